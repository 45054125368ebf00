//! Reconciles against a scripted mock API server: every request is asserted in order (method, path, key body
//! fields), and a reconcile that makes any request beyond the script fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use baleen_api::crd::{ModelDeploymentSpec, ParallelismSpec};
use baleen_api::names::{
    CONDITION_AVAILABLE, REASON_ALL_READY, REASON_AS_EXPECTED, REASON_INVALID_SPEC, REASON_MODEL_LOAD_FAILED,
    REASON_RANK_MISSING, REASON_REPLICAS_NOT_READY,
};
use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::mock::{self, ApiServer, Seen, list, status_error};
use super::*;

const NS: &str = "models";
const STS: &str = "/apis/apps/v1/namespaces/models/statefulsets";
const PODS: &str = "/api/v1/namespaces/models/pods";
const SERVICES: &str = "/api/v1/namespaces/models/services";
const PDBS: &str = "/apis/policy/v1/namespaces/models/poddisruptionbudgets";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/models/events";
const MD_STATUS: &str = "/apis/baleen.dev/v1alpha1/namespaces/models/modeldeployments/tiny/status";
const SELECTOR: &str = "labelSelector=baleen.dev/model-deployment=tiny";
const OLD: &str = "feedbeef";

fn md(replicas: u32, ranks: u32) -> ModelDeployment {
    let mut spec = ModelDeploymentSpec::new("builtin:tiny-moe");
    spec.replicas = Some(replicas);
    spec.parallelism = Some(ParallelismSpec { expert: Some(ranks), ..ParallelismSpec::default() });
    let mut md = ModelDeployment::new("tiny", spec);
    md.metadata.namespace = Some(NS.into());
    md.metadata.uid = Some("0b7f3c1e-uid".into());
    md.metadata.generation = Some(1);
    md
}

fn rev(md: &ModelDeployment) -> String {
    resources::revision(md, &OperatorConfig::default()).unwrap()
}

fn setup(config: OperatorConfig) -> (Arc<Context>, ApiServer) {
    let (client, server) = mock::pair();
    let metrics = Arc::new(Metrics::new().unwrap());
    (Arc::new(Context::new(client, config, metrics, Some("test-replica".into()))), server)
}

/// A group's StatefulSet as the API server returns it; `ready` ranks of `ranks` are ready.
fn sts(revision: &str, index: u32, ranks: i32, ready: i32) -> Value {
    let name = format!("tiny-{revision}-{index}");
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {
            "name": name, "namespace": NS, "generation": 1, "creationTimestamp": "2026-01-01T11:00:00Z",
            "labels": {"baleen.dev/model-deployment": "tiny", "baleen.dev/group": name, "baleen.dev/revision": revision},
            "annotations": {"baleen.dev/group-index": index.to_string()},
        },
        "spec": {"replicas": ranks, "serviceName": name, "selector": {}, "template": {}},
        "status": {"replicas": ranks, "readyReplicas": ready, "observedGeneration": 1},
    })
}

/// The rank pods of a group, all ready or none; `crash` puts rank 0's runtime in CrashLoopBackOff.
fn pods(revision: &str, index: u32, ranks: u32, ready: bool) -> Vec<Value> {
    let group = format!("tiny-{revision}-{index}");
    (0..ranks)
        .map(|rank| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": format!("{group}-{rank}"), "namespace": NS,
                    "labels": {"baleen.dev/model-deployment": "tiny", "baleen.dev/group": group,
                               "apps.kubernetes.io/pod-index": rank.to_string()},
                },
                "status": {
                    "podIP": format!("10.1.{index}.{rank}"),
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                },
            })
        })
        .collect()
}

async fn expect_lists(server: &mut ApiServer, statefulsets: Vec<Value>, pods: Vec<Value>) {
    let seen = server.expect(Method::GET, STS, StatusCode::OK, list("StatefulSet", "apps/v1", statefulsets)).await;
    assert!(seen.query.contains(SELECTOR), "{}", seen.query);
    let seen = server.expect(Method::GET, PODS, StatusCode::OK, list("Pod", "v1", pods)).await;
    assert!(seen.query.contains(SELECTOR), "{}", seen.query);
}

