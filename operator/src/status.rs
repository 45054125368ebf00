//! The status of a `ModelDeployment`, computed from what the operator observed: its StatefulSets (one per group)
//! and its rank pods. Pure: the controller lists the objects, calls [`compute`] (or [`invalid`] when the spec is
//! refused) and writes the result through the status subresource.
//!
//! Conditions (types and reasons are constants in [`baleen_api::names`]):
//!
//! - `Degraded`: `True` with the first of `InvalidSpec`, `ModelLoadFailed` (a runtime or download container is in
//!   `CrashLoopBackOff`, or exited non-zero and was restarted), `Unschedulable` (a pod's `PodScheduled` is `False`
//!   with reason `Unschedulable`), `RankMissing` (a group's StatefulSet has had fewer pods than ranks for longer
//!   than [`RANK_MISSING_GRACE`] since it was created); else `False`/`AsExpected`.
//! - `Progressing`: `True` with `RollingOut` (groups of another revision exist), `Scaling` (the groups of the
//!   current revision are not `replicas` in number) or `ReplicasNotReady` (the right groups exist but some are not
//!   ready yet); `False` with `ScaledToZero` or `AllReplicasReady` when there is nothing left to do.
//! - `Available`: `True` while at least one group is ready (the heads Service has an endpoint to send requests
//!   to): `AllReplicasReady` when `replicas` groups are, else the `Progressing` reason (`Scaling`, `RollingOut`,
//!   `ReplicasNotReady`) with "k of n groups ready". `False`/`ScaledToZero` at 0 replicas, and `False` with the
//!   `Progressing` reason while no group is ready. (How many must stay ready during a rollout is the planner's
//!   rule, [`crate::plan`].)
//!
//! A condition keeps its `lastTransitionTime` while its status stays the same (the reason and message may change);
//! every condition carries the `metadata.generation` it describes.

