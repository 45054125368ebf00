//! Finding the `baleen-runtime` binary: `--runtime-bin` (or `BALEEN_RUNTIME_BIN`), else next to the running
//! `baleen` (cargo puts both in `target/<profile>/`), else on `PATH`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use baleen_api::names::RUNTIME_BIN_NAME;

use crate::error::Error;

/// Where to look, gathered from the process so [`find_runtime`] stays pure.
#[derive(Debug, Clone, Default)]
pub struct SearchPlaces {
    /// `--runtime-bin`, or `BALEEN_RUNTIME_BIN` (clap merges the two).
    pub explicit: Option<PathBuf>,
    /// The running `baleen` binary.
    pub current_exe: Option<PathBuf>,
    /// The `PATH` variable.
    pub path_var: Option<std::ffi::OsString>,
}

impl SearchPlaces {
    /// The places of this process.
    pub fn of_this_process(explicit: Option<PathBuf>) -> Self {
        Self { explicit, current_exe: std::env::current_exe().ok(), path_var: std::env::var_os("PATH") }
    }
}

/// The runtime binary to run; the error lists every place looked at.
pub fn find_runtime(places: &SearchPlaces) -> Result<PathBuf, Error> {
    if let Some(path) = &places.explicit {
        return if is_executable(path) {
            Ok(path.clone())
        } else {
            Err(Error::RuntimeBinMissing { path: path.clone() })
        };
    }
    let mut searched = Vec::new();
    if let Some(dir) = places.current_exe.as_deref().and_then(Path::parent) {
        let candidate = dir.join(RUNTIME_BIN_NAME);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
        searched.push(candidate);
    }
    for dir in std::env::split_paths(places.path_var.as_deref().unwrap_or(OsStr::new(""))) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let candidate = dir.join(RUNTIME_BIN_NAME);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
        searched.push(candidate);
    }
    Err(Error::RuntimeNotFound { searched })
}

fn is_executable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else { return false };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    meta.is_file()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn executable(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn the_flag_wins_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let rt = executable(dir.path(), "my-runtime");
        let places = SearchPlaces { explicit: Some(rt.clone()), ..SearchPlaces::default() };
        assert_eq!(find_runtime(&places).unwrap(), rt);
        let places = SearchPlaces { explicit: Some(dir.path().join("nope")), ..SearchPlaces::default() };
        let err = find_runtime(&places).unwrap_err();
        assert!(matches!(err, Error::RuntimeBinMissing { .. }) && err.to_string().contains("cargo build"), "{err}");
    }

    #[test]
    fn next_to_baleen_comes_before_path() {
        let bin_dir = tempfile::tempdir().unwrap();
        let path_dir = tempfile::tempdir().unwrap();
        let sibling = executable(bin_dir.path(), RUNTIME_BIN_NAME);
        let on_path = executable(path_dir.path(), RUNTIME_BIN_NAME);
        let places = SearchPlaces {
            explicit: None,
            current_exe: Some(bin_dir.path().join("baleen")),
            path_var: Some(path_dir.path().as_os_str().to_owned()),
        };
        assert_eq!(find_runtime(&places).unwrap(), sibling);
        std::fs::remove_file(&sibling).unwrap();
        assert_eq!(find_runtime(&places).unwrap(), on_path);
    }

    #[test]
    fn non_executable_files_are_skipped_and_a_miss_lists_the_places() {
        let bin_dir = tempfile::tempdir().unwrap();
        std::fs::write(bin_dir.path().join(RUNTIME_BIN_NAME), "not executable").unwrap();
        let places = SearchPlaces {
            explicit: None,
            current_exe: Some(bin_dir.path().join("baleen")),
            path_var: Some("/nonexistent-a:/nonexistent-b".into()),
        };
        let err = find_runtime(&places).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent-a/baleen-runtime") && text.contains("cargo build --release"), "{text}");
        assert!(text.contains(&bin_dir.path().display().to_string()), "{text}");
    }
}
