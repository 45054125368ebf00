//! Hugging Face tokenizers: `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`,
//! `generation_config.json`, `config.json`), reproducing transformers' `PreTrainedTokenizerFast` behaviour.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::Value as JinjaValue;
use serde_json::Value as Json;

use super::ChatMessage;
use super::template::ChatTemplate;
use crate::{Error, Result};

/// A `tokenizers` tokenizer with the settings transformers reads from the model directory.
#[derive(Clone)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// The compiled template; `Err` keeps the compile error to report when a chat is rendered.
    template: Option<std::result::Result<ChatTemplate, String>>,
    /// The special-token variables templates are rendered with.
    specials: BTreeMap<String, JinjaValue>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    /// `Some((add_bos, add_eos))` for Llama-family tokenizer classes, which rebuild their post-processor from
    /// `add_bos_token` / `add_eos_token`; `None` keeps `tokenizer.json`'s post-processor.
    llama_specials: Option<(bool, bool)>,
    clean_up_tokenization_spaces: bool,
}

impl std::fmt::Debug for HfTokenizer {
    /// Concise: the inner tokenizer's Debug would print the whole vocabulary.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("chat_template", &self.template.as_ref().map(|t| t.as_ref().map(|_| "compiled")))
            .field("llama_specials", &self.llama_specials)
            .field("clean_up_tokenization_spaces", &self.clean_up_tokenization_spaces)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::Json { path: path.to_path_buf(), source: e })
}

/// A special token given as a string or as an AddedToken object `{"content": ...}`.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` / `bos_token_id` given as an int or a list of ints.
fn token_ids(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()).into_iter().collect(),
        Some(Json::Array(a)) => a.iter().filter_map(|n| n.as_u64().and_then(|n| u32::try_from(n).ok())).collect(),
        _ => Vec::new(),
    }
}

/// The template source: `chat_template.jinja` wins over `tokenizer_config.json` (as in transformers); a list of
/// named templates contributes its `default`.
fn template_source(dir: &Path, config: &Json) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja).map(Some).map_err(|e| Error::io(jinja, e));
    }
    Ok(match config.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_string),
        _ => None,
    })
}

impl HfTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Tokenizer(format!("{} does not exist", path.display())));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);
        let model = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);

        let bos_text = token_text(config.get("bos_token"));
        let eos_text = token_text(config.get("eos_token"));
        let bos_id = bos_text
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| token_ids(generation.get("bos_token_id")).first().copied())
            .or_else(|| token_ids(model.get("bos_token_id")).first().copied());
        let mut eos_ids: Vec<u32> = eos_text.as_deref().and_then(|t| inner.token_to_id(t)).into_iter().collect();
        for id in token_ids(generation.get("eos_token_id")).into_iter().chain(token_ids(model.get("eos_token_id"))) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }

        let class = config.get("tokenizer_class").and_then(Json::as_str).unwrap_or_default();
        let llama_specials = (class.starts_with("Llama") || class.starts_with("CodeLlama")).then(|| {
            (
                config.get("add_bos_token").and_then(Json::as_bool).unwrap_or(true),
                config.get("add_eos_token").and_then(Json::as_bool).unwrap_or(false),
            )
        });
        let clean_up_tokenization_spaces =
            config.get("clean_up_tokenization_spaces").and_then(Json::as_bool).unwrap_or(false);

        let mut specials = BTreeMap::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
            if let Some(text) = token_text(config.get(key)) {
                specials.insert(key.to_string(), JinjaValue::from(text));
            }
        }
        if let Some(extra) = config.get("additional_special_tokens").and_then(Json::as_array) {
            let list: Vec<String> = extra.iter().filter_map(|t| token_text(Some(t))).collect();
            specials.insert("additional_special_tokens".to_string(), JinjaValue::from(list));
        }
        let template = template_source(dir, &config)?.map(|source| {
            ChatTemplate::new(source, specials.clone()).map_err(|e| {
                tracing::warn!(dir = %dir.display(), "chat template does not compile: {e}");
                e.to_string()
            })
        });

        Ok(Self { inner, template, specials, bos_id, eos_ids, llama_specials, clean_up_tokenization_spaces })
    }

    /// Uses `source` as the chat template; it must compile.
    pub fn set_chat_template(&mut self, source: String) -> Result<()> {
        self.template = Some(Ok(ChatTemplate::new(source, self.specials.clone())?));
        Ok(())
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let (use_post_processor, add_bos, add_eos) = match self.llama_specials {
            Some((bos, eos)) => (false, add_special_tokens && bos, add_special_tokens && eos),
            None => (add_special_tokens, false, false),
        };
        let encoding = self
            .inner
            .encode_fast(text, use_post_processor)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 2);
        if add_bos && let Some(bos) = self.bos_id {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        if add_eos && let Some(&eos) = self.eos_ids.first() {
            ids.push(eos);
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))?;
        Ok(if self.clean_up_tokenization_spaces { clean_up_tokenization(&text) } else { text })
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The tokenizer as `tokenizer.json` would hold it (the grammar engine reads its vocabulary from it).
    pub fn to_json(&self) -> std::result::Result<Json, serde_json::Error> {
        serde_json::to_value(&self.inner)
    }

    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        match &self.template {
            None => Err(Error::Template(
                "the model has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja)"
                    .into(),
            )),
            Some(Err(msg)) => Err(Error::Template(msg.clone())),
            Some(Ok(template)) => template.render(messages, tools, add_generation_prompt),
        }
    }
}

/// transformers' `clean_up_tokenization`: removes spaces before punctuation and English contractions.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_parse_from_strings_and_added_token_objects() {
        let v: Json = serde_json::json!({"a": "<s>", "b": {"content": "</s>", "special": true}, "c": 3});
        assert_eq!(token_text(v.get("a")).as_deref(), Some("<s>"));
        assert_eq!(token_text(v.get("b")).as_deref(), Some("</s>"));
        assert_eq!(token_text(v.get("c")), None);
        let ids: Json = serde_json::json!({"one": 1, "many": [1, 7]});
        assert_eq!(token_ids(ids.get("one")), [1]);
        assert_eq!(token_ids(ids.get("many")), [1, 7]);
    }

    #[test]
    fn named_template_lists_use_the_default() {
        let config = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        let dir = std::env::temp_dir();
        assert_eq!(template_source(&dir.join("no-such-dir"), &config).unwrap().as_deref(), Some("D"));
    }

    #[test]
    fn clean_up_removes_spaces_before_punctuation() {
        assert_eq!(clean_up_tokenization("Hi , you do n't ."), "Hi, you don't.");
    }
}
