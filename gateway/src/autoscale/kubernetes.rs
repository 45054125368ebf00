//! The autoscaler in a cluster: decisions become merge patches of a ModelDeployment's `scale` subresource
//! (field manager [`GATEWAY_AUTOSCALER_FIELD_MANAGER`]), written only by the gateway replica that holds the Lease
//! [`GATEWAY_AUTOSCALER_LEASE_NAME`]; every replica routes and decides. Each change is recorded as an Event
//! ([`EVENT_AUTOSCALED`]) on the ModelDeployment, so `kubectl describe md` tells why it scaled. The operator turns
//! `spec.replicas` into groups (and drains the ones it removes).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use baleen_api::crd::ModelDeployment;
use baleen_api::lease::LeaderElector;
use baleen_api::names::{
    CRD_API_VERSION, CRD_KIND, EVENT_ACTION_SCALE, EVENT_AUTOSCALED, GATEWAY_AUTOSCALER_FIELD_MANAGER,
    GATEWAY_AUTOSCALER_LEASE_NAME,
};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};

use super::{Actuator, ActuatorFuture, Decision};

/// How long the autoscaler waits for its Event to be accepted.
const EVENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// This gateway replica as the autoscaler's writer: whether it holds the Lease now, and the name its Events carry.
#[derive(Debug, Clone)]
pub struct Writer {
    leader: Arc<AtomicBool>,
    reporter: Reporter,
}

impl Writer {
    /// A replica named `identity` that holds the Lease while `leader` is set.
    pub fn new(identity: String, leader: Arc<AtomicBool>) -> Self {
        Self {
            leader,
            reporter: Reporter { controller: GATEWAY_AUTOSCALER_FIELD_MANAGER.into(), instance: Some(identity) },
        }
    }

    /// Whether it holds the Lease now.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }
}

/// Patches `spec.replicas` of one ModelDeployment through its `scale` subresource, and records an Event on it.
#[derive(Clone)]
pub struct ScaleSubresource {
    client: Client,
    api: Api<ModelDeployment>,
    name: String,
    reference: ObjectReference,
    writer: Writer,
}

impl std::fmt::Debug for ScaleSubresource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScaleSubresource").field("name", &self.name).finish_non_exhaustive()
    }
}

impl ScaleSubresource {
    /// The ModelDeployment `namespace/name` (with its `uid`, which `kubectl describe` matches Events by), written
    /// while `writer` holds the Lease.
    pub fn new(client: Client, namespace: &str, name: &str, uid: Option<String>, writer: Writer) -> Self {
        let reference = ObjectReference {
            api_version: Some(CRD_API_VERSION.into()),
            kind: Some(CRD_KIND.into()),
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            uid,
            ..ObjectReference::default()
        };
        Self { api: Api::namespaced(client.clone(), namespace), client, name: name.to_string(), reference, writer }
    }
}

impl Actuator for ScaleSubresource {
    fn scale<'a>(&'a self, model: &'a str, from: u32, decision: &'a Decision) -> ActuatorFuture<'a> {
        Box::pin(async move {
            let params =
                PatchParams { field_manager: Some(GATEWAY_AUTOSCALER_FIELD_MANAGER.into()), ..Default::default() };
            let patch = serde_json::json!({ "spec": { "replicas": decision.desired } });
            self.api
                .patch_scale(&self.name, &params, &Patch::Merge(&patch))
                .await
                .map_err(|e| format!("patching modeldeployments/{}/scale: {e}", self.name))?;
            // Best effort: the replica count changed whether or not its Event is accepted. A fresh Recorder per
            // Event keeps each note (a shared one folds same-reason Events into a series with the first note).
            let event = Event {
                type_: EventType::Normal,
                reason: EVENT_AUTOSCALED.into(),
                note: Some(format!("scaled {model} {}", decision.describe(from))),
                action: EVENT_ACTION_SCALE.into(),
                secondary: None,
            };
            let recorder = Recorder::new(self.client.clone(), self.writer.reporter.clone());
            // Bounded: the autoscaler waits for this before it scales other models.
            match tokio::time::timeout(EVENT_TIMEOUT, recorder.publish(&event, &self.reference)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(md = %self.name, "publishing the autoscaling Event failed: {e}"),
                Err(_) => tracing::warn!(md = %self.name, "publishing the autoscaling Event timed out"),
            }
            Ok(())
        })
    }

    fn active(&self) -> bool {
        self.writer.is_leader()
    }
}

/// Starts the election for the autoscaler Lease in `namespace` as `identity`; the writer leads while this
/// replica holds it.
pub fn elect(client: Client, namespace: &str, identity: String) -> (Writer, tokio::task::JoinHandle<()>) {
    let leader = Arc::new(AtomicBool::new(false));
    let elector = LeaderElector::new(client, namespace, GATEWAY_AUTOSCALER_LEASE_NAME, identity.clone());
    let flag = Arc::clone(&leader);
    let task = tokio::spawn(async move { elector.follow(&flag).await });
    (Writer::new(identity, leader), task)
}
