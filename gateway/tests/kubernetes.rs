#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Discovery against a mock Kubernetes API server (tower-test): it answers lists from a state the test edits,
//! holds watch requests open, and answers one with an event when the test says so — so the test decides whether
//! the gateway hears of a change from a watch or only from its periodic relist.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baleen_gateway::Gateway;
use baleen_gateway::backends::kubernetes;
use baleen_gateway::config::{PolicyKind, RoutingArgs};
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

const MDS: &str = "/apis/baleen.dev/v1alpha1/namespaces/models/modeldeployments";
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/models/endpointslices";

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

#[derive(Default)]
struct State {
    mds: Vec<Value>,
    slices: Vec<Value>,
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
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "models");
    let state = Arc::new(Mutex::new(state));
    let (events, events_rx) = mpsc::channel(4);
    tokio::spawn(api_server(handle, Arc::clone(&state), events_rx));
    let gateway = Gateway::new(RoutingArgs::default().settings().unwrap()).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let discovery = kubernetes::run(gateway.clone(), client, Some("models".into()), relist);
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
        State { mds: vec![md("tiny", "prefix-affinity")], slices: vec![slice("tiny", &[true, false])] },
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
        State { mds: vec![md("tiny", "least-load")], slices: vec![slice("tiny", &[true])] },
    );
    assert!(until(Duration::from_secs(5), || served(&h.gateway, "tiny-moe").is_some()).await, "never discovered");
    // The ModelDeployment is deleted while no watch tells the gateway: the next relist removes the model.
    h.state.lock().unwrap().mds.clear();
    assert!(
        until(Duration::from_secs(5), || served(&h.gateway, "tiny-moe").is_none()).await,
        "the deleted model is still served"
    );
}
