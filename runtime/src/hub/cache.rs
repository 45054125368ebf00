//! The Hub cache on disk, in `huggingface_hub`'s layout:
//!
//! ```text
//! <cache>/models--org--name/refs/<revision>         the commit a branch or tag was when last fetched
//! <cache>/models--org--name/blobs/<etag>            file contents (etag = sha256 for LFS files, git sha1 else)
//! <cache>/models--org--name/snapshots/<commit>/<f>  symlinks into blobs/, one directory per commit
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{HubError, HubRepo, Snapshot};
use crate::weights::{INDEX_FILE, SINGLE_FILE};

/// Files the loader needs besides the weights.
pub(super) const CONFIG_FILE: &str = "config.json";
pub(super) const TOKENIZER_FILE: &str = "tokenizer.json";
/// Files the loader reads when present (tokenizer settings, chat template, generation defaults).
pub(super) const OPTIONAL_FILES: [&str; 4] =
    ["tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja"];

#[derive(Debug, Clone)]
pub struct HubCache {
    root: PathBuf,
}

#[derive(Deserialize)]
struct Index {
    weight_map: std::collections::HashMap<String, String>,
}

impl HubCache {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<cache>/models--org--name`.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root.join(format!("models--{}", repo.replace('/', "--")))
    }

    pub fn snapshot_dir(&self, repo: &str, commit: &str) -> PathBuf {
        self.repo_dir(repo).join("snapshots").join(commit)
    }

    fn ref_path(&self, repo: &str, revision: &str) -> PathBuf {
        self.repo_dir(repo).join("refs").join(revision)
    }

    /// The commit `repo`'s revision was when last fetched: the revision itself when it is a full commit hash.
    pub fn commit(&self, repo: &HubRepo) -> Option<String> {
        let revision = repo.revision();
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.ref_path(&repo.repo, revision)).ok()?;
        Some(text.trim().to_string()).filter(|c| is_commit(c))
    }

    /// Records that `repo`'s revision is `commit` (nothing for a commit hash, as `huggingface_hub` does).
    pub(super) fn write_ref(&self, repo: &HubRepo, commit: &str) -> Result<(), HubError> {
        let revision = repo.revision();
        if revision == commit {
            return Ok(());
        }
        let path = self.ref_path(&repo.repo, revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| HubError::io(parent, e))?;
        }
        std::fs::write(&path, commit).map_err(|e| HubError::io(&path, e))
    }

    /// The cached snapshot of `repo` when every file the loader needs is in it.
    pub fn complete_snapshot(&self, repo: &HubRepo) -> Option<Snapshot> {
        let commit = self.commit(repo)?;
        let dir = self.snapshot_dir(&repo.repo, &commit);
        let needed = needed_files(&dir).ok()?;
        Some(Snapshot { dir, commit, files: needed.len(), downloaded_bytes: 0, from_cache: true })
    }

    /// [`HubError::NotCached`], saying what is missing.
    pub(super) fn not_cached(&self, repo: &HubRepo, why: &'static str) -> HubError {
        let missing = match self.commit(repo) {
            None => String::new(),
            Some(commit) => match needed_files(&self.snapshot_dir(&repo.repo, &commit)) {
                Err(missing) => format!(" (snapshot {commit} lacks {missing})"),
                Ok(_) => String::new(),
            },
        };
        HubError::NotCached {
            repo: repo.repo.clone(),
            revision: repo.revision().to_string(),
            cache: self.root.clone(),
            missing,
            why,
        }
    }
}

/// A full 40-hex-digit commit hash.
pub(super) fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The files of `dir` the loader reads, or the first one missing: config.json, tokenizer.json, the weights
/// (model.safetensors, or the index and every shard it names), and the optional files present.
pub(super) fn needed_files(dir: &Path) -> Result<BTreeSet<String>, String> {
    let mut files = BTreeSet::new();
    for name in [CONFIG_FILE, TOKENIZER_FILE] {
        if !dir.join(name).is_file() {
            return Err(name.to_string());
        }
        files.insert(name.to_string());
    }
    if dir.join(SINGLE_FILE).is_file() {
        files.insert(SINGLE_FILE.to_string());
    } else {
        let text = std::fs::read_to_string(dir.join(INDEX_FILE)).map_err(|_| SINGLE_FILE.to_string())?;
        let index: Index = serde_json::from_str(&text).map_err(|_| format!("a valid {INDEX_FILE}"))?;
        files.insert(INDEX_FILE.to_string());
        for shard in index.weight_map.into_values() {
            if !dir.join(&shard).is_file() {
                return Err(shard);
            }
            files.insert(shard);
        }
    }
    files.extend(OPTIONAL_FILES.iter().filter(|f| dir.join(f).is_file()).map(|f| f.to_string()));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn a_snapshot_is_complete_only_with_every_file_the_loader_reads() {
        let root = std::env::temp_dir().join(format!("baleen-hub-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cache = HubCache::new(root.clone());
        let repo = HubRepo { repo: "org/name".into(), revision: None };
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert!(cache.complete_snapshot(&repo).is_none(), "no ref yet");
        cache.write_ref(&repo, commit).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("models--org--name/refs/main")).unwrap(), commit);
        let dir = cache.snapshot_dir("org/name", commit);
        touch(&dir, CONFIG_FILE, "{}");
        touch(&dir, TOKENIZER_FILE, "{}");
        touch(&dir, INDEX_FILE, r#"{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}"#);
        touch(&dir, "model-1.safetensors", "");
        assert!(cache.complete_snapshot(&repo).is_none());
        assert!(cache.not_cached(&repo, "offline").to_string().contains("lacks model-2.safetensors"));
        touch(&dir, "model-2.safetensors", "");
        touch(&dir, "generation_config.json", "{}");
        let snapshot = cache.complete_snapshot(&repo).unwrap();
        assert_eq!((snapshot.dir, snapshot.files, snapshot.from_cache), (dir, 6, true));
        // A commit hash is its own revision: no ref is read or written.
        let pinned = HubRepo { repo: "org/name".into(), revision: Some(commit.into()) };
        cache.write_ref(&pinned, commit).unwrap();
        assert!(!root.join("models--org--name/refs").join(commit).exists());
        assert!(cache.complete_snapshot(&pinned).is_some());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
