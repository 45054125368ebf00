//! Tokenizer and chat-template behaviour against transformers goldens (`tests/fixtures/*/golden.json`), and the
//! built-in byte-level tokenizer.

// Test helpers outside #[test] functions may unwrap too (clippy.toml allows it only inside them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use baleen_runtime::Error;
use baleen_runtime::tokenizer::{ChatMessage, Tokenizer};
use serde::Deserialize;

const FIXTURES: [&str; 4] = ["tiny-v3", "tiny-v2", "tiny-v2-greedy", "tiny-v3-fp8"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[derive(Deserialize)]
struct Golden {
    bos_token_id: u32,
    eos_token_id: u32,
    tokenizer: Cases,
}

#[derive(Deserialize)]
struct Cases {
    encode: Vec<EncodeCase>,
    decode: Vec<DecodeCase>,
    chat: Vec<ChatCase>,
    #[serde(default)]
    chat_errors: Vec<ChatErrorCase>,
}

#[derive(Deserialize)]
struct EncodeCase {
    text: String,
    add_special_tokens: bool,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct DecodeCase {
    ids: Vec<u32>,
    skip_special_tokens: bool,
    text: String,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatErrorCase {
    messages: Vec<ChatMessage>,
    error_contains: String,
}

/// `tests/fixtures/chat-template-goldens.json` (scripts/goldens/make_template_goldens.py): transformers'
/// rendering of the chat templates shipped in deploy/chat-templates, with tools and tool calls.
#[derive(Deserialize)]
struct TemplateGoldens {
    tokenizer: String,
    templates: Vec<TemplateGolden>,
}

#[derive(Deserialize)]
struct TemplateGolden {
    template: String,
    cases: Vec<ToolChatCase>,
}

#[derive(Deserialize)]
struct ToolChatCase {
    name: String,
    messages: Vec<ChatMessage>,
    tools: Option<Vec<serde_json::Value>>,
    add_generation_prompt: bool,
    text: String,
    ids: Vec<u32>,
}

fn load(name: &str) -> (Tokenizer, Golden) {
    let dir = fixture(name);
    let text = std::fs::read_to_string(dir.join("golden.json")).unwrap();
    let golden: Golden = serde_json::from_str(&text).unwrap();
    (Tokenizer::from_dir(&dir).unwrap(), golden)
}

#[test]
fn encode_matches_transformers_on_every_fixture() {
    for name in FIXTURES {
        let (tok, golden) = load(name);
        assert!(!golden.tokenizer.encode.is_empty());
        for case in &golden.tokenizer.encode {
            let ids = tok.encode(&case.text, case.add_special_tokens).unwrap();
            assert_eq!(
                ids, case.ids,
                "{name}: encode({:?}, add_special_tokens={})",
                case.text, case.add_special_tokens
            );
        }
    }
}

#[test]
fn decode_matches_transformers_on_every_fixture() {
    for name in FIXTURES {
        let (tok, golden) = load(name);
        assert!(!golden.tokenizer.decode.is_empty());
        for case in &golden.tokenizer.decode {
            let text = tok.decode(&case.ids, case.skip_special_tokens).unwrap();
            assert_eq!(
                text, case.text,
                "{name}: decode({:?}, skip_special_tokens={})",
                case.ids, case.skip_special_tokens
            );
        }
    }
}

#[test]
fn chat_template_renders_and_encodes_like_transformers() {
    for name in FIXTURES {
        let (tok, golden) = load(name);
        assert!(!golden.tokenizer.chat.is_empty());
        for case in &golden.tokenizer.chat {
            let rendered = tok.apply_chat_template(&case.messages, case.add_generation_prompt).unwrap();
            assert_eq!(rendered, case.rendered, "{name}: render {:?}", case.messages);
            let ids = tok.encode(&rendered, false).unwrap();
            assert_eq!(ids, case.ids, "{name}: ids of {rendered:?}");
        }
    }
}

#[test]
fn chat_template_raise_exception_is_a_template_error_with_the_message() {
    for name in FIXTURES {
        let (tok, golden) = load(name);
        assert!(!golden.tokenizer.chat_errors.is_empty());
        for case in &golden.tokenizer.chat_errors {
            let err = tok.apply_chat_template(&case.messages, true).unwrap_err();
            assert!(
                matches!(&err, Error::Template(msg) if msg.contains(&case.error_contains)),
                "{name}: expected a template error containing {:?}, got {err:?}",
                case.error_contains
            );
        }
    }
}

#[test]
fn unknown_role_raises_through_the_template() {
    let tok = Tokenizer::from_dir(&fixture("tiny-v3")).unwrap();
    let err = tok.apply_chat_template(&[ChatMessage::new("narrator", "Once upon a time")], false).unwrap_err();
    assert!(matches!(&err, Error::Template(msg) if msg.contains("Unsupported chat role: narrator")), "{err:?}");
    let tok = Tokenizer::byte_level();
    let err = tok.apply_chat_template(&[ChatMessage::new("narrator", "Once")], false).unwrap_err();
    assert!(matches!(&err, Error::Template(msg) if msg.contains("Unsupported chat role: narrator")), "{err:?}");
}

#[test]
fn bos_and_eos_ids_match_transformers() {
    for name in FIXTURES {
        let (tok, golden) = load(name);
        assert_eq!(tok.bos_token_id(), Some(golden.bos_token_id), "{name}");
        assert_eq!(tok.eos_token_ids().first(), Some(&golden.eos_token_id), "{name}");
        assert!(tok.eos_token_ids().contains(&golden.eos_token_id), "{name}");
        assert_eq!(tok.vocab_size(), 320, "{name}");
        assert_eq!(tok.token_to_id("<｜end▁of▁sentence｜>"), Some(golden.eos_token_id), "{name}");
    }
}

#[test]
fn missing_tokenizer_json_is_a_tokenizer_error() {
    let err = Tokenizer::from_dir(&fixture("no-such-fixture")).unwrap_err();
    assert!(matches!(&err, Error::Tokenizer(msg) if msg.contains("tokenizer.json")), "{err:?}");
}

#[test]
fn model_without_chat_template_is_a_template_error() {
    let dir = std::env::temp_dir().join(format!("baleen-tokenizer-no-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("tiny-v3").join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": {"content": "<｜begin▁of▁sentence｜>"}}"#)
        .unwrap();
    let tok = Tokenizer::from_dir(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let tok = tok.unwrap();
    assert_eq!(tok.bos_token_id(), Some(0));
    assert!(tok.eos_token_ids().is_empty());
    let err = tok.apply_chat_template(&[ChatMessage::new("user", "hi")], true).unwrap_err();
    assert!(matches!(&err, Error::Template(msg) if msg.contains("no chat template")), "{err:?}");
}

#[test]
fn byte_level_round_trips_arbitrary_utf8() {
    let tok = Tokenizer::byte_level();
    for text in
        ["", "plain ascii", "café 日本 naïve résumé", "whales 🐋🐳 and 👩‍👩‍👧 families", "\u{0}\t\n\u{7f}\u{10FFFF}"]
    {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids.len(), text.len(), "one id per byte for {text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        let with_bos = tok.encode(text, true).unwrap();
        assert_eq!(with_bos[0], 256);
        assert_eq!(tok.decode(&with_bos, true).unwrap(), text);
    }
}

#[test]
fn byte_level_decodes_invalid_utf8_lossily() {
    let tok = Tokenizer::byte_level();
    // The first two bytes of 🐋 (F0 9F 90 8B), then 'a'.
    assert_eq!(tok.decode(&[0xF0, 0x9F, 97], false).unwrap(), "\u{FFFD}a");
}

#[test]
fn byte_level_specials_and_chat_template() {
    let tok = Tokenizer::byte_level();
    assert_eq!(tok.vocab_size(), 264);
    assert_eq!(tok.bos_token_id(), Some(256));
    assert_eq!(tok.eos_token_ids(), &[257]);
    for (text, id) in
        [("<|bos|>", 256), ("<|eos|>", 257), ("<|system|>", 258), ("<|user|>", 259), ("<|assistant|>", 260)]
    {
        assert_eq!(tok.token_to_id(text), Some(id));
    }
    let messages =
        [ChatMessage::new("user", "Hi 🐋"), ChatMessage::new("assistant", "Hello"), ChatMessage::new("user", "Bye")];
    let rendered = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(rendered, "<|bos|><|user|>Hi 🐋<|eos|><|assistant|>Hello<|eos|><|user|>Bye<|eos|><|assistant|>");
    let ids = tok.encode(&rendered, false).unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == 256).count(), 1, "exactly one BOS");
    assert_eq!(&ids[..2], &[256, 259]);
    assert_eq!(ids.last(), Some(&260));
    assert_eq!(tok.decode(&ids, false).unwrap(), rendered);
    let no_prompt = tok.apply_chat_template(&messages[..1], false).unwrap();
    assert_eq!(no_prompt, "<|bos|><|user|>Hi 🐋<|eos|>");
}

#[test]
fn shipped_tool_templates_render_tools_calls_and_results_like_transformers() {
    let path = fixture("chat-template-goldens.json");
    let goldens: TemplateGoldens = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut tok = Tokenizer::from_dir(&fixture(&goldens.tokenizer)).unwrap();
    assert!(!goldens.templates.is_empty());
    for golden in &goldens.templates {
        tok.set_chat_template(std::fs::read_to_string(root.join(&golden.template)).unwrap()).unwrap();
        for case in &golden.cases {
            let text =
                tok.apply_chat_template_with_tools(&case.messages, case.tools.as_deref(), case.add_generation_prompt);
            assert_eq!(text.unwrap(), case.text, "{}: {}", golden.template, case.name);
            assert_eq!(tok.encode(&case.text, false).unwrap(), case.ids, "{}: {}", golden.template, case.name);
        }
    }
    let e = tok.set_chat_template("{% if %}".into()).unwrap_err();
    assert!(matches!(e, Error::Template(_)), "{e:?}");
}
