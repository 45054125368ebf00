//! The PodDisruptionBudget of a ModelDeployment.

use baleen_api::crd::ModelDeployment;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::meta::object_meta;
use super::{common_labels, deployment_selector};
use crate::error::Result;

/// One budget over every rank pod of `md`, `maxUnavailable: 1`.
///
/// A group serves only while all its ranks run, so evicting any one rank takes its whole group down; allowing one
/// voluntary disruption at a time across the ModelDeployment's pods therefore means at most one group is
/// disrupted at a time (a node drain waits until the evicted rank's group is back). `maxUnavailable` (not
/// `minAvailable`) keeps the budget right as groups are added and removed.
///
/// `unhealthyPodEvictionPolicy: AlwaysAllow`: a pod that is not ready (loading, crash-looping, waiting for a
/// peer) serves nothing, so evicting it costs nothing — and with the default policy a broken group would block
/// every node drain forever.
pub fn pod_disruption_budget(md: &ModelDeployment) -> Result<PodDisruptionBudget> {
    Ok(PodDisruptionBudget {
        metadata: object_meta(md, md.name_any(), common_labels(md))?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(deployment_selector(md)), ..LabelSelector::default() }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}
