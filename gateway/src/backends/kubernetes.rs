//! Discovery in the cluster: every `ModelDeployment` is a model (its served name, its `spec.routing.policy`)
//! whose backends are the ready endpoints of its heads Service (named like it; the operator selects each group's
//! head there, or every rank with data-parallel attention), read from that Service's EndpointSlices.
//!
//! The state always comes from a full list of both kinds ([`sync`]): watches on both only say *when* to list
//! again (a burst of events is one relist), and a periodic relist repairs whatever a watch missed (a delete while
//! the watch was down, say). Models that disappear are removed; a backend that stays keeps its state.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use std::sync::Arc;

use baleen_api::crd::{AutoscalingSpec, ModelDeployment};
use baleen_api::names::{PORT_NAME_HTTP, RUNTIME_HTTP_PORT};
use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;

use crate::autoscale::kubernetes::{ScaleSubresource, Writer};
use crate::config::PolicyKind;
use crate::server::Gateway;

/// The label the EndpointSlice controller puts on a Service's slices: the Service's name.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Events arriving within this long after the first are served by one relist.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Pause before listing again after a failed list.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(2);

/// One model as discovered.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    pub name: String,
    pub policy: PolicyKind,
    /// `http://ip:port`, sorted.
    pub backends: Vec<String>,
    /// Its `spec.autoscaling`, when set.
    pub scaling: Option<Scaling>,
}

/// What the autoscaler needs of an autoscaled ModelDeployment.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaling {
    pub namespace: String,
    /// The ModelDeployment's name (its `scale` subresource is patched).
    pub deployment: String,
    /// Its uid (the Events' reference).
    pub uid: Option<String>,
    pub spec: AutoscalingSpec,
    /// `spec.replicas` now.
    pub replicas: u32,
    /// API heads per group.
    pub heads_per_group: u32,
}

/// The ready `http` endpoints of a Service's slices.
fn ready_endpoints<'a>(slices: impl Iterator<Item = &'a EndpointSlice>) -> BTreeSet<String> {
    let mut urls = BTreeSet::new();
    for slice in slices {
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(PORT_NAME_HTTP))
            .and_then(|p| p.port)
            .unwrap_or(i32::from(RUNTIME_HTTP_PORT));
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            // `ready` unset means ready (the API's rule); a terminating endpoint takes no new requests.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true)
                && !conditions.and_then(|c| c.terminating).unwrap_or(false);
            if !ready {
                continue;
            }
            if let Some(address) = endpoint.addresses.first() {
                let host = if address.contains(':') { format!("[{address}]") } else { address.clone() };
                urls.insert(format!("http://{host}:{port}"));
            }
        }
    }
    urls
}

/// The models of `deployments` with the ready heads among `slices`. Deployments being deleted, or whose spec
/// has no served name (an invalid source), are left out. Two deployments serving one name share it: their
/// heads are pooled under the policy of the first (by namespace and name).
pub fn models(deployments: &[ModelDeployment], slices: &[EndpointSlice]) -> Vec<Discovered> {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        if let Some(service) = slice.labels().get(LABEL_SERVICE_NAME) {
            by_service.entry((slice.namespace().unwrap_or_default(), service.clone())).or_default().push(slice);
        }
    }
    let mut sorted: Vec<&ModelDeployment> =
        deployments.iter().filter(|md| md.metadata.deletion_timestamp.is_none()).collect();
    sorted.sort_by_key(|md| (md.namespace(), md.name_any()));
    let mut out: BTreeMap<String, Discovered> = BTreeMap::new();
    for md in sorted {
        let Ok(name) = md.spec.cluster_served_name() else { continue };
        let key = (md.namespace().unwrap_or_default(), md.name_any());
        let heads = ready_endpoints(by_service.get(&key).into_iter().flatten().copied());
        let entry = out.entry(name.clone()).or_insert_with(|| Discovered {
            name,
            policy: md.spec.routing_policy(),
            backends: Vec::new(),
            scaling: md.spec.autoscaling.clone().map(|spec| Scaling {
                namespace: key.0.clone(),
                deployment: key.1.clone(),
                uid: md.metadata.uid.clone(),
                spec,
                replicas: md.spec.replicas(),
                heads_per_group: md.spec.heads_per_group(),
            }),
        });
        entry.backends.extend(heads);
        entry.backends.sort();
        entry.backends.dedup();
    }
    out.into_values().collect()
}

