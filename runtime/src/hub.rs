//! Models from the Hugging Face Hub: `hf://org/name[@revision]` (or a bare `org/name` that is not a directory
//! here, as vLLM takes it) resolved to a snapshot directory of the standard Hub cache, downloading what is missing
//! through the `hf-hub` crate.
//!
//! - The cache is the one `huggingface_hub` and vLLM use (`models--org--name/{blobs,refs,snapshots}` under
//!   `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`): a model one of them downloaded is
//!   served from it, and ours is theirs.
//! - Only the files the loader reads are fetched: `config.json`, the tokenizer files, the safetensors shards and
//!   their index. All of them come from one commit (the revision is resolved to its commit first).
//! - Each file downloads as ranged requests into `blobs/<etag>.sync.part`; an interrupted download resumes from
//!   its last complete chunk. A file appears in the snapshot only once complete, its size checked, and its
//!   SHA-256 for the large (LFS) files whose hash the Hub gives, so a half-downloaded model is never loaded.
//! - `HF_TOKEN` (else `$HF_HOME/token`) for gated and private repositories, `HF_ENDPOINT` for mirrors,
//!   `HF_HUB_OFFLINE=1` to use the cache only.
//!
//! [`Fetch::PreferCache`] (serving) makes no request when the cache holds a complete snapshot of the revision;
//! [`Fetch::Refresh`] (`baleen-runtime download`) asks the Hub which commit the revision is now, and falls back on
//! the cached snapshot when the Hub cannot be reached.

mod cache;
mod fetch;
mod progress;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use baleen_api::names::{
    BUILTIN_SCHEME, ENV_HF_ENDPOINT, ENV_HF_HOME, ENV_HF_HUB_CACHE, ENV_HF_HUB_OFFLINE, ENV_HOME, ENV_XDG_CACHE_HOME,
    FILE_SCHEME, HF_SCHEME, HF_TOKEN_KEY, PVC_SCHEME,
};
use baleen_api::source::ModelSource as SourceSpec;

pub use cache::HubCache;

/// The Hub, when `HF_ENDPOINT` is unset.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision of a source that names none (the Hub's default branch, as `huggingface_hub` assumes).
pub const DEFAULT_REVISION: &str = "main";
/// Default bytes per ranged request: what an interrupted download loses at most, per request in flight.
pub const DEFAULT_CHUNK_SIZE: usize = 16 << 20;
/// Default ranged requests in flight per file.
pub const DEFAULT_PARALLEL: usize = 8;
/// Tries of one file before its download fails (each resumes where the last stopped).
pub const FILE_ATTEMPTS: u32 = 4;

/// Why a Hub model could not be resolved. Every message names the repository and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The source string is not a Hub model or is malformed.
    #[error("--model `{given}`: {reason}")]
    Source { given: String, reason: String },
    /// The repository does not exist, or is private and the token cannot read it.
    #[error(
        "{repo}: no such model repository on {endpoint} (a private one needs HF_TOKEN set to a token that can read it)"
    )]
    RepoNotFound { repo: String, endpoint: String },
    /// The repository is gated and this token (or no token) has not been granted access.
    #[error(
        "{repo} is gated: accept its conditions at {endpoint}/{repo} and set HF_TOKEN to a token of that account{detail}"
    )]
    Gated { repo: String, endpoint: String, detail: String },
    /// The Hub refused the token (401/403 without a more precise reason).
    #[error("{repo}: access denied by {endpoint} (HTTP {status}): check HF_TOKEN{detail}")]
    Denied { repo: String, endpoint: String, status: u16, detail: String },
    /// The revision (branch, tag or commit) does not exist in the repository.
    #[error("{repo}: revision `{revision}` does not exist (a branch, tag or commit of the repository)")]
    RevisionNotFound { repo: String, revision: String },
    /// The repository exists but is not a model Baleen can load.
    #[error("{repo}@{revision}: {reason}")]
    Unusable { repo: String, revision: String, reason: String },
    /// The Hub answered an unexpected status.
    #[error("{repo}: {what}: {endpoint} answered HTTP {status}{detail}")]
    Http { repo: String, what: String, endpoint: String, status: u16, detail: String },
    /// The Hub could not be reached (DNS, connection, TLS, timeout).
    #[error("cannot reach {endpoint}: {reason} (set HF_HUB_OFFLINE=1 to use the cache only, HF_ENDPOINT for a mirror)")]
    Unreachable { endpoint: String, reason: String },
    /// One file could not be downloaded.
    #[error("{repo}: downloading {file}: {reason}")]
    File { repo: String, file: String, reason: String },
    /// A downloaded file is not what the Hub said it is.
    #[error("{repo}: {file}: {reason}; the file was removed, run again to download it anew")]
    Corrupt { repo: String, file: String, reason: String },
    /// The cache lacks the model and the Hub may not be asked.
    #[error("{repo}@{revision} is not (completely) in the Hub cache {cache}{missing} and {why}")]
    NotCached { repo: String, revision: String, cache: PathBuf, missing: String, why: &'static str },
    /// The files left to download do not fit on the cache's disk.
    #[error("not enough disk space for {repo} in {dir}: {needed} bytes to download, {free} bytes free")]
    DiskFull { repo: String, dir: PathBuf, needed: u64, free: u64 },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The client could not be set up (home directory unknown, TLS backend, a token with invalid characters).
    #[error("Hugging Face Hub client: {0}")]
    Client(String),
}

