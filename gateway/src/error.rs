//! The gateway's errors (start-up and serving); request failures are `baleen_api::http::ApiError` answers.

use std::path::PathBuf;

/// What can stop the gateway from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The static discovery file cannot be read.
    #[error("cannot read the gateway config {path}: {source}")]
    ReadConfig { path: PathBuf, source: std::io::Error },
    /// The static discovery file is not YAML of the documented shape (unknown keys included).
    #[error("invalid gateway config {path}: {source}")]
    ParseConfig { path: PathBuf, source: serde_yaml::Error },
    /// A setting or a field of the static file is out of range; `field` names it.
    #[error("invalid gateway setting `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    /// An event loop of the API port (its thread or runtime) could not be started.
    #[error("cannot start event loop {index} of the API port: {source}")]
    EventLoop { index: usize, source: std::io::Error },
    /// The listening line could not be written to stdout.
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
    /// The Kubernetes client could not be configured (no in-cluster config or kubeconfig).
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// A Prometheus query failed or answered something other than one number.
    #[error("prometheus query `{query}`: {reason}")]
    Prometheus { query: String, reason: String },
    /// Registering a metric failed (a programming error: a duplicate name).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