/// Lists both kinds (in `namespace`, or everywhere) and returns the models.
pub async fn sync(client: &Client, namespace: Option<&str>) -> Result<Vec<Discovered>, kube::Error> {
    let (deployments, slices): (Api<ModelDeployment>, Api<EndpointSlice>) = match namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let deployments = deployments.list(&ListParams::default()).await?.items;
    let slices = slices.list(&ListParams::default().labels(LABEL_SERVICE_NAME)).await?.items;
    Ok(models(&deployments, &slices))
}

/// Makes the gateway serve exactly `discovered`: adds and updates those models, removes the ones in `known` that
/// are gone; `known` becomes the new set. Autoscaled models are scaled through their `scale` subresource with
/// `client` while `writer` holds the Lease.
pub fn apply(
    gateway: &Gateway,
    discovered: &[Discovered],
    known: &mut BTreeSet<String>,
    client: &Client,
    writer: &Writer,
) {
    let mut now = BTreeSet::new();
    for model in discovered {
        if let Err(e) = gateway.set_model(&model.name, model.policy, &model.backends) {
            tracing::warn!(model = %model.name, "skipping a discovered model: {e}");
            continue;
        }
        match &model.scaling {
            Some(s) => {
                let (namespace, name, uid) = (&s.namespace, &s.deployment, s.uid.clone());
                let actuator = ScaleSubresource::new(client.clone(), namespace, name, uid, writer.clone());
                let per_group = s.heads_per_group;
                if let Err(e) = gateway.autoscale(&model.name, &s.spec, s.replicas, per_group, Arc::new(actuator)) {
                    tracing::warn!(model = %model.name, "not autoscaling: {e}");
                    gateway.stop_autoscaling(&model.name);
                }
            }
            None => gateway.stop_autoscaling(&model.name),
        }
        now.insert(model.name.clone());
    }
    for gone in known.difference(&now) {
        gateway.stop_autoscaling(gone);
        gateway.remove_model(gone);
        tracing::info!(model = %gone, "model removed: its ModelDeployment is gone");
    }
    *known = now;
}

/// Forwards "something changed" from a watch of `api` into `changed` until the receiver is gone.
async fn watch<K>(api: Api<K>, config: watcher::Config, changed: mpsc::Sender<()>)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let mut events = std::pin::pin!(watcher(api, config));
    while let Some(event) = events.next().await {
        match event {
            Ok(_) => {
                if changed.try_send(()).is_err() && changed.is_closed() {
                    return;
                }
            }
            // The watcher backs off and lists again by itself; say so once per failure.
            Err(e) => tracing::debug!("watch failed: {e}"),
        }
    }
}

/// Discovers until the task is dropped: a relist at start, after every burst of watch events, and every
/// `relist` at the latest.
pub async fn run(gateway: Gateway, client: Client, namespace: Option<String>, relist: Duration, writer: Writer) {
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    let (deployments, slices): (Api<ModelDeployment>, Api<EndpointSlice>) = match &namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let watches = [
        tokio::spawn(watch(deployments, watcher::Config::default(), changed_tx.clone())),
        tokio::spawn(watch(slices, watcher::Config::default().labels(LABEL_SERVICE_NAME), changed_tx)),
    ];
    let _abort_on_drop = AbortOnDrop(watches.into());
    let mut known = BTreeSet::new();
    loop {
        match sync(&client, namespace.as_deref()).await {
            Ok(discovered) => {
                apply(&gateway, &discovered, &mut known, &client, &writer);
                gateway.probe_now().await;
            }
            Err(e) => {
                tracing::warn!("listing ModelDeployments and EndpointSlices failed: {e}");
                gateway.app().metrics.discovery_error();
                tokio::time::sleep(RETRY_AFTER_ERROR).await;
                continue;
            }
        }
        // Wait for a change or the relist, then let the burst settle.
        if let Ok(Some(())) = tokio::time::timeout(relist, changed.recv()).await {
            tokio::time::sleep(DEBOUNCE).await;
            while changed.try_recv().is_ok() {}
        }
    }
}

