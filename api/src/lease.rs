//! Leader election through a `coordination.k8s.io/v1` Lease: only the replica that holds it acts (the operator's
//! controller, the gateway's autoscaler writes).
//!
//! The holder renews `renewTime` every [`RENEW_INTERVAL`]; a Lease whose `renewTime + leaseDurationSeconds` has
//! passed (or that has no holder) may be taken over. Every write is a create or a replace carrying the
//! `resourceVersion` that was read, so of two replicas racing for it the API server lets one win and answers the
//! other 409 Conflict. A leader that cannot renew for [`RENEW_DEADLINE`] (shorter than the Lease's duration) or
//! finds another holder has lost: [`LeaderElector::hold`] returns and the process exits with an error, and
//! Kubernetes restarts it as a follower. Expiry is judged against the holder's `renewTime` with the local clock,
//! so the nodes' clocks must agree to well within [`LEASE_DURATION`] (NTP does that).
//!
//! [`decide`] is the pure decision; [`LeaderElector`] performs it against the API.

use std::time::Duration;

use crate::names::ENV_HOSTNAME;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

/// Why leadership ended, or a Lease could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Reading or writing the Lease failed.
    #[error("the Lease {lease}: {source}")]
    Api {
        lease: String,
        #[source]
        source: kube::Error,
    },
    /// Another replica holds the Lease now.
    #[error("lost the leader Lease {lease} to {holder}")]
    Lost { lease: String, holder: String },
    /// Renewing failed for longer than [`RENEW_DEADLINE`].
    #[error("could not renew the leader Lease {lease} for {}s: {source}", RENEW_DEADLINE.as_secs())]
    RenewDeadline {
        lease: String,
        #[source]
        source: kube::Error,
    },
}

type Result<T, E = LeaseError> = std::result::Result<T, E>;

/// `leaseDurationSeconds` written to the Lease: how long a silent holder keeps it.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(4);
/// A leader that has not renewed for this long gives up (before the Lease expires for the others).
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often a follower tries to take the Lease.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// What to do with the Lease as it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it, holding it.
    Create,
    /// This replica holds it: renew it.
    Renew,
    /// Nobody holds it, or its holder let it expire: take it over.
    Acquire,
    /// Another replica holds a live Lease; it expires in `expires_in` unless renewed.
    Follow {
        /// The current holder.
        holder: String,
        /// Time left until the Lease may be taken over.
        expires_in: Duration,
    },
}

/// The decision for `me` at `now` given the Lease as read (`None`: it does not exist).
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Decision {
    let Some(lease) = lease else { return Decision::Create };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Acquire;
    }
    let Some(renewed) = spec.renew_time.or(spec.acquire_time) else { return Decision::Acquire };
    let seconds = spec.lease_duration_seconds.map_or(LEASE_DURATION.as_secs() as i64, i64::from);
    let expires = renewed.0 + SignedDuration::from_secs(seconds);
    if expires <= now {
        return Decision::Acquire;
    }
    let left = now.duration_until(expires);
    Decision::Follow { holder, expires_in: Duration::try_from(left).unwrap_or(Duration::ZERO) }
}

/// This replica's identity in a Lease: the pod name (`HOSTNAME`), else `PREFIX-PID` outside a pod.
pub fn default_identity(prefix: &str) -> String {
    std::env::var(ENV_HOSTNAME)
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("{prefix}-{}", std::process::id()))
}

/// Holds or waits for the Lease on behalf of one replica.
#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    lease: String,
    identity: String,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("lease", &self.lease)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

impl LeaderElector {
    /// An elector for the Lease `lease` in `namespace`, as `identity`.
    pub fn new(client: Client, namespace: &str, lease: &str, identity: impl Into<String>) -> Self {
        Self { api: Api::namespaced(client, namespace), lease: lease.to_string(), identity: identity.into() }
    }

