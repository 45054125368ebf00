#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use baleen_api::crd::{ModelDeploymentSpec, ParallelismSpec, RolloutSpec};
use serde_json::json;

use super::*;

const REV: &str = "0123abcd";
const OLD: &str = "feedbeef";
const SELECTOR: &str = "heads";

fn now() -> Timestamp {
    "2026-01-01T12:00:00Z".parse().unwrap()
}

fn md(replicas: u32, ranks: u32) -> ModelDeployment {
    let mut spec = ModelDeploymentSpec::new("builtin:tiny-moe");
    spec.replicas = Some(replicas);
    spec.parallelism = Some(ParallelismSpec { expert: Some(ranks), ..ParallelismSpec::default() });
    let mut md = ModelDeployment::new("tiny", spec);
    md.metadata.namespace = Some("models".into());
    md.metadata.generation = Some(3);
    md
}

/// A group's StatefulSet created an hour before [`now`], with `ready` of `ranks` pods ready.
fn sts(revision: &str, index: u32, ranks: i32, ready: i32) -> StatefulSet {
    let name = format!("tiny-{revision}-{index}");
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": "models", "generation": 1,
            "creationTimestamp": "2026-01-01T11:00:00Z",
            "labels": {"baleen.dev/model-deployment": "tiny", "baleen.dev/group": name, "baleen.dev/revision": revision},
        },
        "spec": {"replicas": ranks, "serviceName": name, "selector": {}, "template": {}},
        "status": {"replicas": ranks, "readyReplicas": ready, "observedGeneration": 1},
    }))
    .unwrap()
}

/// A running pod of a group; `ready` sets its Ready condition.
fn pod(revision: &str, index: u32, rank: u32, ready: bool, ip: &str) -> Pod {
    let group = format!("tiny-{revision}-{index}");
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("{group}-{rank}"), "namespace": "models",
            "labels": {"baleen.dev/model-deployment": "tiny", "baleen.dev/group": group,
                       "baleen.dev/revision": revision, "apps.kubernetes.io/pod-index": rank.to_string()},
        },
        "status": {
            "podIP": ip,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": if ready { "True" } else { "False" }},
            ],
            "containerStatuses": [{
                "name": "runtime", "image": "x", "imageID": "", "ready": ready, "restartCount": 0,
                "state": {"running": {}},
            }],
        },
    }))
    .unwrap()
}

/// A whole group: StatefulSet and `ranks` pods, every one ready or none.
fn group(revision: &str, index: u32, ranks: u32, ready: bool, ip_base: u32) -> (StatefulSet, Vec<Pod>) {
    let s = sts(revision, index, ranks as i32, if ready { ranks as i32 } else { 0 });
    let pods = (0..ranks).map(|r| pod(revision, index, r, ready, &format!("10.0.{ip_base}.{r}"))).collect();
    (s, pods)
}

fn observe(groups: Vec<(StatefulSet, Vec<Pod>)>) -> (Vec<StatefulSet>, Vec<Pod>) {
    let mut stss = Vec::new();
    let mut pods = Vec::new();
    for (s, p) in groups {
        stss.push(s);
        pods.extend(p);
    }
    (stss, pods)
}

fn compute_for(md: &ModelDeployment, stss: &[StatefulSet], pods: &[Pod]) -> ModelDeploymentStatus {
    compute(md, REV, SELECTOR.into(), stss, pods, now())
}

fn cond<'a>(status: &'a ModelDeploymentStatus, type_: &str) -> &'a Condition {
    status.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

/// (status, reason) of a condition.
fn sr<'a>(status: &'a ModelDeploymentStatus, type_: &str) -> (&'a str, &'a str) {
    let c = cond(status, type_);
    (c.status.as_str(), c.reason.as_str())
}

#[test]
fn a_new_deployment_is_scaling_and_not_available() {
    let s = compute_for(&md(2, 4), &[], &[]);
    assert_eq!((s.replicas, s.ready_replicas, s.updated_replicas, s.ranks_per_replica), (0, 0, 0, 4));
    assert_eq!(s.selector, SELECTOR);
    assert_eq!(s.current_revision.as_deref(), Some(REV));
    assert_eq!(s.observed_generation, Some(3));
    assert_eq!(sr(&s, CONDITION_AVAILABLE), ("False", REASON_SCALING));
    assert_eq!(sr(&s, CONDITION_PROGRESSING), ("True", REASON_SCALING));
    assert_eq!(sr(&s, CONDITION_DEGRADED), ("False", REASON_AS_EXPECTED));
    assert!(s.conditions.iter().all(|c| c.observed_generation == Some(3) && c.last_transition_time.0 == now()));
    assert!(s.endpoints.is_empty());
}

