//! Autoscaling: every scrape interval (and at once when a request is held at zero), each autoscaled model's
//! load is sampled from what the probe loop scraped — the same samples routing reads — plus the requests the
//! gateway holds for it, turned into a replica count by the pure [`decide`], and handed to the model's
//! [`Actuator`] when it changes (`baleen up` starts and stops runtime groups).
//!
//! Load per metric type: `QueueDepth` sums `vllm:num_requests_waiting` over the ready heads, `RunningRequests`
//! `vllm:num_requests_running`, both plus the held requests; `KVCacheUtilization` sums `vllm:kv_cache_usage_perc`.
//! A ready head without a fresh sample makes the sample missing (the decision then holds).
//!
//! With a Prometheus server ([`prometheus`], `--prometheus-url`) the metrics come from it instead: the query's
//! per-head average times the ready heads (plus the held requests, for the two request counts), or for type
//! `PromQL` the expression's per-replica value times the ready replicas. A failed query makes the sample missing.

pub mod decide;
pub mod hold;
pub mod kubernetes;
pub mod prometheus;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use baleen_api::crd::{AutoscalingSpec, MetricKind};
pub use decide::{Decision, Reason, ScalePolicy, Windows, decide};
use prometheus::Prometheus;
use tokio::sync::Notify;

use crate::App;
use crate::backends::Backend;
use crate::error::{Error, Result};
use crate::registry::Pool;

/// The future an [`Actuator`] returns.
pub type ActuatorFuture<'a> = Pin<Box<dyn Future<Output = std::result::Result<(), String>> + Send + 'a>>;

/// What carries out a decision: `baleen up` starts or stops runtime groups; in a cluster, a patch of the
/// ModelDeployment's `scale` subresource.
pub trait Actuator: Send + Sync + fmt::Debug {
    /// Asks for `decision.desired` replicas of `model` (now `from`); an error is logged and the decision retried
    /// at the next tick.
    fn scale<'a>(&'a self, model: &'a str, from: u32, decision: &'a Decision) -> ActuatorFuture<'a>;

    /// Whether this gateway replica may act now (in a cluster: it holds the autoscaler Lease). The others still
    /// decide — their desired-replicas gauge agrees — but never write.
    fn active(&self) -> bool {
        true
    }
}

/// One autoscaled model's rules and history.
#[derive(Debug)]
struct Scaler {
    policy: ScalePolicy,
    kind: MetricKind,
    /// The PromQL of the load, when the metrics come from Prometheus.
    query: Option<String>,
    /// The last failure of its query (logged once, until it succeeds again).
    query_error: Option<String>,
    /// API heads per replica (data-parallel attention: every rank is one); ready replicas = ready heads / this.
    heads_per_replica: u32,
    actuator: Arc<dyn Actuator>,
    /// Replicas asked for.
    current: u32,
    samples: VecDeque<decide::Sample>,
    recommendations: VecDeque<(Instant, u32)>,
    /// The last time a request arrived or was in flight (the registration time before any).
    last_active: Instant,
}

/// Every autoscaled model, and the wake-up of held requests.
#[derive(Debug, Default)]
pub struct Autoscaler {
    scalers: Mutex<BTreeMap<String, Scaler>>,
    /// Where the metrics come from: a Prometheus server, or (`None`) the probe loop's scrapes of the heads.
    prometheus: Option<Prometheus>,
    /// Notified when a request is held: the loop decides at once rather than at its next tick.
    pub wake: Notify,
}

impl Autoscaler {
    /// An autoscaler reading its metrics from `prometheus`, or from the heads' scrapes without one.
    pub fn new(prometheus: Option<Prometheus>) -> Self {
        Self { prometheus, ..Self::default() }
    }

    /// Autoscales `model` (now at `current` replicas) by `spec` through `actuator`; replaces an earlier
    /// registration, keeping its history when the metric stays the same.
    pub fn register(
        &self,
        model: &str,
        spec: &AutoscalingSpec,
        windows: Windows,
        current: u32,
        heads_per_replica: u32,
        actuator: Arc<dyn Actuator>,
    ) -> Result<()> {
        let kind = spec.metric.kind;
        let query = match &self.prometheus {
            Some(_) => Some(prometheus::query_for(kind, spec.metric.query.as_deref(), model).ok_or_else(|| {
                Error::Invalid {
                    field: format!("spec.autoscaling.metric.query of `{model}`"),
                    reason: "is required with type PromQL".into(),
                }
            })?),
            None if kind == MetricKind::PromQl => {
                return Err(Error::Invalid {
                    field: format!("spec.autoscaling.metric of `{model}`"),
                    reason: "type PromQL needs a Prometheus server (the gateway's --prometheus-url); without one it \
                             scrapes the runtimes directly, so use QueueDepth, RunningRequests or KVCacheUtilization"
                        .into(),
                });
            }
            None => None,
        };
        let policy = ScalePolicy::from_spec(spec, windows);
        let mut scalers = self.scalers.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = scalers.remove(model).filter(|old| old.kind == kind && old.query == query);
        let (samples, recommendations, last_active, query_error) = match kept {
            Some(old) => (old.samples, old.recommendations, old.last_active, old.query_error),
            None => (VecDeque::new(), VecDeque::new(), Instant::now(), None),
        };
        let scaler = Scaler {
            policy,
            kind,
            query,
            query_error,
            heads_per_replica: heads_per_replica.max(1),
            actuator,
            current,
            samples,
            recommendations,
            last_active,
        };
        scalers.insert(model.to_string(), scaler);
        Ok(())
    }

