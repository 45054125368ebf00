//! Settings of the operator that shape what it creates (flags of `baleen-operator run` and `render`).

/// Defaults the operator fills in where a ModelDeployment leaves a field out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorConfig {
    /// Runtime image for ranks whose ModelDeployment sets no `spec.runtime.image`.
    pub runtime_image: String,
    /// Image of the init container that downloads `hf://` models; it must provide `python3 -m pip`.
    pub downloader_image: String,
    /// `huggingface_hub` version the download init container installs (pinned for repeatable pods).
    pub huggingface_hub_version: String,
    /// Create a `monitoring.coreos.com/v1` PodMonitor per ModelDeployment (the Prometheus Operator's CRD exists).
    pub pod_monitor: bool,
    /// Seconds the runtime drains in-flight requests after SIGTERM (`--drain-timeout`); the pod's termination
    /// grace period adds a margin to it.
    pub drain_timeout_seconds: u32,
}

/// The runtime image of this release.
pub const DEFAULT_RUNTIME_IMAGE: &str = concat!("ghcr.io/baleen-dev/baleen-runtime:", env!("CARGO_PKG_VERSION"));
/// The default download image: a slim official Python image.
pub const DEFAULT_DOWNLOADER_IMAGE: &str = "python:3.12-slim";
/// The `huggingface_hub` release the download init container installs by default.
pub const DEFAULT_HUGGINGFACE_HUB_VERSION: &str = "0.36.0";
/// Default drain time of a rank, seconds.
pub const DEFAULT_DRAIN_TIMEOUT_SECONDS: u32 = 30;

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            runtime_image: DEFAULT_RUNTIME_IMAGE.to_string(),
            downloader_image: DEFAULT_DOWNLOADER_IMAGE.to_string(),
            huggingface_hub_version: DEFAULT_HUGGINGFACE_HUB_VERSION.to_string(),
            pod_monitor: false,
            drain_timeout_seconds: DEFAULT_DRAIN_TIMEOUT_SECONDS,
        }
    }
}