/// A server-side apply (PATCH, forced, as the operator's field manager) of the object at `path`.
async fn expect_apply(server: &mut ApiServer, path: &str) -> Seen {
    let seen = server.expect_echo(Method::PATCH, path).await;
    assert!(seen.query.contains("fieldManager=baleen-operator"), "{}", seen.query);
    assert!(seen.query.contains("force=true"), "{}", seen.query);
    let name = path.rsplit('/').next().unwrap();
    assert_eq!(seen.body["metadata"]["name"], name);
    assert!(seen.body["apiVersion"].is_string() && seen.body["kind"].is_string(), "{}", seen.body);
    seen
}

/// Applies of a new group's StatefulSet and headless Service, and its `GroupCreated` Event.
async fn expect_group_created(server: &mut ApiServer, revision: &str, index: u32, ranks: i64) {
    let name = format!("tiny-{revision}-{index}");
    let sts = expect_apply(server, &format!("{STS}/{name}")).await;
    assert_eq!(sts.body["kind"], "StatefulSet");
    assert_eq!(sts.body["metadata"]["labels"]["baleen.dev/revision"], revision);
    assert_eq!(sts.body["metadata"]["ownerReferences"][0]["uid"], "0b7f3c1e-uid");
    assert_eq!(sts.body["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(sts.body["spec"]["replicas"], ranks);
    let svc = expect_apply(server, &format!("{SERVICES}/{name}")).await;
    assert_eq!(svc.body["spec"]["clusterIP"], "None");
    let event = expect_event(server, "Normal", EVENT_GROUP_CREATED).await;
    assert!(event.body["note"].as_str().unwrap().contains(&name));
}

/// Applies of a kept group's StatefulSet and headless Service (drift repair), without an Event.
async fn expect_group_repaired(server: &mut ApiServer, revision: &str, index: u32) {
    let name = format!("tiny-{revision}-{index}");
    let sts = expect_apply(server, &format!("{STS}/{name}")).await;
    assert_eq!(sts.body["metadata"]["labels"]["baleen.dev/revision"], revision);
    expect_apply(server, &format!("{SERVICES}/{name}")).await;
}

/// Deletes of a group's StatefulSet and Service (background propagation) and its `GroupDeleted` Event.
async fn expect_group_deleted(server: &mut ApiServer, revision: &str, index: u32) {
    let name = format!("tiny-{revision}-{index}");
    let ok = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
    for collection in [STS, SERVICES] {
        let seen = server.expect(Method::DELETE, &format!("{collection}/{name}"), StatusCode::OK, ok.clone()).await;
        assert_eq!(seen.body["propagationPolicy"], "Background", "{}", seen.body);
    }
    let event = expect_event(server, "Normal", EVENT_GROUP_DELETED).await;
    assert!(event.body["note"].as_str().unwrap().contains(&name));
}

async fn expect_event(server: &mut ApiServer, type_: &str, reason: &str) -> Seen {
    let seen = server.expect_echo(Method::POST, EVENTS).await;
    assert_eq!((seen.body["type"].as_str(), seen.body["reason"].as_str()), (Some(type_), Some(reason)));
    assert_eq!(seen.body["regarding"]["kind"], "ModelDeployment");
    assert_eq!(seen.body["regarding"]["name"], "tiny");
    assert_eq!(seen.body["reportingController"], OPERATOR_CONTROLLER_NAME);
    assert_eq!(seen.body["reportingInstance"], "test-replica");
    seen
}

async fn expect_shared(server: &mut ApiServer) {
    let heads = expect_apply(server, &format!("{SERVICES}/tiny")).await;
    assert_eq!(heads.body["spec"]["selector"]["apps.kubernetes.io/pod-index"], "0");
    let pdb = expect_apply(server, &format!("{PDBS}/tiny")).await;
    assert_eq!(pdb.body["spec"]["maxUnavailable"], 1);
}

/// The status apply; answers with the ModelDeployment carrying that status. Returns the status written.
async fn expect_status(server: &mut ApiServer, md: &ModelDeployment) -> ModelDeploymentStatus {
    let mut answer = serde_json::to_value(md).unwrap();
    let seen = server
        .expect_with(Method::PATCH, MD_STATUS, |seen| {
            answer["status"] = seen.body["status"].clone();
            (StatusCode::OK, answer)
        })
        .await;
    assert!(seen.query.contains("fieldManager=baleen-operator") && seen.query.contains("force=true"));
    assert_eq!(seen.body["apiVersion"], "baleen.dev/v1alpha1");
    assert_eq!(seen.body["kind"], "ModelDeployment");
    assert_eq!(seen.body.as_object().unwrap().len(), 3, "only apiVersion, kind and status: {}", seen.body);
    serde_json::from_value(seen.body["status"].clone()).unwrap()
}

fn condition<'a>(status: &'a ModelDeploymentStatus, type_: &str) -> (&'a str, &'a str) {
    let c = find_condition(Some(status), type_).unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.as_str(), c.reason.as_str())
}

