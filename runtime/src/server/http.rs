//! The router: routes, the request-size limit, per-route HTTP metrics, OpenAI-shaped 404/405 answers, the probes
//! and `/metrics`, and [`serve`].
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/chat/completions`, `POST /v1/completions` | OpenAI JSON, or SSE with `"stream": true` |
//! | `GET /v1/models` | the served model |
//! | `GET /health` | 200 while the process is alive |
//! | `GET /ready` | 200 while the engine admits requests, 503 while draining |
//! | `GET /metrics` | Prometheus text format |

use std::future::Future;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use baleen_api::http;
use baleen_api::names::{
    PATH_CHAT_COMPLETIONS, PATH_COMPLETIONS, PATH_HEALTH, PATH_METRICS, PATH_MODEL, PATH_MODELS, PATH_READY,
    ROUTE_UNMATCHED,
};
use baleen_api::openai::{Model, ModelList};
use tokio::net::TcpListener;

use super::{ApiError, AppState, chat, completions};
use crate::error::{Error, Result};

/// The application: every route (the paths are in `baleen_api::names`, also the `route` metric label), bodies over `state.max_request_bytes` are refused (413) by the handlers before parsing ([`read_body`]).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(PATH_CHAT_COMPLETIONS, post(chat::handle))
        .route(PATH_COMPLETIONS, post(completions::handle))
        .route(PATH_MODELS, get(models))
        .route(PATH_MODEL, get(model))
        .route(PATH_HEALTH, get(health))
        .route(PATH_READY, get(ready))
        .route(PATH_METRICS, get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` completes, then stops accepting and waits for the
/// connections in flight to finish.
pub async fn serve<F>(listener: TcpListener, state: AppState, shutdown: F) -> Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Server(format!("serving HTTP failed: {e}")))
}

/// Counts every answer by route template and status; the duration runs to the response head.
async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = match request.extensions().get::<MatchedPath>() {
        Some(path) => path.as_str().to_string(),
        None => ROUTE_UNMATCHED.to_string(),
    };
    let start = Instant::now();
    let response = next.run(request).await;
    state.metrics.observe_http(&route, response.status().as_u16(), start.elapsed().as_secs_f64());
    response
}

/// The request body, capped at `limit` before parsing (413 on a declared or actual size over it).
pub(crate) async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    http::check_content_length(headers, limit)?;
    http::read_body(body, limit).await
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
