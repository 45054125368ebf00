//! Pure builders: every object the operator creates for one `ModelDeployment`, with no I/O.
//!
//! One replica is a *group*: a StatefulSet whose pods are the ranks (ordinal = rank) plus a headless Service that
//! gives each rank a stable DNS name for its peers. A group's name carries the spec revision
//! (`NAME-<revision>-<index>`), so a group's pod template never changes: a spec change creates new groups and
//! removes old ones (see [`crate::plan`]), and no group ever mixes two versions. Shared per ModelDeployment: a
//! Service selecting the ready heads, a PodDisruptionBudget, and optionally a PodMonitor.
//!
//! Naming and labels live here; the builders live in the submodules.

mod disruption;
mod meta;
mod monitor;
mod objects;
mod services;
mod statefulset;

pub use disruption::pod_disruption_budget;
pub use monitor::{POD_MONITOR_GROUP, POD_MONITOR_KIND, POD_MONITOR_VERSION, pod_monitor, pod_monitor_resource};
pub use objects::desired_objects;
pub use services::{group_service, heads_labels, heads_selector, heads_service};
pub use statefulset::{
    GPU_RESOURCE, LIVENESS_FAILURE_THRESHOLD, LIVENESS_PERIOD_SECONDS, MODEL_VOLUME, PRE_STOP_SLEEP_SECONDS,
    PROBE_TIMEOUT_SECONDS, READINESS_FAILURE_THRESHOLD, READINESS_PERIOD_SECONDS, STARTUP_FAILURE_THRESHOLD,
    STARTUP_PERIOD_SECONDS, TERMINATION_MARGIN_SECONDS, group_statefulset, runtime_args,
};

use std::collections::BTreeMap;

use baleen_api::crd::ModelDeployment;
use baleen_api::names::{
    APP_RUNTIME, COMPONENT_RUNTIME, LABEL_APP_COMPONENT, LABEL_APP_INSTANCE, LABEL_APP_MANAGED_BY, LABEL_APP_NAME,
    LABEL_GROUP, LABEL_MODEL_DEPLOYMENT, LABEL_REVISION, OPERATOR_FIELD_MANAGER,
};
use kube::ResourceExt;

use crate::config::OperatorConfig;
use crate::error::{Error, Result};

/// One replica group: which revision it runs and its index among the groups of that revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupRef {
    /// The spec revision the group runs ([`revision`]).
    pub revision: String,
    /// Index among the groups of this revision (0, 1, ...); the lowest free index is reused.
    pub index: u32,
}

impl GroupRef {
    /// The group's StatefulSet and headless Service name: `NAME-<revision>-<index>`.
    pub fn name(&self, deployment: &str) -> String {
        format!("{deployment}-{}-{}", self.revision, self.index)
    }
}

/// Hex digits of a revision hash.
pub const REVISION_LEN: usize = 8;

/// The revision of a ModelDeployment: a stable hash of everything that shapes a group's pods — the spec without
/// `replicas`, `autoscaling` and `rollout` (which change how many groups run, not what a group is), plus the
/// operator defaults that end up in the pods. Same input, same revision, across operator restarts and versions of
/// Rust (FNV-1a over canonical JSON, not `std`'s randomly seeded hasher).
pub fn revision(md: &ModelDeployment, config: &OperatorConfig) -> Result<String> {
    let mut shape = serde_json::to_value(&md.spec).map_err(|e| Error::Serialize {
        what: format!("spec of ModelDeployment {}", md.name_any()),
        reason: e.to_string(),
    })?;
    if let Some(object) = shape.as_object_mut() {
        for field in ["replicas", "autoscaling", "rollout"] {
            object.remove(field);
        }
    }
    // Keys sorted at every level: the text is canonical whether or not serde_json's `preserve_order` is on (a
    // dependency of the runtime turns it on in workspace builds).
    let shape = sorted_keys(shape);
    let text = format!("{shape}\n{}\n{}", config.runtime_image, config.drain_timeout_seconds);
    Ok(format!("{:0width$x}", fnv1a(text.as_bytes()) & 0xffff_ffff, width = REVISION_LEN))
}