#[tokio::test]
async fn a_new_deployment_gets_every_group_the_shared_objects_and_a_status() {
    let md = md(2, 4);
    let r = rev(&md);
    let (ctx, mut server) = setup(OperatorConfig::default());
    let task = tokio::spawn(reconcile(Arc::new(md.clone()), ctx.clone()));
    expect_lists(&mut server, vec![], vec![]).await;
    expect_group_created(&mut server, &r, 0, 4).await;
    expect_group_created(&mut server, &r, 1, 4).await;
    expect_shared(&mut server).await;
    let status = expect_status(&mut server, &md).await;
    let action = server.finish(task).await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(REQUEUE_BUSY));

    // The status describes the groups just created (not ready yet), not the empty list observed before.
    assert_eq!((status.replicas, status.ready_replicas, status.ranks_per_replica), (2, 0, 4));
    assert_eq!(status.current_revision.as_deref(), Some(r.as_str()));
    assert_eq!(status.selector, "apps.kubernetes.io/pod-index=0,baleen.dev/model-deployment=tiny");
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(condition(&status, CONDITION_AVAILABLE), ("False", REASON_REPLICAS_NOT_READY));
    assert_eq!(condition(&status, CONDITION_PROGRESSING), ("True", REASON_REPLICAS_NOT_READY));
    assert_eq!(condition(&status, CONDITION_DEGRADED), ("False", REASON_AS_EXPECTED));
    assert!(status.conditions.iter().all(|c| c.observed_generation == Some(1)));
    assert_eq!(status.model.unwrap().experts_per_rank, Some(4));
    assert_eq!(ctx.metrics.reconciles(metrics::RESULT_OK), 1);
}

#[tokio::test]
async fn the_pod_monitor_is_applied_when_enabled() {
    let md = md(1, 1);
    let r = rev(&md);
    let config = OperatorConfig { pod_monitor: true, ..OperatorConfig::default() };
    let (ctx, mut server) = setup(config);
    let task = tokio::spawn(reconcile(Arc::new(md.clone()), ctx));
    expect_lists(&mut server, vec![sts(&r, 0, 1, 1)], pods(&r, 0, 1, true)).await;
    expect_group_repaired(&mut server, &r, 0).await;
    expect_shared(&mut server).await;
    let monitor = expect_apply(&mut server, "/apis/monitoring.coreos.com/v1/namespaces/models/podmonitors/tiny").await;
    assert_eq!(monitor.body["kind"], "PodMonitor");
    let status = expect_status(&mut server, &md).await;
    assert_eq!(server.finish(task).await.unwrap().unwrap(), Action::requeue(REQUEUE_IDLE), "all ready: idle");
    assert_eq!(condition(&status, CONDITION_AVAILABLE), ("True", REASON_ALL_READY));
    assert_eq!(status.endpoints, ["10.1.0.0:8000"]);
}

