//! The byte-level tokenizer of the `builtin:tiny-moe` demo model: ids 0..=255 are the bytes, then six special
//! tokens; 262..=263 are reserved (never produced by encoding, decoded as nothing).

use std::collections::BTreeMap;

use minijinja::Value;

use super::ChatMessage;
use super::template::ChatTemplate;
use crate::{Error, Result};

/// `<|bos|>`
pub const BOS_ID: u32 = 256;
/// `<|eos|>`
pub const EOS_ID: u32 = 257;
/// `<|system|>`
pub const SYSTEM_ID: u32 = 258;
/// `<|user|>`
pub const USER_ID: u32 = 259;
/// `<|assistant|>`
pub const ASSISTANT_ID: u32 = 260;
/// `<|tool|>` (a tool result's turn)
pub const TOOL_ID: u32 = 261;
/// Vocabulary size, including the reserved ids 262..=263.
pub const VOCAB_SIZE: usize = 264;

/// The special tokens in id order from [`BOS_ID`].
const SPECIALS: [&str; 6] = ["<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"];

/// Role markers, content, `<|eos|>` after each turn; `<|assistant|>` opens the generation prompt. OpenAI's
/// `developer` role is a system turn. With `tools`, a first system turn lists the functions (as JSON) and the
/// call syntax, DeepSeek's markers (`<｜tool▁calls▁begin｜>`, one `<｜tool▁call▁begin｜>name<｜tool▁sep｜>arguments
/// <｜tool▁call▁end｜>` per call, `<｜tool▁calls▁end｜>`, as DeepSeek-V3.1 writes them); an assistant turn's
/// `tool_calls` are written in the same syntax.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}\
{%- if tools %}<|system|>You can call functions. To call them, answer <｜tool▁calls▁begin｜>, then for each \
call <｜tool▁call▁begin｜>, its name, <｜tool▁sep｜>, its arguments as a JSON object and <｜tool▁call▁end｜>, \
then <｜tool▁calls▁end｜>. The functions:\n\
{% for tool in tools %}{{ tool['function'] | tojson }}\n{% endfor %}{{ eos_token }}\
{%- endif %}\
{%- for message in messages %}\
{%- if message['role'] == 'system' or message['role'] == 'developer' %}<|system|>\
{%- elif message['role'] == 'user' %}<|user|>\
{%- elif message['role'] == 'assistant' %}<|assistant|>\
{%- elif message['role'] == 'tool' %}<|tool|>\
{%- else %}{{ raise_exception('Unsupported chat role: ' + message['role']) }}\
{%- endif %}\
{%- if message['content'] %}{{ message['content'] }}{% endif %}\
{%- if message['tool_calls'] %}<｜tool▁calls▁begin｜>\
{%- for call in message['tool_calls'] %}<｜tool▁call▁begin｜>{{ call['function']['name'] }}<｜tool▁sep｜>\
{{- call['function']['arguments'] }}<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>\
{%- endif %}{{ eos_token }}\
{%- endfor %}\
{%- if add_generation_prompt %}<|assistant|>{% endif %}";

impl Default for ByteTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

/// Byte-level tokenizer with a fixed chat template.
#[derive(Debug, Clone)]
pub struct ByteTokenizer {
    /// `Err` only if the constant template failed to compile (a bug, covered by tests); reported when used.
    /// Boxed: the environment is large and `Tokenizer` holds this inline.
    template: Box<std::result::Result<ChatTemplate, String>>,
    eos_ids: [u32; 1],
    /// The model's vocabulary: ids from [`VOCAB_SIZE`] up to it are padding of a larger random model and decode as
    /// nothing (at least [`VOCAB_SIZE`]).
    vocab: usize,
}

impl ByteTokenizer {
    pub fn new() -> Self {
        let template = ChatTemplate::new(CHAT_TEMPLATE.to_string(), Self::specials()).map_err(|e| e.to_string());
        Self { template: Box::new(template), eos_ids: [EOS_ID], vocab: VOCAB_SIZE }
    }