    /// Stops autoscaling `model`.
    pub fn unregister(&self, model: &str) {
        self.scalers.lock().unwrap_or_else(PoisonError::into_inner).remove(model);
    }

    /// The replicas asked for `model`, when it is autoscaled.
    pub fn current(&self, model: &str) -> Option<u32> {
        self.scalers.lock().unwrap_or_else(PoisonError::into_inner).get(model).map(|s| s.current)
    }
}

/// The held requests as load: they count for the request-count metrics only.
fn held_load(kind: MetricKind, held: usize) -> f64 {
    match kind {
        MetricKind::QueueDepth | MetricKind::RunningRequests => held as f64,
        MetricKind::KvCacheUtilization | MetricKind::PromQl => 0.0,
    }
}

/// The load of `pool` now by `kind` from the probe loop's scrapes, plus its held requests; `None` when a ready
/// head has no fresh sample.
fn scraped(pool: &Pool, ready: &[Arc<Backend>], kind: MetricKind, now: Instant, stale: Duration) -> Option<f64> {
    let mut load = held_load(kind, pool.hold.held());
    for backend in ready {
        let s = backend.sample().filter(|s| now.saturating_duration_since(s.at) <= stale)?;
        load += match kind {
            MetricKind::QueueDepth => s.waiting,
            MetricKind::RunningRequests => s.running,
            MetricKind::KvCacheUtilization => s.kv_usage,
            MetricKind::PromQl => 0.0,
        };
    }
    Some(load)
}

/// The load from a Prometheus answer (`value`: the query's number, `None` for no series) with `heads` ready
/// heads of `per_replica` each; `None` when the model runs but Prometheus has no series of it.
fn from_prometheus(value: Option<f64>, kind: MetricKind, heads: usize, per_replica: u32, held: usize) -> Option<f64> {
    match (value, kind) {
        // Nothing serves, so nothing can be measured: only the held requests count.
        (None, _) if heads == 0 => Some(held_load(kind, held)),
        (None, _) => None,
        // Replicas counted by their ready heads, a partly ready one in part.
        (Some(v), MetricKind::PromQl) => Some(v * heads as f64 / f64::from(per_replica.max(1))),
        (Some(per_head), _) => Some(per_head * heads as f64 + held_load(kind, held)),
    }
}

/// What Prometheus answered for each model, with the query it answered (a model re-registered with another
/// query meanwhile must not read it).
type Answers = BTreeMap<String, (String, Result<Option<f64>>)>;

/// Every Prometheus-sourced model's query answer, asked concurrently. Models at zero are not asked: nothing
/// runs to measure, and a held request's decision must not wait on Prometheus.
async fn query_prometheus(autoscaler: &Autoscaler) -> Answers {
    let Some(prometheus) = &autoscaler.prometheus else { return BTreeMap::new() };
    let queries: Vec<(String, String)> = {
        let scalers = autoscaler.scalers.lock().unwrap_or_else(PoisonError::into_inner);
        let asked = scalers.iter().filter(|(_, s)| s.current > 0);
        asked.filter_map(|(model, s)| Some((model.clone(), s.query.clone()?))).collect()
    };
    let answers = futures_util::future::join_all(queries.iter().map(|(_, query)| prometheus.query(query))).await;
    queries.into_iter().zip(answers).map(|((model, query), answer)| (model, (query, answer))).collect()
}

/// Drops entries older than `from` but the newest of them: it shows the history covers the whole window (a
/// scale-down needs that).
fn prune<T>(entries: &mut VecDeque<T>, from: Instant, at: impl Fn(&T) -> Instant) {
    while entries.get(1).is_some_and(|next| at(next) <= from) {
        entries.pop_front();
    }
}

