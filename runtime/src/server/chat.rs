//! `POST /v1/chat/completions`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use baleen_api::openai::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChatLogprobs,
    ChatResponseMessage, ChatTokenLogprob, FinishReason as WireFinishReason, GenerationOptions, TopLogprob,
};

use super::generate::{Collected, Endpoint, Head, StreamFormat, to_json, wire_usage};
use super::params::CommonParams;
use super::tools::{TOOL_TYPE_FUNCTION, ToolMode, ToolPlan, ToolStream, tool_calls};
use super::{ApiError, AppState};
use crate::engine::{TokenLogprob, Usage};
use crate::tokenizer::ChatMessage;

const ROLE_ASSISTANT: &str = "assistant";
/// OpenAI's `developer` role (instructions that outrank the user's): rendered as a system turn, since model
/// chat templates know `system` and would skip an unknown role.
const ROLE_DEVELOPER: &str = "developer";
const ROLE_SYSTEM: &str = "system";
/// The roles a conversation may hold.
const ROLES: [&str; 5] = [ROLE_SYSTEM, ROLE_DEVELOPER, "user", ROLE_ASSISTANT, "tool"];

/// `POST /v1/chat/completions` as an [`Endpoint`]: the conversation through the chat template (with the tools),
/// and the answer's content and tool calls read by the request's [`ToolMode`].
pub(crate) struct Chat {
    tools: ToolMode,
}

impl Endpoint for Chat {
    type Request = ChatCompletionRequest;
    type Stream = ChatStream;
    const ID_PREFIX: &'static str = "chatcmpl";
    const PROMPT_PARAM: &'static str = "messages";

    fn model(req: &Self::Request) -> Option<&str> {
        req.model.as_deref()
    }

    fn options(req: &Self::Request) -> &GenerationOptions {
        &req.options
    }

    fn prepare(state: &AppState, req: &Self::Request) -> Result<(Self, CommonParams, Vec<u32>), ApiError> {
        let mut params = CommonParams::from_chat(req)?;
        let tools = ToolPlan::new(req)?;
        tools.apply(&mut params)?;
        let messages = messages(req)?;
        let tokenizer = state.engine.tokenizer();
        let text = tokenizer.apply_chat_template_with_tools(&messages, tools.template_tools.as_deref(), true)?;
        let prompt = tokenizer.encode(&text, false)?;
        Ok((Self { tools: tools.mode }, params, prompt))
    }

    fn stream(self, head: Head) -> ChatStream {
        ChatStream { head, tools: ToolStream::new(self.tools) }
    }

    fn answer(self, head: Head, done: Collected, prompt_tokens: usize) -> Response {
        let usage = wire_usage(&done.usage, prompt_tokens);
        let reading = self.tools.read(&done.text, true);
        let calls = tool_calls(&reading);
        let content = (!reading.content.is_empty() || calls.is_empty()).then(|| reading.content.to_string());
        let finish = self.tools.finish_reason(done.finish_reason.unwrap_or(WireFinishReason::Stop), &done.text);
        let choice = ChatChoice {
            index: 0,
            message: ChatResponseMessage { role: ROLE_ASSISTANT.to_string(), content, tool_calls: calls },
            logprobs: head
                .with_logprobs
                .then(|| ChatLogprobs { content: done.logprobs.iter().map(chat_logprob).collect() }),
            finish_reason: finish,
        };
        Json(ChatCompletion::new(head.id, head.created, head.model, vec![choice], usage)).into_response()
    }
}

