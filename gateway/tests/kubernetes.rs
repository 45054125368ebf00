#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Discovery against a mock Kubernetes API server (tower-test): it answers lists from a state the test edits,
//! holds watch requests open, and answers one with an event when the test says so — so the test decides whether
//! the gateway hears of a change from a watch or only from its periodic relist.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicBool;

use baleen_gateway::Gateway;
use baleen_gateway::autoscale;
use baleen_gateway::backends::kubernetes;
use baleen_gateway::config::{PolicyKind, RoutingArgs};
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

mod common;
use tokio::sync::{mpsc, oneshot};

const MDS: &str = "/apis/baleen.dev/v1alpha1/namespaces/models/modeldeployments";
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/models/endpointslices";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/models/leases";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/models/leases/baleen-gateway-autoscaler";
const SCALE: &str = "/apis/baleen.dev/v1alpha1/namespaces/models/modeldeployments/tiny/scale";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/models/events";
const UID: &str = "5d7c8a52-0b8e-4f4e-9a51-5b1f0c2a7e11";

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Reply = tower_test::mock::SendResponse<Response<Body>>;

fn md(name: &str, policy: &str) -> Value {
    json!({"apiVersion": "baleen.dev/v1alpha1", "kind": "ModelDeployment",
           "metadata": {"name": name, "namespace": "models", "resourceVersion": "1"},
           "spec": {"model": {"source": "builtin:tiny-moe"}, "routing": {"policy": policy}}})
}

