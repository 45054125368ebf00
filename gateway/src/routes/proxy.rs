//! Forwarding one completion request: peek at what routing needs, pick a backend by the
//! model's policy, send the body as received, and stream the answer back. A failure before the first response
//! byte — a refused or reset connection, or a 429/502/503/504 answer — is retried on another backend of the
//! model, up to `--retries` times; the last answer (or a 502) goes back when none is left.

use std::sync::Arc;
use std::time::Instant;

use baleen_api::http::ApiError;
use baleen_api::names::MODEL_UNKNOWN;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode, Uri};

use super::body::{InFlight, ResponseBody, Upstream};
use super::peek::{peek, prefix_key};
use crate::App;
use crate::auth::Key;
use crate::backends::Backend;
use crate::backends::pool::Outgoing;
use crate::config::PolicyKind;
use crate::registry::Pool;
use crate::wire::Fields;

/// Answers worth another backend: it is over capacity, draining, or failed as a gateway would.
fn retryable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}

/// An error answer, counted.
fn refuse(app: &App, model: &str, e: ApiError) -> Response<ResponseBody> {
    app.metrics.request(model, "", e.status.as_u16());
    e.into_http()
}

/// Why no backend of `pool` can take a request now (for the 503).
fn no_backend(pool: &Pool, now: Instant) -> ApiError {
    let backends = pool.backends();
    let reason = if backends.is_empty() {
        "it has no backends".to_string()
    } else {
        let ejected = backends.iter().filter(|b| b.health().ejected_until.is_some_and(|t| now < t)).count();
        let not_ready = backends.iter().filter(|b| b.health().ready != Some(true)).count();
        format!("{} backends: {not_ready} not ready, {ejected} ejected after failures", backends.len())
    };
    let mut e = ApiError::unavailable(format!("no ready backend for the model `{}`: {reason}", pool.name));
    e.retry_after = Some(1);
    e
}

/// Marks a failed attempt on `backend` (ejecting it after repeated failures).
fn failed(app: &App, pool: &Pool, backend: &Backend) {
    if backend.failed(Instant::now()) {
        tracing::warn!(model = %pool.name, backend = %backend.url, "backend ejected after repeated failures");
        app.metrics.ejected(&pool.name, &backend.url);
    }
}