impl HubError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

/// A Hub model repository at a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRepo {
    /// `org/name`.
    pub repo: String,
    /// Branch, tag or commit; `None` = [`DEFAULT_REVISION`].
    pub revision: Option<String>,
}

impl HubRepo {
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or(DEFAULT_REVISION)
    }
}

impl std::fmt::Display for HubRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.revision {
            Some(rev) => write!(f, "{HF_SCHEME}{}@{rev}", self.repo),
            None => write!(f, "{HF_SCHEME}{}", self.repo),
        }
    }
}

/// What `--model` names: something on this machine (a directory or `builtin:NAME`), or a Hub repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A model directory or `builtin:NAME`, as the loader takes it (`file://` stripped).
    Local(String),
    Hub(HubRepo),
}

impl ModelRef {
    /// `hf://org/name[@revision]` → Hub; `file:///path` → that path; `builtin:NAME` and existing paths → local;
    /// a bare `org/name` that is not a path here → Hub (vLLM's rule); `pvc://` is refused (a cluster's).
    pub fn parse(spec: &str) -> Result<Self, HubError> {
        let bad = |reason: String| HubError::Source { given: spec.to_string(), reason };
        if spec.starts_with(HF_SCHEME) || spec.starts_with(FILE_SCHEME) || spec.starts_with(PVC_SCHEME) {
            return match SourceSpec::from_str(spec).map_err(|e| bad(e.to_string()))? {
                SourceSpec::HuggingFace { repo, revision } => Ok(Self::Hub(HubRepo { repo, revision })),
                SourceSpec::File { path } => Ok(Self::Local(path)),
                _ => Err(bad(
                    "pvc:// sources exist in a cluster only; give the directory the claim is mounted at".into()
                )),
            };
        }
        if spec.starts_with(BUILTIN_SCHEME) || Path::new(spec).exists() || !is_repo_id(spec) {
            return Ok(Self::Local(spec.to_string()));
        }
        Ok(Self::Hub(HubRepo { repo: spec.to_string(), revision: None }))
    }
}

/// `org/name` with the Hub's characters (letters, digits, `-`, `_`, `.`), neither part starting with `.` or `-`.
fn is_repo_id(spec: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(spec.split_once('/'), Some((org, name)) if part_ok(org) && part_ok(name))
}

/// Where the Hub is and how to reach it, from the environment (`huggingface_hub`'s variables).
#[derive(Clone)]
pub struct HubSettings {
    pub endpoint: String,
    /// The Hub cache directory (the one holding `models--org--name`).
    pub cache: PathBuf,
    pub token: Option<String>,
    /// Never reach the Hub.
    pub offline: bool,
    /// Progress bars (a terminal) rather than periodic log lines.
    pub bars: bool,
}

impl std::fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("cache", &self.cache)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .finish()
    }
}

