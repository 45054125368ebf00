//! The Prometheus Operator `PodMonitor` of a ModelDeployment (created when the operator runs with
//! `--pod-monitor`).

use baleen_api::crd::ModelDeployment;
use baleen_api::names::{PATH_METRICS, PORT_NAME_HTTP};
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

use super::meta::object_meta;
use super::{common_labels, deployment_selector};
use crate::error::Result;

/// API group of the Prometheus Operator's resources.
pub const POD_MONITOR_GROUP: &str = "monitoring.coreos.com";
/// API version of `PodMonitor`.
pub const POD_MONITOR_VERSION: &str = "v1";
/// Kind of the Prometheus Operator's pod scrape configuration.
pub const POD_MONITOR_KIND: &str = "PodMonitor";

/// The `PodMonitor` API resource (`monitoring.coreos.com/v1`, plural `podmonitors`).
pub fn pod_monitor_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(POD_MONITOR_GROUP, POD_MONITOR_VERSION, POD_MONITOR_KIND))
}

/// A PodMonitor named like `md` that scrapes `/metrics` on the `http` port of every rank pod of `md` (every rank
/// serves its metrics there: heads the `vllm:*` set, all ranks the expert metrics).
pub fn pod_monitor(md: &ModelDeployment) -> Result<DynamicObject> {
    let metadata = object_meta(md, md.name_any(), common_labels(md))?;
    let mut monitor = DynamicObject::new(&md.name_any(), &pod_monitor_resource());
    monitor.metadata = metadata;
    monitor.data = serde_json::json!({
        "spec": {
            "selector": {"matchLabels": deployment_selector(md)},
            "podMetricsEndpoints": [{"port": PORT_NAME_HTTP, "path": PATH_METRICS}],
        }
    });
    Ok(monitor)
}
