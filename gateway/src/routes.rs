//! The gateway's routes.
//!
//! | route (API port) | answer |
//! |---|---|
//! | `POST /v1/chat/completions`, `POST /v1/completions` | proxied to a backend of the request's model ([`proxy`]) |
//! | `GET /v1/models` | the models with at least one ready backend, and the autoscaled ones |
//! | `GET /v1/models/{id}` | one of those, or a 404 |
//! | `GET /health` | 200 while the process is alive |
//! | `GET /ready` | 200 once discovery has loaded |
//!
//! The admin port serves `GET /metrics`, `GET /health` and `GET /targets` (every backend as Prometheus HTTP
//! service discovery, so a Prometheus beside `baleen up` or a static file scrapes what the gateway routes to).
//! Anything else is an OpenAI-shaped 404 or 405.

pub mod body;
pub mod peek;
pub mod proxy;

use std::time::Instant;

use baleen_api::http::{ApiError, json_response};
use baleen_api::names::{
    MODEL_UNKNOWN, PATH_CHAT_COMPLETIONS, PATH_COMPLETIONS, PATH_GATEWAY_TARGETS, PATH_HEALTH, PATH_METRICS,
    PATH_MODELS, PATH_READY,
};
use baleen_api::openai::{Model, ModelList};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

pub use body::ResponseBody;

use crate::App;
use crate::auth::Key;
use crate::wire::Fields;

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    let text = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    json_response(status, Bytes::from(text))
}

fn status_ok() -> Response<ResponseBody> {
    json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

fn not_routed(method: &Method, path: &str, known: &[&str]) -> Response<ResponseBody> {
    if known.contains(&path) {
        ApiError::method_not_allowed(method.as_str(), path).into_http()
    } else {
        ApiError::route_not_found(method.as_str(), path).into_http()
    }
}

/// Where a request of the API port goes, decided from its head alone (before its body is read).
#[derive(Debug)]
pub enum Route<'a> {
    /// A completion, to proxy with its body ([`proxy::forward`]), by this API key when keys are required.
    Forward(Option<&'a Key>),
    /// Answered without the body: the GET routes, an unknown route or method, a missing or wrong API key.
    Answer(Response<ResponseBody>),
}

/// The API port: where a request with this head goes.
pub fn route<'a>(app: &'a App, method: &Method, path: &str, fields: &Fields) -> Route<'a> {
    let model_id = path.strip_prefix(PATH_MODELS).and_then(|rest| rest.strip_prefix('/')).filter(|id| !id.is_empty());
    let guarded = model_id.is_some() || matches!(path, PATH_CHAT_COMPLETIONS | PATH_COMPLETIONS | PATH_MODELS);
    let key = match &app.settings.api_keys {
        Some(keys) if guarded => match keys.authenticate(fields.get(header::AUTHORIZATION.as_str())) {
            Ok(key) => Some(key),
            Err(e) => {
                app.metrics.request(MODEL_UNKNOWN, "", e.status.as_u16());
                let mut response: Response<ResponseBody> = e.into_http();
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return Route::Answer(response);
            }
        },
        _ => None,
    };
    Route::Answer(match (method, path) {
        (&Method::POST, PATH_CHAT_COMPLETIONS | PATH_COMPLETIONS) => return Route::Forward(key),
        (&Method::GET, PATH_MODELS) => models(app),
        (&Method::GET, _) if let Some(id) = model_id => model(app, id),
        (&Method::GET, PATH_HEALTH) => status_ok(),
        (&Method::GET, PATH_READY) => json(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
        (method, path) => {
            let known = [PATH_CHAT_COMPLETIONS, PATH_COMPLETIONS, PATH_MODELS, PATH_HEALTH, PATH_READY];
            let response = not_routed(method, path, &known);
            app.metrics.request(MODEL_UNKNOWN, "", response.status().as_u16());
            response
        }
    })
}

/// The admin port.
pub fn admin<B>(app: &App, request: &Request<B>) -> Response<ResponseBody> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, PATH_METRICS) => {
            let mut response = Response::new(ResponseBody::from(app.metrics.render()));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
            response
        }
        (&Method::GET, PATH_HEALTH) => status_ok(),
        (&Method::GET, PATH_GATEWAY_TARGETS) => targets(app),
        (method, path) => not_routed(method, path, &[PATH_METRICS, PATH_HEALTH, PATH_GATEWAY_TARGETS]),
    }
}

/// `GET /targets` (admin port): one Prometheus `http_sd_configs` target group per model, listing the
/// `host:port` of each of its backends (ready or not; Prometheus records which are up).
fn targets(app: &App) -> Response<ResponseBody> {
    let groups: Vec<serde_json::Value> = app
        .registry
        .pools()
        .iter()
        .map(|pool| pool.backends().iter().map(|b| b.url.trim_start_matches("http://").to_string()).collect())
        .filter(|targets: &Vec<String>| !targets.is_empty())
        .map(|targets| serde_json::json!({ "targets": targets, "labels": {} }))
        .collect();
    json(StatusCode::OK, &groups)
}

/// `GET /v1/models`: every model with a backend that can take requests now, and every autoscaled one (at zero,
/// a request starts a replica).
fn models(app: &App) -> Response<ResponseBody> {
    json(StatusCode::OK, &ModelList::new(listed(app)))
}

/// The models `/v1/models` lists.
fn listed(app: &App) -> Vec<Model> {
    let now = Instant::now();
    app.registry
        .pools()
        .iter()
        .filter(|pool| pool.hold.enabled() || !pool.routable(now).is_empty())
        .map(|pool| Model::new(pool.name.clone(), app.created, None))
        .collect()
}

/// `GET /v1/models/{id}`: a model `/v1/models` lists, or a 404 naming the ones it does.
fn model(app: &App, id: &str) -> Response<ResponseBody> {
    let listed = listed(app);
    if let Some(model) = listed.iter().find(|m| m.id == id) {
        return json(StatusCode::OK, model);
    }
    let served = listed.iter().map(|m| format!("`{}`", m.id)).collect::<Vec<_>>().join(", ");
    let response: Response<ResponseBody> = ApiError::model_not_found(id, &served).into_http();
    app.metrics.request(MODEL_UNKNOWN, "", response.status().as_u16());
    response
}
