//! The controller: reconciles each `ModelDeployment` into replica groups with server-side apply, writes its
//! status and records Events. [`run`] is `baleen-operator run`: admin server, leader election, then the
//! controller until SIGTERM.
//!
//! One reconcile ([`reconcile`]):
//!
//! 1. A ModelDeployment being deleted is left alone: its objects carry it as their controlling owner, so the
//!    garbage collector removes them.
//! 2. An invalid spec (or name) is reported — `Degraded`/`InvalidSpec` with the validation message, one Warning
//!    Event — and nothing is created, changed or deleted; the reconcile waits for the next change of the object.
//! 3. Otherwise the StatefulSets and pods labelled with the ModelDeployment's name are listed, and
//!    [`plan`](crate::plan::plan) says which groups to create (StatefulSet, then its headless Service, both by
//!    server-side apply) and which to delete (StatefulSet and Service, propagation `Background`: the StatefulSet
//!    goes at once, so its name and index are free again and the status stops counting it, and the garbage
//!    collector then removes its pods, each of which drains through its own termination grace period).
//! 4. The groups of the current revision that stay are applied again (drift repair; a no-op when nothing changed),
//!    and the shared objects every time: the heads Service, the PodDisruptionBudget and, with `--pod-monitor`,
//!    the PodMonitor.
//! 5. The status ([`crate::status::compute`]) of the groups as step 3 left them — created groups counted (not
//!    ready yet), deleted ones gone — is applied to the status subresource, unless it is exactly the status the
//!    object already has.
//!
//! Events: `GroupCreated`/`GroupDeleted` for each group, `RolloutComplete` once no old group is left, and a
//! Warning with the `Degraded` reason whenever `Degraded` turns true, changes reason, or stays true across a spec
//! change. Requeue: [`REQUEUE_BUSY`] while anything is progressing or degraded, [`REQUEUE_IDLE`] otherwise;
//! failures back off exponentially from [`BACKOFF_BASE`] to [`BACKOFF_MAX`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baleen_api::crd::{ModelDeployment, ModelDeploymentStatus, validate_name};
use baleen_api::names::{
    CONDITION_DEGRADED, CONDITION_PROGRESSING, CRD_API_VERSION, CRD_KIND, EVENT_GROUP_CREATED, EVENT_GROUP_DELETED,
    EVENT_ROLLOUT_COMPLETE, LABEL_MODEL_DEPLOYMENT, OPERATOR_CONTROLLER_NAME, OPERATOR_FIELD_MANAGER,
    OPERATOR_LEASE_NAME, REASON_ROLLING_OUT,
};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::OperatorConfig;
use crate::error::{Error, Result};
use crate::leader::LeaderElector;
use crate::metrics::{self, Metrics};
use crate::plan::{ObservedGroup, Plan, plan};
use crate::resources::{self, GroupRef};
use crate::status::{self, find_condition, group_index, group_ready, group_revision};

#[cfg(test)]
pub(crate) mod mock;
#[cfg(test)]
mod tests;

/// Requeue while groups are starting, being replaced, or something is wrong.
pub const REQUEUE_BUSY: Duration = Duration::from_secs(10);
/// Requeue when everything is as asked (a safety net; watch events drive the rest).
pub const REQUEUE_IDLE: Duration = Duration::from_secs(300);
/// First retry after a failed reconcile; each further failure in a row doubles it.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay after failures.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Watch events within this window are reconciled once.
pub const DEBOUNCE: Duration = Duration::from_secs(1);

/// `action` of the Events about groups.
const ACTION_CREATE: &str = "Create";
const ACTION_DELETE: &str = "Delete";
const ACTION_RECONCILE: &str = "Reconcile";

