//! Running one request on the engine for a handler: [`handle`] is the skeleton both generation endpoints share
//! (read → parse → check the model → parameters and prompt → submit → stream or collect), each endpoint an
//! [`Endpoint`]; submit, then either collect every event into one answer or stream them as server-sent events. The request is cancelled as soon as nobody waits for it any more — the
//! handler's future or the response stream is dropped when the client disconnects — through [`CancelOnDrop`].

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use baleen_api::http::{parse_request, set_sse_headers, sse_frame};
use baleen_api::openai::{FinishReason as WireFinishReason, GenerationOptions, STREAM_DONE, Usage as WireUsage};
use futures_util::Stream;
use tokio_util::sync::CancellationToken;

use super::access::Access;
use super::params::{CommonParams, check_model, new_request_id};
use super::{ApiError, AppState, unix_now};
use crate::engine::{
    EngineError, EngineHandle, Event, EventStream, FinishReason, GenerateRequest, TokenLogprob, Usage,
};

/// What the request ids of an endpoint start with, the request field that holds its prompt, and how its
/// request becomes parameters and a prompt and the engine's output its answer or stream.
pub(crate) trait Endpoint: Sized + Send + 'static {
    type Request: serde::de::DeserializeOwned + Send;
    type Stream: StreamFormat;
    /// `chatcmpl`, `cmpl`.
    const ID_PREFIX: &'static str;
    /// The field errors about the prompt name: `messages`, `prompt`.
    const PROMPT_PARAM: &'static str;

    /// The request's `model`.
    fn model(req: &Self::Request) -> Option<&str>;
    /// The request's shared options (`stream`, `stream_options`).
    fn options(req: &Self::Request) -> &GenerationOptions;
    /// The endpoint's state for this request, its parameters and its prompt ids.
    fn prepare(state: &AppState, req: &Self::Request) -> Result<(Self, CommonParams, Vec<u32>), ApiError>;
    /// The stream of chunks for `head`.
    fn stream(self, head: Head) -> Self::Stream;
    /// The whole answer.
    fn answer(self, head: Head, done: Collected, prompt_tokens: usize) -> Response;
}

/// What every answer and chunk of one request carries.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// The request asked for logprobs.
    pub with_logprobs: bool,
}