    fn api_error(&self, source: kube::Error) -> LeaseError {
        LeaseError::Api { lease: self.lease.clone(), source }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One round: reads the Lease and creates, renews or takes it over when [`decide`] says so. `Ok(None)`: this
    /// replica holds the Lease now; `Ok(Some(holder))`: another does (or won the race for it).
    pub async fn try_acquire_or_renew(&self) -> Result<Option<String>> {
        let lease = self.api.get_opt(&self.lease).await.map_err(|e| self.api_error(e))?;
        let now = Timestamp::now();
        let decision = decide(lease.as_ref(), &self.identity, now);
        let write = match (&decision, lease) {
            (Decision::Follow { holder, .. }, _) => return Ok(Some(holder.clone())),
            (Decision::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.lease.clone()), ..ObjectMeta::default() },
                    spec: Some(self.spec(now, 0)),
                };
                self.api.create(&PostParams::default(), &lease).await.map(drop)
            }
            (Decision::Renew, Some(mut lease)) => {
                let mut spec = lease.spec.take().unwrap_or_default();
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
                if spec.acquire_time.is_none() {
                    spec.acquire_time = Some(MicroTime(now));
                }
                lease.spec = Some(spec);
                self.api.replace(&self.lease, &PostParams::default(), &lease).await.map(drop)
            }
            (Decision::Acquire, Some(mut lease)) => {
                let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
                lease.spec = Some(self.spec(now, transitions.saturating_add(1)));
                self.api.replace(&self.lease, &PostParams::default(), &lease).await.map(drop)
            }
        };
        match write {
            Ok(()) => Ok(None),
            // Someone else wrote the Lease between our read and our write: they won this round.
            Err(e) if is_conflict(&e) => Ok(Some(String::new())),
            Err(e) => Err(self.api_error(e)),
        }
    }

    fn spec(&self, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Waits until this replica holds the Lease. API errors are logged and retried.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(None) => {
                    tracing::info!(identity = %self.identity, lease = %self.lease, "became the leader");
                    return;
                }
                Ok(Some(holder)) => tracing::debug!(%holder, "another replica leads; waiting"),
                Err(e) => tracing::warn!(error = %e, "leader election: reading or writing the Lease failed"),
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }

    /// Renews the Lease every [`RENEW_INTERVAL`] until leadership is lost, and returns why: another replica holds
    /// the Lease, or renewing has failed for [`RENEW_DEADLINE`].
    pub async fn hold(&self) -> LeaseError {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_INTERVAL).await;
            match self.try_acquire_or_renew().await {
                Ok(None) => last_renewed = tokio::time::Instant::now(),
                Ok(Some(holder)) => {
                    let holder = if holder.is_empty() { "another replica".to_string() } else { holder };
                    return LeaseError::Lost { lease: self.lease.clone(), holder };
                }
                Err(LeaseError::Api { source, .. }) if last_renewed.elapsed() >= RENEW_DEADLINE => {
                    return LeaseError::RenewDeadline { lease: self.lease.clone(), source };
                }
                Err(e) => tracing::warn!(error = %e, "renewing the leader Lease failed; retrying"),
            }
        }
    }

    /// Holds the Lease whenever it can, forever: `leader` is true while this replica holds it (renewed within
    /// [`RENEW_DEADLINE`]). For a process whose replicas all run but only the leader writes.
    pub async fn follow(&self, leader: &std::sync::atomic::AtomicBool) {
        use std::sync::atomic::Ordering;
        let mut last_renewed: Option<tokio::time::Instant> = None;
        loop {
            let held = match self.try_acquire_or_renew().await {
                Ok(None) => {
                    last_renewed = Some(tokio::time::Instant::now());
                    true
                }
                Ok(Some(_)) => {
                    last_renewed = None;
                    false
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: reading or writing the Lease failed");
                    last_renewed.is_some_and(|t| t.elapsed() < RENEW_DEADLINE)
                }
            };
            if held != leader.swap(held, Ordering::Relaxed) {
                tracing::info!(identity = %self.identity, lease = %self.lease, leader = held, "leadership changed");
            }
            tokio::time::sleep(if held { RENEW_INTERVAL } else { RETRY_INTERVAL }).await;
        }
    }

    /// Gives the Lease up on shutdown (clears the holder) so another replica takes over without waiting for it
    /// to expire. Only if this replica still holds it.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.lease).await.map_err(|e| self.api_error(e))? else {
            return Ok(());
        };
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref());
        if holder != Some(self.identity.as_str()) {
            return Ok(());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        match self.api.replace(&lease.name_any(), &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(self.api_error(e)),
        }
    }
}
