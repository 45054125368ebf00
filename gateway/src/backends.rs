//! Backends and discovery: which runtime heads serve each model, whether each is ready, and how loaded it is.
//!
//! Discovery fills a [`Registry`] (model name → [`Pool`]) through [`Registry::set_model`]; the static file does it
//! once, `baleen up` whenever it starts or stops a replica. A backend that stays in a model keeps its state
//! (health, load sample, in-flight count). The [`scrape`] loop probes every backend's `/ready` and scrapes its
//! `/metrics` for the vLLM load gauges; [`health`] tracks passive failures (ejection with backoff, readmission
//! by a successful probe, re-ejection on the first failure after it).

pub mod health;
pub mod kubernetes;
pub mod pool;
pub mod scrape;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::metrics::{BackendMetrics, Metrics};
use health::Health;

/// Added to the load score of a backend whose metrics are stale or missing: it is chosen only when every other
/// one is too.
pub const SATURATED: f64 = 1.0e6;
/// Weight of the KV-cache use (0..1) in the load score: a full cache counts as this many queued requests.
pub const KV_WEIGHT: f64 = 4.0;

/// The load gauges of one scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadSample {
    pub waiting: f64,
    pub running: f64,
    pub kv_usage: f64,
    pub at: Instant,
}

/// One runtime head serving a model.
#[derive(Debug)]
pub struct Backend {
    /// `http://host:port`.
    pub url: String,
    /// A stable hash of the URL (the affinity policies' identity of the backend).
    pub id: u64,
    in_flight: AtomicUsize,
    health: Mutex<Health>,
    /// Whether a failed request has been recorded since the last success (kept under the `health` lock): until
    /// then a success has nothing to reset, and takes no lock.
    failing: AtomicBool,
    sample: Mutex<Option<LoadSample>>,
    /// Keep-alive connections for requests.
    pub pool: pool::ConnPool,
    /// The URL as a header value (`x-baleen-backend` of its answers).
    pub header: Option<http::HeaderValue>,
    handles: OnceLock<BackendMetrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A stable 64-bit hash (SipHash with fixed keys), the same in every process.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

impl Backend {
    pub fn new(url: String) -> Self {
        let id = stable_hash(url.as_bytes());
        let authority = url.strip_prefix("http://").unwrap_or(&url).to_string();
        Self {
            pool: pool::ConnPool::new(authority),
            header: http::HeaderValue::from_str(&url).ok(),
            handles: OnceLock::new(),
            url,
            id,
            in_flight: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
            failing: AtomicBool::new(false),
            sample: Mutex::new(None),
        }
    }

    /// Its metric series (a backend belongs to one model's pool), looked up on first use.
    pub fn metrics(&self, model: &str, metrics: &Metrics) -> &BackendMetrics {
        self.handles.get_or_init(|| metrics.backend(model, &self.url))
    }

    /// Its metric series, once [`Backend::metrics`] has looked them up.
    pub fn series(&self) -> Option<&BackendMetrics> {
        self.handles.get()
    }

    /// Requests the gateway has sent it that have not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Ready (by its last probe) and not ejected.
    pub fn routable(&self, now: Instant) -> bool {
        lock(&self.health).routable(now)
    }

    /// The health state, for changes.
    pub fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        lock(&self.health)
    }

    /// A request to it failed ([`Health::failed`]): true when this failure ejects it.
    pub fn failed(&self, now: Instant) -> bool {
        let mut health = lock(&self.health);
        self.failing.store(true, Ordering::Relaxed);
        health.failed(now)
    }

    /// A request to it succeeded ([`Health::succeeded`]). Only a failure since the last success leaves anything to
    /// reset (ejection and half-open readmission both follow failures), so the common case takes no lock.
    pub fn succeeded(&self) {
        if self.failing.load(Ordering::Relaxed) {
            let mut health = lock(&self.health);
            health.succeeded();
            self.failing.store(false, Ordering::Relaxed);
        }
    }

    pub fn set_sample(&self, sample: Option<LoadSample>) {
        *lock(&self.sample) = sample;
    }

    pub fn sample(&self) -> Option<LoadSample> {
        *lock(&self.sample)
    }

    /// The load score least-load minimizes: the larger of the gateway's in-flight count (fresh) and the scraped
    /// running + waiting (complete, but up to one scrape old), plus the queue again (waiting is worse than
    /// running) and the KV-cache use; [`SATURATED`] more when the sample is older than `stale_after`.
    pub fn score(&self, now: Instant, stale_after: Duration) -> f64 {
        let in_flight = self.in_flight() as f64;
        match self.sample() {
            Some(s) if now.saturating_duration_since(s.at) <= stale_after => {
                in_flight.max(s.running + s.waiting) + s.waiting + KV_WEIGHT * s.kv_usage
            }
            _ => in_flight + SATURATED,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn stale_or_missing_samples_score_as_saturated() {
        let b = Backend::new("http://a:1".into());
        let now = Instant::now();
        assert!(b.score(now, Duration::from_secs(3)) >= SATURATED);
        b.set_sample(Some(LoadSample { waiting: 2.0, running: 3.0, kv_usage: 0.5, at: now }));
        assert_eq!(b.score(now, Duration::from_secs(3)), 5.0 + 2.0 + 2.0);
        for _ in 0..9 {
            b.begin();
        }
        assert_eq!(b.score(now, Duration::from_secs(3)), 9.0 + 2.0 + 2.0, "the fresh in-flight count wins");
        let later = now + Duration::from_secs(4);
        assert!(b.score(later, Duration::from_secs(3)) >= SATURATED);
    }

    /// Failures and successes through the backend: the third failure ejects it, a probe after the backoff
    /// readmits it half-open, and a success then closes the circuit (so one failure no longer ejects it).
    #[test]
    fn a_success_after_failures_closes_the_circuit() {
        let b = Backend::new("http://a:1".into());
        let t0 = Instant::now();
        b.health().probed(true, t0);
        b.succeeded();
        assert_eq!(*b.health(), Health { ready: Some(true), ..Health::default() });
        assert!(!b.failed(t0) && !b.failed(t0) && b.failed(t0), "the third failure in a row ejects");
        assert!(!b.routable(t0));
        let t1 = t0 + health::BASE_BACKOFF;
        b.health().probed(true, t1);
        assert!(b.routable(t1), "readmitted half-open after the backoff");
        b.succeeded();
        assert_eq!(*b.health(), Health { ready: Some(true), ..Health::default() }, "the circuit is closed");
        assert!(!b.failed(t1) && b.routable(t1), "one failure after a success does not eject");
    }
}
