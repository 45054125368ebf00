//! `serve` as an expert-only rank (rank > 0 without data-parallel attention): load this rank's shard of the
//! routed experts — nothing else — and answer the head's dispatches over gRPC until SIGTERM.
//!
//! No OpenAI API: the rank's HTTP port (`--port`) serves only the probes and metrics a pod needs —
//! `GET /health` (alive), `GET /ready` (200 once the shard is loaded and the gRPC service listens, 503 after
//! SIGTERM), `GET /metrics` (rows computed by layer, compute seconds) — and answers everything else with an
//! OpenAI-shaped 404 that points at the head.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use baleen_api::names::{
    LABEL_LAYER, LABEL_WEIGHT_FORMAT, METRIC_RUNTIME_EXPERT_COMPUTE_SECONDS, METRIC_RUNTIME_EXPERT_ROWS_SERVED_TOTAL,
    METRIC_RUNTIME_MODEL_WEIGHT_BYTES, PATH_HEALTH, PATH_METRICS, PATH_READY, RUNTIME_EXPERTS_LISTENING_PREFIX,
    RUNTIME_LISTENING_PREFIX,
};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ApiError;

use super::args::ServeArgs;
use super::signals::Signals;
use crate::device::{parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::expert::{
    ComputeObserver, EXPERT_LATENCY_BUCKETS, ExpertCompute, HeldExperts, ShardCompute, model_fingerprint, serve_experts,
};
use crate::loader::{ModelSource, var_builder};
use crate::model::{DeepseekModel, ExpertShard};

pub(super) fn run(args: &ServeArgs, runtime: &tokio::runtime::Runtime, mut signals: Signals) -> Result<Value> {
    let device = parse_device(&args.model.device)?;
    let dtype = parse_dtype(&args.model.dtype)?;
    let source = ModelSource::parse(&args.model.model);
    let mut config = source.config()?;
    let expert = &args.model.expert;
    let placement = expert
        .placement(&config)?
        .ok_or_else(|| Error::Setting { name: "world-size".into(), reason: "an expert rank needs a group".into() })?;
    let rank = expert.rank;
    let quantize = args.model.quantize()?;
    quantize.configure(&mut config)?;
    let mut shard = ExpertShard::load(&config, &placement, rank, var_builder(&source, &config, dtype, &device)?)?;
    quantize.apply(|f| shard.visit_weights(f))?;
    tracing::info!(rank, experts = ?shard.held(), expert_bytes = shard.bytes(), quantize = quantize.as_str(), "expert shard loaded");
    let fingerprint = model_fingerprint(&source.to_string(), &config, dtype, quantize);
    let metrics = Arc::new(RankMetrics::new(&quantize.weight_format(dtype), shard.bytes())?);
    let observed = metrics.clone();
    let observer: ComputeObserver = Arc::new(move |layer, rows, seconds| observed.observe(layer, rows, seconds));
    let compute: Arc<dyn ExpertCompute> = Arc::new(ShardCompute::new(
        HeldExperts::Shard(shard),
        placement,
        rank,
        fingerprint,
        device,
        args.model.threads()?,
        Some(observer),
    )?);
    let port = expert_port(expert)?;
    runtime.block_on(async move {
        let bind = |port: u16| async move {
            TcpListener::bind((args.host.as_str(), port))
                .await
                .map_err(|e| Error::Server(format!("binding {}:{port} failed: {e}", args.host)))
        };
        let listener = bind(port).await?;
        let http_listener = bind(args.port).await?;
        let local =
            |l: &TcpListener| l.local_addr().map_err(|e| Error::Server(format!("reading the bound address: {e}")));
        let (addr, http_addr) = (local(&listener)?, local(&http_listener)?);
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{RUNTIME_EXPERTS_LISTENING_PREFIX}{addr}")
            .and_then(|()| writeln!(stdout, "{RUNTIME_LISTENING_PREFIX}{http_addr}"))
            .and_then(|()| stdout.flush())
            .map_err(|e| Error::Server(format!("writing the listening lines: {e}")))?;
        drop(stdout);
        let stop = CancellationToken::new();
        let state = RankState { rank, ready: Arc::new(AtomicBool::new(true)), metrics };
        let ready = state.ready.clone();
        let http_stop = stop.clone();
        let http = tokio::spawn(async move {
            axum::serve(http_listener, rank_router(state)).with_graceful_shutdown(http_stop.cancelled_owned()).await
        });
        let grpc_stop = stop.clone();
        let served = serve_experts(listener, compute, async move {
            let signal = signals.recv().await;
            tracing::info!(signal, "expert rank shutting down");
            ready.store(false, Ordering::SeqCst);
            grpc_stop.cancel();
        })
        .await;
        stop.cancel();
        match http.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the probe and metrics server failed"),
            Err(e) => tracing::warn!(error = %e, "the probe and metrics server task failed"),
        }
        served
    })?;
    Ok(Value::Null)
}

