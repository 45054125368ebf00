//! The online half: which commit a revision is and what files it has (the Hub's repository-info API), then the
//! missing files through `hf-hub`, checked against the sizes and hashes the Hub gave.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::tokio::{ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};
use reqwest::StatusCode;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::cache::{CONFIG_FILE, OPTIONAL_FILES, TOKENIZER_FILE, needed_files};
use super::progress::Reporter;
use super::{FILE_ATTEMPTS, FetchOptions, HubCache, HubError, HubRepo, HubSettings, Snapshot};
use crate::weights::{INDEX_FILE, SINGLE_FILE};

/// The Hub's machine-readable reason for a refusal.
const ERROR_CODE_HEADER: &str = "x-error-code";
/// The Hub's human-readable reason for a refusal.
const ERROR_MESSAGE_HEADER: &str = "x-error-message";
/// Seconds waited before the n-th retry of a file (doubling).
const RETRY_BASE: Duration = Duration::from_secs(1);
/// Requests to the repository-info API give up after this long (file downloads have no overall limit).
const INFO_TIMEOUT: Duration = Duration::from_secs(60);

/// `GET /api/models/{repo}/revision/{revision}?blobs=true`.
#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

impl Sibling {
    fn size(&self) -> Option<u64> {
        self.lfs.as_ref().map(|l| l.size).or(self.size)
    }
}

pub(super) async fn fetch(
    repo: &HubRepo,
    settings: &HubSettings,
    options: FetchOptions,
    cache: &HubCache,
) -> Result<Snapshot, HubError> {
    let endpoint = settings.endpoint.clone();
    let api = ApiBuilder::new()
        .with_endpoint(endpoint.clone())
        .with_cache_dir(settings.cache.clone())
        .with_token(settings.token.clone())
        .with_progress(false)
        .with_max_files(options.parallel.max(1))
        .with_chunk_size(Some(options.chunk_size))
        .with_user_agent("baleen", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| HubError::Client(e.to_string()))?;

    let info = repo_info(&api, repo, &endpoint).await?;
    let commit = info.sha.clone();
    let files = select_files(repo, &info)?;
    let snapshot_dir = cache.snapshot_dir(&repo.repo, &commit);
    let missing: Vec<&Sibling> = files.iter().copied().filter(|f| !snapshot_dir.join(&f.rfilename).is_file()).collect();
    let bytes: u64 = missing.iter().filter_map(|f| f.size()).sum();
    tracing::info!(
        model = %repo, commit, files = files.len(), missing = missing.len(), bytes,
        "resolved the revision on the Hub"
    );
    if !missing.is_empty() {
        check_space(repo, cache.root(), bytes)?;
        // Pinned to the commit, so every file comes from the same one even if the branch moves meanwhile.
        let pinned = api.repo(Repo::with_revision(repo.repo.clone(), RepoType::Model, commit.clone()));
        let reporter = Reporter::start(repo.to_string(), bytes, settings.bars);
        for file in &missing {
            let path = download(repo, &pinned, file, &reporter, &endpoint).await?;
            verify(repo, file, &path).await?;
        }
        reporter.finish();
        // hf-hub records the pinned commit as a ref named after itself; the Hub's own client records none.
        if repo.revision() != commit {
            let _ = std::fs::remove_file(cache.repo_dir(&repo.repo).join("refs").join(&commit));
        }
    }
    cache.write_ref(repo, &commit)?;
    let needed = needed_files(&snapshot_dir).map_err(|missing| HubError::Unusable {
        repo: repo.repo.clone(),
        revision: repo.revision().to_string(),
        reason: format!("the downloaded snapshot lacks {missing}, which its files name"),
    })?;
    Ok(Snapshot { dir: snapshot_dir, commit, files: needed.len(), downloaded_bytes: bytes, from_cache: false })
}

async fn repo_info(api: &hf_hub::api::tokio::Api, repo: &HubRepo, endpoint: &str) -> Result<RepoInfo, HubError> {
    let request = api
        .repo(Repo::with_revision(repo.repo.clone(), RepoType::Model, repo.revision().to_string()))
        .info_request()
        .query(&[("blobs", "true")])
        .timeout(INFO_TIMEOUT);
    let response = request.send().await.map_err(|e| unreachable(endpoint, &e))?;
    let status = response.status();
    if !status.is_success() {
        let header =
            |name| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string).unwrap_or_default();
        return Err(refusal(repo, endpoint, status, &header(ERROR_CODE_HEADER), &header(ERROR_MESSAGE_HEADER)));
    }
    response.json::<RepoInfo>().await.map_err(|e| HubError::Http {
        repo: repo.repo.clone(),
        what: "repository info".into(),
        endpoint: endpoint.to_string(),
        status: status.as_u16(),
        detail: format!(": unexpected answer: {e}"),
    })
}

