//! The access log: one INFO line per request (target [`ACCESS_LOG_TARGET`]) with method, path, status,
//! duration and, for generations, the request id, token counts and finish reason — never prompt or output text.
//!
//! The line is written when the request's [`Access`] record is dropped: by the router's middleware for a plain
//! answer, and at the end of the stream for a streamed one (the stream holds a reference), so a stream's
//! duration and tokens are its whole life's.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::engine::Usage;

/// The `tracing` target of access lines (`BALEEN_RUNTIME_LOG=baleen_access=off` silences them).
pub const ACCESS_LOG_TARGET: &str = "baleen_access";

/// One request's access record; shared by the middleware and the handler through the request's extensions.
#[derive(Debug)]
pub(crate) struct Access {
    method: String,
    path: String,
    start: Instant,
    outcome: Mutex<Outcome>,
}

#[derive(Debug, Default)]
struct Outcome {
    status: u16,
    request_id: Option<String>,
    usage: Option<Usage>,
    finish_reason: Option<&'static str>,
}

impl Access {
    pub fn new(method: &str, path: &str) -> Arc<Self> {
        Arc::new(Self {
            method: method.to_string(),
            path: path.to_string(),
            start: Instant::now(),
            outcome: Mutex::new(Outcome::default()),
        })
    }

    fn update(&self, f: impl FnOnce(&mut Outcome)) {
        f(&mut self.outcome.lock().unwrap_or_else(PoisonError::into_inner));
    }

    pub fn set_status(&self, status: u16) {
        self.update(|o| o.status = status);
    }

    pub fn set_request_id(&self, id: &str) {
        self.update(|o| o.request_id = Some(id.to_string()));
    }

    pub fn finished(&self, usage: Usage, finish_reason: &'static str) {
        self.update(|o| {
            o.usage = Some(usage);
            o.finish_reason = Some(finish_reason);
        });
    }
}

impl Drop for Access {
    fn drop(&mut self) {
        let o = self.outcome.get_mut().unwrap_or_else(PoisonError::into_inner);
        let duration_ms = (self.start.elapsed().as_secs_f64() * 1e3 * 10.0).round() / 10.0;
        tracing::info!(
            target: ACCESS_LOG_TARGET,
            method = %self.method,
            path = %self.path,
            status = o.status,
            duration_ms,
            request_id = o.request_id.as_deref().unwrap_or("-"),
            prompt_tokens = o.usage.map(|u| u.prompt_tokens),
            completion_tokens = o.usage.map(|u| u.completion_tokens),
            cached_tokens = o.usage.map(|u| u.cached_tokens),
            finish_reason = o.finish_reason.unwrap_or("-"),
        );
    }
}