/// One look at every autoscaled model: sample, decide, and carry out changes.
pub async fn tick(app: &App) {
    let mut answers = query_prometheus(&app.autoscaler).await;
    let now = Instant::now();
    let mut actions = Vec::new();
    {
        let mut scalers = app.autoscaler.scalers.lock().unwrap_or_else(PoisonError::into_inner);
        for (model, scaler) in scalers.iter_mut() {
            let Some(pool) = app.registry.get(model) else { continue };
            let routable = pool.routable(now);
            let ready_heads = routable.len();
            let ready = u32::try_from(ready_heads).unwrap_or(u32::MAX) / scaler.heads_per_replica;
            let answer = answers.remove(model).filter(|(asked, _)| scaler.query.as_ref() == Some(asked));
            let load = match (&scaler.query, answer.map(|(_, answer)| answer)) {
                (None, _) => scraped(&pool, &routable, scaler.kind, now, scaler.policy.stale_after),
                (Some(_), Some(Ok(value))) => {
                    if scaler.query_error.take().is_some() {
                        tracing::info!(model = %model, "the Prometheus query answers again");
                    }
                    from_prometheus(value, scaler.kind, ready_heads, scaler.heads_per_replica, pool.hold.held())
                }
                (Some(_), Some(Err(e))) => {
                    let e = e.to_string();
                    if scaler.query_error.as_ref() != Some(&e) {
                        tracing::warn!(model = %model, "autoscaling metrics missing: {e}");
                    }
                    app.metrics.scrape_error(model, app.autoscaler.prometheus.as_ref().map_or("", Prometheus::url));
                    scaler.query_error = Some(e);
                    None
                }
                // At zero (not asked), or (re-)registered after the queries went out: the next look has it.
                (Some(_), None) => None,
            };
            let in_flight: usize = pool.backends().iter().map(|b| b.in_flight()).sum();
            if in_flight > 0 || pool.hold.held() > 0 {
                scaler.last_active = now;
            } else if let Some(arrival) = pool.hold.last_arrival() {
                scaler.last_active = scaler.last_active.max(arrival);
            }
            scaler.samples.push_back(decide::Sample { at: now, load });
            if let Some(from) = now.checked_sub(scaler.policy.history()) {
                prune(&mut scaler.samples, from, |s| s.at);
                prune(&mut scaler.recommendations, from, |r| r.0);
            }
            let observed = decide::Observed {
                samples: scaler.samples.make_contiguous(),
                recommendations: scaler.recommendations.make_contiguous(),
                current: scaler.current,
                ready,
                held: pool.hold.held(),
                last_active: scaler.last_active,
            };
            let decision = decide(&observed, &scaler.policy, now);
            tracing::debug!(
                model = %model, current = scaler.current, ready, held = observed.held, load = ?decision.load,
                desired = decision.desired, reason = %decision.reason, "autoscaler"
            );
            if let Some(r) = decision.recommendation {
                scaler.recommendations.push_back((now, r));
            }
            app.metrics.set_desired_replicas(model, decision.desired);
            app.metrics.set_held_requests(model, pool.hold.held());
            if decision.desired != scaler.current && scaler.actuator.active() {
                actions.push((model.clone(), scaler.current, decision, Arc::clone(&scaler.actuator)));
            }
        }
    }
    for (model, from, decision, actuator) in actions {
        let result = actuator.scale(&model, from, &decision).await;
        let mut scalers = app.autoscaler.scalers.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(scaler) = scalers.get_mut(&model) else { continue };
        match result {
            Ok(()) => {
                let source = if scaler.query.is_some() { "prometheus" } else { "scrape" };
                tracing::info!(
                    model = %model, from, to = decision.desired, reason = %decision.reason, load = ?decision.load,
                    source, "scaled"
                );
                app.metrics.scaled(&model, decision.reason.as_str());
                scaler.current = decision.desired;
            }
            Err(e) => tracing::warn!(model = %model, to = decision.desired, "scaling failed: {e}"),
        }
    }
}

/// Looks every scrape interval, and at once when a request is held, until the task is dropped.
pub async fn run(app: Arc<App>) {
    let mut ticker = tokio::time::interval(app.settings.scrape_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = app.autoscaler.wake.notified() => {}
        }
        tick(&app).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::time::Duration;

    use super::*;

    #[test]
    fn prometheus_averages_scale_by_what_the_gateway_sees_ready() {
        use MetricKind::{KvCacheUtilization, PromQl, QueueDepth, RunningRequests};
        // Per-head averages times the ready heads, plus the held requests for the request counts.
        assert_eq!(from_prometheus(Some(1.5), QueueDepth, 4, 2, 3), Some(9.0));
        assert_eq!(from_prometheus(Some(2.0), RunningRequests, 2, 1, 0), Some(4.0));
        assert_eq!(from_prometheus(Some(0.5), KvCacheUtilization, 2, 1, 7), Some(1.0));
        // A custom query is per replica: 4 heads of 2 per replica are 2 replicas, 3 are 1.5.
        assert_eq!(from_prometheus(Some(3.0), PromQl, 4, 2, 5), Some(6.0));
        assert_eq!(from_prometheus(Some(2.0), PromQl, 3, 2, 0), Some(3.0));
        // No series: nothing to measure at zero ready (the held requests are the load); missing otherwise.
        assert_eq!(from_prometheus(None, QueueDepth, 0, 1, 2), Some(2.0));
        assert_eq!(from_prometheus(None, PromQl, 0, 1, 2), Some(0.0));
        assert_eq!(from_prometheus(None, QueueDepth, 1, 1, 0), None);
    }

    #[test]
    fn pruning_keeps_the_newest_entry_before_the_window_as_evidence_of_coverage() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut entries: VecDeque<Instant> = (0..10).map(at).collect();
        prune(&mut entries, at(5) + Duration::from_millis(500), |t| *t);
        assert_eq!(entries.front(), Some(&at(5)), "the entry at 5 s shows the window from 5.5 s is covered");
        assert_eq!(entries.len(), 5);
        prune(&mut entries, at(100), |t| *t);
        assert_eq!(entries.len(), 1, "the newest entry always stays");
    }
}