    /// The template variables of the special tokens.
    fn specials() -> BTreeMap<String, Value> {
        let mut specials = BTreeMap::new();
        specials.insert("bos_token".to_string(), Value::from(SPECIALS[0]));
        specials.insert("eos_token".to_string(), Value::from(SPECIALS[1]));
        specials
    }

    /// Uses `source` as the chat template; it must compile.
    pub fn set_chat_template(&mut self, source: String) -> Result<()> {
        *self.template = Ok(ChatTemplate::new(source, Self::specials())?);
        Ok(())
    }

    /// The tokenizer of a model whose vocabulary is `vocab` (at least [`VOCAB_SIZE`]): ids past the bytes and
    /// specials decode as nothing.
    pub fn with_vocab(vocab: usize) -> Self {
        Self { vocab: vocab.max(VOCAB_SIZE), ..Self::new() }
    }

    /// Ids this tokenizer decodes.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Bytes, except that the special tokens' text maps to their ids; `add_special_tokens` prepends `<|bos|>`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() + 1);
        if add_special_tokens {
            ids.push(BOS_ID);
        }
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'<'
                && let Some((k, s)) = SPECIALS.iter().enumerate().find(|(_, s)| bytes[i..].starts_with(s.as_bytes()))
            {
                ids.push(BOS_ID + k as u32);
                i += s.len();
                continue;
            }
            ids.push(u32::from(bytes[i]));
            i += 1;
        }
        ids
    }

    /// Bytes decode with lossy UTF-8 replacement; specials render as their text unless skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len());
        for &id in ids {
            match id {
                0..=255 => bytes.push(id as u8),
                BOS_ID..=TOOL_ID => {
                    if !skip_special_tokens {
                        bytes.extend_from_slice(SPECIALS[(id - BOS_ID) as usize].as_bytes());
                    }
                }
                _ if (id as usize) < self.vocab => {}
                _ => {
                    return Err(Error::Tokenizer(format!("token id {id} is out of range (vocab size {})", self.vocab)));
                }
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The text of special token `id` (`<|bos|>` …), `None` for a byte or a reserved id.
    pub fn special_name(&self, id: usize) -> Option<&'static str> {
        id.checked_sub(BOS_ID as usize).and_then(|k| SPECIALS.get(k)).copied()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        if let Some(k) = SPECIALS.iter().position(|s| *s == token) {
            return Some(BOS_ID + k as u32);
        }
        match token.as_bytes() {
            [b] => Some(u32::from(*b)),
            _ => None,
        }
    }

    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        match self.template.as_ref() {
            Ok(template) => template.render(messages, tools, add_generation_prompt),
            Err(msg) => Err(Error::Template(msg.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specials_in_text_become_special_ids() {
        let t = ByteTokenizer::new();
        assert_eq!(t.encode("a<|user|>b<|x", true), vec![BOS_ID, 97, USER_ID, 98, 60, 124, 120]);
        assert_eq!(t.decode(&[BOS_ID, 97, USER_ID, 262], false).unwrap(), "<|bos|>a<|user|>");
        assert_eq!(t.decode(&[BOS_ID, 97, USER_ID], true).unwrap(), "a");
        assert!(t.decode(&[264], false).is_err());
    }

    #[test]
    fn chat_template_marks_roles_and_ends_turns() {
        let t = ByteTokenizer::new();
        let msgs = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
        let text = t.apply_chat_template(&msgs, None, true).unwrap();
        assert_eq!(text, "<|bos|><|system|>Be brief.<|eos|><|user|>Hi<|eos|><|assistant|>");
        let msgs = [ChatMessage::new("developer", "D"), ChatMessage::new("tool", "42")];
        let roles = t.apply_chat_template(&msgs, None, false).unwrap();
        assert_eq!(roles, "<|bos|><|system|>D<|eos|><|tool|>42<|eos|>");
        assert_eq!(t.encode("<|tool|>", false), vec![TOOL_ID]);
        let ids = t.encode(&text, false);
        assert_eq!(ids[..2], [BOS_ID, SYSTEM_ID]);
        assert_eq!(*ids.last().unwrap(), ASSISTANT_ID);
    }
}