/// The conversation as the chat template takes it: roles are OpenAI's (`developer` becomes `system`), content
/// parts other than text are refused, an assistant turn's `tool_calls` and a tool turn's `tool_call_id` pass
/// through (an assistant turn with calls and no content has `content: none`, as transformers gives it).
fn messages(req: &ChatCompletionRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must not be empty"));
    }
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                ROLE_DEVELOPER => ROLE_SYSTEM,
                role if ROLES.contains(&role) => role,
                other => {
                    return Err(ApiError::invalid_param(
                        &format!("messages[{i}].role"),
                        format!("unknown role `{other}`; a message's role is one of {}", ROLES.join(", ")),
                    ));
                }
            };
            // An assistant turn that calls has `content: None` when it says nothing (`null`, "" or no text
            // parts): DeepSeek's templates write the calls only then. `tool_calls: []` is no calls.
            let calls = m.tool_calls.as_ref().filter(|c| !c.is_empty());
            let content = match &m.content {
                Some(c) => {
                    Some(c.to_text().map_err(|e| ApiError::invalid_param(&format!("messages[{i}].content"), e))?)
                }
                None => Some(String::new()),
            }
            .filter(|text| calls.is_none() || !text.is_empty());
            let tool_calls = match calls {
                Some(_) if role != ROLE_ASSISTANT => {
                    return Err(ApiError::invalid_param(
                        &format!("messages[{i}].tool_calls"),
                        "only assistant messages carry `tool_calls`",
                    ));
                }
                Some(calls) => Some(
                    calls
                        .iter()
                        .enumerate()
                        .map(|(j, call)| {
                            if call.kind != TOOL_TYPE_FUNCTION {
                                return Err(ApiError::invalid_param(
                                    &format!("messages[{i}].tool_calls[{j}].type"),
                                    format!("a tool call's type is `function`, got `{}`", call.kind),
                                ));
                            }
                            Ok(serde_json::json!({"id": call.id, "type": call.kind, "function": {
                                "name": call.function.name, "arguments": call.function.arguments}}))
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                None => None,
            };
            Ok(ChatMessage { role: role.to_string(), content, tool_calls, tool_call_id: m.tool_call_id.clone() })
        })
        .collect()
}

fn chat_logprob(lp: &TokenLogprob) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: lp.token.clone(),
        logprob: lp.logprob,
        bytes: Some(lp.token.as_bytes().to_vec()),
        top_logprobs: lp
            .top
            .iter()
            .map(|(_, token, logprob)| TopLogprob {
                token: token.clone(),
                logprob: *logprob,
                bytes: Some(token.as_bytes().to_vec()),
            })
            .collect(),
    }
}

/// Chunks of a streamed chat completion: the role first, then content and tool-call deltas, the finish, the
/// usage.
pub(crate) struct ChatStream {
    head: Head,
    tools: ToolStream,
}

impl ChatStream {
    fn chunk(&self, delta: ChatDelta, logprobs: Option<ChatLogprobs>, finish: Option<WireFinishReason>) -> String {
        let choice = ChatChunkChoice { index: 0, delta, logprobs, finish_reason: finish };
        let head = &self.head;
        to_json(&ChatCompletionChunk::new(head.id.clone(), head.created, head.model.clone(), vec![choice], None))
    }

    fn is_empty(delta: &ChatDelta) -> bool {
        delta.content.is_none() && delta.tool_calls.is_empty()
    }
}

impl StreamFormat for ChatStream {
    fn start(&mut self) -> Vec<String> {
        let delta =
            ChatDelta { role: Some(ROLE_ASSISTANT.to_string()), content: Some(String::new()), tool_calls: Vec::new() };
        vec![self.chunk(delta, None, None)]
    }

    fn token(&mut self, text: &str, logprob: Option<&TokenLogprob>) -> Vec<String> {
        let logprobs = match logprob {
            Some(lp) if self.head.with_logprobs => Some(ChatLogprobs { content: vec![chat_logprob(lp)] }),
            _ => None,
        };
        let mut delta = self.tools.push(text, false);
        if Self::is_empty(&delta) {
            if logprobs.is_none() {
                return Vec::new();
            }
            delta.content = Some(String::new());
        }
        vec![self.chunk(delta, logprobs, None)]
    }

