//! OpenAI API wire types, as the runtime serves them and the gateway forwards them.
//!
//! Requests accept the fields of the OpenAI API plus the vLLM extensions clients of vLLM send (`top_k`,
//! `stop_token_ids`, `repetition_penalty`, `ignore_eos`); other top-level fields are kept in the request's
//! `extra`, where the server refuses those that would change the answer. Range checks belong to the server (it
//! knows the model's limits); these types only describe shapes.
//!
//! - [`chat`]: `POST /v1/chat/completions` — [`ChatCompletionRequest`], [`ChatCompletion`],
//!   [`ChatCompletionChunk`].
//! - [`completions`]: `POST /v1/completions` — [`CompletionRequest`], [`Completion`] (also each streamed chunk).
//! - here: what both share ([`Usage`], [`FinishReason`], [`StopSequences`], [`StreamOptions`]), `GET /v1/models`
//!   ([`ModelList`]) and the error body ([`ErrorResponse`]).

pub mod chat;
pub mod completions;

pub use chat::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChatLogprobs,
    ChatMessage, ChatResponseMessage, ChatTokenLogprob, ContentPart, FunctionCall, FunctionCallDelta,
    FunctionDefinition, FunctionName, MessageContent, NamedToolChoice, Tool, ToolCall, ToolCallDelta, ToolChoice,
    TopLogprob,
};
pub use completions::{
    Completion, CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest, Prompt, SinglePrompt,
};

use serde::{Deserialize, Serialize};

/// `object` of a chat completion.
pub const OBJECT_CHAT_COMPLETION: &str = "chat.completion";
/// `object` of a streamed chat completion chunk.
pub const OBJECT_CHAT_COMPLETION_CHUNK: &str = "chat.completion.chunk";
/// `object` of a completion and of each streamed completion chunk.
pub const OBJECT_TEXT_COMPLETION: &str = "text_completion";
/// `object` of a model list.
pub const OBJECT_LIST: &str = "list";
/// `object` of a model.
pub const OBJECT_MODEL: &str = "model";
/// `owned_by` of the models Baleen serves.
pub const OWNED_BY: &str = "baleen";
/// The payload of the last server-sent event of a stream (`data: [DONE]`).
pub const STREAM_DONE: &str = "[DONE]";

/// Why a choice stopped generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A natural stop: EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The answer is tool calls (a natural stop after them).
    ToolCalls,
    /// The server cut the request short (shutdown after its drain timeout, or a second signal); vLLM's name.
    Abort,
}

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

impl StopSequences {
    /// The stop strings, empty ones dropped.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s.clone()],
            Self::Many(v) => v.clone(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }
}

/// The parameters both generation endpoints (`/v1/chat/completions`, `/v1/completions`) accept the same way:
/// OpenAI's sampling and stopping fields, vLLM's extensions, and streaming. Flattened into each request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// vLLM extension; 0 or -1 means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopSequences>,
    /// vLLM extension: token ids that end generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// vLLM extension; 1.0 means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// vLLM extension: keep generating past EOS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
    /// Token id (as a decimal string) → a bias in [-100, 100] added to its logit before sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send one more chunk before `[DONE]` with empty `choices` and the request's `usage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl Usage {
    /// Usage with `total_tokens` summed and the cached prompt tokens reported.
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }),
        }
    }
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Model>,
}

impl ModelList {
    pub fn new(data: Vec<Model>) -> Self {
        Self { object: OBJECT_LIST.to_string(), data }
    }
}

/// One served model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    /// The name clients put in `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Always `baleen`.
    pub owned_by: String,
    /// Prompt plus completion tokens of one request at most (vLLM extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
}

impl Model {
    pub fn new(id: impl Into<String>, created: u64, max_model_len: Option<usize>) -> Self {
        Self { id: id.into(), object: OBJECT_MODEL.to_string(), created, owned_by: OWNED_BY.to_string(), max_model_len }
    }
}

/// The body of every error answer: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

/// See [`ErrorResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    /// The error class, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code, e.g. `model_not_found`.
    pub code: Option<String>,
}

impl ErrorResponse {
    pub fn new(
        message: impl Into<String>,
        kind: impl Into<String>,
        param: Option<String>,
        code: Option<String>,
    ) -> Self {
        Self { error: ErrorBody { message: message.into(), kind: kind.into(), param, code } }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use serde_json::json;

    use super::*;

    #[test]
    fn stop_is_a_string_or_a_list_and_drops_empty_strings() {
        let one: StopSequences = serde_json::from_value(json!("\n")).unwrap();
        assert_eq!(one.to_vec(), vec!["\n"]);
        let many: StopSequences = serde_json::from_value(json!(["a", "", "b"])).unwrap();
        assert_eq!(many.to_vec(), vec!["a", "b"]);
        assert!(serde_json::from_value::<StopSequences>(json!(3)).is_err());
    }

    #[test]
    fn usage_serializes_totals_and_cached_tokens() {
        let v = serde_json::to_value(Usage::new(7, 5, 4)).unwrap();
        assert_eq!(
            v,
            json!({"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                   "prompt_tokens_details": {"cached_tokens": 4}})
        );
    }

    #[test]
    fn errors_have_the_openai_shape_with_null_param_and_code() {
        let v = serde_json::to_value(ErrorResponse::new("bad", "invalid_request_error", None, None)).unwrap();
        assert_eq!(
            v,
            json!({"error": {"message": "bad", "type": "invalid_request_error", "param": null, "code": null}})
        );
    }

    #[test]
    fn models_are_owned_by_baleen() {
        let v = serde_json::to_value(ModelList::new(vec![Model::new("tiny-moe", 1, None)])).unwrap();
        assert_eq!(
            v,
            json!({"object": "list", "data": [{"id": "tiny-moe", "object": "model", "created": 1, "owned_by": "baleen"}]})
        );
    }
}