/// Settings of `baleen-operator run`.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Defaults for the objects created.
    pub config: crate::OperatorConfig,
    /// Namespace to watch; empty = all.
    pub namespace: String,
    /// Namespace of the leader Lease.
    pub lease_namespace: Option<String>,
    /// Identity in the Lease.
    pub identity: Option<String>,
    /// Admin server address.
    pub admin_addr: std::net::SocketAddr,
}

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Operator defaults for the objects created.
    pub config: OperatorConfig,
    /// Names the operator (and this replica) as the source of its Events.
    pub reporter: Reporter,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Failed reconciles in a row, by `namespace/name`, for the back-off of [`error_policy`].
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Context {
    /// A context whose Events name `instance` (this replica) as their reporting instance.
    pub fn new(client: Client, config: OperatorConfig, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let reporter = Reporter { controller: OPERATOR_CONTROLLER_NAME.to_string(), instance };
        Self { reporter, client, config, metrics, failures: Mutex::new(HashMap::new()) }
    }

    fn key(md: &ModelDeployment) -> String {
        format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any())
    }

    /// Counts one more failure of `md` and returns how many in a row.
    fn failed(&self, md: &ModelDeployment) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = failures.entry(Self::key(md)).or_insert(0);
        *count = count.saturating_add(1);
        *count
    }

    fn succeeded(&self, md: &ModelDeployment) {
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&Self::key(md));
    }
}

/// The retry delay after `failures` failed reconciles in a row: 5 s, 10 s, 20 s, ... at most 5 min.
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << doublings).min(BACKOFF_MAX)
}

/// Reconciles one ModelDeployment (see the module docs), counting it in the metrics.
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action> {
    let start = Instant::now();
    let result = reconcile_inner(&md, &ctx).await;
    ctx.metrics.reconciled(result.is_ok(), start.elapsed());
    if result.is_ok() {
        ctx.succeeded(&md);
    }
    result
}

/// After a failed reconcile: count the error by class and retry with exponential back-off.
pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error);
    let failures = ctx.failed(&md);
    let delay = backoff(failures);
    tracing::warn!(
        md = %Context::key(&md), class = error.class(), %error, failures, retry_in_s = delay.as_secs(),
        "reconcile failed"
    );
    Action::requeue(delay)
}

fn apply_params() -> PatchParams {
    PatchParams::apply(OPERATOR_FIELD_MANAGER).force()
}

/// Server-side apply of `object` as the operator's field manager.
async fn apply<K>(api: &Api<K>, object: &K) -> Result<K>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    Ok(api.patch(&object.name_any(), &apply_params(), &Patch::Apply(object)).await?)
}

/// Applies one group: its StatefulSet, then its headless Service. Returns the StatefulSet as the server has it.
async fn apply_group(
    statefulsets: &Api<StatefulSet>,
    services: &Api<Service>,
    md: &ModelDeployment,
    group: &GroupRef,
    config: &OperatorConfig,
) -> Result<StatefulSet> {
    let applied = apply(statefulsets, &resources::group_statefulset(md, group, config)?).await?;
    apply(services, &resources::group_service(md, group)?).await?;
    Ok(applied)
}

/// Deletes `name` with background propagation; an object already gone is fine.
async fn delete<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + DeserializeOwned + Clone + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Publishes an Event on `md`, about `secondary` too when given (a group's StatefulSet).
///
/// The controller decides itself when an Event is due (on transitions), so each Event is posted as a new object:
/// a fresh [`Recorder`] per Event. A shared one would fold Events with the same type, reason, action and objects
/// within six minutes into a series that keeps the first Event's note — a second `InvalidSpec` for a different
/// mistake would then show the old message.
async fn publish(
    ctx: &Context,
    md: &ModelDeployment,
    (type_, reason, action): (EventType, &str, &str),
    secondary: Option<ObjectReference>,
    note: String,
) {
    let event = Event { type_, reason: reason.to_string(), note: Some(note), action: action.to_string(), secondary };
    // Events are best effort: a refused Event must not fail the reconcile (which would retry its applies).
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    if let Err(e) = recorder.publish(&event, &md.object_ref(&())).await {
        tracing::warn!(md = %Context::key(md), reason, error = %e, "publishing an Event failed");
    }
}

/// A reference to a group's StatefulSet, the secondary object of the group Events.
fn group_reference(namespace: &str, name: &str) -> Option<ObjectReference> {
    Some(ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("StatefulSet".into()),
        namespace: Some(namespace.to_string()),
        name: Some(name.to_string()),
        ..ObjectReference::default()
    })
}