/// Proxies one completion request (see the module docs): its method, target and end-to-end fields, and its body
/// as received (the server has capped it at `--max-request-bytes`).
pub async fn forward(
    app: &Arc<App>,
    method: &Method,
    uri: &Uri,
    fields: &Fields,
    body: Bytes,
    arrived: Instant,
    api_key: Option<&Key>,
) -> Response<ResponseBody> {
    let mut peeked = match peek(&body, fields, &app.settings.session_header) {
        Ok(peeked) => peeked,
        Err(e) => return refuse(app, MODEL_UNKNOWN, e),
    };
    if let Some(key) = api_key
        && let Err((e, limit)) = key.admit(peeked.max_tokens, Instant::now())
    {
        if let Some(limit) = limit {
            app.metrics.rate_limited(&key.name, limit.as_str());
        }
        return refuse(app, MODEL_UNKNOWN, e);
    }
    let pool = match peeked.model.take() {
        Some(model) => app.registry.get(&model).ok_or(model),
        None => match app.registry.pools().as_slice() {
            [only] => Ok(Arc::clone(only)),
            _ => {
                let e = ApiError::invalid_param("model", "`model` is required: this gateway serves several models");
                return refuse(app, MODEL_UNKNOWN, e);
            }
        },
    };
    let pool = match pool {
        Ok(pool) => pool,
        Err(model) => {
            let served = app.registry.names().iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
            return refuse(app, MODEL_UNKNOWN, ApiError::model_not_found(&model, &served));
        }
    };
    if pool.policy.kind() == PolicyKind::PrefixAffinity {
        peeked.key.prefix = prefix_key(&body, app.settings.prefix_bytes);
    }
    // Time spent waiting for a replica, which is not the gateway's own cost (`added_latency`).
    let mut held_for = std::time::Duration::ZERO;
    if pool.hold.enabled() {
        // An autoscaled model: with no ready replica (at zero, or all starting), wait for one.
        pool.hold.arrived();
        if pool.routable(Instant::now()).is_empty() {
            let started = Instant::now();
            let ready = || !pool.routable(Instant::now()).is_empty();
            let (timeout, max) = (app.settings.hold_timeout, app.settings.max_held_requests);
            if let Err(e) = pool.hold.wait(&pool.name, ready, timeout, max, &app.autoscaler.wake).await {
                return refuse(app, &pool.name, e);
            }
            held_for = started.elapsed();
        }
    }

    // The request as every backend gets it: same method, path and query (origin form), its end-to-end fields as
    // they came (the pool writes `Host` and `Content-Length`), the body as received.
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut upstream = Outgoing { method, target, fields, body: &body, at: arrived };
    let stale_after = app.settings.windows.stale_after;
    // Backends that failed this request or answered it with a retryable status (none on the common path).
    let mut tried: Vec<u64> = Vec::new();
    // A retryable answer kept to return if no other backend answers better: (backend URL, answer).
    let mut held: Option<(String, Response<ResponseBody>)> = None;
    let mut last_error: Option<ApiError> = None;
    for attempt in 0..=app.settings.retries {
        // A first attempt that waited for nothing picks as of the request's arrival (microseconds ago; samples go
        // stale and ejections end over seconds).
        let picked_at = if attempt == 0 && held_for.is_zero() { arrived } else { Instant::now() };
        let mut candidates = pool.candidates(picked_at, stale_after, &tried);
        let Some(chosen) = pool.policy.pick(&candidates, &peeked.key) else { break };
        let backend = candidates.swap_remove(chosen).backend;
        if attempt > 0 {
            app.metrics.retry(&pool.name);
        }
        // The attempt's one clock read after the pick: the added latency, the pooled connections' age, the timeout.
        let now = Instant::now();
        upstream.at = now;
        let series = backend.metrics(&pool.name, &app.metrics);
        let in_flight = InFlight::new(Arc::clone(&backend));
        if attempt == 0 {
            app.metrics.added_latency(now.saturating_duration_since(arrived).saturating_sub(held_for).as_secs_f64());
        }
        let deadline = tokio::time::Instant::from_std(now) + app.settings.request_timeout;
        let response = match tokio::time::timeout_at(deadline, backend.pool.send(&upstream)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                failed(app, &pool, &backend);
                tracing::debug!(model = %pool.name, backend = %backend.url, "upstream failed: {e}");
                last_error = Some(if e.is_connect() {
                    // Nothing reached it: the backend is gone (stopped, restarting), not misbehaving.
                    let mut e = ApiError::unavailable(format!(
                        "no backend of the model `{}` could be reached; the last, {}, refused: {e}",
                        pool.name, backend.url
                    ));
                    e.retry_after = Some(1);
                    e
                } else {
                    ApiError::bad_gateway(format!("the backend {} failed: {e}", backend.url))
                });
                tried.push(backend.id);
                continue;
            }
            Err(_) => {
                // The backend may still be working on it: another try would run the request twice.
                failed(app, &pool, &backend);
                let e = ApiError::gateway_timeout(format!(
                    "the backend {} did not answer within {:?}",
                    backend.url, app.settings.request_timeout
                ));
                app.metrics.request(&pool.name, &backend.url, e.status.as_u16());
                return e.into_http();
            }
        };
        let status = response.status();
        if status.is_server_error() {
            failed(app, &pool, &backend);
        } else {
            backend.succeeded();
        }
        // (The pool's answer carries no hop-by-hop fields; its own go out from the body, with `x-baleen-backend`.)
        let (head, incoming) = response.into_parts();
        let body = Upstream { inner: incoming, first_byte: Some(arrived), in_flight };
        let answer = Response::from_parts(head, ResponseBody::Upstream(Box::new(body)));
        if retryable(status) {
            held = Some((backend.url.clone(), answer));
            tried.push(backend.id);
            continue;
        }
        if status == StatusCode::OK {
            series.ok.inc();
        } else {
            app.metrics.request(&pool.name, &backend.url, status.as_u16());
        }
        return answer;
    }
    if let Some((url, mut answer)) = held {
        app.metrics.request(&pool.name, &url, answer.status().as_u16());
        // A client told "too many requests" or "unavailable" is told when to come back.
        let told =
            answer.body().upstream().is_some_and(|up| up.inner.fields().get(header::RETRY_AFTER.as_str()).is_some());
        if matches!(answer.status(), StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) && !told {
            answer.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        return answer;
    }
    let e = last_error.unwrap_or_else(|| no_backend(&pool, Instant::now()));
    refuse(app, &pool.name, e)
}
