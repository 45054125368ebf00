//! Errors of `baleen`.

use std::path::PathBuf;
use std::time::Duration;

use baleen_api::crd::ManifestError;

/// Everything that can stop `baleen up` before or while it serves.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value is not acceptable.
    #[error("{name}: {reason}")]
    Setting { name: &'static str, reason: String },
    /// The manifest file could not be read.
    #[error("reading the manifest {}", path.display())]
    ReadManifest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not a valid ModelDeployment.
    #[error("invalid manifest {}", path.display())]
    Manifest {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    /// The manifest is valid, but asks for something `baleen up` cannot do on one machine (yet).
    #[error("`{field}`: {reason}")]
    Unsupported { field: &'static str, reason: String },
    /// No `baleen-runtime` binary was found.
    #[error(
        "cannot find the `baleen-runtime` binary (looked in: {}). Build it with `cargo build --release` (it lands \
         next to `baleen` in target/release/), or point --runtime-bin or BALEEN_RUNTIME_BIN at it",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    RuntimeNotFound { searched: Vec<PathBuf> },
    /// `--runtime-bin` (or its variable) names no file.
    #[error("--runtime-bin {}: no such file; build it with `cargo build --release`", path.display())]
    RuntimeBinMissing { path: PathBuf },
    /// Starting the runtime process failed.
    #[error("starting {}", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The runtime exited before it was ready.
    #[error("the runtime exited before it was ready ({status}); its log above says why")]
    RuntimeFailed { status: std::process::ExitStatus },
    /// `baleen-runtime download` failed (the Hub refused, the network failed, the disk is full, ...).
    #[error("downloading the model failed ({status}); the lines above say why")]
    DownloadFailed { status: std::process::ExitStatus },
    /// The runtime did not become ready in time.
    #[error("the runtime was not ready within {timeout:?} (raise --ready-timeout for large models)")]
    ReadyTimeout { timeout: Duration },
    /// Installing a signal handler, signalling or waiting for the child failed.
    #[error("{what}")]
    Process {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The gateway's port could not be bound.
    #[error("cannot listen on {addr} (another process may hold the port; pick another with --port/--admin-port)")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The in-process gateway refused a setting or failed to start.
    #[error("gateway: {0}")]
    Gateway(#[from] baleen_gateway::Error),
    /// An HTTP GET to the runtime got no answer in time.
    #[error("no answer within {0:?}")]
    ProbeTimeout(Duration),
    /// An HTTP GET to the runtime failed to connect, send or read.
    #[error("HTTP request to the runtime failed")]
    ProbeIo(#[source] std::io::Error),
    /// The runtime's answer was not HTTP/1.x.
    #[error("malformed HTTP response: {0}")]
    ProbeMalformed(&'static str),
}
