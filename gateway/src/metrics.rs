//! The gateway's Prometheus metrics (names in `baleen_api::names`), served on the admin port.

use baleen_api::names::{
    LABEL_BACKEND, LABEL_CODE, LABEL_KEY, LABEL_LIMIT, LABEL_MODEL, METRIC_GATEWAY_ADDED_LATENCY_SECONDS,
    METRIC_GATEWAY_BACKEND_HEALTHY, METRIC_GATEWAY_DISCOVERY_ERRORS_TOTAL, METRIC_GATEWAY_EJECTIONS_TOTAL,
    METRIC_GATEWAY_IN_FLIGHT, METRIC_GATEWAY_RATE_LIMITED_TOTAL, METRIC_GATEWAY_READY_REPLICAS,
    METRIC_GATEWAY_REQUESTS_TOTAL, METRIC_GATEWAY_RETRIES_TOTAL, METRIC_GATEWAY_SCRAPE_ERRORS_TOTAL,
    METRIC_GATEWAY_TIME_TO_FIRST_BYTE_SECONDS,
};
use baleen_api::names::{
    LABEL_REASON, METRIC_GATEWAY_DESIRED_REPLICAS, METRIC_GATEWAY_HELD_REQUESTS, METRIC_GATEWAY_SCALINGS_TOTAL,
};
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::error::Result;

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Buckets of the added latency: 25 µs to 0.5 s (a proxy hop is tens to hundreds of microseconds).
const ADDED_LATENCY_BUCKETS: [f64; 14] =
    [25e-6, 50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1.6e-3, 3.2e-3, 6.4e-3, 12.8e-3, 25e-3, 50e-3, 0.1, 0.5];
/// Buckets of the time to first byte: 1 ms to 60 s.
const TTFB_BUCKETS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// A backend's hot series: its in-flight gauge, its 200 counter, its model's time to first byte.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    pub in_flight: prometheus::IntGauge,
    pub ok: prometheus::IntCounter,
    pub ttfb: Histogram,
}