/// The heads Service's slice: `ready[i]` for endpoint 127.0.0.1 (port 1: nothing listens, probes fail fast).
fn slice(service: &str, ready: &[bool]) -> Value {
    let endpoints: Vec<Value> = ready
        .iter()
        .enumerate()
        .map(|(i, r)| json!({"addresses": [format!("127.0.0.{}", i + 1)], "conditions": {"ready": r}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-abc"), "namespace": "models", "resourceVersion": "1",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 1, "protocol": "TCP"}], "endpoints": endpoints})
}

/// An autoscaled ModelDeployment at zero replicas.
fn md_at_zero(name: &str) -> Value {
    json!({"apiVersion": "baleen.dev/v1alpha1", "kind": "ModelDeployment",
           "metadata": {"name": name, "namespace": "models", "resourceVersion": "1", "uid": UID},
           "spec": {"model": {"source": "builtin:tiny-moe"}, "replicas": 0,
                    "autoscaling": {"minReplicas": 0, "maxReplicas": 2}}})
}

/// A Lease held by `holder`, renewed now.
fn lease(holder: &str) -> Value {
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "baleen-gateway-autoscaler", "namespace": "models", "resourceVersion": "7"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": now, "acquireTime": now}})
}

#[derive(Default)]
struct State {
    mds: Vec<Value>,
    slices: Vec<Value>,
    /// The autoscaler Lease, as last written.
    lease: Option<Value>,
    /// Requests that write anything but the Lease and Events: (method, path, query, content type, body).
    writes: Vec<(String, String, String, String, Value)>,
    /// Events posted.
    posted: Vec<Value>,
}

fn respond(reply: Reply, body: Value) {
    let bytes = serde_json::to_vec(&body).unwrap();
    reply.send_response(Response::builder().status(StatusCode::OK).body(Body::from(bytes)).unwrap());
}

/// Answers a held watch with one MODIFIED event: the first object of its kind.
fn send_event(reply: Reply, state: &Mutex<State>, path: &str) {
    let object = {
        let state = state.lock().unwrap();
        if path == MDS { state.mds.first().cloned() } else { state.slices.first().cloned() }
    };
    respond(reply, json!({"type": "MODIFIED", "object": object.unwrap()}));
}

/// Serves lists from `state`; holds watches until `events` names their path, then answers with one MODIFIED
/// event of the first object of that kind.
async fn api_server(mut handle: Handle, state: Arc<Mutex<State>>, mut events: mpsc::Receiver<&'static str>) {
    let mut held: HashMap<String, Vec<Reply>> = HashMap::new();
    // Events announced before their watch was (re)opened: answered when it is.
    let mut pending: Vec<&'static str> = Vec::new();
    loop {
        tokio::select! {
            next = handle.next_request() => {
                let Some((request, reply)) = next else { return };
                let path = request.uri().path().to_string();
                let watch = request.uri().query().unwrap_or("").contains("watch=true");
                if watch {
                    if let Some(i) = pending.iter().position(|p| *p == path) {
                        let kind = pending.remove(i);
                        send_event(reply, &state, kind);
                    } else {
                        held.entry(path).or_default().push(reply);
                    }
                    continue;
                }
                let method = request.method().to_string();
                if path.starts_with(LEASES) || path == SCALE || path == EVENTS {
                    let query = request.uri().query().unwrap_or("").to_string();
                    let content_type = request
                        .headers()
                        .get("content-type")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    let bytes = request.into_body().collect_bytes().await.unwrap();
                    let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
                    let mut state = state.lock().unwrap();
                    match (method.as_str(), path.as_str()) {
                        ("GET", LEASE) => match state.lease.clone() {
                            Some(lease) => respond(reply, lease),
                            None => {
                                let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                    "reason": "NotFound", "code": 404, "message": "not found"});
                                let bytes = serde_json::to_vec(&status).unwrap();
                                reply.send_response(
                                    Response::builder().status(StatusCode::NOT_FOUND).body(Body::from(bytes)).unwrap(),
                                );
                            }
                        },
                        ("POST", LEASES) | ("PUT", LEASE) => {
                            state.lease = Some(body.clone());
                            respond(reply, body);
                        }
                        ("POST", EVENTS) => {
                            state.posted.push(body.clone());
                            respond(reply, body);
                        }
                        _ => {
                            // The API server applies a scale patch to the ModelDeployment's spec.replicas.
                            if let (Some(replicas), Some(md)) = (body["spec"]["replicas"].as_u64(), state.mds.first_mut()) {
                                md["spec"]["replicas"] = json!(replicas);
                            }
                            state.writes.push((method, path, query, content_type, body));
                            respond(reply, json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                                                  "metadata": {"name": "tiny", "namespace": "models"},
                                                  "spec": {"replicas": 1}, "status": {"replicas": 0}}));
                        }
                    }
                    continue;
                }
                let state = state.lock().unwrap();
                let (kind, api_version, items) = match path.as_str() {
                    MDS => ("ModelDeploymentList", "baleen.dev/v1alpha1", state.mds.clone()),
                    SLICES => ("EndpointSliceList", "discovery.k8s.io/v1", state.slices.clone()),
                    other => panic!("unexpected request {other}"),
                };
                respond(reply, json!({"kind": kind, "apiVersion": api_version,
                                      "metadata": {"resourceVersion": "1"}, "items": items}));
            }
            event = events.recv() => {
                let Some(path) = event else { return };
                match held.get_mut(path).and_then(Vec::pop) {
                    Some(reply) => send_event(reply, &state, path),
                    None => pending.push(path),
                }
            }
        }
    }
}

struct Harness {
    gateway: Gateway,
    state: Arc<Mutex<State>>,
    events: mpsc::Sender<&'static str>,
    _stop: oneshot::Sender<()>,
}

fn start(relist: Duration, state: State) -> Harness {
    start_with(relist, state, RoutingArgs::default(), false)
}

/// The gateway discovering from the mock API; with `elect` it also runs for the autoscaler Lease as `gw-a`.
fn start_with(relist: Duration, state: State, routing: RoutingArgs, elect: bool) -> Harness {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "models");
    let state = Arc::new(Mutex::new(state));
    let (events, events_rx) = mpsc::channel(4);
    tokio::spawn(api_server(handle, Arc::clone(&state), events_rx));
    let gateway = Gateway::new(routing.settings().unwrap()).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let writer = if elect {
        let (writer, election) = autoscale::kubernetes::elect(client.clone(), "models", "gw-a".into());
        std::mem::forget(election);
        writer
    } else {
        autoscale::kubernetes::Writer::new("gw-a".into(), Arc::new(AtomicBool::new(false)))
    };
    let discovery = kubernetes::run(gateway.clone(), client, Some("models".into()), relist, writer);
    tokio::spawn(async move {
        tokio::select! {
            () = discovery => {}
            _ = stopped => {}
        }
    });
    Harness { gateway, state, events, _stop: stop }
}