#[tokio::test]
async fn a_hand_edited_group_is_put_back() {
    // Someone ran `kubectl scale sts` on a group: the operator applies the group as the spec says again.
    let md = md(1, 2);
    let r = rev(&md);
    let (ctx, mut server) = setup(OperatorConfig::default());
    let task = tokio::spawn(reconcile(Arc::new(md.clone()), ctx));
    expect_lists(&mut server, vec![sts(&r, 0, 5, 2)], pods(&r, 0, 2, true)).await;
    let name = format!("tiny-{r}-0");
    let applied = expect_apply(&mut server, &format!("{STS}/{name}")).await;
    assert_eq!(applied.body["spec"]["replicas"], 2, "the group has as many ranks as parallelism.expert");
    let svc = expect_apply(&mut server, &format!("{SERVICES}/{name}")).await;
    assert_eq!(svc.body["spec"]["clusterIP"], "None");
    expect_shared(&mut server).await;
    // The edit left the group with fewer pods than its (edited) rank count: reported until the group is back.
    let status = expect_status(&mut server, &md).await;
    assert_eq!(condition(&status, CONDITION_DEGRADED), ("True", REASON_RANK_MISSING));
    expect_event(&mut server, "Warning", REASON_RANK_MISSING).await;
    server.finish(task).await.unwrap().unwrap();
}

#[tokio::test]
async fn scaling_up_creates_exactly_one_group() {
    let md = md(3, 2);
    let r = rev(&md);
    let (ctx, mut server) = setup(OperatorConfig::default());
    let task = tokio::spawn(reconcile(Arc::new(md.clone()), ctx));
    let mut all_pods = pods(&r, 0, 2, true);
    all_pods.extend(pods(&r, 1, 2, true));
    expect_lists(&mut server, vec![sts(&r, 0, 2, 2), sts(&r, 1, 2, 2)], all_pods).await;
    expect_group_created(&mut server, &r, 2, 2).await;
    expect_group_repaired(&mut server, &r, 0).await;
    expect_group_repaired(&mut server, &r, 1).await;
    expect_shared(&mut server).await;
    let status = expect_status(&mut server, &md).await;
    server.finish(task).await.unwrap().unwrap();
    assert_eq!((status.replicas, status.ready_replicas), (3, 2));
    assert_eq!(condition(&status, CONDITION_PROGRESSING), ("True", REASON_REPLICAS_NOT_READY));
    assert_eq!(condition(&status, CONDITION_AVAILABLE), ("True", REASON_REPLICAS_NOT_READY));
    assert_eq!(status.endpoints, ["10.1.0.0:8000", "10.1.1.0:8000"]);
}

#[tokio::test]
async fn scaling_down_deletes_the_highest_groups() {
    let md = md(1, 1);
    let r = rev(&md);
    let (ctx, mut server) = setup(OperatorConfig::default());
    let task = tokio::spawn(reconcile(Arc::new(md.clone()), ctx));
    let groups = (0..3).map(|i| sts(&r, i, 1, 1)).collect();
    let all_pods = (0..3).flat_map(|i| pods(&r, i, 1, true)).collect();
    expect_lists(&mut server, groups, all_pods).await;
    expect_group_repaired(&mut server, &r, 0).await;
    expect_group_deleted(&mut server, &r, 2).await;
    expect_group_deleted(&mut server, &r, 1).await;
    expect_shared(&mut server).await;
    let status = expect_status(&mut server, &md).await;
    assert_eq!(server.finish(task).await.unwrap().unwrap(), Action::requeue(REQUEUE_BUSY));
    assert_eq!(status.replicas, 1, "the status shows the groups as this reconcile left them");
}

