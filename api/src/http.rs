//! The OpenAI HTTP edge shared by the runtime and the gateway (feature `http`): every failure as one
//! [`ApiError`] rendered once as OpenAI JSON (`{"error": {"message", "type", "param", "code"}}`), body reading
//! with a size cap, JSON parsing that names the field, the OpenAI-style 404/405 answers, and SSE framing.
//!
//! Rendering is framework-neutral ([`ApiError::into_http`] builds an `http::Response` over any body that can be
//! made from [`Bytes`]); with the `axum` feature [`ApiError`] is also an axum `IntoResponse`.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::openai::ErrorResponse;

/// The `Content-Type` of JSON answers.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// The `Content-Type` of server-sent event streams.
pub const CONTENT_TYPE_SSE: &str = "text/event-stream";
/// The header that asks proxies in front (nginx) not to buffer a stream.
pub const HEADER_ACCEL_BUFFERING: &str = "x-accel-buffering";

/// An error answer: status, OpenAI error type and code, the field at fault, and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        Self { status, kind, code, param: None, message: message.into(), retry_after: None }
    }

    /// 400: the request is malformed or a parameter is out of range.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message)
    }

    /// 400 naming the parameter at fault.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.to_string()), ..Self::invalid(message) }
    }

    /// 401: a missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", Some("invalid_api_key"), message)
    }

    /// 404: `model` is not served here; `served` lists what is (for the message).
    pub fn model_not_found(model: &str, served: &str) -> Self {
        Self {
            param: Some("model".to_string()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "NotFoundError",
                Some("model_not_found"),
                format!("the model `{model}` does not exist; this server serves {served}"),
            )
        }
    }

    /// 404: no such route.
    pub fn route_not_found(method: &str, path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFoundError", Some("not_found"), format!("no route for {method} {path}"))
    }

    /// 405: the route exists but not for this method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            Some("method_not_allowed"),
            format!("method {method} is not allowed for {path}"),
        )
    }

    /// 413: the body is larger than the server's limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
    }

    /// 408: the client did not send the whole request body in time.
    pub fn request_timeout(seconds: u64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            Some("request_timeout"),
            format!("the request body did not arrive within {seconds} s"),
        )
    }

    /// 400 naming a field the server does not implement (rather than ignoring it and answering something else).
    pub fn unsupported_param(param: &str, message: impl Into<String>) -> Self {
        Self { code: Some("unsupported_parameter"), ..Self::invalid_param(param, message) }
    }

    /// 429 with `Retry-After: 1`: a queue or a rate limit is full.
    pub fn queue_full(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("rate_limit_exceeded"), message)
        }
    }

    /// 503: draining for shutdown, the engine is gone, or no backend can take the request.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", Some("service_unavailable"), message)
    }

    /// 502: an upstream failed before it answered (the gateway).
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "service_unavailable", Some("bad_gateway"), message)
    }

    /// 504: an upstream did not answer in time (the gateway).
    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", Some("timeout"), message)
    }

    /// 500: the server failed the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", Some("internal_error"), message)
    }

    /// The OpenAI JSON body.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse::new(&self.message, self.kind, self.param.clone(), self.code.map(str::to_string))
    }

    /// The JSON text of [`ApiError::body`].
    pub fn json(&self) -> String {
        serde_json::to_string(&self.body()).unwrap_or_else(|_| String::from("{\"error\":{}}"))
    }

    /// The response: status, JSON body, and `Retry-After` when set.
    pub fn into_http<B: From<Bytes>>(self) -> Response<B> {
        let mut response = json_response(self.status, Bytes::from(self.json()));
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for ApiError {
    fn into_response(self) -> axum_core::response::Response {
        self.into_http()
    }
}

/// A JSON response with `status` and `body`.
pub fn json_response<B: From<Bytes>>(status: StatusCode, body: Bytes) -> Response<B> {
    let mut response = Response::new(B::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_JSON));
    response
}

/// The key of an `Authorization: Bearer KEY` header; a 401 (OpenAI's shape) when there is none.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    bearer(headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes))
}

/// The key of an `Authorization` value `Bearer KEY`; a 401 (OpenAI's shape) when there is none.
pub fn bearer(authorization: Option<&[u8]>) -> Result<&str, ApiError> {
    authorization
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::unauthorized("an API key is required: send `Authorization: Bearer KEY`"))
}

/// 413 before any byte is read when the declared `Content-Length` is over `limit`.
pub fn check_content_length(headers: &HeaderMap, limit: usize) -> Result<(), ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => Err(ApiError::too_large(limit)),
        _ => Ok(()),
    }
}

/// Reads a whole body of at most `limit` bytes: 413 when it is larger, 400 when the connection fails mid-body.
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, ApiError>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::invalid(format!("could not read the request body: {e}"))),
    }
}

/// Parses a JSON body; any mismatch is a 400 that quotes serde's message (it names the field).
/// `T` may borrow from `body`.
pub fn parse_json<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

/// Objects with more top-level fields than this are not searched for the field at fault when they do not parse
/// (each probe parses the object again).
const MAX_PROBED_FIELDS: usize = 64;
/// Bodies larger than this are not probed (each probe re-reads the body); their type errors name no field.
const MAX_PROBED_BYTES: usize = 64 * 1024;

