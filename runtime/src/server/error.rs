//! Every HTTP failure, classified once near its cause and rendered once as OpenAI JSON:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use baleen_api::openai::ErrorResponse;

use crate::engine::SubmitError;

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

    /// 404: `model` is not the served model.
    pub fn model_not_found(model: &str, served: &str) -> Self {
        Self {
            param: Some("model".to_string()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "NotFoundError",
                Some("model_not_found"),
                format!("the model `{model}` does not exist; this server serves `{served}`"),
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

    /// 413: the body is larger than `--max-request-bytes`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
    }

    /// 429 with `Retry-After: 1`: the waiting queue is full.
    pub fn queue_full(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("rate_limit_exceeded"), message)
        }
    }

    /// 503: draining for shutdown, or the engine is gone.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", Some("service_unavailable"), message)
    }

    /// 500: the engine failed the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", Some("internal_error"), message)
    }

    /// The OpenAI JSON body.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse::new(&self.message, self.kind, self.param.clone(), self.code.map(str::to_string))
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { .. } => Self::queue_full(e.to_string()),
            SubmitError::Draining => Self::unavailable(e.to_string()),
            SubmitError::Invalid(message) => Self::invalid(message),
        }
    }
}

impl From<crate::Error> for ApiError {
    /// Errors of request-dependent work (templating, tokenizing, sampling-parameter checks).
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::InvalidRequest(message) => Self::invalid(message),
            crate::Error::Template(_) => Self::invalid_param("messages", e.to_string()),
            other => Self::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn submit_errors_map_to_429_503_and_400() {
        let full = ApiError::from(SubmitError::QueueFull { waiting: 3 });
        assert_eq!(full.status, StatusCode::TOO_MANY_REQUESTS);
        let response = full.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(ApiError::from(SubmitError::Draining).status, StatusCode::SERVICE_UNAVAILABLE);
        let invalid = ApiError::from(SubmitError::Invalid("too long".into()));
        assert_eq!((invalid.status, invalid.kind), (StatusCode::BAD_REQUEST, "invalid_request_error"));
    }

    #[test]
    fn unknown_models_are_404_model_not_found() {
        let e = ApiError::model_not_found("gpt-4", "tiny-moe");
        let body = serde_json::to_value(e.body()).unwrap();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["type"], "NotFoundError");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
    }

    #[test]
    fn runtime_errors_split_into_client_and_server_faults() {
        assert_eq!(ApiError::from(crate::Error::InvalidRequest("x".into())).status, StatusCode::BAD_REQUEST);
        assert_eq!(ApiError::from(crate::Error::Template("x".into())).status, StatusCode::BAD_REQUEST);
        assert_eq!(ApiError::from(crate::Error::Tokenizer("x".into())).status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