impl HubSettings {
    pub fn from_env() -> Result<Self, HubError> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// [`HubSettings::from_env`] over any variable source (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, HubError> {
        // The Hugging Face home: where the token file is, and the cache unless HF_HUB_CACHE names it.
        let home = var(ENV_HF_HOME).map(PathBuf::from).or_else(|| match (var(ENV_XDG_CACHE_HOME), var(ENV_HOME)) {
            (Some(xdg), _) => Some(Path::new(&xdg).join("huggingface")),
            (None, Some(home)) => Some(Path::new(&home).join(".cache").join("huggingface")),
            (None, None) => None,
        });
        let cache = match (var(ENV_HF_HUB_CACHE), &home) {
            (Some(cache), _) => PathBuf::from(cache),
            (None, Some(home)) => home.join("hub"),
            (None, None) => {
                return Err(HubError::Client(format!(
                    "no cache directory: set {ENV_HF_HUB_CACHE} or {ENV_HF_HOME} (HOME is unset)"
                )));
            }
        };
        let token = var(HF_TOKEN_KEY).or_else(|| {
            let text = std::fs::read_to_string(home.as_ref()?.join("token")).ok()?;
            Some(text.trim().to_string()).filter(|t| !t.is_empty())
        });
        let offline = var(ENV_HF_HUB_OFFLINE)
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        let endpoint = var(ENV_HF_ENDPOINT).unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Ok(Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            cache,
            token,
            offline,
            bars: std::io::stderr().is_terminal(),
        })
    }
}

/// Whether to ask the Hub when the cache already holds the revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// A complete cached snapshot is used without any request (serving).
    PreferCache,
    /// Ask the Hub which commit the revision is now and fetch what is missing (`download`); the cached snapshot
    /// is used when the Hub cannot be reached.
    Refresh,
}

/// How files are downloaded.
#[derive(Debug, Clone, Copy)]
pub struct FetchOptions {
    pub chunk_size: usize,
    pub parallel: usize,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self { chunk_size: DEFAULT_CHUNK_SIZE, parallel: DEFAULT_PARALLEL }
    }
}

/// A resolved model: its snapshot directory and what it took.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub commit: String,
    /// Files in the snapshot the loader reads.
    pub files: usize,
    /// Bytes downloaded by this call (0 when the cache had everything).
    pub downloaded_bytes: u64,
    /// True when the snapshot came from the cache without asking the Hub.
    pub from_cache: bool,
}

/// Resolves `repo` to a complete snapshot directory, downloading what is missing unless offline. Runs its own
/// tokio runtime and shuts it down (its threads joined) before returning, so callers may still be
/// single-threaded afterwards.
///
/// The runtime is single-threaded on purpose: its tasks then run in the order they were spawned, so hf-hub's
/// chunks of a file take the download slots in file order. hf-hub resumes an interrupted file from the end of the
/// longest run of finished chunks from its start (the count it keeps in the `.sync.part` file); on a
/// multi-threaded runtime the last chunk spawned may run first, and a kill then loses every finished chunk after
/// the first one still missing. Hashing runs on the blocking pool, off this thread.
pub fn resolve_blocking(
    repo: &HubRepo,
    settings: &HubSettings,
    fetch: Fetch,
    options: FetchOptions,
) -> Result<Snapshot, HubError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| HubError::Client(format!("cannot start the download runtime: {e}")))?;
    let result = runtime.block_on(resolve(repo, settings, fetch, options));
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

pub async fn resolve(
    repo: &HubRepo,
    settings: &HubSettings,
    fetch: Fetch,
    options: FetchOptions,
) -> Result<Snapshot, HubError> {
    let cache = HubCache::new(settings.cache.clone());
    let cached = cache.complete_snapshot(repo);
    if let Some(snapshot) = &cached
        && (fetch == Fetch::PreferCache || settings.offline)
    {
        tracing::info!(model = %repo, dir = %snapshot.dir.display(), "using the cached snapshot");
        return Ok(snapshot.clone());
    }
    if settings.offline {
        return Err(cache.not_cached(repo, "HF_HUB_OFFLINE is set"));
    }
    match fetch::fetch(repo, settings, options, &cache).await {
        Err(HubError::Unreachable { endpoint, reason }) if cached.is_some() => {
            tracing::warn!(model = %repo, %endpoint, %reason, "the Hub cannot be reached: using the cached snapshot");
            cached.ok_or(HubError::Unreachable { endpoint, reason })
        }
        other => other,
    }
}