/// The handler of an [`Endpoint`]: every failure is its OpenAI JSON error.
pub(crate) async fn handle<E: Endpoint>(
    State(state): State<AppState>,
    Extension(access): Extension<Arc<Access>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run::<E>(state, access, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn run<E: Endpoint>(
    state: AppState,
    access: Arc<Access>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = state.read_body(&headers, body).await?;
    let req: E::Request = parse_request(&body)?;
    let served = state.served_model_name().to_string();
    check_model(E::model(&req), &served)?;
    let (endpoint, params, prompt) = E::prepare(&state, &req)?;
    let id = new_request_id(E::ID_PREFIX);
    let request = params.into_engine_request(&state, id.clone(), prompt, E::PROMPT_PARAM).await?;
    let options = E::options(&req);
    let head = Head {
        id,
        created: unix_now(),
        model: served,
        include_usage: options.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
        with_logprobs: request.logprobs.is_some(),
    };
    let streamed = options.stream.unwrap_or(false);
    let submitted = submit(&state.engine, request, access)?;
    if streamed {
        return Ok(sse_response(sse_stream(submitted, endpoint.stream(head))));
    }
    let prompt_tokens = submitted.prompt_tokens;
    let done = collect(submitted).await?;
    Ok(endpoint.answer(head, done, prompt_tokens))
}

/// Cancels the request's token when dropped: on a normal end (harmless: the engine is done with it) and when
/// the client goes away (the engine frees the sequence within one step).
#[derive(Debug)]
pub(crate) struct CancelOnDrop(CancellationToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A submitted request: its events, the guard that cancels it, and its access-log record (kept until the
/// request ends, so a stream's line is written when the stream ends).
#[derive(Debug)]
pub(crate) struct Submitted {
    pub events: EventStream,
    pub _guard: CancelOnDrop,
    pub prompt_tokens: usize,
    pub access: Arc<Access>,
}

impl Submitted {
    /// Records the end of the request for the access log.
    fn record(&self, reason: FinishReason, usage: &Usage) {
        self.access.finished(*usage, reason.as_str());
    }
}

/// Submits `request`; the guard exists before the engine sees the request.
pub(crate) fn submit(
    engine: &EngineHandle,
    request: GenerateRequest,
    access: Arc<Access>,
) -> Result<Submitted, ApiError> {
    let guard = CancelOnDrop(request.cancel.clone());
    let prompt_tokens = request.prompt.len();
    access.set_request_id(&request.request_id);
    let events = engine.submit(request)?;
    Ok(Submitted { events, _guard: guard, prompt_tokens, access })
}

/// Everything a finished request produced.
#[derive(Debug, Clone, Default)]
pub(crate) struct Collected {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<WireFinishReason>,
    pub usage: Usage,
}

/// OpenAI usage; the engine's prompt count is authoritative, the submitted length a fallback.
pub(crate) fn wire_usage(usage: &Usage, submitted_prompt_tokens: usize) -> WireUsage {
    let prompt = if usage.prompt_tokens > 0 { usage.prompt_tokens } else { submitted_prompt_tokens };
    WireUsage::new(prompt, usage.completion_tokens, usage.cached_tokens)
}

/// The OpenAI finish reason of an engine finish (`abort`: shutdown cut the request short, vLLM's name).
pub(crate) fn wire_finish(reason: FinishReason) -> WireFinishReason {
    match reason {
        FinishReason::Stop => WireFinishReason::Stop,
        FinishReason::Length => WireFinishReason::Length,
        FinishReason::Abort => WireFinishReason::Abort,
    }
}

/// Waits for the request to finish and gathers its text, logprobs and usage. A request that shutdown aborted is
/// a 503 (retryable elsewhere; a stream instead ends with `finish_reason: "abort"`).
pub(crate) async fn collect(mut submitted: Submitted) -> Result<Collected, ApiError> {
    let mut out = Collected::default();
    while let Some(event) = submitted.events.recv().await {
        match event {
            Event::Token { text, logprob, .. } => {
                out.text.push_str(&text);
                out.logprobs.extend(logprob);
            }
            Event::Finished { reason, usage, text } => {
                submitted.record(reason, &usage);
                if reason == FinishReason::Abort {
                    return Err(ApiError::unavailable("the request was aborted: the server is shutting down"));
                }
                out.text.push_str(&text);
                out.finish_reason = Some(wire_finish(reason));
                out.usage = usage;
                return Ok(out);
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::from(EngineError::Stopped))
}

/// Turns one request's events into the `data:` payloads of its stream (JSON texts, without framing).
pub(crate) trait StreamFormat: Send + 'static {
    /// Payloads sent before any token (the chat role chunk).
    fn start(&mut self) -> Vec<String>;
    /// Payloads for one generated token (none to skip it).
    fn token(&mut self, text: &str, logprob: Option<&TokenLogprob>) -> Vec<String>;
    /// Payloads for the end: released held-back text, the finish chunk, the usage chunk.
    fn finish(&mut self, reason: WireFinishReason, usage: &Usage, text: &str) -> Vec<String>;
}

struct StreamState<F> {
    submitted: Submitted,
    format: F,
    pending: VecDeque<Bytes>,
    done: bool,
}

/// The stream of SSE frames for a submitted request: `format`'s payloads, then `data: [DONE]`. A request that
/// shutdown aborted ends like any other, with `finish_reason: "abort"` (and usage when asked for). An engine
/// error becomes an error payload followed by `[DONE]`. Dropping the stream cancels the request.
pub(crate) fn sse_stream<F: StreamFormat>(
    submitted: Submitted,
    mut format: F,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let pending: VecDeque<Bytes> = format.start().iter().map(|p| sse_frame(p)).collect();
    let state = StreamState { submitted, format, pending, done: false };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(frame) = s.pending.pop_front() {
                return Some((Ok(frame), s));
            }
            if s.done {
                return None;
            }
            let payloads = match s.submitted.events.recv().await {
                Some(Event::Token { text, logprob, .. }) => s.format.token(&text, logprob.as_ref()),
                Some(Event::Finished { reason, usage, text }) => {
                    s.done = true;
                    s.submitted.record(reason, &usage);
                    s.format.finish(wire_finish(reason), &usage, &text)
                }
                Some(Event::Error(e)) => {
                    s.done = true;
                    vec![ApiError::from(e).json()]
                }
                None => {
                    s.done = true;
                    vec![ApiError::from(EngineError::Stopped).json()]
                }
            };
            s.pending.extend(payloads.iter().map(|p| sse_frame(p)));
            if s.done {
                s.pending.push_back(sse_frame(STREAM_DONE));
            }
        }
    })
}

/// A `text/event-stream` response over `stream`.
pub(crate) fn sse_response(stream: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static) -> Response {
    let mut response = Body::from_stream(stream).into_response();
    set_sse_headers(response.headers_mut());
    response
}

/// JSON text of a response object (serialization of our own types cannot fail; an empty object if it did).
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| String::from("{}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use futures_util::StreamExt;

    use super::*;

    struct Echo;

    impl StreamFormat for Echo {
        fn start(&mut self) -> Vec<String> {
            vec!["start".into()]
        }
        fn token(&mut self, text: &str, _: Option<&TokenLogprob>) -> Vec<String> {
            if text.is_empty() { vec![] } else { vec![format!("t:{text}")] }
        }
        fn finish(&mut self, reason: WireFinishReason, usage: &Usage, text: &str) -> Vec<String> {
            vec![format!("f:{text}:{reason:?}:{}", usage.completion_tokens)]
        }
    }

    fn submitted() -> (tokio::sync::mpsc::UnboundedSender<Event>, Submitted, CancellationToken) {
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let token = CancellationToken::new();
        let access = Access::new("POST", "/v1/completions");
        (tx, Submitted { events, _guard: CancelOnDrop(token.clone()), prompt_tokens: 1, access }, token)
    }

    fn token(text: &str) -> Event {
        Event::Token { id: 0, text: text.into(), logprob: None }
    }

    async fn frames(s: impl Stream<Item = Result<Bytes, Infallible>>) -> Vec<String> {
        s.map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap()).collect().await
    }

    #[tokio::test]
    async fn streams_frame_payloads_and_end_with_done() {
        let (tx, sub, cancel) = submitted();
        tx.send(token("a")).unwrap();
        tx.send(token("")).unwrap();
        let usage = Usage { prompt_tokens: 1, completion_tokens: 2, cached_tokens: 0 };
        tx.send(Event::Finished { reason: FinishReason::Length, usage, text: "b".into() }).unwrap();
        let got = frames(sse_stream(sub, Echo)).await;
        assert_eq!(got, vec!["data: start\n\n", "data: t:a\n\n", "data: f:b:Length:2\n\n", "data: [DONE]\n\n"]);
        assert!(cancel.is_cancelled(), "the guard cancels once the stream is gone");
    }

    #[tokio::test]
    async fn a_stream_cut_by_shutdown_ends_with_finish_reason_abort_and_done() {
        let (tx, sub, _) = submitted();
        tx.send(token("a")).unwrap();
        let usage = Usage { prompt_tokens: 1, completion_tokens: 1, cached_tokens: 0 };
        tx.send(Event::Finished { reason: FinishReason::Abort, usage, text: String::new() }).unwrap();
        let got = frames(sse_stream(sub, Echo)).await;
        assert_eq!(got, vec!["data: start\n\n", "data: t:a\n\n", "data: f::Abort:1\n\n", "data: [DONE]\n\n"]);
    }

    #[tokio::test]
    async fn engine_errors_end_the_stream_with_an_error_payload() {
        let (tx, sub, _) = submitted();
        tx.send(Event::Error(EngineError::Forward("boom".into()))).unwrap();
        let got = frames(sse_stream(sub, Echo)).await;
        assert_eq!(got.len(), 3);
        assert!(got[1].contains("\"message\":\"forward pass failed: boom\""), "{got:?}");
        assert_eq!(got[2], "data: [DONE]\n\n");
    }

    #[tokio::test]
    async fn dropping_a_stream_cancels_the_request() {
        let (tx, sub, cancel) = submitted();
        tx.send(token("a")).unwrap();
        let mut stream = Box::pin(sse_stream(sub, Echo));
        assert!(stream.next().await.is_some());
        assert!(!cancel.is_cancelled());
        drop(stream);
        assert!(cancel.is_cancelled());
    }

    #[tokio::test]
    async fn collect_gathers_text_and_usage_and_maps_abort_to_503() {
        let (tx, sub, _) = submitted();
        tx.send(token("he")).unwrap();
        let usage = Usage { prompt_tokens: 3, completion_tokens: 2, cached_tokens: 1 };
        tx.send(Event::Finished { reason: FinishReason::Stop, usage, text: "llo".into() }).unwrap();
        let c = collect(sub).await.unwrap();
        assert_eq!((c.text.as_str(), c.finish_reason, c.usage), ("hello", Some(WireFinishReason::Stop), usage));

        let (tx, sub, _) = submitted();
        tx.send(Event::Finished { reason: FinishReason::Abort, usage, text: String::new() }).unwrap();
        assert_eq!(collect(sub).await.unwrap_err().status.as_u16(), 503);

        let (tx, sub, _) = submitted();
        drop(tx);
        assert_eq!(collect(sub).await.unwrap_err().status.as_u16(), 500);
    }
}
