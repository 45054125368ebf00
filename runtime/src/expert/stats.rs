//! Counters of the expert transport: plain atomics ([`Stats`]) for tests and benchmarks, and Prometheus
//! metrics ([`ExpertMetrics`]) labelled by peer rank, registered into the runtime's registry by the caller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baleen_api::names::{
    LABEL_PEER, METRIC_RUNTIME_EXPERT_BYTES_SENT_TOTAL, METRIC_RUNTIME_EXPERT_DISPATCH_ERRORS_TOTAL,
    METRIC_RUNTIME_EXPERT_DISPATCH_SECONDS, METRIC_RUNTIME_EXPERT_PEER_UP,
};
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::Result;

/// Buckets of the expert latency histograms (a dispatch's round trip, a rank's compute): 50 µs (loopback, tiny
/// rows) to 10 s.
pub(crate) const EXPERT_LATENCY_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Totals over every peer since the [`super::ExpertPeers`] was created.
#[derive(Debug, Default)]
pub struct Stats {
    /// Dispatches handed to a peer's stream.
    pub dispatches: AtomicU64,
    /// Encoded bytes of those dispatches.
    pub bytes_sent: AtomicU64,
    /// Dispatches answered successfully.
    pub completed: AtomicU64,
    /// Dispatches that failed: peer down, stream broken, timeout or a remote error.
    pub errors: AtomicU64,
    /// Sum of the round-trip times of the completed dispatches, in nanoseconds.
    pub latency_nanos: AtomicU64,
}

impl Stats {
    /// Mean round trip of the completed dispatches.
    pub fn mean_latency(&self) -> Option<Duration> {
        let n = self.completed.load(Ordering::Relaxed);
        (n > 0).then(|| Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed) / n))
    }
}

/// Prometheus metrics of the expert client, labelled by [`LABEL_PEER`] (the peer's rank).
#[derive(Debug, Clone)]
pub struct ExpertMetrics {
    dispatch_seconds: HistogramVec,
    bytes_sent: IntCounterVec,
    errors: IntCounterVec,
    peer_up: IntGaugeVec,
}

impl ExpertMetrics {
    pub(crate) fn new() -> Result<Self> {
        Ok(Self {
            dispatch_seconds: HistogramVec::new(
                HistogramOpts::new(
                    METRIC_RUNTIME_EXPERT_DISPATCH_SECONDS,
                    "Seconds from sending an expert dispatch to a peer until its response arrived.",
                )
                .buckets(EXPERT_LATENCY_BUCKETS.to_vec()),
                &[LABEL_PEER],
            )?,
            bytes_sent: IntCounterVec::new(
                Opts::new(METRIC_RUNTIME_EXPERT_BYTES_SENT_TOTAL, "Encoded bytes of expert dispatches sent to peers."),
                &[LABEL_PEER],
            )?,
            errors: IntCounterVec::new(
                Opts::new(METRIC_RUNTIME_EXPERT_DISPATCH_ERRORS_TOTAL, "Expert dispatches that failed."),
                &[LABEL_PEER],
            )?,
            peer_up: IntGaugeVec::new(
                Opts::new(METRIC_RUNTIME_EXPERT_PEER_UP, "1 while the peer's expert stream is open and handshaken."),
                &[LABEL_PEER],
            )?,
        })
    }

    /// Registers every metric into `registry`.
    pub fn register(&self, registry: &prometheus::Registry) -> Result<()> {
        registry.register(Box::new(self.dispatch_seconds.clone()))?;
        registry.register(Box::new(self.bytes_sent.clone()))?;
        registry.register(Box::new(self.errors.clone()))?;
        registry.register(Box::new(self.peer_up.clone()))?;
        Ok(())
    }

    /// The series of one peer.
    pub(crate) fn peer(&self, rank: usize) -> PeerMetrics {
        let label = rank.to_string();
        let labels = [label.as_str()];
        PeerMetrics {
            dispatch_seconds: self.dispatch_seconds.with_label_values(&labels),
            bytes_sent: self.bytes_sent.with_label_values(&labels),
            errors: self.errors.with_label_values(&labels),
            peer_up: self.peer_up.with_label_values(&labels),
        }
    }
}

/// One peer's series, resolved once.
#[derive(Debug, Clone)]
pub(crate) struct PeerMetrics {
    pub dispatch_seconds: Histogram,
    pub bytes_sent: IntCounter,
    pub errors: IntCounter,
    pub peer_up: IntGauge,
}