/// The error for a refused repository-info request, from the Hub's `X-Error-Code` when it gives one.
fn refusal(repo: &HubRepo, endpoint: &str, status: StatusCode, code: &str, message: &str) -> HubError {
    let (name, endpoint_s) = (repo.repo.clone(), endpoint.to_string());
    let detail = if message.is_empty() { String::new() } else { format!(" ({message})") };
    match (code, status.as_u16()) {
        ("RepoNotFound", _) | ("", 404) => HubError::RepoNotFound { repo: name, endpoint: endpoint_s },
        ("RevisionNotFound", _) => HubError::RevisionNotFound { repo: name, revision: repo.revision().to_string() },
        ("GatedRepo", _) => HubError::Gated { repo: name, endpoint: endpoint_s, detail },
        (_, status @ (401 | 403)) => HubError::Denied { repo: name, endpoint: endpoint_s, status, detail },
        (_, status) => {
            HubError::Http { repo: name, what: "repository info".into(), endpoint: endpoint_s, status, detail }
        }
    }
}

fn unreachable(endpoint: &str, error: &reqwest::Error) -> HubError {
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        reason = format!("{reason}: {cause}");
        source = cause.source();
    }
    HubError::Unreachable { endpoint: endpoint.to_string(), reason }
}

/// The top-level files the loader reads: config.json, tokenizer.json, the safetensors weights (and their index),
/// and the optional tokenizer and generation files the repository has.
fn select_files<'a>(repo: &HubRepo, info: &'a RepoInfo) -> Result<Vec<&'a Sibling>, HubError> {
    let unusable =
        |reason: String| HubError::Unusable { repo: repo.repo.clone(), revision: repo.revision().to_string(), reason };
    let top: Vec<&Sibling> = info.siblings.iter().filter(|s| !s.rfilename.contains('/')).collect();
    let has = |name: &str| top.iter().any(|s| s.rfilename == name);
    for required in [CONFIG_FILE, TOKENIZER_FILE] {
        if !has(required) {
            return Err(unusable(format!("the repository has no {required}, which Baleen needs")));
        }
    }
    let weights = top.iter().any(|s| s.rfilename.ends_with(".safetensors"));
    if !weights || !(has(SINGLE_FILE) || has(INDEX_FILE)) {
        return Err(unusable(format!(
            "the repository has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE} with its shards); Baleen \
             loads safetensors only"
        )));
    }
    let mut files: Vec<&Sibling> = top
        .into_iter()
        .filter(|s| {
            let n = s.rfilename.as_str();
            n == CONFIG_FILE
                || n == TOKENIZER_FILE
                || n == INDEX_FILE
                || OPTIONAL_FILES.contains(&n)
                || n.ends_with(".safetensors")
        })
        .collect();
    // Small files first: a repository that is not a usable model fails before gigabytes move.
    files.sort_by_key(|s| (s.rfilename.ends_with(".safetensors"), s.rfilename.clone()));
    Ok(files)
}

fn check_space(repo: &HubRepo, root: &Path, needed: u64) -> Result<(), HubError> {
    std::fs::create_dir_all(root).map_err(|e| HubError::io(root, e))?;
    let free = fs2::available_space(root).map_err(|e| HubError::io(root, e))?;
    if needed > free {
        return Err(HubError::DiskFull { repo: repo.repo.clone(), dir: root.to_path_buf(), needed, free });
    }
    Ok(())
}

