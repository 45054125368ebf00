//! The runtime's causes of HTTP failures mapped onto the shared [`ApiError`] (`baleen_api::http`, which renders
//! every failure once as OpenAI JSON: `{"error": {"message", "type", "param", "code"}}`).

pub use baleen_api::http::ApiError;

use crate::engine::{EngineError, SubmitError};

impl From<SubmitError> for ApiError {
    /// The API layer checks a request against the model's limits before it submits (naming `messages` or
    /// `prompt`); a request refused here is named by its completions-API field.
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { .. } => Self::queue_full(e.to_string()),
            SubmitError::Draining => Self::unavailable(e.to_string()),
            SubmitError::Invalid(invalid) => super::params::request_error(&invalid, "prompt"),
        }
    }
}

impl From<EngineError> for ApiError {
    /// The engine failed a request it had accepted: the server's fault.
    fn from(e: EngineError) -> Self {
        Self::internal(e.to_string())
    }
}

impl From<crate::Error> for ApiError {
    /// Errors of request-dependent work (templating, tokenizing, sampling-parameter checks).
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Submit(e) => e.into(),
            crate::Error::Engine(e) => e.into(),
            crate::Error::InvalidParam { param, .. } => Self::invalid_param(param, e.to_string()),
            crate::Error::Template(_) => Self::invalid_param("messages", e.to_string()),
            other => Self::internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;

    use super::*;

    #[test]
    fn submit_errors_map_to_429_503_and_400() {
        let full = ApiError::from(SubmitError::QueueFull { waiting: 3 });
        assert_eq!(full.status, StatusCode::TOO_MANY_REQUESTS);
        let response = full.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(ApiError::from(SubmitError::Draining).status, StatusCode::SERVICE_UNAVAILABLE);
        let invalid = ApiError::from(SubmitError::Invalid(crate::engine::RequestError::NoCompletionTokens));
        assert_eq!((invalid.status, invalid.kind), (StatusCode::BAD_REQUEST, "invalid_request_error"));
        assert_eq!(invalid.param.as_deref(), Some("max_tokens"));
        let empty = ApiError::from(SubmitError::Invalid(crate::engine::RequestError::EmptyPrompt));
        assert_eq!(empty.param.as_deref(), Some("prompt"));
        let failed = ApiError::from(EngineError::DoesNotFit { needed: 3, total: 2 });
        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn runtime_errors_split_into_client_and_server_faults() {
        let internal = crate::Error::internal(crate::error::Part::KvCache, "no cache block for position 3");
        assert_eq!(ApiError::from(internal).status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(ApiError::from(crate::Error::Template("x".into())).status, StatusCode::BAD_REQUEST);
        assert_eq!(ApiError::from(crate::Error::Tokenizer("x".into())).status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
