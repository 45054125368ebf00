//! Shared by the Rust integration tests that start real runtime processes (`#[path]`-included): where the
//! `baleen-runtime` binary is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The runtime binary: `BALEEN_RUNTIME_BIN`, else `target/<profile>/baleen-runtime` beside this test's
/// binaries — `cargo test --workspace` builds it first; under `cargo test -p <one crate>` it is built here when
/// missing.
pub fn runtime_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("BALEEN_RUNTIME_BIN") {
            return PathBuf::from(path);
        }
        // target/<profile>/deps/<test>-<hash>
        let exe = std::env::current_exe().expect("the test binary's path");
        let dir = exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf();
        let bin = dir.join("baleen-runtime");
        if !bin.exists() {
            let profile = match dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") | None => "dev",
                Some(other) => other,
            };
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", "baleen-runtime", "--bin", "baleen-runtime", "--profile", profile])
                .status()
                .expect("running cargo build");
            assert!(status.success(), "building baleen-runtime failed");
        }
        assert!(bin.exists(), "{} is missing", bin.display());
        bin
    })
}
