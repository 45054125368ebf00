//! The operator's own metrics and its admin server: `/metrics` (Prometheus text format) and `/healthz`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use baleen_api::names::{
    LABEL_ERROR_CLASS, LABEL_RESULT, METRIC_OPERATOR_LEADER, METRIC_OPERATOR_RECONCILE_DURATION_SECONDS,
    METRIC_OPERATOR_RECONCILE_ERRORS_TOTAL, METRIC_OPERATOR_RECONCILES_TOTAL, PATH_HEALTHZ, PATH_METRICS,
};
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::error::{Error, Result};

/// Value of [`LABEL_RESULT`] for a reconcile that succeeded.
pub const RESULT_OK: &str = "ok";
/// Value of [`LABEL_RESULT`] for a reconcile that failed.
pub const RESULT_ERROR: &str = "error";

/// Buckets of the reconcile duration histogram, seconds: a reconcile is a handful of API calls.
const DURATION_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The operator's metrics in their own registry (nothing global).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    duration: Histogram,
    errors: IntCounterVec,
    leader: IntGauge,
}

fn prometheus_error(e: prometheus::Error) -> Error {
    Error::Runtime(format!("metrics: {e}"))
}

impl Metrics {
    /// Registers every metric, at zero.
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(METRIC_OPERATOR_RECONCILES_TOTAL, "Reconciles of ModelDeployments, by result."),
            &[LABEL_RESULT],
        )
        .map_err(prometheus_error)?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(METRIC_OPERATOR_RECONCILE_DURATION_SECONDS, "Seconds per reconcile.")
                .buckets(DURATION_BUCKETS.to_vec()),
        )
        .map_err(prometheus_error)?;
        let errors = IntCounterVec::new(
            Opts::new(METRIC_OPERATOR_RECONCILE_ERRORS_TOTAL, "Failed reconciles, by error class."),
            &[LABEL_ERROR_CLASS],
        )
        .map_err(prometheus_error)?;
        let leader = IntGauge::new(METRIC_OPERATOR_LEADER, "1 while this replica holds the leader Lease.")
            .map_err(prometheus_error)?;
        registry.register(Box::new(reconciles.clone())).map_err(prometheus_error)?;
        registry.register(Box::new(duration.clone())).map_err(prometheus_error)?;
        registry.register(Box::new(errors.clone())).map_err(prometheus_error)?;
        registry.register(Box::new(leader.clone())).map_err(prometheus_error)?;
        // Show both results from the start, so rate() over them works before the first error.
        for result in [RESULT_OK, RESULT_ERROR] {
            reconciles.with_label_values(&[result]);
        }
        Ok(Self { registry, reconciles, duration, errors, leader })
    }

    /// Counts one reconcile and its duration.
    pub fn reconciled(&self, ok: bool, elapsed: Duration) {
        self.reconciles.with_label_values(&[if ok { RESULT_OK } else { RESULT_ERROR }]).inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Counts one failed reconcile by its [`Error::class`].
    pub fn error(&self, error: &Error) {
        self.errors.with_label_values(&[error.class()]).inc();
    }

    /// Sets the leader gauge.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Reconciles counted so far with `result` ([`RESULT_OK`] or [`RESULT_ERROR`]).
    pub fn reconciles(&self, result: &str) -> u64 {
        self.reconciles.with_label_values(&[result]).get()
    }

    /// Errors counted so far of `class`.
    pub fn errors(&self, class: &str) -> u64 {
        self.errors.with_label_values(&[class]).get()
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> Result<String> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).map_err(prometheus_error)?;
        String::from_utf8(buffer).map_err(|e| Error::Runtime(format!("metrics: {e}")))
    }
}

/// The admin routes: [`PATH_METRICS`] and [`PATH_HEALTHZ`].
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new().route(PATH_METRICS, get(metrics_handler)).route(PATH_HEALTHZ, get(healthz)).with_state(metrics)
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Liveness: the process answers. (Not leadership: a follower is healthy too.)
async fn healthz() -> &'static str {
    "ok\n"
}

/// Binds the admin address.
pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::Runtime(format!("binding the admin address {addr}: {e}")))
}

/// Serves the admin routes on `listener` until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> Result<()> {
    axum::serve(listener, router(metrics)).await.map_err(|e| Error::Runtime(format!("admin server: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn the_admin_server_serves_metrics_and_healthz() {
        let metrics = Arc::new(Metrics::new().unwrap());
        metrics.reconciled(true, Duration::from_millis(20));
        metrics.error(&Error::MissingField("namespace".into()));
        metrics.set_leader(true);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, metrics.clone()));

        let health = get(addr, PATH_HEALTHZ).await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert!(health.ends_with("ok\n"), "{health}");

        let text = get(addr, PATH_METRICS).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("text/plain; version=0.0.4"), "{text}");
        assert!(text.contains(&format!("{METRIC_OPERATOR_RECONCILES_TOTAL}{{result=\"ok\"}} 1")), "{text}");
        assert!(text.contains(&format!("{METRIC_OPERATOR_RECONCILES_TOTAL}{{result=\"error\"}} 0")), "{text}");
        assert!(text.contains(&format!("{METRIC_OPERATOR_RECONCILE_DURATION_SECONDS}_count 1")), "{text}");
        assert!(text.contains(&format!("{METRIC_OPERATOR_RECONCILE_ERRORS_TOTAL}{{class=\"missing_field\"}} 1")));
        assert!(text.contains(&format!("{METRIC_OPERATOR_LEADER} 1")), "{text}");

        let missing = get(addr, "/nope").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        server.abort();
    }
}
