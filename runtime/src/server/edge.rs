//! What every request meets before its route: the connection cap (an over-cap connection is served the probes
//! and `/metrics` only), API keys (`--api-key`: `/v1/*` needs `Authorization: Bearer KEY`, compared in constant
//! time), and CORS for browsers (`--allowed-origins`: preflights answered, the allowed origin echoed).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use baleen_api::http::bearer_token;
use baleen_api::names::{PATH_HEALTH, PATH_METRICS, PATH_READY};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// The path prefix API keys protect (the probes and `/metrics` stay open, as in vLLM).
const API_PREFIX: &str = "/v1/";
/// Methods and headers a browser may use across origins.
const CORS_METHODS: &str = "GET, POST, OPTIONS";
const CORS_HEADERS: &str = "authorization, content-type";
/// Response headers a browser script may read.
const CORS_EXPOSED: &str = "retry-after, x-request-id";
/// Seconds a browser may cache a preflight answer.
const CORS_MAX_AGE: &str = "600";

/// Marks a request that arrived on a connection over `--max-connections`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OverCapacity;

/// The edge's settings: API keys (as SHA-256 digests) and the origins allowed through CORS.
#[derive(Debug, Clone, Default)]
pub struct Edge {
    api_keys: Vec<[u8; 32]>,
    origins: Origins,
}

/// Origins allowed through CORS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Origins {
    /// No CORS headers at all (browsers then refuse cross-origin calls).
    #[default]
    None,
    /// `*`: any origin.
    Any,
    List(Vec<String>),
}

impl Edge {
    /// `api_keys`: the keys clients must send (none: no check). `allowed_origins`: `*` or exact origins such as
    /// `https://app.example.com`; empty entries are skipped.
    pub fn new(api_keys: &[String], allowed_origins: &[String]) -> Self {
        let api_keys = api_keys
            .iter()
            .map(|k| k.trim())
            .filter(|k| !k.is_empty())
            .map(|k| Sha256::digest(k.as_bytes()).into())
            .collect();
        let list: Vec<String> = allowed_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_string())
            .filter(|o| !o.is_empty())
            .collect();
        let origins = if list.iter().any(|o| o == "*") {
            Origins::Any
        } else if list.is_empty() {
            Origins::None
        } else {
            Origins::List(list)
        };
        Self { api_keys, origins }
    }

    /// 401 unless the request carries one of the keys (always fine without keys).
    fn authenticate(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.api_keys.is_empty() {
            return Ok(());
        }
        let hash: [u8; 32] = Sha256::digest(bearer_token(headers)?.as_bytes()).into();
        let found = self.api_keys.iter().fold(false, |found, key| found | bool::from(key.ct_eq(&hash)));
        if found { Ok(()) } else { Err(ApiError::unauthorized("the API key is not valid")) }
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if it is allowed.
    fn allow_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        match &self.origins {
            Origins::None => None,
            Origins::Any => Some(HeaderValue::from_static("*")),
            Origins::List(list) => {
                let text = origin.to_str().ok()?;
                list.iter().any(|o| o == text).then(|| origin.clone())
            }
        }
    }
}

/// The middleware: capacity, then CORS preflight, then the API key, then the route; the allowed origin is set
/// on every answer (errors included, so a browser can read them).
pub(crate) async fn edge(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let allow_origin = state.edge.allow_origin(request.headers());
    let mut response = match check(&state, &request, allow_origin.is_some()) {
        Ok(Some(early)) => early,
        Ok(None) => next.run(request).await,
        Err(e) => e.into_response(),
    };
    if let Some(origin) = allow_origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

/// An early answer (an allowed preflight), an error, or `None` to route the request.
fn check(state: &AppState, request: &Request, origin_allowed: bool) -> Result<Option<Response>, ApiError> {
    let path = request.uri().path();
    if request.extensions().get::<OverCapacity>().is_some() && ![PATH_HEALTH, PATH_READY, PATH_METRICS].contains(&path)
    {
        let mut e = ApiError::unavailable(format!(
            "the server has {} open connections, its limit; retry on another connection later",
            state.limits.max_connections
        ));
        e.retry_after = Some(1);
        return Err(e);
    }
    let headers = request.headers();
    if origin_allowed
        && request.method() == Method::OPTIONS
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return Ok(Some(preflight(headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS))));
    }
    if path.starts_with(API_PREFIX) {
        state.edge.authenticate(headers)?;
    }
    Ok(None)
}

/// 204 with the methods, headers and cache time a browser may use. The headers asked for are allowed as asked
/// (SDKs send their own, such as the openai SDK's `x-stainless-*`), else [`CORS_HEADERS`].
fn preflight(requested: Option<&HeaderValue>) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(CORS_METHODS));
    let allowed = requested.cloned().unwrap_or_else(|| HeaderValue::from_static(CORS_HEADERS));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed);
    headers.append(header::VARY, HeaderValue::from_static("Access-Control-Request-Headers"));
    headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(CORS_EXPOSED));
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(CORS_MAX_AGE));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (k.clone(), HeaderValue::from_str(v).unwrap())).collect()
    }

    #[test]
    fn api_keys_are_checked_only_when_set() {
        let open = Edge::new(&[], &[]);
        assert!(open.authenticate(&HeaderMap::new()).is_ok());
        let edge = Edge::new(&["k1".into(), " k2".into()], &[]);
        assert!(edge.authenticate(&headers(&[(header::AUTHORIZATION, "Bearer k2")])).is_ok());
        for bad in [
            headers(&[(header::AUTHORIZATION, "Bearer k3")]),
            headers(&[(header::AUTHORIZATION, "k1")]),
            HeaderMap::new(),
        ] {
            assert_eq!(edge.authenticate(&bad).unwrap_err().status, StatusCode::UNAUTHORIZED);
        }
    }

    #[test]
    fn origins_are_echoed_only_when_allowed() {
        let from = |o: &str| headers(&[(header::ORIGIN, o)]);
        assert_eq!(Edge::new(&[], &[]).allow_origin(&from("https://a.example")), None);
        assert_eq!(Edge::new(&[], &["*".into()]).allow_origin(&from("https://a.example")).unwrap(), "*");
        let list = Edge::new(&[], &["https://a.example/".into(), "".into()]);
        assert_eq!(list.allow_origin(&from("https://a.example")).unwrap(), "https://a.example");
        assert_eq!(list.allow_origin(&from("https://b.example")), None);
        assert_eq!(list.allow_origin(&HeaderMap::new()), None);
    }
}