/// Parses a JSON request object into `T`; a body that is not JSON is a 400 quoting the syntax error, and a
/// field of the wrong type is a 400 whose `param` names the field (`max_tokens`, `messages[0].content`) and
/// whose message says what was expected.
pub fn parse_request<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?;
    let Value::Object(fields) = &value else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
    let error = match serde_path_to_error::deserialize::<_, T>(&value) {
        Ok(request) => return Ok(request),
        Err(e) => e,
    };
    let message = error.inner().to_string();
    let path = error.path().to_string();
    // Fields of flattened structs lose their path (serde buffers them): find the top-level field at fault by
    // removing one at a time.
    let param = if path != "." && !path.contains('?') {
        Some(path)
    } else if fields.len() <= MAX_PROBED_FIELDS && body.len() <= MAX_PROBED_BYTES {
        faulty_field::<T>(fields, &message)
    } else {
        None
    };
    Err(match param {
        Some(param) => ApiError::invalid_param(&param, format!("invalid `{param}`: {message}")),
        None => ApiError::invalid(format!("invalid request: {message}")),
    })
}

/// The top-level field that causes `message`: the one whose removal makes the body valid, else one whose removal
/// changes the error to something other than its own absence, else (a required field of the wrong type) one
/// whose removal changes the error at all.
fn faulty_field<T: DeserializeOwned>(fields: &serde_json::Map<String, Value>, message: &str) -> Option<String> {
    let outcomes: Vec<(&String, Option<String>)> = fields
        .keys()
        .filter_map(|key| {
            let mut without = fields.clone();
            without.remove(key.as_str());
            match T::deserialize(&Value::Object(without)) {
                Ok(_) => Some((key, None)),
                Err(e) => {
                    let other = e.to_string();
                    (other != message).then_some((key, Some(other)))
                }
            }
        })
        .collect();
    let missing = |key: &str, error: &str| error.contains(&format!("missing field `{key}`"));
    outcomes
        .iter()
        .find(|(_, error)| error.is_none())
        .or_else(|| outcomes.iter().find(|(key, error)| error.as_deref().is_some_and(|e| !missing(key, e))))
        .or_else(|| outcomes.first())
        .map(|(key, _)| (*key).clone())
}

/// The SSE frame of one `data:` payload.
pub fn sse_frame(payload: &str) -> Bytes {
    Bytes::from(format!("data: {payload}\n\n"))
}

/// The frame sent in place of further chunks when a stream fails: the error's JSON as a `data:` payload (the
/// stream then ends with `data: [DONE]`).
pub fn sse_error_frame(error: &ApiError) -> Bytes {
    sse_frame(&error.json())
}

/// The headers of an SSE answer: the content type, no caching, no proxy buffering.
pub fn set_sse_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_SSE));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(HEADER_ACCEL_BUFFERING, HeaderValue::from_static("no"));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use http_body_util::Full;

    use super::*;

    #[test]
    fn errors_render_as_openai_json_with_retry_after() {
        let response: Response<Full<Bytes>> = ApiError::queue_full("busy").into_http();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE_JSON);
        let e = ApiError::model_not_found("gpt-4", "`tiny-moe`");
        let body: serde_json::Value = serde_json::from_str(&e.json()).unwrap();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["type"], "NotFoundError");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_413_and_declared_lengths_are_checked_first() {
        let ok = read_body(Full::new(Bytes::from_static(b"12345")), 5).await.unwrap();
        assert_eq!(&ok[..], b"12345");
        let over = read_body(Full::new(Bytes::from_static(b"123456")), 5).await.unwrap_err();
        assert_eq!(over.status, StatusCode::PAYLOAD_TOO_LARGE);
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(50_000_000u64));
        assert_eq!(check_content_length(&headers, 10).unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(10u64));
        assert!(check_content_length(&headers, 10).is_ok());
    }

    #[test]
    fn json_errors_name_the_field_and_frames_are_sse() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct R {
            max_tokens: u32,
        }
        let e = parse_json::<R>(br#"{"max_tokens": "abc"}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("invalid type"), "{}", e.message);
        assert_eq!(&sse_frame("x")[..], b"data: x\n\n");
        let frame = sse_error_frame(&ApiError::internal("boom"));
        assert!(frame.starts_with(b"data: {\"error\":") && frame.ends_with(b"\n\n"));
    }

    #[test]
    fn type_errors_name_the_field_even_inside_flattened_options() {
        use crate::openai::ChatCompletionRequest;
        let param = |body: serde_json::Value| {
            let e = parse_request::<ChatCompletionRequest>(body.to_string().as_bytes()).unwrap_err();
            if let Some(param) = &e.param {
                assert!(e.message.starts_with(&format!("invalid `{param}`")), "{e:?}");
            }
            e.param
        };
        let user = serde_json::json!([{"role": "user", "content": "hi"}]);
        let with = |k: &str, v: serde_json::Value| serde_json::json!({"messages": user, k: v});
        assert_eq!(param(with("max_tokens", "abc".into())).as_deref(), Some("max_tokens"));
        assert_eq!(param(with("temperature", "hot".into())).as_deref(), Some("temperature"));
        assert_eq!(param(with("stop", 5.into())).as_deref(), Some("stop"));
        assert_eq!(param(with("logit_bias", serde_json::json!({"1": "x"}))).as_deref(), Some("logit_bias"));
        let bad_content = serde_json::json!({"messages": [{"role": "user", "content": 5}], "max_tokens": 3});
        assert_eq!(param(bad_content).as_deref(), Some("messages[0].content"));
        assert_eq!(param(serde_json::json!({"model": "m"})), None);
    }
}