/// Writes `status` to the status subresource by server-side apply.
async fn patch_status(api: &Api<ModelDeployment>, name: &str, status: &ModelDeploymentStatus) -> Result<()> {
    let body = serde_json::json!({"apiVersion": CRD_API_VERSION, "kind": CRD_KIND, "status": status});
    api.patch_status(name, &apply_params(), &Patch::Apply(&body)).await?;
    Ok(())
}

/// Writes `status` unless `md` already has exactly that status (an unchanged status costs no API call and no
/// watch event).
async fn write_status(api: &Api<ModelDeployment>, md: &ModelDeployment, status: &ModelDeploymentStatus) -> Result<()> {
    if md.status.as_ref() == Some(status) {
        return Ok(());
    }
    patch_status(api, &md.name_any(), status).await
}

/// Whether a Warning Event is due for the new `Degraded` condition: it turned true, changed reason, or is true
/// for a new generation of the spec.
fn degraded_event_due(previous: Option<&Condition>, now: &Condition) -> bool {
    if now.status != "True" {
        return false;
    }
    previous.is_none_or(|p| {
        p.status != now.status || p.reason != now.reason || p.observed_generation != now.observed_generation
    })
}

async fn reconcile_inner(md: &ModelDeployment, ctx: &Context) -> Result<Action> {
    if md.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = md.name_any();
    let namespace = md
        .namespace()
        .ok_or_else(|| Error::MissingField(format!("ModelDeployment {name} has no metadata.namespace")))?;
    let client = ctx.client.clone();
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &namespace);
    let previous_degraded = find_condition(md.status.as_ref(), CONDITION_DEGRADED);
    // Whole seconds: what a condition's `lastTransitionTime` keeps on the wire.
    let now = Timestamp::now();
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);

    if let Err(invalid) = validate_name(&name).and_then(|()| md.spec.validate()) {
        let message = invalid.to_string();
        tracing::info!(md = %Context::key(md), %message, "invalid spec: nothing is created");
        let status = status::invalid(md, &message, resources::heads_selector(md), now);
        write_status(&mds, md, &status).await?;
        if let Some(degraded) = find_condition(Some(&status), CONDITION_DEGRADED)
            && degraded_event_due(previous_degraded, degraded)
        {
            publish(ctx, md, (EventType::Warning, &degraded.reason, ACTION_RECONCILE), None, message).await;
        }
        return Ok(Action::await_change());
    }

    let revision = resources::revision(md, &ctx.config)?;
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let selector = ListParams::default().labels(&format!("{LABEL_MODEL_DEPLOYMENT}={name}"));
    let observed_sets = statefulsets.list(&selector).await?.items;
    let observed_pods = pods.list(&selector).await?.items;

    // Groups: StatefulSets named as this ModelDeployment's groups are (anything else with the label is not ours
    // to touch). One being deleted still holds its name, so it counts, as not ready, and is not deleted again.
    let mut groups = Vec::new();
    let mut terminating = Vec::new();
    for sts in &observed_sets {
        let (Some(revision), Some(index)) = (group_revision(sts), group_index(sts)) else { continue };
        let group = GroupRef { revision: revision.to_string(), index };
        if group.name(&name) != sts.name_any() {
            continue;
        }
        let gone = sts.metadata.deletion_timestamp.is_some();
        if gone {
            terminating.push(group.clone());
        }
        groups.push(ObservedGroup { ready: !gone && group_ready(sts), group });
    }
    let Plan { create, delete: mut remove } = plan(md.spec.replicas(), &revision, md.spec.max_surge(), &groups);
    remove.retain(|g| !terminating.contains(g));

    // What the groups are once this plan is applied: the status describes that, not the moment before it.
    let mut current_sets = observed_sets;
    for group in &create {
        let group_name = group.name(&name);
        let created = apply_group(&statefulsets, &services, md, group, &ctx.config).await?;
        current_sets.retain(|s| s.name_any() != group_name);
        current_sets.push(created);
        tracing::info!(md = %Context::key(md), group = %group_name, "created group");
        let note =
            format!("Created group {group_name} (revision {}, {} ranks)", group.revision, md.spec.expert_parallelism());
        let group_ref = group_reference(&namespace, &group_name);
        publish(ctx, md, (EventType::Normal, EVENT_GROUP_CREATED, ACTION_CREATE), group_ref, note).await;
    }
    // Drift repair: the groups of the current revision that stay are applied again (a no-op when nothing changed;
    // a hand-edited or deleted StatefulSet field or headless Service comes back). Groups of older revisions
    // cannot be rebuilt from this spec and are on their way out anyway.
    for observed in &groups {
        let group = &observed.group;
        if group.revision != revision || remove.contains(group) || terminating.contains(group) {
            continue;
        }
        apply_group(&statefulsets, &services, md, group, &ctx.config).await?;
    }
    for group in &remove {
        let group_name = group.name(&name);
        delete(&statefulsets, &group_name).await?;
        delete(&services, &group_name).await?;
        current_sets.retain(|s| s.name_any() != group_name);
        tracing::info!(md = %Context::key(md), group = %group_name, "deleted group");
        let note = format!("Deleted group {group_name} (revision {})", group.revision);
        let group_ref = group_reference(&namespace, &group_name);
        publish(ctx, md, (EventType::Normal, EVENT_GROUP_DELETED, ACTION_DELETE), group_ref, note).await;
    }

    apply(&services, &resources::heads_service(md)?).await?;
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &namespace);
    apply(&budgets, &resources::pod_disruption_budget(md)?).await?;
    if ctx.config.pod_monitor {
        let monitors: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &namespace, &resources::pod_monitor_resource());
        apply(&monitors, &resources::pod_monitor(md)?).await?;
    }

    let status = status::compute(md, &revision, resources::heads_selector(md), &current_sets, &observed_pods, now);
    write_status(&mds, md, &status).await?;

    let was_rolling_out = find_condition(md.status.as_ref(), CONDITION_PROGRESSING)
        .is_some_and(|c| c.status == "True" && c.reason == REASON_ROLLING_OUT);
    let progressing = find_condition(Some(&status), CONDITION_PROGRESSING);
    let rolling_out = progressing.is_some_and(|c| c.status == "True" && c.reason == REASON_ROLLING_OUT);
    if was_rolling_out && !rolling_out {
        let note = format!("Every group runs revision {revision}");
        publish(ctx, md, (EventType::Normal, EVENT_ROLLOUT_COMPLETE, ACTION_RECONCILE), None, note).await;
    }
    let degraded = find_condition(Some(&status), CONDITION_DEGRADED);
    if let Some(degraded) = degraded
        && degraded_event_due(previous_degraded, degraded)
    {
        let note = degraded.message.clone();
        publish(ctx, md, (EventType::Warning, &degraded.reason, ACTION_RECONCILE), None, note).await;
    }

    let busy = !create.is_empty()
        || !remove.is_empty()
        || progressing.is_some_and(|c| c.status == "True")
        || degraded.is_some_and(|c| c.status == "True");
    Ok(Action::requeue(if busy { REQUEUE_BUSY } else { REQUEUE_IDLE }))
}

