//! The router: routes, the request-size limit, per-route HTTP metrics and the access log, OpenAI-shaped 404/405
//! answers, the probes and `/metrics`, and [`serve`]: hyper's HTTP/1.1 server with connection hygiene (a
//! header-read timeout that also closes idle keep-alive connections, a body-read timeout, a connection cap).
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/chat/completions`, `POST /v1/completions` | OpenAI JSON, or SSE with `"stream": true` |
//! | `GET /v1/models` | the served model |
//! | `GET /health` | 200 while the process is alive |
//! | `GET /ready` | 200 while the engine admits requests, 503 while draining |
//! | `GET /metrics` | Prometheus text format |

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use baleen_api::names::{
    PATH_CHAT_COMPLETIONS, PATH_COMPLETIONS, PATH_HEALTH, PATH_METRICS, PATH_MODEL, PATH_MODELS, PATH_READY,
    ROUTE_UNMATCHED,
};
use baleen_api::openai::{Model, ModelList};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::access::Access;
use super::edge::{OverCapacity, edge};
use super::{ApiError, AppState, chat, completions, generate};
use crate::error::Result;

/// A connection over the cap must send its request's headers within this (or the configured timeout, if
/// shorter): it holds a file descriptor the server may need for a probe.
const OVER_CAPACITY_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections over the cap served at once (probes only); beyond them a new connection is closed at once, so
/// open file descriptors stay bounded however many clients connect.
pub const OVER_CAPACITY_CONNECTIONS: usize = 256;
/// How long accepting pauses after a failed accept (out of file descriptors and the like).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The application: every route (the paths are in `baleen_api::names`, also the `route` metric label) behind
/// the edge (connection cap, API keys, CORS) and the metrics and access log; bodies over
/// `state.max_request_bytes` are refused (413) by the handlers before parsing ([`AppState::read_body`]).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(PATH_CHAT_COMPLETIONS, post(generate::handle::<chat::Chat>))
        .route(PATH_COMPLETIONS, post(generate::handle::<completions::Completions>))
        .route(PATH_MODELS, get(models))
        .route(PATH_MODEL, get(model))
        .route(PATH_HEALTH, get(health))
        .route(PATH_READY, get(ready))
        .route(PATH_METRICS, get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), edge))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` completes, then stops accepting and waits for the
/// connections in flight to finish (idle keep-alive connections are closed at once).
///
/// Each connection gets `state.limits.header_read_timeout` to send a request's headers (hyper's timer also runs
/// while a keep-alive connection waits for its next request, so idle connections close after it). Beyond
/// `state.limits.max_connections` open connections a new one is still accepted — so a probe always gets in —
/// but it is served only `/health`, `/ready` and `/metrics` (others get 503), with a short header timeout and
/// no keep-alive; beyond [`OVER_CAPACITY_CONNECTIONS`] more, a new connection is closed without an answer.
pub async fn serve<F>(listener: TcpListener, state: AppState, shutdown: F) -> Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let limits = state.limits;
    let app = router(state);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let over = Arc::new(Semaphore::new(OVER_CAPACITY_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let permit = Arc::clone(&open).try_acquire_owned().ok();
        let over_capacity = permit.is_none();
        let over_permit = if over_capacity {
            match Arc::clone(&over).try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    tracing::debug!("connection closed: over the cap and the probe-only connections");
                    continue;
                }
            }
        } else {
            None
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
        if over_capacity {
            builder.keep_alive(false).header_read_timeout(limits.header_read_timeout.min(OVER_CAPACITY_HEADER_TIMEOUT));
        }
        let app = app.clone();
        let service = service_fn(move |mut request: hyper::Request<Incoming>| {
            if over_capacity {
                request.extensions_mut().insert(OverCapacity);
            }
            let app = app.clone();
            async move {
                let response: Result<Response, Infallible> = app.oneshot(request.map(Body::new)).await;
                response
            }
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop((permit, over_permit));
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Counts every answer by route template and status (the duration runs to the response head) and opens the
/// request's access-log record, which handlers fill in and which is written once nobody holds it.
async fn track(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let route = match request.extensions().get::<MatchedPath>() {
        Some(path) => path.as_str().to_string(),
        None => ROUTE_UNMATCHED.to_string(),
    };
    let access = Access::new(request.method().as_str(), request.uri().path());
    request.extensions_mut().insert(Arc::clone(&access));
    let start = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    access.set_status(status);
    state.metrics.observe_http(&route, status, start.elapsed().as_secs_f64());
    response
}

/// The one model this server serves.
fn served(state: &AppState) -> Model {
    let info = state.engine.info();
    Model::new(&info.served_model_name, state.created, Some(info.max_model_len))
}

async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList::new(vec![served(&state)]))
}

/// `GET /v1/models/{id}`: the served model, or a 404 naming it.
async fn model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let model = served(&state);
    if id == model.id {
        Json(model).into_response()
    } else {
        ApiError::model_not_found(&id, &format!("`{}`", model.id)).into_response()
    }
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(state): State<AppState>) -> Response {
    if let Some(peers) = &state.peers
        && !peers.all_ready()
    {
        let missing = peers.not_ready().join("; ");
        return ApiError::unavailable(format!("expert peers not ready: {missing}")).into_response();
    }
    if state.engine.is_ready() {
        (StatusCode::OK, Json(serde_json::json!({ "status": "ready" }))).into_response()
    } else {
        ApiError::unavailable("the server is draining or its engine has stopped").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], state.metrics.render()).into_response()
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}