#[tokio::test]
async fn a_rollout_adds_a_new_group_before_removing_an_old_one() {
    let md = md(2, 1);
    let r = rev(&md);
    let old_groups = || vec![sts(OLD, 0, 1, 1), sts(OLD, 1, 1, 1)];
    let old_pods = || [pods(OLD, 0, 1, true), pods(OLD, 1, 1, true)].concat();

    // Step 1: the spec changed; two old groups serve. One new group, nothing deleted.
    let (ctx, mut server) = setup(OperatorConfig::default());
    let task = tokio::spawn(reconcile(Arc::new(md.clone()), ctx.clone()));
    expect_lists(&mut server, old_groups(), old_pods()).await;
    expect_group_created(&mut server, &r, 0, 1).await;
    expect_shared(&mut server).await;
    let status = expect_status(&mut server, &md).await;
    server.finish(task).await.unwrap().unwrap();
    assert_eq!(condition(&status, CONDITION_PROGRESSING), ("True", REASON_ROLLING_OUT));
    assert_eq!((status.replicas, status.updated_replicas), (3, 1));

    // Step 2: the new group is starting: nothing changes, not even the status (step 1 already counted the group).
    let mut md2 = md.clone();
    md2.status = Some(status.clone());
    let task = tokio::spawn(reconcile(Arc::new(md2.clone()), ctx.clone()));
    let mut groups = old_groups();
    groups.push(sts(&r, 0, 1, 0));
    expect_lists(&mut server, groups, [old_pods(), pods(&r, 0, 1, false)].concat()).await;
    expect_group_repaired(&mut server, &r, 0).await;
    expect_shared(&mut server).await;
    server.finish(task).await.unwrap().unwrap();
    assert_eq!((status.replicas, status.ready_replicas, status.updated_replicas), (3, 2, 1));

    // Step 3: the new group is ready: the highest old group goes, and the second new group takes its place.
    md2.status = Some(status);
    let task = tokio::spawn(reconcile(Arc::new(md2.clone()), ctx.clone()));
    let mut groups = old_groups();
    groups.push(sts(&r, 0, 1, 1));
    expect_lists(&mut server, groups, [old_pods(), pods(&r, 0, 1, true)].concat()).await;
    expect_group_created(&mut server, &r, 1, 1).await;
    expect_group_repaired(&mut server, &r, 0).await;
    expect_group_deleted(&mut server, OLD, 1).await;
    expect_shared(&mut server).await;
    let status = expect_status(&mut server, &md2).await;
    server.finish(task).await.unwrap().unwrap();

    // Step 4: only new groups are left, both ready: the rollout is complete.
    md2.status = Some(status);
    let task = tokio::spawn(reconcile(Arc::new(md2.clone()), ctx));
    let groups = vec![sts(&r, 0, 1, 1), sts(&r, 1, 1, 1)];
    expect_lists(&mut server, groups, [pods(&r, 0, 1, true), pods(&r, 1, 1, true)].concat()).await;
    expect_group_repaired(&mut server, &r, 0).await;
    expect_group_repaired(&mut server, &r, 1).await;
    expect_shared(&mut server).await;
    let status = expect_status(&mut server, &md2).await;
    let event = expect_event(&mut server, "Normal", EVENT_ROLLOUT_COMPLETE).await;
    assert!(event.body["note"].as_str().unwrap().contains(&r));
    assert_eq!(server.finish(task).await.unwrap().unwrap(), Action::requeue(REQUEUE_IDLE));
    assert_eq!(condition(&status, CONDITION_PROGRESSING), ("False", REASON_ALL_READY));
}