#[test]
fn every_group_ready_is_available_with_the_heads_as_endpoints() {
    let (stss, pods) = observe(vec![group(REV, 0, 2, true, 1), group(REV, 1, 2, true, 2)]);
    let s = compute_for(&md(2, 2), &stss, &pods);
    assert_eq!((s.replicas, s.ready_replicas, s.updated_replicas), (2, 2, 2));
    assert_eq!(sr(&s, CONDITION_AVAILABLE), ("True", REASON_ALL_READY));
    assert_eq!(sr(&s, CONDITION_PROGRESSING), ("False", REASON_ALL_READY));
    assert_eq!(sr(&s, CONDITION_DEGRADED), ("False", REASON_AS_EXPECTED));
    assert_eq!(s.endpoints, ["10.0.1.0:8000", "10.0.2.0:8000"]);
}

#[test]
fn data_parallel_attention_makes_every_ready_rank_an_endpoint() {
    let mut md = md(1, 2);
    md.spec.parallelism.as_mut().unwrap().data_parallel_attention = Some(true);
    let (stss, mut pods) = observe(vec![group(REV, 0, 2, true, 1)]);
    pods.push(pod(REV, 0, 2, false, "10.0.1.9"));
    let s = compute_for(&md, &stss, &pods);
    assert_eq!(s.endpoints, ["10.0.1.0:8000", "10.0.1.1:8000"], "the unready pod is no endpoint");
}

#[test]
fn terminating_pods_and_groups_are_not_counted() {
    let (mut stss, mut pods) = observe(vec![group(REV, 0, 1, true, 1), group(REV, 1, 1, true, 2)]);
    let gone = Some(Time(now()));
    stss[1].metadata.deletion_timestamp = gone.clone();
    pods[1].metadata.deletion_timestamp = gone;
    let s = compute_for(&md(1, 1), &stss, &pods);
    assert_eq!((s.replicas, s.ready_replicas), (1, 1));
    assert_eq!(s.endpoints, ["10.0.1.0:8000"]);
}

#[test]
fn a_group_is_ready_only_when_its_statefulset_was_observed_at_its_generation() {
    let mut s = sts(REV, 0, 2, 2);
    assert!(group_ready(&s));
    s.metadata.generation = Some(2);
    assert!(!group_ready(&s), "the StatefulSet controller has not seen generation 2");
    let s = sts(REV, 0, 2, 1);
    assert!(!group_ready(&s));
    assert_eq!(group_index(&sts(REV, 7, 1, 1)), Some(7));
    assert_eq!(group_revision(&sts(OLD, 0, 1, 1)), Some(OLD));
}

#[test]
fn scaled_to_zero() {
    let s = compute_for(&md(0, 1), &[], &[]);
    assert_eq!(sr(&s, CONDITION_AVAILABLE), ("False", REASON_SCALED_TO_ZERO));
    assert_eq!(sr(&s, CONDITION_PROGRESSING), ("False", REASON_SCALED_TO_ZERO));
}

#[test]
fn scaling_up_stays_available_while_a_group_serves() {
    let (stss, pods) = observe(vec![group(REV, 0, 1, true, 1), group(REV, 1, 1, true, 2)]);
    let s = compute_for(&md(3, 1), &stss, &pods);
    assert_eq!(sr(&s, CONDITION_PROGRESSING), ("True", REASON_SCALING));
    assert_eq!(sr(&s, CONDITION_AVAILABLE), ("True", REASON_SCALING));
}

#[test]
fn groups_that_are_starting_are_progressing_and_available_while_one_serves() {
    let (stss, pods) = observe(vec![group(REV, 0, 1, true, 1), group(REV, 1, 1, false, 2)]);
    let s = compute_for(&md(2, 1), &stss, &pods);
    assert_eq!(sr(&s, CONDITION_PROGRESSING), ("True", REASON_REPLICAS_NOT_READY));
    assert_eq!(sr(&s, CONDITION_AVAILABLE), ("True", REASON_REPLICAS_NOT_READY));
    assert!(find_condition(Some(&s), CONDITION_AVAILABLE).unwrap().message.contains("1 of 2 groups ready"));
    let (stss, pods) = observe(vec![group(REV, 0, 1, false, 1), group(REV, 1, 1, false, 2)]);
    let s = compute_for(&md(2, 1), &stss, &pods);
    assert_eq!(sr(&s, CONDITION_AVAILABLE), ("False", REASON_REPLICAS_NOT_READY));
}