use baleen_api::crd::{Dtype, ModelDeployment, ModelDeploymentStatus, ModelStatus};
use baleen_api::names::{
    ANNOTATION_GROUP_INDEX, BUILTIN_TINY_MOE, BUILTIN_TINY_MOE_ARCHITECTURE, BUILTIN_TINY_MOE_KV_VALUES_PER_TOKEN,
    CONDITION_AVAILABLE, CONDITION_DEGRADED, CONDITION_PROGRESSING, CONTAINER_MODEL_DOWNLOAD, CONTAINER_RUNTIME,
    LABEL_GROUP, LABEL_POD_INDEX, LABEL_REVISION, REASON_ALL_READY, REASON_AS_EXPECTED, REASON_INVALID_SPEC,
    REASON_MODEL_LOAD_FAILED, REASON_RANK_MISSING, REASON_REPLICAS_NOT_READY, REASON_ROLLING_OUT,
    REASON_SCALED_TO_ZERO, REASON_SCALING, REASON_UNSCHEDULABLE, RUNTIME_HTTP_PORT,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

/// How long a group's StatefulSet may have fewer pods than ranks after it was created before the deployment is
/// `Degraded`/`RankMissing` (pods are created within seconds unless a quota, an admission webhook or a missing
/// service account refuses them).
pub const RANK_MISSING_GRACE: SignedDuration = SignedDuration::from_secs(60);

/// Waiting reason the kubelet gives a container it is restarting with back-off.
const CRASH_LOOP_BACK_OFF: &str = "CrashLoopBackOff";
/// Pod condition type the scheduler sets.
const POD_SCHEDULED: &str = "PodScheduled";
/// Pod condition type of a ready pod.
const POD_READY: &str = "Ready";
/// Reason of a `PodScheduled=False` condition when no node fits.
const UNSCHEDULABLE: &str = "Unschedulable";
/// Most problems a `Degraded` message lists before it says how many more there are.
const MESSAGE_ITEMS: usize = 3;

/// Condition status strings.
const TRUE: &str = "True";
const FALSE: &str = "False";

/// The spec revision a group's StatefulSet runs ([`LABEL_REVISION`]).
pub fn group_revision(sts: &StatefulSet) -> Option<&str> {
    sts.labels().get(LABEL_REVISION).map(String::as_str)
}

/// The index of a group within its revision: the [`ANNOTATION_GROUP_INDEX`] annotation when present, otherwise
/// the number after the last `-` of the StatefulSet's name (`NAME-<revision>-<index>`).
pub fn group_index(sts: &StatefulSet) -> Option<u32> {
    if let Some(index) = sts.annotations().get(ANNOTATION_GROUP_INDEX).and_then(|v| v.parse().ok()) {
        return Some(index);
    }
    sts.metadata.name.as_deref()?.rsplit_once('-')?.1.parse().ok()
}

/// Ranks a group's StatefulSet asks for (`spec.replicas`, default 1 as in Kubernetes).
fn group_ranks(sts: &StatefulSet) -> i32 {
    sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

/// A group is ready when the StatefulSet controller has seen its current spec and every rank pod is ready.
pub fn group_ready(sts: &StatefulSet) -> bool {
    let Some(status) = &sts.status else { return false };
    let seen = match (status.observed_generation, sts.metadata.generation) {
        (Some(observed), Some(generation)) => observed >= generation,
        (_, None) => true,
        (None, Some(_)) => false,
    };
    let ranks = group_ranks(sts);
    seen && ranks > 0 && status.ready_replicas.unwrap_or(0) >= ranks
}

/// Whether an object is being deleted.
fn terminating(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.deletion_timestamp.is_some()
}

/// `status.model` from the spec: the routed experts when known (`spec.model.routedExperts`, or the built-in
/// model's) and how many each rank holds. Facts only the checkpoint knows stay unset.
pub fn model_status(md: &ModelDeployment) -> Option<ModelStatus> {
    let experts = md.spec.routed_experts()?;
    let ranks = md.spec.expert_parallelism();
    let per_rank = (ranks > 0 && experts.is_multiple_of(ranks)).then(|| experts / ranks);
    let builtin = md.spec.model.source.trim() == BUILTIN_TINY_MOE;
    // The runtime keeps a bf16 model's latent cache in f32 on the CPU (its host kernels compute in f32).
    let on_cpu = md.spec.gpus_per_rank() == 0;
    let dtype_bytes = match md.spec.model.dtype.unwrap_or_default() {
        Dtype::F32 => 4,
        Dtype::Bf16 if on_cpu => 4,
        Dtype::Bf16 | Dtype::F16 => 2,
    };
    Some(ModelStatus {
        architecture: builtin.then(|| BUILTIN_TINY_MOE_ARCHITECTURE.to_string()),
        routed_experts: Some(experts),
        experts_per_rank: per_rank,
        kv_cache_bytes_per_token: builtin.then_some(BUILTIN_TINY_MOE_KV_VALUES_PER_TOKEN * dtype_bytes),
    })
}

/// The status of `md`, whose spec is valid, at `revision`, from its StatefulSets and rank pods (both listed by the
/// `LABEL_MODEL_DEPLOYMENT` label). `selector` is the head pods' selector (the scale subresource's). The previous
/// status is `md.status`; its conditions' transition times are kept where the status did not change.
pub fn compute(
    md: &ModelDeployment,
    revision: &str,
    selector: String,
    statefulsets: &[StatefulSet],
    pods: &[Pod],
    now: Timestamp,
) -> ModelDeploymentStatus {
    let desired = md.spec.replicas();
    let groups: Vec<&StatefulSet> = statefulsets.iter().filter(|s| !terminating(&s.metadata)).collect();
    let pods: Vec<&Pod> = pods.iter().filter(|p| !terminating(&p.metadata)).collect();
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let replicas = count(groups.len());
    let ready = count(groups.iter().filter(|s| group_ready(s)).count());
    let updated = count(groups.iter().filter(|s| group_revision(s) == Some(revision)).count());
    let old = replicas - updated;

    let progressing = if old > 0 {
        (true, REASON_ROLLING_OUT, format!("{updated} of {replicas} groups run revision {revision}"))
    } else if updated != desired {
        (true, REASON_SCALING, format!("{updated} groups, {desired} wanted"))
    } else if ready < desired {
        (true, REASON_REPLICAS_NOT_READY, format!("{ready} of {desired} groups ready"))
    } else if desired == 0 {
        (false, REASON_SCALED_TO_ZERO, "replicas is 0: nothing runs".to_string())
    } else {
        (false, REASON_ALL_READY, format!("{desired} groups ready at revision {revision}"))
    };

    // Available: at least one group serves (the heads Service has an endpoint). The reason says whether that is
    // every group or fewer, and why (what Progressing reports).
    let ready_message = format!("{ready} of {desired} groups ready");
    let available = if desired == 0 {
        (false, REASON_SCALED_TO_ZERO, "replicas is 0: nothing runs".to_string())
    } else if ready >= desired {
        (true, REASON_ALL_READY, ready_message)
    } else {
        (ready >= 1, progressing.1, ready_message)
    };

    let degraded =
        degraded(&groups, &pods, now).unwrap_or_else(|| (false, REASON_AS_EXPECTED, "no problem observed".to_string()));

    let previous = md.status.as_ref().map_or(&[][..], |s| s.conditions.as_slice());
    let generation = md.metadata.generation;
    let stamp = |type_: &str, (status, reason, message): (bool, &str, String)| {
        condition(previous, type_, status, reason, message, generation, &now)
    };
    ModelDeploymentStatus {
        observed_generation: generation,
        replicas,
        ready_replicas: ready,
        updated_replicas: updated,
        ranks_per_replica: md.spec.expert_parallelism(),
        selector,
        current_revision: Some(revision.to_string()),
        conditions: vec![
            stamp(CONDITION_AVAILABLE, available),
            stamp(CONDITION_PROGRESSING, progressing),
            stamp(CONDITION_DEGRADED, degraded),
        ],
        endpoints: endpoints(md, &pods),
        model: model_status(md),
    }
}

/// The status of `md` when its spec is refused with `message`: `Degraded`/`InvalidSpec`, not available, not
/// progressing (nothing is created until the spec is fixed). Nothing was observed, so the counts, endpoints and
/// revision of the previous status are kept: groups created for an earlier valid spec keep running.
pub fn invalid(md: &ModelDeployment, message: &str, selector: String, now: Timestamp) -> ModelDeploymentStatus {
    let previous = md.status.clone().unwrap_or_default();
    let generation = md.metadata.generation;
    let stamp = |type_: &str, status: bool| {
        condition(&previous.conditions, type_, status, REASON_INVALID_SPEC, message.to_string(), generation, &now)
    };
    let conditions =
        vec![stamp(CONDITION_AVAILABLE, false), stamp(CONDITION_PROGRESSING, false), stamp(CONDITION_DEGRADED, true)];
    ModelDeploymentStatus {
        observed_generation: generation,
        ranks_per_replica: md.spec.expert_parallelism(),
        selector,
        conditions,
        model: model_status(md),
        ..previous
    }
}

/// One condition; it keeps the previous `lastTransitionTime` when its status is unchanged.
fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Timestamp,
) -> Condition {
    let status = if status { TRUE } else { FALSE };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| Time(*now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The condition of `type_` in `status`, if set.
pub fn find_condition<'a>(status: Option<&'a ModelDeploymentStatus>, type_: &str) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

/// The first kind of problem found (in the order of the module docs) with a message naming the objects.
fn degraded(groups: &[&StatefulSet], pods: &[&Pod], now: Timestamp) -> Option<(bool, &'static str, String)> {
    let crashing: Vec<String> = pods.iter().filter_map(|p| crash(p)).collect();
    if !crashing.is_empty() {
        return Some((true, REASON_MODEL_LOAD_FAILED, summary(crashing)));
    }
    let unschedulable: Vec<String> = pods.iter().filter_map(|p| unschedulable(p)).collect();
    if !unschedulable.is_empty() {
        return Some((true, REASON_UNSCHEDULABLE, summary(unschedulable)));
    }
    let missing: Vec<String> = groups.iter().filter_map(|s| missing_ranks(s, pods, now)).collect();
    if !missing.is_empty() {
        return Some((true, REASON_RANK_MISSING, summary(missing)));
    }
    None
}

fn summary(mut items: Vec<String>) -> String {
    items.sort();
    let more = items.len().saturating_sub(MESSAGE_ITEMS);
    items.truncate(MESSAGE_ITEMS);
    let mut text = items.join("; ");
    if more > 0 {
        text.push_str(&format!("; and {more} more"));
    }
    text
}

/// A runtime (or model download) container that keeps failing: in `CrashLoopBackOff`, or terminated non-zero
/// after at least one restart.
fn crash(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let containers = status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
    containers
        .filter(|c| c.name == CONTAINER_RUNTIME || c.name == CONTAINER_MODEL_DOWNLOAD)
        .find_map(|c| crashed_container(c).map(|what| format!("pod {}: container {} {what}", pod.name_any(), c.name)))
}

fn crashed_container(c: &ContainerStatus) -> Option<String> {
    let state = c.state.as_ref()?;
    let last_exit = || {
        let t = c.last_state.as_ref()?.terminated.as_ref()?;
        let detail = t.message.as_deref().or(t.reason.as_deref()).unwrap_or("").trim();
        Some(if detail.is_empty() {
            format!(" (exit code {})", t.exit_code)
        } else {
            format!(" (exit code {}: {detail})", t.exit_code)
        })
    };
    if let Some(waiting) = &state.waiting
        && waiting.reason.as_deref() == Some(CRASH_LOOP_BACK_OFF)
    {
        return Some(format!("is in {CRASH_LOOP_BACK_OFF}{}", last_exit().unwrap_or_default()));
    }
    if let Some(t) = &state.terminated
        && t.exit_code != 0
        && c.restart_count > 0
    {
        return Some(format!("exited with code {} after {} restarts", t.exit_code, c.restart_count));
    }
    None
}

fn unschedulable(pod: &Pod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let c = conditions
        .iter()
        .find(|c| c.type_ == POD_SCHEDULED && c.status == FALSE && c.reason.as_deref() == Some(UNSCHEDULABLE))?;
    let detail = c.message.as_deref().unwrap_or("no node fits").trim();
    Some(format!("pod {} cannot be scheduled: {detail}", pod.name_any()))
}

fn missing_ranks(sts: &StatefulSet, pods: &[&Pod], now: Timestamp) -> Option<String> {
    let name = sts.metadata.name.as_deref()?;
    let ranks = group_ranks(sts);
    let present = pods.iter().filter(|p| p.labels().get(LABEL_GROUP).map(String::as_str) == Some(name)).count();
    let present = i32::try_from(present).unwrap_or(i32::MAX);
    // No creation time: a group this reconcile is creating right now.
    let created = sts.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);
    (present < ranks && now.duration_since(created) > RANK_MISSING_GRACE)
        .then(|| format!("group {name} has {present} of {ranks} rank pods"))
}

fn pod_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|cs| cs.iter().any(|c| c.type_ == POD_READY && c.status == TRUE))
}

/// A pod's rank: the StatefulSet's [`LABEL_POD_INDEX`] label, or the ordinal at the end of its name.
fn pod_rank(pod: &Pod) -> Option<u32> {
    if let Some(index) = pod.labels().get(LABEL_POD_INDEX).and_then(|v| v.parse().ok()) {
        return Some(index);
    }
    pod.metadata.name.as_deref()?.rsplit_once('-')?.1.parse().ok()
}

/// `podIP:8000` of every ready head pod (rank 0, or every rank with data-parallel attention), sorted.
fn endpoints(md: &ModelDeployment, pods: &[&Pod]) -> Vec<String> {
    let every_rank = md.spec.data_parallel_attention();
    let mut out: Vec<String> =
        pods.iter()
            .filter(|p| pod_ready(p) && (every_rank || pod_rank(p) == Some(0)))
            .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref())
            .filter(|ip| !ip.is_empty())
            .map(|ip| {
                if ip.contains(':') {
                    format!("[{ip}]:{RUNTIME_HTTP_PORT}")
                } else {
                    format!("{ip}:{RUNTIME_HTTP_PORT}")
                }
            })
            .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests;
