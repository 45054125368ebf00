//! Settings of the operator that shape what it creates (flags of `baleen-operator run` and `render`).

/// Defaults the operator fills in where a ModelDeployment leaves a field out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorConfig {
    /// Runtime image for ranks whose ModelDeployment sets no `spec.runtime.image` (also the image of the `hf://`
    /// download init container: `baleen-runtime download`).
    pub runtime_image: String,
    /// Create a `monitoring.coreos.com/v1` PodMonitor per ModelDeployment (the Prometheus Operator's CRD exists).
    pub pod_monitor: bool,
    /// Seconds the runtime drains in-flight requests after SIGTERM (`--drain-timeout`); the pod's termination
    /// grace period adds a margin to it.
    pub drain_timeout_seconds: u32,
}

/// The runtime image of this release.
pub const DEFAULT_RUNTIME_IMAGE: &str = concat!("ghcr.io/baleen-dev/baleen-runtime:", env!("CARGO_PKG_VERSION"));
/// Default drain time of a rank, seconds.
pub const DEFAULT_DRAIN_TIMEOUT_SECONDS: u32 = 30;

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            runtime_image: DEFAULT_RUNTIME_IMAGE.to_string(),
            pod_monitor: false,
            drain_timeout_seconds: DEFAULT_DRAIN_TIMEOUT_SECONDS,
        }
    }
}