/// The model's policy and backend URLs, or None when it is not served.
fn served(gateway: &Gateway, model: &str) -> Option<(PolicyKind, Vec<String>)> {
    let pool = gateway.app().registry.get(model)?;
    Some((pool.policy.kind(), pool.backends().iter().map(|b| b.url.clone()).collect()))
}

async fn until(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

#[tokio::test]
async fn watch_events_add_and_remove_backends() {
    // Relists are an hour apart: whatever changes within the test, a watch event announced.
    let h = start(
        Duration::from_secs(3600),
        State {
            mds: vec![md("tiny", "prefix-affinity")],
            slices: vec![slice("tiny", &[true, false])],
            ..State::default()
        },
    );
    let one = vec!["http://127.0.0.1:1".to_string()];
    assert!(until(Duration::from_secs(5), || served(&h.gateway, "tiny-moe").is_some()).await, "never discovered");
    assert_eq!(served(&h.gateway, "tiny-moe"), Some((PolicyKind::PrefixAffinity, one.clone())), "only ready heads");

    // The second head turns ready: an EndpointSlice event adds it.
    h.state.lock().unwrap().slices = vec![slice("tiny", &[true, true])];
    h.events.send(SLICES).await.unwrap();
    let two = vec!["http://127.0.0.1:1".to_string(), "http://127.0.0.2:1".to_string()];
    assert!(
        until(Duration::from_secs(5), || served(&h.gateway, "tiny-moe").is_some_and(|(_, b)| b == two)).await,
        "the watch event did not add the head: {:?}",
        served(&h.gateway, "tiny-moe")
    );

    // The first one goes: removed.
    h.state.lock().unwrap().slices = vec![slice("tiny", &[false, true])];
    h.events.send(SLICES).await.unwrap();
    assert!(
        until(Duration::from_secs(5), || served(&h.gateway, "tiny-moe")
            .is_some_and(|(_, b)| b == ["http://127.0.0.2:1"]))
        .await,
        "the watch event did not remove the head: {:?}",
        served(&h.gateway, "tiny-moe")
    );

    // The policy changes on the ModelDeployment: a ModelDeployment event applies it, backends kept.
    h.state.lock().unwrap().mds = vec![md("tiny", "round-robin")];
    h.events.send(MDS).await.unwrap();
    assert!(
        until(Duration::from_secs(5), || served(&h.gateway, "tiny-moe")
            .is_some_and(|(p, b)| p == PolicyKind::RoundRobin && b == ["http://127.0.0.2:1"]))
        .await,
        "{:?}",
        served(&h.gateway, "tiny-moe")
    );
}

#[tokio::test]
async fn a_relist_repairs_a_missed_delete() {
    let h = start(
        Duration::from_millis(300),
        State { mds: vec![md("tiny", "least-load")], slices: vec![slice("tiny", &[true])], ..State::default() },
    );
    assert!(until(Duration::from_secs(5), || served(&h.gateway, "tiny-moe").is_some()).await, "never discovered");
    // The ModelDeployment is deleted while no watch tells the gateway: the next relist removes the model.
    h.state.lock().unwrap().mds.clear();
    assert!(
        until(Duration::from_secs(5), || served(&h.gateway, "tiny-moe").is_none()).await,
        "the deleted model is still served"
    );
}

/// Serves `gateway` on free ports; its API base URL.
async fn serve(gateway: &Gateway) -> String {
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", api.local_addr().unwrap());
    tokio::spawn(gateway.clone().serve(api, admin, std::future::pending()));
    url
}

/// Fast ticks and a short hold, so a request held at zero comes back within the test.
fn quick() -> RoutingArgs {
    RoutingArgs { scrape_interval: 0.1, hold_timeout: 1.5, ..RoutingArgs::default() }
}

#[tokio::test]
async fn the_lease_holder_patches_the_scale_subresource_for_a_request_held_at_zero() {
    let h = start_with(
        Duration::from_secs(3600),
        State { mds: vec![md_at_zero("tiny")], ..State::default() },
        quick(),
        true,
    );
    let holder = || h.state.lock().unwrap().lease.as_ref().map(|l| l["spec"]["holderIdentity"].clone());
    assert!(until(Duration::from_secs(5), || holder() == Some(json!("gw-a"))).await, "never took the Lease");
    assert!(until(Duration::from_secs(5), || served(&h.gateway, "tiny-moe").is_some()).await, "never discovered");
    let url = serve(&h.gateway).await;
    let (status, models) = common::get(&format!("{url}/v1/models")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(models.contains("tiny-moe"), "an autoscaled model at zero is listed: {models}");

    // A request at zero: held, the autoscaler decides 0 → 1 at once, the leader patches the scale subresource.
    let held =
        tokio::spawn(async move { common::post(&format!("{url}/v1/chat/completions"), &common::chat("hi", 2)).await });
    assert!(until(Duration::from_secs(5), || !h.state.lock().unwrap().writes.is_empty()).await, "no scale patch");
    let (method, path, query, content_type, body) = h.state.lock().unwrap().writes[0].clone();
    assert_eq!((method.as_str(), path.as_str()), ("PATCH", SCALE));
    assert_eq!(query.trim_start_matches('&'), "fieldManager=baleen-gateway-autoscaler", "{query}");
    assert_eq!(content_type, "application/merge-patch+json");
    assert_eq!(body, json!({"spec": {"replicas": 1}}));
    // No replica comes up in this test: the held request gets the 503 that says the model is starting.
    let answer = held.await.unwrap();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.error()["message"].as_str().unwrap().contains("is starting"), "{:?}", answer.body);
    assert_eq!(answer.headers.get("retry-after").unwrap(), "5");
    // Only the Lease and that one patch were written (the decision is not repeated while the count holds)...
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = h.state.lock().unwrap().writes.clone();
    assert_eq!(writes.len(), 1, "{writes:?}");
    // ...and one Event on the ModelDeployment says what changed and why, from this replica.
    let posted = h.state.lock().unwrap().posted.clone();
    assert_eq!(posted.len(), 1, "{posted:#?}");
    let event = &posted[0];
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["reason"], "Autoscaled");
    assert_eq!(event["action"], "Scale");
    assert_eq!(event["note"], "scaled tiny-moe from 0 to 1 replica (FromZero; load unknown)");
    assert_eq!(event["reportingController"], "baleen-gateway-autoscaler");
    assert_eq!(event["reportingInstance"], "gw-a");
    let regarding = &event["regarding"];
    assert_eq!(
        (&regarding["apiVersion"], &regarding["kind"], &regarding["namespace"], &regarding["name"], &regarding["uid"]),
        (&json!("baleen.dev/v1alpha1"), &json!("ModelDeployment"), &json!("models"), &json!("tiny"), &json!(UID)),
        "{event:#}"
    );
}

