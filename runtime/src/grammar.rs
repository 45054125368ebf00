//! Structured outputs: `response_format` `json_object` and `json_schema` compiled to a token-level grammar with
//! llguidance (the engine vLLM, SGLang and llama.cpp use). Before each sampled token the sequence's
//! [`Constraint`] masks every token the grammar cannot take next; after it, the token advances the grammar; a
//! finished grammar finishes the sequence (`finish_reason: "stop"`).
//!
//! [`Grammars`] is built once per tokenizer: the vocabulary as bytes (a token trie) and llguidance's parser
//! factory. JSON is generated compactly (`,` and `:` without spaces, no free whitespace) unless the schema's
//! `x-guidance` options say otherwise, so a random-weight model cannot fill its budget with spaces.

use std::sync::Arc;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

use crate::error::{Error, Part, Result};
use crate::tokenizer::Tokenizer;

/// The key of llguidance's options inside a JSON schema.
const GUIDANCE_OPTIONS_KEY: &str = "x-guidance";
/// Most symbols a compiled grammar may hold (llguidance's default is 500,000, a few megabytes of JSON schema).
pub const MAX_GRAMMAR_SYMBOLS: usize = 100_000;
/// Most bytes a schema may take in the request (checked before it is compiled).
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Schema compiles the server runs at once; more wait, so a burst of schemas cannot take every core from the
/// engine.
pub const MAX_CONCURRENT_COMPILES: usize = 2;

/// What a request asks its output to be.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// `response_format: {"type": "json_object"}`: any JSON object.
    JsonObject,
    /// `response_format: {"type": "json_schema", "json_schema": {"schema": …}}`: JSON valid against the schema.
    JsonSchema(Value),
}

impl OutputFormat {
    /// The JSON schema the output must satisfy, with the compact-JSON defaults added.
    fn schema(&self) -> Value {
        let mut schema = match self {
            Self::JsonObject => json!({"type": "object"}),
            Self::JsonSchema(schema) => schema.clone(),
        };
        if let Value::Object(map) = &mut schema {
            let options = map.entry(GUIDANCE_OPTIONS_KEY).or_insert_with(|| json!({}));
            if let Value::Object(options) = options {
                options.entry("whitespace_flexible").or_insert(Value::Bool(false));
                options.entry("item_separator").or_insert(json!(","));
                options.entry("key_separator").or_insert(json!(":"));
            }
        }
        schema
    }
}

/// The vocabulary of one tokenizer as llguidance sees it.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match &*self.tokenizer {
            Tokenizer::Bytes(_) => s.iter().map(|&b| TokenId::from(b)).collect(),
            Tokenizer::Hf(t) => t.encode(&String::from_utf8_lossy(s), false).unwrap_or_default(),
        }
    }
}

/// Compiles output formats into per-request [`Constraint`]s for one tokenizer.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab_size", &self.factory.tok_env().tok_trie().vocab_size()).finish()
    }
}

impl Grammars {
    /// Builds the token trie and the parser factory of `tokenizer`. `model_vocab` is the width of the model's
    /// logits (at least the tokenizer's vocabulary; ids past the tokenizer's are never allowed).
    pub fn new(tokenizer: Arc<Tokenizer>, model_vocab: usize) -> Result<Self> {
        let mut words = token_bytes(&tokenizer)?;
        let vocab = words.len().max(model_vocab);
        words.resize(vocab, Vec::new());
        let eos = tokenizer.eos_token_ids().first().copied().ok_or_else(|| {
            Error::Tokenizer("structured outputs need an end-of-sequence token, and the tokenizer has none".into())
        })?;
        let vocab_size = u32::try_from(vocab).map_err(|_| Error::Tokenizer(format!("vocabulary of {vocab}")))?;
        let mut info = TokRxInfo::new(vocab_size, eos);
        info.tok_bos = tokenizer.bos_token_id();
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let caps =
            InferenceCapabilities { ff_tokens: false, backtrack: false, conditional_ff_tokens: false, fork: false };
        let mut factory = ParserFactory::new(&env, caps, &SlicedBiasComputer::general_slices())
            .map_err(|e| Error::Tokenizer(format!("building the grammar engine: {e}")))?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits { max_grammar_size: MAX_GRAMMAR_SYMBOLS, ..ParserLimits::default() };
        Ok(Self { factory })
    }