#[test]
fn rolling_out_is_available_while_a_group_serves() {
    let (stss, pods) = observe(vec![group(OLD, 0, 1, true, 1), group(OLD, 1, 1, true, 2), group(REV, 0, 1, false, 3)]);
    let s = compute_for(&md(2, 1), &stss, &pods);
    assert_eq!((s.replicas, s.ready_replicas, s.updated_replicas), (3, 2, 1));
    assert_eq!(sr(&s, CONDITION_PROGRESSING), ("True", REASON_ROLLING_OUT));
    assert_eq!(sr(&s, CONDITION_AVAILABLE), ("True", REASON_ALL_READY));
    // One old group left and the new one starting (an in-place rollout): still serving.
    let (stss, pods) = observe(vec![group(OLD, 0, 1, true, 1), group(REV, 0, 1, false, 3)]);
    let mut in_place = md(2, 1);
    in_place.spec.rollout = Some(RolloutSpec { max_surge: Some(0) });
    let s = compute_for(&in_place, &stss, &pods);
    assert_eq!(sr(&s, CONDITION_AVAILABLE), ("True", REASON_ROLLING_OUT));
    // Nothing ready at all: not available.
    let (stss, pods) = observe(vec![group(OLD, 0, 1, false, 1), group(REV, 0, 1, false, 3)]);
    let s = compute_for(&md(2, 1), &stss, &pods);
    assert_eq!(sr(&s, CONDITION_AVAILABLE), ("False", REASON_ROLLING_OUT));
}

#[test]
fn a_crash_looping_runtime_is_model_load_failed() {
    let (stss, mut pods) = observe(vec![group(REV, 0, 2, false, 1)]);
    pods[1].status.as_mut().unwrap().container_statuses = Some(vec![
        serde_json::from_value(json!({
            "name": "runtime", "image": "x", "imageID": "", "ready": false, "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": "config.json: no such file"}},
        }))
        .unwrap(),
    ]);
    let s = compute_for(&md(1, 2), &stss, &pods);
    assert_eq!(sr(&s, CONDITION_DEGRADED), ("True", REASON_MODEL_LOAD_FAILED));
    let message = &cond(&s, CONDITION_DEGRADED).message;
    assert!(message.contains("tiny-0123abcd-0-1") && message.contains("config.json: no such file"), "{message}");
}

#[test]
fn a_runtime_that_exited_non_zero_after_restarts_is_model_load_failed() {
    let (stss, mut pods) = observe(vec![group(REV, 0, 1, false, 1)]);
    pods[0].status.as_mut().unwrap().init_container_statuses = Some(vec![
        serde_json::from_value(json!({
            "name": "model-download", "image": "x", "imageID": "", "ready": false, "restartCount": 2,
            "state": {"terminated": {"exitCode": 1}},
        }))
        .unwrap(),
    ]);
    let s = compute_for(&md(1, 1), &stss, &pods);
    assert_eq!(sr(&s, CONDITION_DEGRADED), ("True", REASON_MODEL_LOAD_FAILED));
    assert!(cond(&s, CONDITION_DEGRADED).message.contains("model-download exited with code 1 after 2 restarts"));
}

#[test]
fn a_pod_without_a_node_is_unschedulable() {
    let (stss, mut pods) = observe(vec![group(REV, 0, 1, false, 1)]);
    pods[0].status.as_mut().unwrap().conditions = Some(vec![
        serde_json::from_value(json!({
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        }))
        .unwrap(),
    ]);
    let s = compute_for(&md(1, 1), &stss, &pods);
    assert_eq!(sr(&s, CONDITION_DEGRADED), ("True", REASON_UNSCHEDULABLE));
    assert!(cond(&s, CONDITION_DEGRADED).message.contains("Insufficient nvidia.com/gpu"));
}

#[test]
fn a_group_short_of_pods_after_the_grace_period_is_rank_missing() {
    let (stss, mut pods) = observe(vec![group(REV, 0, 4, false, 1)]);
    pods.truncate(3);
    let s = compute_for(&md(1, 4), &stss, &pods);
    assert_eq!(sr(&s, CONDITION_DEGRADED), ("True", REASON_RANK_MISSING));
    assert_eq!(cond(&s, CONDITION_DEGRADED).message, "group tiny-0123abcd-0 has 3 of 4 rank pods");
    // A group created just now is still being filled in.
    let mut fresh = stss.clone();
    fresh[0].metadata.creation_timestamp = Some(Time(now() - SignedDuration::from_secs(5)));
    let s = compute_for(&md(1, 4), &fresh, &pods);
    assert_eq!(sr(&s, CONDITION_DEGRADED), ("False", REASON_AS_EXPECTED));
}

