//! `POST /v1/completions`.

use std::collections::BTreeMap;

use axum::Json;
use axum::response::{IntoResponse, Response};
use baleen_api::openai::{
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, FinishReason as WireFinishReason,
    GenerationOptions, SinglePrompt,
};

use super::generate::{Collected, Endpoint, Head, StreamFormat, to_json, wire_usage};
use super::params::CommonParams;
use super::{ApiError, AppState};
use crate::engine::{TokenLogprob, Usage};

/// `POST /v1/completions` as an [`Endpoint`]: a text prompt (BOS added) or token ids, the text as the answer.
pub(crate) struct Completions;

impl Endpoint for Completions {
    type Request = CompletionRequest;
    type Stream = CompletionStream;
    const ID_PREFIX: &'static str = "cmpl";
    const PROMPT_PARAM: &'static str = "prompt";

    fn model(req: &Self::Request) -> Option<&str> {
        req.model.as_deref()
    }

    fn options(req: &Self::Request) -> &GenerationOptions {
        &req.options
    }

    fn prepare(state: &AppState, req: &Self::Request) -> Result<(Self, CommonParams, Vec<u32>), ApiError> {
        let params = CommonParams::from_completion(req)?;
        let prompt = match req.prompt.single().map_err(|e| ApiError::invalid_param("prompt", e))? {
            SinglePrompt::Text(text) => state.engine.tokenizer().encode(&text, true)?,
            SinglePrompt::Tokens(ids) => ids,
        };
        Ok((Self, params, prompt))
    }

    fn stream(self, head: Head) -> CompletionStream {
        CompletionStream { head, offset: 0 }
    }

    fn answer(self, head: Head, done: Collected, prompt_tokens: usize) -> Response {
        let logprobs = head.with_logprobs.then(|| {
            let mut offset = 0;
            let mut out = CompletionLogprobs::default();
            for lp in &done.logprobs {
                push_logprob(&mut out, lp, &mut offset);
            }
            out
        });
        let choice = CompletionChoice {
            text: done.text,
            index: 0,
            logprobs,
            finish_reason: Some(done.finish_reason.unwrap_or(WireFinishReason::Stop)),
        };
        let usage = wire_usage(&done.usage, prompt_tokens);
        Json(Completion::new(head.id, head.created, head.model, vec![choice], Some(usage))).into_response()
    }
}

/// Appends one token's entry to the parallel logprob lists; `offset` is the token's character offset in the
/// completion text and advances past it.
fn push_logprob(out: &mut CompletionLogprobs, lp: &TokenLogprob, offset: &mut usize) {
    out.tokens.push(lp.token.clone());
    out.token_logprobs.push(lp.logprob);
    out.top_logprobs
        .push(lp.top.iter().map(|(_, token, logprob)| (token.clone(), *logprob)).collect::<BTreeMap<_, _>>());
    out.text_offset.push(*offset);
    *offset += lp.token.chars().count();
}

/// Chunks of a streamed completion: one per token with text, the finish, the usage.
pub(crate) struct CompletionStream {
    head: Head,
    /// Characters of completion text so far (for `text_offset`).
    offset: usize,
}

impl CompletionStream {
    fn chunk(&self, text: &str, logprobs: Option<CompletionLogprobs>, finish: Option<WireFinishReason>) -> String {
        let choice = CompletionChoice { text: text.to_string(), index: 0, logprobs, finish_reason: finish };
        let head = &self.head;
        to_json(&Completion::new(head.id.clone(), head.created, head.model.clone(), vec![choice], None))
    }
}

impl StreamFormat for CompletionStream {
    fn start(&mut self) -> Vec<String> {
        Vec::new()
    }

    fn token(&mut self, text: &str, logprob: Option<&TokenLogprob>) -> Vec<String> {
        let logprobs = match logprob {
            Some(lp) if self.head.with_logprobs => {
                let mut out = CompletionLogprobs::default();
                push_logprob(&mut out, lp, &mut self.offset);
                Some(out)
            }
            _ => None,
        };
        if text.is_empty() && logprobs.is_none() {
            return Vec::new();
        }
        vec![self.chunk(text, logprobs, None)]
    }

    fn finish(&mut self, reason: WireFinishReason, usage: &Usage, text: &str) -> Vec<String> {
        let mut out = Vec::with_capacity(3);
        if !text.is_empty() {
            out.push(self.chunk(text, None, None));
        }
        out.push(self.chunk("", None, Some(reason)));
        if self.head.include_usage {
            let usage = wire_usage(usage, 0);
            let head = &self.head;
            out.push(to_json(&Completion::new(head.id.clone(), head.created, head.model.clone(), vec![], Some(usage))));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use serde_json::{Value, json};

    use super::*;

    fn stream(include_usage: bool, with_logprobs: bool) -> CompletionStream {
        let head = Head { id: "cmpl-x".into(), created: 5, model: "m".into(), include_usage, with_logprobs };
        CompletionStream { head, offset: 0 }
    }

    fn parse(payloads: Vec<String>) -> Vec<Value> {
        payloads.iter().map(|p| serde_json::from_str(p).unwrap()).collect()
    }

    #[test]
    fn token_chunks_carry_text_and_offsets() {
        let mut s = stream(false, true);
        let lp = |t: &str| TokenLogprob { id: 0, token: t.into(), logprob: -1.0, top: vec![(0, t.into(), -1.0)] };
        let a = parse(s.token("ab", Some(&lp("ab"))));
        let b = parse(s.token("c", Some(&lp("c"))));
        assert_eq!(a[0]["object"], "text_completion");
        assert_eq!(a[0]["choices"][0]["text"], "ab");
        assert_eq!(a[0]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(b[0]["choices"][0]["logprobs"]["text_offset"], json!([2]));
        assert_eq!(b[0]["choices"][0]["logprobs"]["top_logprobs"], json!([{"c": -1.0}]));
        assert!(stream(false, false).token("", None).is_empty());
    }

    #[test]
    fn the_end_finishes_then_reports_usage() {
        let usage = Usage { prompt_tokens: 4, completion_tokens: 2, cached_tokens: 3 };
        let v = parse(stream(true, false).finish(WireFinishReason::Stop, &usage, ""));
        assert_eq!(v.len(), 2);
        assert_eq!(v[0]["choices"][0]["finish_reason"], "stop");
        assert_eq!(v[1]["choices"], json!([]));
        assert_eq!(v[1]["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
    }
}