    fn finish(&mut self, reason: WireFinishReason, usage: &Usage, text: &str) -> Vec<String> {
        let mut out = Vec::with_capacity(3);
        let delta = self.tools.push(text, true);
        if !Self::is_empty(&delta) {
            out.push(self.chunk(delta, None, None));
        }
        let reason = self.tools.finish_reason(reason);
        out.push(self.chunk(ChatDelta::default(), None, Some(reason)));
        if self.head.include_usage {
            let usage = wire_usage(usage, 0);
            let head = &self.head;
            let chunk =
                ChatCompletionChunk::new(head.id.clone(), head.created, head.model.clone(), vec![], Some(usage));
            out.push(to_json(&chunk));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use serde_json::{Value, json};

    use super::*;

    fn stream(include_usage: bool, with_logprobs: bool) -> ChatStream {
        let head = Head { id: "chatcmpl-x".into(), created: 5, model: "m".into(), include_usage, with_logprobs };
        ChatStream { head, tools: ToolStream::new(ToolMode::Off) }
    }

    fn parse(payloads: Vec<String>) -> Vec<Value> {
        payloads.iter().map(|p| serde_json::from_str(p).unwrap()).collect()
    }

    #[test]
    fn a_calling_assistant_turn_without_text_has_no_content() {
        let call = json!({"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}});
        let req: ChatCompletionRequest = serde_json::from_value(json!({"messages": [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "assistant", "content": [], "tool_calls": [call]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
            {"role": "assistant", "content": null, "tool_calls": []},
            {"role": "tool", "content": "ok", "tool_call_id": "c1"}]}))
        .unwrap();
        let m = messages(&req).unwrap();
        assert_eq!((m[0].content.as_deref(), m[0].tool_calls.as_ref().map(Vec::len)), (None, Some(1)));
        assert_eq!(m[1].content, None);
        assert_eq!(m[2].content.as_deref(), Some("Checking."));
        assert_eq!((m[3].content.as_deref(), m[3].tool_calls.as_ref()), (Some(""), None));
        assert_eq!(m[4].tool_call_id.as_deref(), Some("c1"));
    }

    #[test]
    fn the_first_chunk_carries_the_role_and_empty_content() {
        let v = parse(stream(false, false).start());
        assert_eq!(v[0]["object"], "chat.completion.chunk");
        assert_eq!(v[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(v[0]["choices"][0]["finish_reason"], Value::Null);
    }

    #[test]
    fn empty_deltas_are_skipped_unless_logprobs_were_asked_for() {
        assert!(stream(false, false).token("", None).is_empty());
        let lp = TokenLogprob { id: 1, token: "a".into(), logprob: -0.5, top: vec![(1, "a".into(), -0.5)] };
        let v = parse(stream(false, true).token("", Some(&lp)));
        assert_eq!(v[0]["choices"][0]["delta"]["content"], "");
        let content = &v[0]["choices"][0]["logprobs"]["content"][0];
        assert_eq!(content["token"], "a");
        assert_eq!(content["bytes"], json!([97]));
        assert_eq!(content["top_logprobs"][0]["logprob"], -0.5);
    }

    #[test]
    fn the_end_releases_text_then_finishes_then_reports_usage() {
        let usage = Usage { prompt_tokens: 4, completion_tokens: 2, cached_tokens: 0 };
        let v = parse(stream(true, false).finish(WireFinishReason::Length, &usage, "z"));
        assert_eq!(v.len(), 3);
        assert_eq!(v[0]["choices"][0]["delta"]["content"], "z");
        assert_eq!(v[1]["choices"][0]["delta"], json!({}));
        assert_eq!(v[1]["choices"][0]["finish_reason"], "length");
        assert_eq!(v[2]["choices"], json!([]));
        assert_eq!(v[2]["usage"]["total_tokens"], 6);
        assert_eq!(parse(stream(false, false).finish(WireFinishReason::Stop, &usage, "")).len(), 1);
    }
}