    /// The constraint of one request; an invalid or unsupported schema is an error saying why.
    pub fn compile(&self, format: &OutputFormat) -> std::result::Result<Constraint, String> {
        let grammar = TopLevelGrammar::from_json_schema(format.schema());
        let parser = self.factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(error);
        }
        Ok(Constraint { matcher })
    }
}

/// The bytes of every token id: what llguidance matches the grammar against. Special tokens are marked with
/// toktrie's special-token byte, so no grammar text can produce them.
fn token_bytes(tokenizer: &Tokenizer) -> Result<Vec<Vec<u8>>> {
    match tokenizer {
        Tokenizer::Bytes(t) => Ok((0..t.vocab_size())
            .map(|id| match u8::try_from(id) {
                Ok(byte) => vec![byte],
                Err(_) => match t.special_name(id) {
                    Some(name) => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], name.as_bytes()].concat(),
                    None => Vec::new(),
                },
            })
            .collect()),
        Tokenizer::Hf(t) => {
            let json = t.to_json().map_err(|e| Error::Tokenizer(format!("serializing the tokenizer: {e}")))?;
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| {
                Error::Tokenizer(format!("structured outputs do not support this tokenizer's vocabulary: {e}"))
            })
        }
    }
}

/// One request's grammar state.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Constraint {
    /// Sets every logit the grammar does not allow next to −∞.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| Error::internal(Part::Grammar, e.to_string()))?;
        for (id, logit) in logits.iter_mut().enumerate() {
            // Ids past the grammar's vocabulary (a logits row wider than it) are never allowed.
            let allowed = id < allowed.len() && u32::try_from(id).is_ok_and(|id| allowed.is_allowed(id));
            if !allowed {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar by the sampled token.
    pub fn consume(&mut self, id: u32) -> Result<()> {
        self.matcher.consume_token(id).map_err(|e| Error::internal(Part::Grammar, e.to_string()))
    }

    /// The grammar is complete: nothing but the end may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn grammars() -> Grammars {
        Grammars::new(Arc::new(Tokenizer::byte_level()), 264).unwrap()
    }

    /// Drives `constraint` greedily over `text`'s bytes; returns false at the first byte it refuses.
    fn accepts(constraint: &mut Constraint, text: &str) -> bool {
        for &b in text.as_bytes() {
            let mut logits = vec![0.0f32; 264];
            constraint.mask(&mut logits).unwrap();
            if logits[usize::from(b)] == f32::NEG_INFINITY {
                return false;
            }
            constraint.consume(u32::from(b)).unwrap();
        }
        true
    }

    #[test]
    fn a_schema_allows_exactly_its_json() {
        let g = grammars();
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                            "additionalProperties": false});
        let format = OutputFormat::JsonSchema(schema);
        assert!(accepts(&mut g.compile(&format).unwrap(), "{\"n\":42}"));
        assert!(!accepts(&mut g.compile(&format).unwrap(), "{\"n\":\"x\"}"));
        assert!(!accepts(&mut g.compile(&format).unwrap(), "{ \"n\":1}"), "compact JSON by default");
        let mut done = g.compile(&format).unwrap();
        assert!(accepts(&mut done, "{\"n\":7}"));
        let mut logits = vec![0.0f32; 264];
        done.mask(&mut logits).unwrap();
        let allowed: Vec<usize> = (0..264).filter(|&i| logits[i] > f32::NEG_INFINITY).collect();
        assert_eq!(allowed, vec![crate::tokenizer::bytes::EOS_ID as usize], "only the end after the object");
    }

    #[test]
    fn special_tokens_and_padding_ids_are_never_allowed() {
        let g = grammars();
        let mut c = g.compile(&OutputFormat::JsonObject).unwrap();
        let mut logits = vec![0.0f32; 300];
        c.mask(&mut logits).unwrap();
        assert!(logits[usize::from(b'{')] == 0.0);
        assert!(logits[256..].iter().all(|l| *l == f32::NEG_INFINITY), "specials and ids past the vocabulary");
    }

    #[test]
    fn invalid_schemas_are_errors() {
        let g = grammars();
        let bad = OutputFormat::JsonSchema(json!({"type": "frobnicate"}));
        assert!(g.compile(&bad).is_err());
    }
}
