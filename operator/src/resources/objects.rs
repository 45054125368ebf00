//! Everything the operator creates for one ModelDeployment, as dynamic objects (`baleen-operator render`).

use baleen_api::crd::ModelDeployment;
use kube::api::DynamicObject;

use super::meta::to_dynamic;
use super::{GroupRef, group_service, group_statefulset, heads_service, pod_disruption_budget, pod_monitor};
use crate::config::OperatorConfig;
use crate::error::Result;

/// Every object for `md` with `groups`, in a stable order: the heads Service, the PodDisruptionBudget, the
/// PodMonitor (when `config.pod_monitor`), then per group (in the order given) its headless Service and its
/// StatefulSet — each Service before the pods that need its DNS names.
pub fn desired_objects(
    md: &ModelDeployment,
    groups: &[GroupRef],
    config: &OperatorConfig,
) -> Result<Vec<DynamicObject>> {
    let mut objects = vec![to_dynamic(&heads_service(md)?)?, to_dynamic(&pod_disruption_budget(md)?)?];
    if config.pod_monitor {
        objects.push(pod_monitor(md)?);
    }
    for group in groups {
        objects.push(to_dynamic(&group_service(md, group)?)?);
        objects.push(to_dynamic(&group_statefulset(md, group, config)?)?);
    }
    Ok(objects)
}
