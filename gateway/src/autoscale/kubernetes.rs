//! The autoscaler in a cluster: decisions become merge patches of a ModelDeployment's `scale` subresource
//! (field manager [`GATEWAY_AUTOSCALER_FIELD_MANAGER`]), written only by the gateway replica that holds the Lease
//! [`GATEWAY_AUTOSCALER_LEASE_NAME`]; every replica routes and decides. The operator turns `spec.replicas` into
//! groups (and drains the ones it removes).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use baleen_api::crd::ModelDeployment;
use baleen_api::lease::LeaderElector;
use baleen_api::names::{GATEWAY_AUTOSCALER_FIELD_MANAGER, GATEWAY_AUTOSCALER_LEASE_NAME};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::{Actuator, ActuatorFuture, Decision};

/// Patches `spec.replicas` of one ModelDeployment through its `scale` subresource.
#[derive(Clone)]
pub struct ScaleSubresource {
    api: Api<ModelDeployment>,
    name: String,
    leader: Arc<AtomicBool>,
}

impl std::fmt::Debug for ScaleSubresource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScaleSubresource").field("name", &self.name).finish_non_exhaustive()
    }
}

impl ScaleSubresource {
    /// The ModelDeployment `namespace/name`, written while `leader` is set.
    pub fn new(client: Client, namespace: &str, name: &str, leader: Arc<AtomicBool>) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.to_string(), leader }
    }
}

impl Actuator for ScaleSubresource {
    fn scale<'a>(&'a self, _model: &'a str, _from: u32, decision: &'a Decision) -> ActuatorFuture<'a> {
        Box::pin(async move {
            let params =
                PatchParams { field_manager: Some(GATEWAY_AUTOSCALER_FIELD_MANAGER.into()), ..Default::default() };
            let patch = serde_json::json!({ "spec": { "replicas": decision.desired } });
            self.api
                .patch_scale(&self.name, &params, &Patch::Merge(&patch))
                .await
                .map(drop)
                .map_err(|e| format!("patching modeldeployments/{}/scale: {e}", self.name))
        })
    }

    fn active(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }
}

/// Starts the election for the autoscaler Lease in `namespace` as `identity`; the flag is set while this replica
/// holds it.
pub fn elect(client: Client, namespace: &str, identity: String) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let leader = Arc::new(AtomicBool::new(false));
    let elector = LeaderElector::new(client, namespace, GATEWAY_AUTOSCALER_LEASE_NAME, identity);
    let flag = Arc::clone(&leader);
    let task = tokio::spawn(async move { elector.follow(&flag).await });
    (leader, task)
}
