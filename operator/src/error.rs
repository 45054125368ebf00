//! The operator's errors.

/// Everything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The ModelDeployment's spec is invalid; reported in its status, not retried until it changes.
    #[error("invalid ModelDeployment: {0}")]
    InvalidSpec(#[from] baleen_api::crd::ManifestError),
    /// An object could not be turned into JSON or YAML.
    #[error("serializing {what}: {reason}")]
    Serialize {
        /// What was being serialized.
        what: String,
        /// The serializer's message.
        reason: String,
    },
    /// A file given on the command line could not be read or parsed.
    #[error("{path}: {reason}")]
    Input {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// An object the operator needs lacks a field it must have (e.g. a ModelDeployment without a namespace).
    #[error("{0}")]
    MissingField(String),
    /// The admin (metrics) server or the leader election failed.
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    /// The class reported in the `class` label of the reconcile error counter.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::InvalidSpec(_) => "invalid_spec",
            Self::Serialize { .. } => "serialize",
            Self::Input { .. } => "input",
            Self::MissingField(_) => "missing_field",
            Self::Runtime(_) => "runtime",
        }
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