#[tokio::test]
async fn a_crash_looping_rank_is_degraded_with_one_warning() {
    let md = md(1, 2);
    let r = rev(&md);
    let mut crashing = pods(&r, 0, 2, false);
    crashing[1]["status"]["containerStatuses"] = json!([{
        "name": "runtime", "image": "x", "imageID": "", "ready": false, "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
    }]);
    let (ctx, mut server) = setup(OperatorConfig::default());
    let task = tokio::spawn(reconcile(Arc::new(md.clone()), ctx.clone()));
    expect_lists(&mut server, vec![sts(&r, 0, 2, 1)], crashing.clone()).await;
    expect_group_repaired(&mut server, &r, 0).await;
    expect_shared(&mut server).await;
    let status = expect_status(&mut server, &md).await;
    let warning = expect_event(&mut server, "Warning", REASON_MODEL_LOAD_FAILED).await;
    assert!(warning.body["note"].as_str().unwrap().contains("OOMKilled"), "{}", warning.body);
    assert_eq!(server.finish(task).await.unwrap().unwrap(), Action::requeue(REQUEUE_BUSY));
    assert_eq!(condition(&status, CONDITION_DEGRADED), ("True", REASON_MODEL_LOAD_FAILED));

    // Still crashing at the next reconcile: the same status (not written again) and no second Warning.
    let mut md2 = md.clone();
    md2.status = Some(status);
    let task = tokio::spawn(reconcile(Arc::new(md2.clone()), ctx));
    expect_lists(&mut server, vec![sts(&r, 0, 2, 1)], crashing).await;
    expect_group_repaired(&mut server, &r, 0).await;
    expect_shared(&mut server).await;
    assert_eq!(server.finish(task).await.unwrap().unwrap(), Action::requeue(REQUEUE_BUSY));
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_nothing_is_created() {
    // 3 ranks cannot split builtin:tiny-moe's 16 experts.
    let md = md(2, 3);
    let (ctx, mut server) = setup(OperatorConfig::default());
    let task = tokio::spawn(reconcile(Arc::new(md.clone()), ctx.clone()));
    let status = expect_status(&mut server, &md).await;
    let warning = expect_event(&mut server, "Warning", REASON_INVALID_SPEC).await;
    let action = server.finish(task).await.unwrap().unwrap();
    assert_eq!(action, Action::await_change(), "no requeue: only a change of the object can fix it");
    assert_eq!(condition(&status, CONDITION_DEGRADED), ("True", REASON_INVALID_SPEC));
    assert_eq!(condition(&status, CONDITION_AVAILABLE), ("False", REASON_INVALID_SPEC));
    let message = &find_condition(Some(&status), CONDITION_DEGRADED).unwrap().message;
    assert!(message.contains("spec.parallelism.expert") && message.contains("16"), "{message}");
    assert_eq!(warning.body["note"].as_str(), Some(message.as_str()));
    assert_eq!(ctx.metrics.reconciles(metrics::RESULT_OK), 1, "an invalid spec is handled, not an error");

    // Reconciled again unchanged: the status is already right and the Warning was given: no request at all.
    let mut md2 = md.clone();
    md2.status = Some(status);
    let task = tokio::spawn(reconcile(Arc::new(md2.clone()), ctx.clone()));
    assert_eq!(server.finish(task).await.unwrap().unwrap(), Action::await_change());

    // The spec is edited but still invalid: the status names the new generation, and the Warning is repeated.
    md2.metadata.generation = Some(2);
    let task = tokio::spawn(reconcile(Arc::new(md2.clone()), ctx));
    let status = expect_status(&mut server, &md2).await;
    expect_event(&mut server, "Warning", REASON_INVALID_SPEC).await;
    assert_eq!(server.finish(task).await.unwrap().unwrap(), Action::await_change());
    assert_eq!(find_condition(Some(&status), CONDITION_DEGRADED).unwrap().observed_generation, Some(2));
    server.expect_quiet().await;
}

#[tokio::test]
async fn a_deployment_being_deleted_is_left_to_the_garbage_collector() {
    let mut md = md(1, 1);
    md.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()));
    let (ctx, mut server) = setup(OperatorConfig::default());
    let action = server.finish(reconcile(Arc::new(md), ctx)).await.unwrap();
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn api_failures_back_off_and_are_counted_by_class() {
    let md = Arc::new(md(1, 1));
    let (ctx, mut server) = setup(OperatorConfig::default());
    for expected in [BACKOFF_BASE, BACKOFF_BASE * 2] {
        let task = tokio::spawn(reconcile(md.clone(), ctx.clone()));
        server.expect(Method::GET, STS, StatusCode::INTERNAL_SERVER_ERROR, status_error(500, "InternalError")).await;
        let error = server.finish(task).await.unwrap().unwrap_err();
        assert_eq!(error.class(), "kube");
        assert_eq!(error_policy(md.clone(), &error, ctx.clone()), Action::requeue(expected));
    }
    assert_eq!(ctx.metrics.errors("kube"), 2);
    assert_eq!(ctx.metrics.reconciles(metrics::RESULT_ERROR), 2);
}

#[test]
fn backoff_doubles_up_to_the_maximum() {
    assert_eq!(backoff(1), Duration::from_secs(5));
    assert_eq!(backoff(2), Duration::from_secs(10));
    assert_eq!(backoff(4), Duration::from_secs(40));
    assert_eq!(backoff(7), BACKOFF_MAX);
    assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
}