#[tokio::test]
async fn a_replica_that_does_not_hold_the_lease_decides_but_never_writes() {
    let state = State { mds: vec![md_at_zero("tiny")], lease: Some(lease("gw-b")), ..State::default() };
    let h = start_with(Duration::from_secs(3600), state, quick(), true);
    assert!(until(Duration::from_secs(5), || served(&h.gateway, "tiny-moe").is_some()).await, "never discovered");
    let url = serve(&h.gateway).await;
    let held =
        tokio::spawn(async move { common::post(&format!("{url}/v1/chat/completions"), &common::chat("hi", 2)).await });
    // While the request is held it decides 0 → 1 all the same (its gauge agrees with the leader's)...
    let gateway = h.gateway.clone();
    let desired_one =
        || gateway.app().metrics.render().contains("baleen_gateway_desired_replicas{model=\"tiny-moe\"} 1");
    assert!(until(Duration::from_secs(2), desired_one).await, "{}", h.gateway.app().metrics.render());
    // ...but writes nothing, and keeps the replica count it read.
    let answer = held.await.unwrap();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let state = h.state.lock().unwrap();
    assert!(state.writes.is_empty(), "a follower wrote: {:?}", state.writes);
    assert!(state.posted.is_empty(), "a follower posted Events: {:?}", state.posted);
    assert_eq!(state.lease.as_ref().unwrap()["spec"]["holderIdentity"], "gw-b", "the live Lease was not taken");
    drop(state);
    assert_eq!(h.gateway.app().autoscaler.current("tiny-moe"), Some(0));
}