/// Aborts its tasks when dropped (the watches when discovery stops, the election with discovery).
pub(crate) struct AbortOnDrop(pub(crate) Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use baleen_api::crd::ModelDeploymentSpec;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    use super::*;

    fn md(ns: &str, name: &str, served: Option<&str>, policy: Option<PolicyKind>) -> ModelDeployment {
        let mut spec = ModelDeploymentSpec::new("builtin:tiny-moe");
        spec.model.served_name = served.map(str::to_string);
        spec.routing = policy.map(|p| baleen_api::crd::RoutingSpec { policy: Some(p) });
        let mut md = ModelDeployment::new(name, spec);
        md.metadata.namespace = Some(ns.into());
        md
    }

    fn slice(
        ns: &str,
        service: &str,
        port: Option<i32>,
        endpoints: Vec<(&str, Option<bool>, Option<bool>)>,
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                labels: Some([(LABEL_SERVICE_NAME.to_string(), service.to_string())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            ports: port.map(|p| {
                vec![EndpointPort { name: Some(PORT_NAME_HTTP.into()), port: Some(p), ..EndpointPort::default() }]
            }),
            endpoints: endpoints
                .into_iter()
                .map(|(ip, ready, terminating)| Endpoint {
                    addresses: vec![ip.into()],
                    conditions: Some(EndpointConditions { ready, terminating, serving: None }),
                    ..Endpoint::default()
                })
                .collect(),
        }
    }

    #[test]
    fn ready_heads_of_each_deployment_become_its_backends() {
        let mds = [md("a", "tiny", None, Some(PolicyKind::PrefixAffinity)), md("b", "big", Some("whale"), None)];
        let slices = [
            slice(
                "a",
                "tiny",
                Some(8000),
                vec![("10.0.0.1", Some(true), None), ("10.0.0.2", None, None), ("10.0.0.3", Some(false), None)],
            ),
            slice("a", "tiny", None, vec![("10.0.0.4", Some(true), Some(true)), ("fd00::5", Some(true), None)]),
            // Same Service name in another namespace: not `tiny`'s.
            slice("b", "tiny", Some(8000), vec![("10.9.9.9", Some(true), None)]),
            slice("b", "big", Some(9000), vec![("10.1.0.1", Some(true), None)]),
        ];
        let found = models(&mds, &slices);
        assert_eq!(
            found,
            [
                Discovered {
                    name: "tiny-moe".into(),
                    policy: PolicyKind::PrefixAffinity,
                    backends: vec![
                        "http://10.0.0.1:8000".into(),
                        "http://10.0.0.2:8000".into(),
                        "http://[fd00::5]:8000".into()
                    ],
                    scaling: None,
                },
                Discovered {
                    name: "whale".into(),
                    policy: PolicyKind::LeastLoad,
                    backends: vec!["http://10.1.0.1:9000".into()],
                    scaling: None,
                },
            ]
        );
    }

    #[test]
    fn deployments_sharing_a_name_pool_their_heads_and_deleting_ones_are_left_out() {
        let mut deleting = md("a", "old", None, None);
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let mds = [
            md("b", "two", None, Some(PolicyKind::RoundRobin)),
            md("a", "one", None, Some(PolicyKind::SessionAffinity)),
            deleting,
        ];
        let slices = [
            slice("a", "one", Some(8000), vec![("10.0.0.1", Some(true), None)]),
            slice("b", "two", Some(8000), vec![("10.0.0.2", Some(true), None)]),
            slice("a", "old", Some(8000), vec![("10.0.0.3", Some(true), None)]),
        ];
        let found = models(&mds, &slices);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].policy, PolicyKind::SessionAffinity, "the first by namespace and name decides");
        assert_eq!(found[0].backends, ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]);
    }
}
