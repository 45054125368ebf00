//! The runtime's one error type. Each variant is a class a caller can act on; the message names the
//! field, tensor or file at fault.

use std::path::PathBuf;

/// Result alias used throughout the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `config.json` field is missing, malformed or has a value this runtime does not implement.
    #[error("config.json: field `{field}`: {reason}")]
    Config { field: String, reason: String },

    /// A tensor is missing from the checkpoint, has the wrong shape or an unsupported dtype.
    #[error("weights: tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },

    /// The checkpoint directory is not laid out as a Hugging Face model directory.
    #[error("weights: {0}")]
    Checkpoint(String),

    /// Tokenizer files are missing or malformed, or encoding/decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),

    /// A request was refused by the engine (the model's limits, a full queue, draining).
    #[error(transparent)]
    Submit(#[from] crate::engine::errors::SubmitError),

    /// The engine failed a request it had accepted.
    #[error("engine: {0}")]
    Engine(#[from] crate::engine::errors::EngineError),

    /// A broken invariant inside the runtime: a batch, cache block, expert assignment or kernel input that the
    /// code calling it should never have built. Names a bug (HTTP 500), never a fault of the request.
    #[error("internal error in the {part}: {detail}")]
    Internal { part: Part, detail: String },

    /// One named request parameter is invalid: `param` is its API name (`temperature`, `logit_bias`, ...), so the
    /// HTTP layer reports it without parsing the message.
    #[error("`{param}` {reason}")]
    InvalidParam { param: &'static str, reason: String },

    /// A command-line or environment setting is invalid (device, dtype, threads).
    #[error("invalid setting `{name}`: {reason}")]
    Setting { name: String, reason: String },

    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}: invalid JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// One of Baleen's own device kernels could not run: this build or device has none, or its inputs have shapes
    /// or dtypes it does not take (callers check before choosing a kernel, so this names a bug or a missing build
    /// feature).
    #[error("device kernel: {0}")]
    Kernel(String),

    /// A metric could not be created or registered (a bad name or label, a duplicate).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),

    /// The HTTP server could not bind, serve or shut down.
    #[error("server: {0}")]
    Server(String),

    /// The expert-parallel transport failed: a peer is down or unreachable, its stream broke, a dispatch timed
    /// out, the handshake found mismatched fingerprints, or the peer reported a failed computation. The message
    /// names the peer (rank and address).
    #[error("expert transport: {0}")]
    Expert(String),

    /// A Hugging Face Hub model could not be resolved or downloaded.
    #[error("model download: {0}")]
    Hub(#[from] crate::hub::HubError),
}

/// Where an [`Error::Internal`] happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// A forward pass's batch: sequences, block tables, positions.
    Batch,
    /// The paged latent KV cache.
    KvCache,
    /// Multi-head latent attention.
    Attention,
    /// Routed or shared experts, their assignment and packing.
    Experts,
    /// The host (CPU) matmul, norm and SwiGLU kernels.
    HostKernels,
    /// Token sampling.
    Sampler,
    /// A structured-output grammar.
    Grammar,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Batch => "batch",
            Self::KvCache => "KV cache",
            Self::Attention => "attention",
            Self::Experts => "experts",
            Self::HostKernels => "host kernels",
            Self::Sampler => "sampler",
            Self::Grammar => "grammar",
        })
    }
}

impl Error {
    pub fn internal(part: Part, detail: impl Into<String>) -> Self {
        Self::Internal { part, detail: detail.into() }
    }

    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config { field: field.into(), reason: reason.into() }
    }

    pub fn tensor(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Tensor { name: name.into(), reason: reason.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