/// `value` with every object's keys in sorted order.
fn sorted_keys(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let sorted: BTreeMap<String, serde_json::Value> =
                map.into_iter().map(|(k, v)| (k, sorted_keys(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(sorted_keys).collect()),
        other => other,
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(PRIME))
}

/// Labels on every object made for `md` (and on its pods): the standard `app.kubernetes.io` set plus
/// [`LABEL_MODEL_DEPLOYMENT`].
pub fn common_labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    let name = md.name_any();
    BTreeMap::from([
        (LABEL_APP_NAME.to_string(), APP_RUNTIME.to_string()),
        (LABEL_APP_INSTANCE.to_string(), name.clone()),
        (LABEL_APP_COMPONENT.to_string(), COMPONENT_RUNTIME.to_string()),
        (LABEL_APP_MANAGED_BY.to_string(), OPERATOR_FIELD_MANAGER.to_string()),
        (LABEL_MODEL_DEPLOYMENT.to_string(), name),
    ])
}

/// Labels of one group's objects and pods: [`common_labels`] plus [`LABEL_GROUP`] and [`LABEL_REVISION`].
pub fn group_labels(md: &ModelDeployment, group: &GroupRef) -> BTreeMap<String, String> {
    let mut labels = common_labels(md);
    labels.insert(LABEL_GROUP.to_string(), group.name(&md.name_any()));
    labels.insert(LABEL_REVISION.to_string(), group.revision.clone());
    labels
}

/// The selector (as a map) of every rank pod of `md`, whatever its group.
pub fn deployment_selector(md: &ModelDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_MODEL_DEPLOYMENT.to_string(), md.name_any())])
}

#[cfg(test)]
mod builders_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use baleen_api::crd::ModelDeploymentSpec;

    use super::*;

    fn md(spec: ModelDeploymentSpec) -> ModelDeployment {
        let mut md = ModelDeployment::new("tiny", spec);
        md.metadata.namespace = Some("models".into());
        md
    }

    #[test]
    fn the_revision_ignores_replicas_autoscaling_and_rollout_but_not_the_pod_shape() {
        let config = OperatorConfig::default();
        let base = md(ModelDeploymentSpec::new("builtin:tiny-moe"));
        let rev = revision(&base, &config).unwrap();
        assert_eq!(rev.len(), REVISION_LEN);
        assert!(rev.chars().all(|c| c.is_ascii_hexdigit()));
        let mut scaled = base.clone();
        scaled.spec.replicas = Some(7);
        scaled.spec.rollout = Some(baleen_api::crd::RolloutSpec { max_surge: Some(3) });
        assert_eq!(revision(&scaled, &config).unwrap(), rev);
        let mut changed = base.clone();
        changed.spec.model.dtype = Some(baleen_api::crd::Dtype::Bf16);
        assert_ne!(revision(&changed, &config).unwrap(), rev);
        let other_image = OperatorConfig { runtime_image: "example.com/runtime:2".into(), ..config };
        assert_ne!(revision(&base, &other_image).unwrap(), rev);
    }

    #[test]
    fn the_canonical_text_sorts_keys_at_every_level() {
        let mut inner = serde_json::Map::new();
        inner.insert("z".into(), serde_json::json!(1));
        inner.insert("a".into(), serde_json::json!([{"y": 1, "b": 2}]));
        let mut outer = serde_json::Map::new();
        outer.insert("m".into(), serde_json::Value::Object(inner));
        outer.insert("c".into(), serde_json::json!(null));
        let text = sorted_keys(serde_json::Value::Object(outer)).to_string();
        assert_eq!(text, r#"{"c":null,"m":{"a":[{"b":2,"y":1}],"z":1}}"#);
    }

    #[test]
    fn the_hash_is_fnv1a() {
        // Published FNV-1a 64-bit test vectors: if the hash changed, every group of every user would roll on an
        // operator upgrade.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn group_names_and_labels() {
        let md = md(ModelDeploymentSpec::new("builtin:tiny-moe"));
        let group = GroupRef { revision: "0123abcd".into(), index: 2 };
        assert_eq!(group.name("tiny"), "tiny-0123abcd-2");
        let labels = group_labels(&md, &group);
        assert_eq!(labels[LABEL_GROUP], "tiny-0123abcd-2");
        assert_eq!(labels[LABEL_REVISION], "0123abcd");
        assert_eq!(labels[LABEL_MODEL_DEPLOYMENT], "tiny");
        assert_eq!(labels[LABEL_APP_MANAGED_BY], OPERATOR_FIELD_MANAGER);
    }
}