/// Data-parallel attention: a head also serves the experts its own model holds to the other heads, on its
/// `--peers` address, from a thread of its own (a current-thread runtime whose tasks compute small dispatches
/// where they arrive, larger or concurrent ones on the shard's compute thread), so another head's rows are
/// answered while this head's engine computes. Stop it with [`HeadService::stop`].
pub(super) fn start_head_service(args: &ServeArgs, model: &DeepseekModel) -> Result<HeadService> {
    let expert = &args.model.expert;
    let config = model.config();
    let placement = expert
        .placement(config)?
        .ok_or_else(|| Error::Setting { name: "world-size".into(), reason: "a head service needs a group".into() })?;
    let rank = expert.rank;
    let source = ModelSource::parse(&args.model.model);
    let fingerprint = model_fingerprint(&source.to_string(), config, model.dtype(), model.quantization());
    let compute = Arc::new(ShardCompute::new(
        HeldExperts::Model(Box::new(model.clone())),
        placement,
        rank,
        fingerprint,
        model.device().clone(),
        args.model.threads()?,
        None,
    )?);
    let port = expert_port(expert)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Server(format!("starting the expert service runtime failed: {e}")))?;
    let listener = runtime
        .block_on(TcpListener::bind((args.host.as_str(), port)))
        .map_err(|e| Error::Server(format!("binding the expert service on {}:{port} failed: {e}", args.host)))?;
    tracing::info!(rank, port, "serving this head's experts to the other heads");
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("baleen-expert-svc".into())
        .spawn(move || {
            if let Err(e) = runtime.block_on(serve_experts(listener, compute, stopped.cancelled_owned())) {
                tracing::error!(error = %e, "the expert service stopped");
            }
            // The runtime (and the model its tasks hold) is dropped here, outside any async context.
            drop(runtime);
            let _ = done.send(());
        })
        .map_err(|e| Error::Server(format!("starting the expert service thread failed: {e}")))?;
    Ok(HeadService { stop, finished })
}

/// How long a stopping head waits for its expert service's connections to close.
const HEAD_SERVICE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A data-parallel head's expert service, running until [`HeadService::stop`].
#[derive(Debug)]
pub(super) struct HeadService {
    stop: CancellationToken,
    finished: std::sync::mpsc::Receiver<()>,
}

impl HeadService {
    /// Ends every open stream (other heads see this one go away at once) and waits, up to a bound, for the
    /// service to stop.
    pub(super) fn stop(self) {
        self.stop.cancel();
        if self.finished.recv_timeout(HEAD_SERVICE_CLOSE_TIMEOUT).is_err() {
            tracing::warn!("the expert service did not stop within {HEAD_SERVICE_CLOSE_TIMEOUT:?}; exiting anyway");
        }
    }
}

/// The port this rank's expert service binds: `--grpc-port` when given, else the port of its own `--peers` entry.
fn expert_port(expert: &crate::settings::ExpertArgs) -> Result<u16> {
    if let Some(port) = expert.grpc_port {
        return Ok(port);
    }
    let own = expert.peers.get(expert.rank).map(String::as_str).unwrap_or_default();
    own.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| Error::Setting { name: "peers".into(), reason: format!("`{own}`: expected host:port") })
}

/// Metrics of an expert-only rank, on its own registry (the head's serving metrics do not apply here).
#[derive(Debug)]
struct RankMetrics {
    registry: Registry,
    rows_served: IntCounterVec,
    compute_seconds: Histogram,
}

impl RankMetrics {
    /// `weight_format` and `weight_bytes`: the experts this rank holds, as stored.
    fn new(weight_format: &str, weight_bytes: usize) -> Result<Self> {
        let registry = Registry::new();
        let held = IntGaugeVec::new(
            Opts::new(METRIC_RUNTIME_MODEL_WEIGHT_BYTES, "Bytes of the expert weights this rank holds, as stored."),
            &[LABEL_WEIGHT_FORMAT],
        )?;
        held.with_label_values(&[weight_format]).set(i64::try_from(weight_bytes).unwrap_or(i64::MAX));
        registry.register(Box::new(held))?;
        let rows_served = IntCounterVec::new(
            Opts::new(
                METRIC_RUNTIME_EXPERT_ROWS_SERVED_TOTAL,
                "Token rows this rank computed for heads, by MoE layer.",
            ),
            &[LABEL_LAYER],
        )?;
        let compute_seconds = Histogram::with_opts(
            HistogramOpts::new(METRIC_RUNTIME_EXPERT_COMPUTE_SECONDS, "Seconds computing one dispatch's rows.")
                .buckets(EXPERT_LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(rows_served.clone()))?;
        registry.register(Box::new(compute_seconds.clone()))?;
        Ok(Self { registry, rows_served, compute_seconds })
    }

    fn observe(&self, layer: usize, rows: usize, seconds: f64) {
        self.compute_seconds.observe(seconds);
        self.rows_served.with_label_values(&[layer.to_string().as_str()]).inc_by(rows as u64);
    }

    fn render(&self) -> String {
        crate::metrics::render_registry(&self.registry)
    }
}

#[derive(Clone)]
struct RankState {
    rank: usize,
    ready: Arc<AtomicBool>,
    metrics: Arc<RankMetrics>,
}

/// Probes and metrics of an expert-only rank; anything else is a 404 that names the head.
fn rank_router(state: RankState) -> Router {
    Router::new()
        .route(PATH_HEALTH, get(|| async { StatusCode::OK }))
        .route(PATH_READY, get(rank_ready))
        .route(PATH_METRICS, get(rank_metrics))
        .fallback(not_a_head)
        .with_state(state)
}

async fn rank_ready(State(state): State<RankState>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, axum::Json(serde_json::json!({ "status": "ready", "rank": state.rank }))).into_response()
    } else {
        ApiError::unavailable("this expert rank is shutting down").into_response()
    }
}

async fn rank_metrics(State(state): State<RankState>) -> Response {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], state.metrics.render()).into_response()
}

async fn not_a_head(State(state): State<RankState>, method: Method, uri: Uri) -> ApiError {
    let mut error = ApiError::route_not_found(method.as_str(), uri.path());
    error.message = format!(
        "{}: rank {} serves routed experts only and has no OpenAI API; send requests to the head (rank 0)",
        error.message, state.rank
    );
    error
}
