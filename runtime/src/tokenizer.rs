//! Tokenizers and chat templates: a Hugging Face `tokenizer.json` with its `tokenizer_config.json` chat template,
//! or the built-in byte-level tokenizer of `builtin:tiny-moe`.
//!
//! Chat flow: [`Tokenizer::apply_chat_template`] renders text that already begins with the BOS token's text (the
//! template writes `bos_token` itself), so encode the rendered text with `add_special_tokens = false` — otherwise
//! the prompt would start with two BOS tokens.

pub mod bytes;
pub mod hf;
pub mod template;

use std::path::Path;

pub use bytes::ByteTokenizer;
pub use hf::HfTokenizer;

use crate::Result;

/// One chat turn (`role`: `system`, `user`, `assistant`, ... as the template understands them), in the shape
/// transformers hands templates: `content` is `none` for an assistant turn that only calls tools (DeepSeek's
/// template tests `content is none`), `tool_calls` are OpenAI's objects (`function.arguments` a JSON text).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: Some(content.into()), tool_calls: None, tool_call_id: None }
    }
}

/// The tokenizer of a model, chosen at load.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// `tokenizer.json` from a Hugging Face model directory.
    Hf(Box<HfTokenizer>),
    /// The byte-level tokenizer of `builtin:tiny-moe`.
    Bytes(ByteTokenizer),
}

impl Tokenizer {
    /// Loads `tokenizer.json` + `tokenizer_config.json` (`chat_template`: a string, or a list of `{name,
    /// template}` whose `default` is used, overridden by a `chat_template.jinja` file; `bos_token` / `eos_token` as
    /// a string or an AddedToken object) + optional `generation_config.json` / `config.json` for `eos_token_id`
    /// (int or list) and `bos_token_id`. A template that does not compile is logged and reported when used.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Ok(Self::Hf(Box::new(HfTokenizer::from_dir(dir)?)))
    }

    /// The byte-level tokenizer of `builtin:tiny-moe`: ids 0..=255 are the bytes; specials 256 `<|bos|>`,
    /// 257 `<|eos|>`, 258 `<|system|>`, 259 `<|user|>`, 260 `<|assistant|>`, 261 `<|tool|>`; vocab size 264
    /// (262..=263 reserved).
    /// Its chat template writes `<|bos|>`, then per turn the role marker, the content and `<|eos|>`, and
    /// `<|assistant|>` as the generation prompt. Invalid UTF-8 decodes with replacement characters.
    pub fn byte_level() -> Self {
        Self::Bytes(ByteTokenizer::new())
    }

    /// [`Tokenizer::byte_level`] for a model with a larger vocabulary (the full-size built-ins): the ids past the
    /// byte tokenizer's decode as nothing.
    pub fn byte_level_for_vocab(vocab: usize) -> Self {
        Self::Bytes(ByteTokenizer::with_vocab(vocab))
    }

    /// Replaces the chat template with `source` (rendered with the same special-token variables); a template
    /// that does not compile is an error.
    pub fn set_chat_template(&mut self, source: String) -> Result<()> {
        match self {
            Self::Hf(t) => t.set_chat_template(source),
            Self::Bytes(t) => t.set_chat_template(source),
        }
    }

    /// Encodes `text`; special tokens written in the text become their ids. `add_special_tokens` adds what the
    /// tokenizer's post-processor adds (BOS for DeepSeek).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match self {
            Self::Hf(t) => t.encode(text, add_special_tokens),
            Self::Bytes(t) => Ok(t.encode(text, add_special_tokens)),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        match self {
            Self::Hf(t) => t.decode(ids, skip_special_tokens),
            Self::Bytes(t) => t.decode(ids, skip_special_tokens),
        }
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        match self {
            Self::Hf(t) => t.bos_token_id(),
            Self::Bytes(_) => Some(bytes::BOS_ID),
        }
    }

    /// Every id that ends generation: the tokenizer's `eos_token` first, then `generation_config.json` /
    /// `config.json` `eos_token_id` (int or list).
    pub fn eos_token_ids(&self) -> &[u32] {
        match self {
            Self::Hf(t) => t.eos_token_ids(),
            Self::Bytes(t) => t.eos_token_ids(),
        }
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Hf(t) => t.vocab_size(),
            Self::Bytes(t) => t.vocab_size(),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Self::Hf(t) => t.token_to_id(token),
            Self::Bytes(t) => t.token_to_id(token),
        }
    }

    /// Renders the chat like transformers' `apply_chat_template(tokenize=False)`. The text starts with the BOS
    /// token's text, so encode it with `add_special_tokens = false`. A model without a template, a template that
    /// does not compile and `raise_exception(msg)` in the template are [`crate::Error::Template`].
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.apply_chat_template_with_tools(messages, None, add_generation_prompt)
    }

    /// [`Tokenizer::apply_chat_template`] with `tools` (OpenAI's `tools` objects) passed to the template as
    /// transformers passes them: the template decides how the model sees them.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        match self {
            Self::Hf(t) => t.apply_chat_template(messages, tools, add_generation_prompt),
            Self::Bytes(t) => t.apply_chat_template(messages, tools, add_generation_prompt),
        }
    }
}