fn scoped<K>(client: Client, namespace: &str) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    if namespace.is_empty() { Api::all(client) } else { Api::namespaced(client, namespace) }
}

/// Runs the controller over `namespace` (empty: all) until `shutdown` resolves, then lets running reconciles
/// finish.
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    // Only objects carrying the ModelDeployment label: the operator's own StatefulSets and their pods.
    let ours = watcher::Config::default().labels(LABEL_MODEL_DEPLOYMENT);
    Controller::new(scoped::<ModelDeployment>(client.clone(), namespace), watcher::Config::default())
        .owns(scoped::<StatefulSet>(client.clone(), namespace), ours.clone())
        // The group and heads Services: deleting or editing one by hand is repaired at once.
        .owns(scoped::<Service>(client.clone(), namespace), ours.clone())
        // Pod changes (crash loops, scheduling) change the status; pods are owned by the StatefulSets, so map them
        // to their ModelDeployment through its label.
        .watches(scoped::<Pod>(client, namespace), ours, |pod: Pod| {
            let owner = pod.labels().get(LABEL_MODEL_DEPLOYMENT).cloned();
            owner.zip(pod.namespace()).map(|(name, ns)| ObjectRef::<ModelDeployment>::new(&name).within(&ns))
        })
        .with_config(ControllerConfig::default().debounce(DEBOUNCE))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, action)) => tracing::debug!(md = %object, ?action, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}

