//! The runtime's HTTP server: the OpenAI-compatible API plus `/health`, `/ready` and `/metrics` on one port (as
//! vLLM does, so an endpoint picker scrapes the serving port).
//!
//! - [`http`]: the router, per-route HTTP metrics, the probes, `/metrics`, `/v1/models`, [`serve`].
//! - `chat` / `completions`: the two generation endpoints; `params` turns their bodies into a
//!   [`GenerateRequest`](crate::engine::GenerateRequest); `generate` submits it and collects or streams (SSE)
//!   the engine's events, cancelling the request when the client goes away.
//! - [`edge`]: what every request meets before its route — the connection cap, API keys, CORS.
//! - [`access`]: the access log, one line per request (never prompt text).
//! - [`error`]: [`ApiError`], every failure rendered once as OpenAI JSON.
//! - [`cmd`]: the `serve` subcommand.

pub mod access;
pub mod args;
mod chat;
pub mod cmd;
mod completions;
pub mod edge;
pub mod error;
mod expert_rank;
mod generate;
pub mod http;
mod params;
pub mod signals;
mod tools;

use std::sync::Arc;
use std::time::Duration;

pub use args::ServeArgs;
pub use edge::Edge;
pub use error::ApiError;
pub use http::{router, serve};

use crate::engine::EngineHandle;
use crate::grammar::{Constraint, Grammars, MAX_CONCURRENT_COMPILES, OutputFormat};
use crate::metrics::Metrics;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    pub metrics: Arc<Metrics>,
    /// Request bodies larger than this are refused with 413 before they are parsed.
    pub max_request_bytes: usize,
    /// Unix seconds at start-up (the `created` of `/v1/models`).
    pub created: u64,
    /// The other ranks of this head's expert-parallel group; `/ready` waits for all of them.
    pub peers: Option<Arc<crate::expert::ExpertPeers>>,
    /// Connection timeouts and cap.
    pub limits: HttpLimits,
    /// API keys and CORS origins.
    pub edge: Arc<Edge>,
    /// The structured-output grammar engine of the model's tokenizer, built at the first request that needs it
    /// (`Err`: this tokenizer cannot be used, and why).
    grammars: Arc<tokio::sync::OnceCell<Result<Arc<Grammars>, String>>>,
    /// Schema compiles running at once at most ([`MAX_CONCURRENT_COMPILES`]); others wait for a slot.
    compiles: Arc<tokio::sync::Semaphore>,
}

/// The HTTP server's connection hygiene: how long a client may take, how many connections it may hold open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// A request's headers must arrive within this; an idle keep-alive connection is closed after it.
    pub header_read_timeout: Duration,
    /// A request's body must arrive within this (else 408).
    pub body_read_timeout: Duration,
    /// Open connections at most; a connection beyond it is served only the probes and `/metrics` (others get
    /// 503) and is closed after one answer.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

impl AppState {
    pub fn new(engine: EngineHandle, metrics: Arc<Metrics>, max_request_bytes: usize) -> Self {
        Self {
            engine,
            metrics,
            max_request_bytes,
            created: unix_now(),
            peers: None,
            limits: HttpLimits::default(),
            edge: Arc::new(Edge::default()),
            grammars: Arc::default(),
            compiles: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_COMPILES)),
        }
    }

    /// The grammar constraint of `format` (none without one), which came from the request field `param`
    /// (`response_format`, or `tools` for a forced call). Building the engine and compiling the schema are CPU
    /// work, done off the async threads, [`MAX_CONCURRENT_COMPILES`] at a time, and only for a request the engine
    /// would admit now (else its 429 / 503 first); a schema the engine refuses is a 400 naming `param`.
    pub(crate) async fn constraint(
        &self,
        format: Option<OutputFormat>,
        param: &str,
    ) -> Result<Option<Constraint>, ApiError> {
        let Some(format) = format else { return Ok(None) };
        self.engine.check_admission()?;
        let grammars = self
            .grammars
            .get_or_init(|| {
                let tokenizer = Arc::clone(self.engine.tokenizer());
                let vocab = self.engine.info().vocab_size;
                async move {
                    let built = tokio::task::spawn_blocking(move || Grammars::new(tokenizer, vocab));
                    match built.await {
                        Ok(Ok(grammars)) => Ok(Arc::new(grammars)),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(e) => Err(format!("building the grammar engine failed: {e}")),
                    }
                }
            })
            .await
            .clone()
            .map_err(|e| ApiError::unsupported_param(param, e))?;
        let _slot = self
            .compiles
            .acquire()
            .await
            .map_err(|e| ApiError::internal(format!("waiting to compile the schema failed: {e}")))?;
        let compiled = tokio::task::spawn_blocking(move || grammars.compile(&format))
            .await
            .map_err(|e| ApiError::internal(format!("compiling the schema failed: {e}")))?;
        compiled.map(Some).map_err(|e| ApiError::invalid_param(param, format!("invalid `{param}` schema: {e}")))
    }

    /// The request body, capped at `max_request_bytes` (413 on a declared size over it, before any byte is read
    /// and without a `100 Continue`; 413 on an actual size over it) and read within `limits.body_read_timeout`
    /// (else 408).
    pub(crate) async fn read_body(
        &self,
        headers: &axum::http::HeaderMap,
        body: axum::body::Body,
    ) -> Result<axum::body::Bytes, ApiError> {
        let limit = self.max_request_bytes;
        baleen_api::http::check_content_length(headers, limit)?;
        let timeout = self.limits.body_read_timeout;
        tokio::time::timeout(timeout, baleen_api::http::read_body(body, limit))
            .await
            .unwrap_or_else(|_| Err(ApiError::request_timeout(timeout.as_secs())))
    }

    /// The model name clients must send in `model`.
    pub fn served_model_name(&self) -> &str {
        &self.engine.info().served_model_name
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