/// Every gateway metric.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    added_latency: Histogram,
    ttfb: HistogramVec,
    in_flight: IntGaugeVec,
    healthy: IntGaugeVec,
    retries: IntCounterVec,
    ejections: IntCounterVec,
    scrape_errors: IntCounterVec,
    ready_replicas: IntGaugeVec,
    rate_limited: IntCounterVec,
    discovery_errors: prometheus::IntCounter,
    desired_replicas: IntGaugeVec,
    held_requests: IntGaugeVec,
    scalings: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let model_backend = [LABEL_MODEL, LABEL_BACKEND];
        let requests = IntCounterVec::new(
            Opts::new(METRIC_GATEWAY_REQUESTS_TOTAL, "Answers by model, backend and HTTP status code."),
            &[LABEL_MODEL, LABEL_BACKEND, LABEL_CODE],
        )?;
        let added_latency = Histogram::with_opts(
            HistogramOpts::new(
                METRIC_GATEWAY_ADDED_LATENCY_SECONDS,
                "Seconds from a request's arrival to its upstream request being sent.",
            )
            .buckets(ADDED_LATENCY_BUCKETS.to_vec()),
        )?;
        let ttfb = HistogramVec::new(
            HistogramOpts::new(
                METRIC_GATEWAY_TIME_TO_FIRST_BYTE_SECONDS,
                "Seconds from a request's arrival to the first body byte of its answer.",
            )
            .buckets(TTFB_BUCKETS.to_vec()),
            &[LABEL_MODEL],
        )?;
        let in_flight =
            IntGaugeVec::new(Opts::new(METRIC_GATEWAY_IN_FLIGHT, "Requests in flight per backend."), &model_backend)?;
        let healthy = IntGaugeVec::new(
            Opts::new(METRIC_GATEWAY_BACKEND_HEALTHY, "1 while a backend is ready and not ejected."),
            &model_backend,
        )?;
        let retries = IntCounterVec::new(
            Opts::new(METRIC_GATEWAY_RETRIES_TOTAL, "Upstream attempts retried on another backend."),
            &[LABEL_MODEL],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(METRIC_GATEWAY_EJECTIONS_TOTAL, "Backends ejected after consecutive failures."),
            &model_backend,
        )?;
        let scrape_errors = IntCounterVec::new(
            Opts::new(METRIC_GATEWAY_SCRAPE_ERRORS_TOTAL, "Failed probes or scrapes of a backend."),
            &model_backend,
        )?;
        let ready_replicas = IntGaugeVec::new(
            Opts::new(METRIC_GATEWAY_READY_REPLICAS, "Ready backends serving a model."),
            &[LABEL_MODEL],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(METRIC_GATEWAY_RATE_LIMITED_TOTAL, "Requests refused by an API key's rate limit."),
            &[LABEL_KEY, LABEL_LIMIT],
        )?;
        let discovery_errors = prometheus::IntCounter::new(
            METRIC_GATEWAY_DISCOVERY_ERRORS_TOTAL,
            "Failed lists of the cluster's ModelDeployments and EndpointSlices.",
        )?;
        let desired_replicas = IntGaugeVec::new(
            Opts::new(METRIC_GATEWAY_DESIRED_REPLICAS, "Replicas the autoscaler asks for, per autoscaled model."),
            &[LABEL_MODEL],
        )?;
        let held_requests = IntGaugeVec::new(
            Opts::new(METRIC_GATEWAY_HELD_REQUESTS, "Requests held for want of a ready replica (scale from zero)."),
            &[LABEL_MODEL],
        )?;
        let scalings = IntCounterVec::new(
            Opts::new(METRIC_GATEWAY_SCALINGS_TOTAL, "Replica-count changes the autoscaler carried out, by reason."),
            &[LABEL_MODEL, LABEL_REASON],
        )?;
        registry.register(Box::new(desired_replicas.clone()))?;
        registry.register(Box::new(held_requests.clone()))?;
        registry.register(Box::new(scalings.clone()))?;
        registry.register(Box::new(discovery_errors.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(added_latency.clone()))?;
        registry.register(Box::new(ttfb.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(healthy.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(ejections.clone()))?;
        registry.register(Box::new(scrape_errors.clone()))?;
        registry.register(Box::new(ready_replicas.clone()))?;
        Ok(Self {
            registry,
            requests,
            added_latency,
            ttfb,
            in_flight,
            healthy,
            retries,
            ejections,
            scrape_errors,
            ready_replicas,
            rate_limited,
            discovery_errors,
            desired_replicas,
            held_requests,
            scalings,
        })
    }

    pub fn request(&self, model: &str, backend: &str, code: u16) {
        self.requests.with_label_values(&[model, backend, &code.to_string()]).inc();
    }

    pub fn discovery_error(&self) {
        self.discovery_errors.inc();
    }

    pub fn rate_limited(&self, key: &str, limit: &str) {
        self.rate_limited.with_label_values(&[key, limit]).inc();
    }

    pub fn added_latency(&self, seconds: f64) {
        self.added_latency.observe(seconds);
    }

    /// The series one backend's requests touch, looked up once (see [`crate::backends::Backend::metrics`]).
    pub fn backend(&self, model: &str, backend: &str) -> BackendMetrics {
        BackendMetrics {
            in_flight: self.in_flight.with_label_values(&[model, backend]),
            ok: self.requests.with_label_values(&[model, backend, "200"]),
            ttfb: self.ttfb.with_label_values(&[model]),
        }
    }

    pub fn set_healthy(&self, model: &str, backend: &str, healthy: bool) {
        self.healthy.with_label_values(&[model, backend]).set(i64::from(healthy));
    }

    pub fn retry(&self, model: &str) {
        self.retries.with_label_values(&[model]).inc();
    }

    pub fn ejected(&self, model: &str, backend: &str) {
        self.ejections.with_label_values(&[model, backend]).inc();
        self.set_healthy(model, backend, false);
    }

    pub fn scrape_error(&self, model: &str, backend: &str) {
        self.scrape_errors.with_label_values(&[model, backend]).inc();
    }

    pub fn set_ready_replicas(&self, model: &str, ready: usize) {
        self.ready_replicas.with_label_values(&[model]).set(i64::try_from(ready).unwrap_or(i64::MAX));
    }

    pub fn set_desired_replicas(&self, model: &str, desired: u32) {
        self.desired_replicas.with_label_values(&[model]).set(i64::from(desired));
    }

    pub fn set_held_requests(&self, model: &str, held: usize) {
        self.held_requests.with_label_values(&[model]).set(i64::try_from(held).unwrap_or(i64::MAX));
    }

    pub fn scaled(&self, model: &str, reason: &str) {
        self.scalings.with_label_values(&[model, reason]).inc();
    }

    /// Drops the per-backend series of a backend that left a model.
    pub fn forget_backend(&self, model: &str, backend: &str) {
        for vec in [&self.in_flight, &self.healthy] {
            let _ = vec.remove_label_values(&[model, backend]);
        }
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!("rendering metrics failed: {e}");
        }
        out
    }
}