/// Downloads one file into the cache, retrying (and so resuming) up to [`FILE_ATTEMPTS`] times on errors that
/// may pass: a broken connection, a 5xx or 429 answer.
async fn download(
    repo: &HubRepo,
    pinned: &hf_hub::api::tokio::ApiRepo,
    file: &Sibling,
    reporter: &Reporter,
    endpoint: &str,
) -> Result<PathBuf, HubError> {
    let name = file.rfilename.as_str();
    let mut attempt = 1;
    loop {
        let error = match pinned.download_with_progress(name, reporter.file()).await {
            Ok(path) => return Ok(path),
            Err(error) => error,
        };
        let failure = file_error(repo, name, endpoint, &error);
        if attempt >= FILE_ATTEMPTS || !retryable(&error) {
            return Err(failure);
        }
        let wait = RETRY_BASE * 2u32.pow(attempt - 1);
        tracing::warn!(file = name, attempt, error = %failure, wait_s = wait.as_secs(), "download failed; resuming");
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

fn status_of(error: &ApiError) -> Option<StatusCode> {
    match error {
        ApiError::RequestError(e) => e.status(),
        ApiError::TooManyRetries(inner) => status_of(inner),
        _ => None,
    }
}

fn retryable(error: &ApiError) -> bool {
    match error {
        ApiError::RequestError(e) => {
            e.status().is_none_or(|s| s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS)
        }
        ApiError::TooManyRetries(inner) => retryable(inner),
        ApiError::LockAcquisition(_) | ApiError::Join(_) => true,
        _ => false,
    }
}

fn file_error(repo: &HubRepo, file: &str, endpoint: &str, error: &ApiError) -> HubError {
    if let ApiError::IoError(io) = error
        && io.kind() == std::io::ErrorKind::StorageFull
    {
        return HubError::File {
            repo: repo.repo.clone(),
            file: file.into(),
            reason: format!("the disk is full: {io}"),
        };
    }
    let reason = match status_of(error) {
        Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
            format!("{endpoint} refused access ({error}): check HF_TOKEN")
        }
        Some(StatusCode::NOT_FOUND) => format!("{endpoint} has no such file at this commit ({error})"),
        _ => match error {
            ApiError::LockAcquisition(lock) => {
                format!("another process is downloading it (lock {} held)", lock.display())
            }
            other => {
                let mut text = other.to_string();
                let mut source = std::error::Error::source(other);
                while let Some(cause) = source {
                    text = format!("{text}: {cause}");
                    source = cause.source();
                }
                text
            }
        },
    };
    HubError::File { repo: repo.repo.clone(), file: file.into(), reason }
}

/// Checks a downloaded file's size, and its SHA-256 when the Hub gave one; removes it from the cache if wrong.
async fn verify(repo: &HubRepo, file: &Sibling, path: &Path) -> Result<(), HubError> {
    let corrupt = |reason: String| {
        let blob = std::fs::canonicalize(path).ok();
        let _ = std::fs::remove_file(path);
        if let Some(blob) = blob {
            let _ = std::fs::remove_file(blob);
        }
        HubError::Corrupt { repo: repo.repo.clone(), file: file.rfilename.clone(), reason }
    };
    let len = std::fs::metadata(path).map_err(|e| HubError::io(path, e))?.len();
    if let Some(size) = file.size()
        && size != len
    {
        return Err(corrupt(format!("the Hub lists {size} bytes, the download has {len}")));
    }
    let Some(lfs) = &file.lfs else { return Ok(()) };
    let owned = path.to_path_buf();
    let digest = tokio::task::spawn_blocking(move || sha256_file(&owned))
        .await
        .map_err(|e| HubError::Client(format!("checksum task: {e}")))?
        .map_err(|e| HubError::io(path, e))?;
    if !digest.eq_ignore_ascii_case(&lfs.sha256) {
        return Err(corrupt(format!("SHA-256 is {digest}, the Hub lists {}", lfs.sha256)));
    }
    Ok(())
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> HubRepo {
        HubRepo { repo: "org/m".into(), revision: Some("v2".into()) }
    }

    fn info(files: &[&str]) -> RepoInfo {
        RepoInfo {
            sha: "0".repeat(40),
            siblings: files.iter().map(|f| Sibling { rfilename: f.to_string(), size: Some(1), lfs: None }).collect(),
        }
    }

    #[test]
    fn only_the_files_the_loader_reads_are_fetched_small_ones_first() {
        let info = info(&[
            "model-00002-of-00002.safetensors",
            "README.md",
            "config.json",
            "model.safetensors.index.json",
            "figures/x.png",
            "model-00001-of-00002.safetensors",
            "tokenizer.json",
            "modeling_deepseek.py",
            "tokenizer_config.json",
            "pytorch_model.bin",
            "sub/model.safetensors",
        ]);
        let names: Vec<&str> = select_files(&repo(), &info).unwrap().iter().map(|s| s.rfilename.as_str()).collect();
        assert_eq!(
            names,
            [
                "config.json",
                "model.safetensors.index.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
    }

    #[test]
    fn a_repository_that_is_not_a_loadable_model_is_refused_with_what_is_missing() {
        let err = select_files(&repo(), &info(&["config.json", "tokenizer.json", "pytorch_model.bin"])).unwrap_err();
        assert!(err.to_string().starts_with("org/m@v2: ") && err.to_string().contains("safetensors"), "{err}");
        let err = select_files(&repo(), &info(&["config.json", "model.safetensors"])).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn refusals_say_what_to_do() {
        let r = repo();
        let e = |code, status| refusal(&r, "https://hub", StatusCode::from_u16(status).unwrap(), code, "").to_string();
        assert!(e("RepoNotFound", 401).contains("no such model repository"));
        assert!(e("", 404).contains("no such model repository"));
        assert!(e("RevisionNotFound", 404).contains("revision `v2` does not exist"));
        assert!(e("GatedRepo", 401).contains("is gated") && e("GatedRepo", 401).contains("HF_TOKEN"));
        assert!(e("", 403).contains("access denied") && e("", 403).contains("HF_TOKEN"));
        assert!(e("", 500).contains("HTTP 500"));
    }
}
