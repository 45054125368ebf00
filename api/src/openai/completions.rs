//! `POST /v1/completions` (the legacy text completion API).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{FinishReason, GenerationOptions, OBJECT_TEXT_COMPLETION, Usage};

/// A completion request. Fields this type does not name are kept in `extra`, for the server to refuse (or to
/// ignore, when they cannot change the answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// The served model name; absent means the one model this server runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub prompt: Prompt,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// Sampling, stopping and streaming parameters (shared with the other generation endpoint).
    #[serde(flatten)]
    pub options: GenerationOptions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u32>,
    /// Return the chosen tokens' log-probabilities and this many most likely alternatives per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// Echo the prompt in the completion (only `false` is served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Every other top-level field, as sent.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// `prompt`: text, token ids, or a batch of either.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a string, a list of token ids, or a list of one of those")]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

/// A single prompt, as the server runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinglePrompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl Prompt {
    /// The one prompt of the request: a string, a token-id list, or a batch holding exactly one of those.
    /// Batches of several prompts are not served.
    pub fn single(&self) -> Result<SinglePrompt, String> {
        let batch_error = |n: usize| format!("prompt: batches are not supported (got {n} prompts); send one prompt");
        match self {
            Self::Text(s) => Ok(SinglePrompt::Text(s.clone())),
            Self::Tokens(ids) => Ok(SinglePrompt::Tokens(ids.clone())),
            Self::Texts(v) if v.len() == 1 => Ok(SinglePrompt::Text(v[0].clone())),
            Self::TokenBatches(v) if v.len() == 1 => Ok(SinglePrompt::Tokens(v[0].clone())),
            Self::Texts(v) if v.is_empty() => Err("prompt: the prompt is empty".to_string()),
            Self::Texts(v) => Err(batch_error(v.len())),
            Self::TokenBatches(v) => Err(batch_error(v.len())),
        }
    }
}

/// A completion, and also each chunk of a streamed one (OpenAI streams `text_completion` objects).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub id: String,
    /// Always `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    /// Empty in the final usage chunk of a stream.
    pub choices: Vec<CompletionChoice>,
    /// Always in a complete response; in a stream, only in the final usage chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A streamed completion chunk has the shape of a [`Completion`].
pub type CompletionChunk = Completion;

impl Completion {
    pub fn new(id: String, created: u64, model: String, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Self {
        Self { id, object: OBJECT_TEXT_COMPLETION.to_string(), created, model, choices, usage }
    }
}

/// One choice of a [`Completion`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    pub logprobs: Option<CompletionLogprobs>,
    /// `null` until the last chunk of a stream.
    pub finish_reason: Option<FinishReason>,
}

/// `choices[].logprobs` of a completion: parallel lists, one entry per generated token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// The most likely alternatives at each step, token text → logprob.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Character offset of each token in the completion text.
    pub text_offset: Vec<usize>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use serde_json::json;

    use super::*;

    fn prompt(v: serde_json::Value) -> Result<SinglePrompt, String> {
        serde_json::from_value::<Prompt>(v).unwrap().single()
    }

    #[test]
    fn a_single_string_or_token_list_is_one_prompt() {
        assert_eq!(prompt(json!("hi")), Ok(SinglePrompt::Text("hi".into())));
        assert_eq!(prompt(json!([1, 2, 3])), Ok(SinglePrompt::Tokens(vec![1, 2, 3])));
        assert_eq!(prompt(json!(["hi"])), Ok(SinglePrompt::Text("hi".into())));
        assert_eq!(prompt(json!([[4, 5]])), Ok(SinglePrompt::Tokens(vec![4, 5])));
    }

    #[test]
    fn batches_of_prompts_are_refused() {
        assert!(prompt(json!(["a", "b"])).unwrap_err().contains("batches"));
        assert!(prompt(json!([[1], [2]])).unwrap_err().contains("batches"));
        assert!(serde_json::from_value::<Prompt>(json!({"text": "x"})).is_err());
    }

    #[test]
    fn requests_parse_and_ignore_unknown_fields() {
        let r: CompletionRequest = serde_json::from_value(json!({
            "model": "m", "prompt": "x", "max_tokens": 4, "logprobs": 2, "echo": false, "suffix": null,
            "stop": "\n", "stream": false
        }))
        .unwrap();
        assert_eq!(r.logprobs, Some(2));
        assert_eq!(r.options.stop.unwrap().to_vec(), vec!["\n"]);
    }

    #[test]
    fn chunks_carry_null_finish_reason_and_no_usage() {
        let c = Completion::new(
            "cmpl-1".into(),
            2,
            "m".into(),
            vec![CompletionChoice { text: "a".into(), index: 0, logprobs: None, finish_reason: None }],
            None,
        );
        assert_eq!(
            serde_json::to_value(c).unwrap(),
            json!({"id": "cmpl-1", "object": "text_completion", "created": 2, "model": "m",
                   "choices": [{"text": "a", "index": 0, "logprobs": null, "finish_reason": null}]})
        );
    }
}