#[test]
fn an_invalid_spec_is_degraded_and_keeps_what_was_observed_before() {
    let mut md = md(2, 3);
    let previous = compute_for(&md, &[], &[]);
    md.status = Some(ModelDeploymentStatus { replicas: 2, ready_replicas: 1, ..previous });
    let s = invalid(&md, "`spec.parallelism.expert`: 3 ranks do not divide 16", SELECTOR.into(), now());
    assert_eq!(sr(&s, CONDITION_DEGRADED), ("True", REASON_INVALID_SPEC));
    assert_eq!(sr(&s, CONDITION_AVAILABLE), ("False", REASON_INVALID_SPEC));
    assert_eq!(sr(&s, CONDITION_PROGRESSING), ("False", REASON_INVALID_SPEC));
    assert!(cond(&s, CONDITION_DEGRADED).message.contains("3 ranks do not divide 16"));
    assert_eq!((s.replicas, s.ready_replicas, s.ranks_per_replica), (2, 1, 3));
    assert_eq!(s.model.as_ref().unwrap().experts_per_rank, None, "3 does not divide 16");
}

#[test]
fn transition_times_change_only_with_the_status() {
    let mut md = md(1, 1);
    let earlier = Time(now() - SignedDuration::from_secs(3600));
    let mut first = compute_for(&md, &[], &[]);
    for c in &mut first.conditions {
        c.last_transition_time = earlier.clone();
    }
    md.status = Some(first);
    // Still not available, still progressing (now for another reason), still not degraded: times kept.
    let (stss, pods) = observe(vec![group(REV, 0, 1, false, 1)]);
    let second = compute_for(&md, &stss, &pods);
    assert_eq!(sr(&second, CONDITION_PROGRESSING), ("True", REASON_REPLICAS_NOT_READY));
    assert!(second.conditions.iter().all(|c| c.last_transition_time == earlier), "{:?}", second.conditions);
    // Ready: Available and Progressing flip and take the new time; Degraded keeps its own.
    let (stss, pods) = observe(vec![group(REV, 0, 1, true, 1)]);
    let third = compute_for(&md, &stss, &pods);
    assert_eq!(cond(&third, CONDITION_AVAILABLE).last_transition_time.0, now());
    assert_eq!(cond(&third, CONDITION_PROGRESSING).last_transition_time.0, now());
    assert_eq!(cond(&third, CONDITION_DEGRADED).last_transition_time, earlier);
}

#[test]
fn the_model_status_of_the_builtin_model_and_of_a_declared_checkpoint() {
    let m = model_status(&md(1, 4)).unwrap();
    assert_eq!((m.routed_experts, m.experts_per_rank), (Some(16), Some(4)));
    assert_eq!(m.architecture.as_deref(), Some("DeepseekV3ForCausalLM"));
    // (kv_lora_rank 32 + rope 8) x 4 layers, f32 by default; `baleen-runtime info` reports the same.
    assert_eq!(m.kv_cache_bytes_per_token, Some(640));
    let mut bf16 = md(1, 4);
    bf16.spec.model.dtype = Some(baleen_api::crd::Dtype::Bf16);
    // bf16 on a GPU caches bf16; on the CPU the runtime's host kernels keep the cache in f32.
    assert_eq!(model_status(&bf16).unwrap().kv_cache_bytes_per_token, Some(640));
    bf16.spec.runtime.get_or_insert_default().gpus_per_rank = Some(1);
    assert_eq!(model_status(&bf16).unwrap().kv_cache_bytes_per_token, Some(320));
    let mut spec = ModelDeploymentSpec::new("hf://deepseek-ai/DeepSeek-V3");
    assert_eq!(model_status(&ModelDeployment::new("x", spec.clone())), None);
    spec.model.routed_experts = Some(256);
    spec.parallelism = Some(ParallelismSpec { expert: Some(8), ..ParallelismSpec::default() });
    let m = model_status(&ModelDeployment::new("x", spec)).unwrap();
    assert_eq!((m.routed_experts, m.experts_per_rank), (Some(256), Some(32)));
    assert_eq!((m.architecture, m.kv_cache_bytes_per_token), (None, None), "unknown until the checkpoint is read");
}
