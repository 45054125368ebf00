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
mod chat;
pub mod cmd;
mod completions;
pub mod edge;
pub mod error;
mod expert_rank;
mod generate;
pub mod http;
mod params;
mod tools;

use std::sync::Arc;
use std::time::Duration;

pub use edge::Edge;
pub use error::ApiError;
pub use http::{router, serve};

use crate::engine::EngineHandle;
use crate::grammar::{Constraint, Grammars, OutputFormat};
use crate::metrics::Metrics;
use params::RESPONSE_FORMAT;

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
        }
    }

    /// The grammar constraint of `format` (none without one). Building the engine and compiling the schema are
    /// CPU work, done off the async threads; a schema the engine refuses is a 400 naming `response_format`.
    pub(crate) async fn constraint(&self, format: Option<OutputFormat>) -> Result<Option<Constraint>, ApiError> {
        let Some(format) = format else { return Ok(None) };
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
            .map_err(|e| ApiError::unsupported_param(RESPONSE_FORMAT, e))?;
        let compiled = tokio::task::spawn_blocking(move || grammars.compile(&format))
            .await
            .map_err(|e| ApiError::internal(format!("compiling the schema failed: {e}")))?;
        compiled
            .map(Some)
            .map_err(|e| ApiError::invalid_param(RESPONSE_FORMAT, format!("invalid `response_format` schema: {e}")))
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