/// A future that resolves on SIGTERM or Ctrl-C, shareable (every clone resolves).
fn shutdown_signal() -> Result<tokio::sync::watch::Receiver<bool>> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Runtime(format!("installing the SIGTERM handler: {e}")))?;
    tokio::spawn(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn wait_for_shutdown(mut rx: tokio::sync::watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens after it sent.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// `baleen-operator run`: serves `/metrics` and `/healthz`, waits to become the leader, then runs the controller
/// until SIGTERM (returning `Ok`, after releasing the Lease) or until leadership is lost (returning the error, so
/// the process exits non-zero and is restarted as a follower).
pub async fn run(settings: RunSettings) -> Result<()> {
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::new()?);
    let listener = metrics::bind(settings.admin_addr).await?;
    tracing::info!(addr = %settings.admin_addr, "admin server listening");
    let mut admin = tokio::spawn(metrics::serve(listener, metrics.clone()));

    let identity = settings
        .identity
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| baleen_api::lease::default_identity(OPERATOR_FIELD_MANAGER));
    let lease_namespace = settings.lease_namespace.unwrap_or_else(|| client.default_namespace().to_string());
    let elector = LeaderElector::new(client.clone(), &lease_namespace, OPERATOR_LEASE_NAME, identity.clone());
    let shutdown = shutdown_signal()?;

    tracing::info!(%identity, lease_namespace, "waiting to become the leader");
    tokio::select! {
        () = elector.acquire() => {}
        () = wait_for_shutdown(shutdown.clone()) => return Ok(()),
        finished = &mut admin => return Err(admin_stopped(finished)),
    }
    metrics.set_leader(true);

    let ctx = Arc::new(Context::new(client, settings.config, metrics.clone(), Some(identity)));
    let namespace = settings.namespace;
    tracing::info!(namespace = if namespace.is_empty() { "<all>" } else { namespace.as_str() }, "controller starting");
    let result = tokio::select! {
        () = run_controller(ctx, &namespace, wait_for_shutdown(shutdown)) => Ok(()),
        lost = elector.hold() => Err(Error::Runtime(lost.to_string())),
        finished = &mut admin => Err(admin_stopped(finished)),
    };
    metrics.set_leader(false);
    if result.is_ok() {
        if let Err(e) = elector.release().await {
            tracing::warn!(error = %e, "releasing the leader Lease failed; it expires by itself");
        }
        tracing::info!("controller stopped");
    }
    result
}

fn admin_stopped(finished: std::result::Result<Result<()>, tokio::task::JoinError>) -> Error {
    match finished {
        Ok(Err(e)) => e,
        Ok(Ok(())) => Error::Runtime("the admin server stopped".into()),
        Err(e) => Error::Runtime(format!("the admin server failed: {e}")),
    }
}