/// Parses a byte size: digits with an optional `K`, `M` or `G` (powers of 1024; `KiB`/`MiB`/`GiB` too).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let shift = match unit.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        _ => return Err(format!("`{text}`: expected a byte count such as 262144, 256K or 16M")),
    };
    let n: usize = number.parse().map_err(|_| format!("`{text}`: expected a byte count such as 256K or 16M"))?;
    match n.checked_shl(shift).filter(|v| *v > 0 && v >> shift == n) {
        Some(v) => Ok(v),
        None => Err(format!("`{text}`: must be above 0 and fit in memory")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(repo: &str, revision: Option<&str>) -> ModelRef {
        ModelRef::Hub(HubRepo { repo: repo.into(), revision: revision.map(Into::into) })
    }

    #[test]
    fn model_refs() {
        assert_eq!(
            ModelRef::parse("hf://deepseek-ai/DeepSeek-V2-Lite").unwrap(),
            hub("deepseek-ai/DeepSeek-V2-Lite", None)
        );
        assert_eq!(ModelRef::parse("hf://a/b@v1.0").unwrap(), hub("a/b", Some("v1.0")));
        assert_eq!(ModelRef::parse("deepseek-ai/DeepSeek-V3").unwrap(), hub("deepseek-ai/DeepSeek-V3", None));
        assert_eq!(ModelRef::parse("builtin:tiny-moe").unwrap(), ModelRef::Local("builtin:tiny-moe".into()));
        assert_eq!(ModelRef::parse("file:///models/x").unwrap(), ModelRef::Local("/models/x".into()));
        assert_eq!(ModelRef::parse("/models/x").unwrap(), ModelRef::Local("/models/x".into()));
        assert_eq!(ModelRef::parse("./x/y").unwrap(), ModelRef::Local("./x/y".into()));
        assert_eq!(ModelRef::parse("a/b/c").unwrap(), ModelRef::Local("a/b/c".into()));
        // A relative directory that exists is a directory, not a repository (tests run in the crate's directory).
        assert!(Path::new("tests/fixtures").is_dir());
        assert_eq!(ModelRef::parse("tests/fixtures").unwrap(), ModelRef::Local("tests/fixtures".into()));
        for bad in ["hf://a", "hf://a/b@", "pvc://claim/x", "file://relative"] {
            let err = ModelRef::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn settings_follow_huggingface_hub_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let s = HubSettings::from_vars(vars(&[("HOME", "/home/u")])).unwrap();
        assert_eq!(s.cache, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(s.endpoint, DEFAULT_ENDPOINT);
        assert!(!s.offline && s.token.is_none());
        let s = HubSettings::from_vars(vars(&[
            ("HOME", "/home/u"),
            ("HF_HOME", "/hf"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_HUB_OFFLINE", "True"),
            ("HF_TOKEN", "hf_x"),
        ]))
        .unwrap();
        assert_eq!(s.cache, PathBuf::from("/hf/hub"));
        assert_eq!(s.endpoint, "http://127.0.0.1:9");
        assert!(s.offline);
        assert_eq!(s.token.as_deref(), Some("hf_x"));
        assert!(!format!("{s:?}").contains("hf_x"), "the token is never printed");
        let s = HubSettings::from_vars(vars(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/c"), ("HF_HUB_OFFLINE", "0")]))
            .unwrap();
        assert_eq!(s.cache, PathBuf::from("/c"));
        assert!(!s.offline);
        let s = HubSettings::from_vars(vars(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/home/u")])).unwrap();
        assert_eq!(s.cache, PathBuf::from("/x/huggingface/hub"));
        assert!(HubSettings::from_vars(vars(&[])).is_err());
        // A container without HOME (the operator's download init container) needs only HF_HUB_CACHE.
        let s = HubSettings::from_vars(vars(&[("HF_HUB_CACHE", "/models/hf")])).unwrap();
        assert_eq!((s.cache, s.token), (PathBuf::from("/models/hf"), None));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("262144"), Ok(262144));
        assert_eq!(parse_size("256K"), Ok(256 << 10));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        for bad in ["", "0", "-1", "1T", "K", "1.5M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
