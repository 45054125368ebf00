//! What routing reads of a request body — `model`, `user`, the token cap, and for `prefix-affinity` only the
//! prompt's leading text (a second pass, [`prefix_key`]) — without taking the rest apart: every other field is
//! skipped, and a field of an unexpected shape is left for the backend to judge.

use std::borrow::Cow;

use baleen_api::http::{ApiError, parse_json};
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::backends::stable_hash;
use crate::policy::RouteKey;
use crate::wire::Fields;

/// The fields every request is read for (unknown fields are skipped without being built).
#[derive(Debug, Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    model: Option<Text<'a>>,
    #[serde(default)]
    user: Option<Lenient>,
    #[serde(default)]
    max_tokens: Option<Count>,
    #[serde(default)]
    max_completion_tokens: Option<Count>,
}

/// A string, borrowed from the body unless it has escapes. (`#[serde(borrow)]` on an `Option<Cow<str>>` still
/// copies: `Option`'s own deserializer reads its `Cow` owned.)
#[derive(Debug)]
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Text<'a>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(text)))
            }

            fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(text.to_owned())))
            }

            fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(text)))
            }
        }
        deserializer.deserialize_str(Visit(std::marker::PhantomData))
    }
}

/// The prompt, read only for `prefix-affinity`.
#[derive(Debug, Deserialize)]
struct Prompted {
    #[serde(default)]
    messages: Option<Messages>,
    #[serde(default)]
    prompt: Option<Prompt>,
}

/// A count, or anything else (left for the backend to refuse).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Count {
    N(u64),
    Other(IgnoredAny),
}

impl Count {
    fn get(&self) -> Option<u64> {
        match self {
            Self::N(n) => Some(*n),
            Self::Other(_) => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Messages {
    List(Vec<Message>),
    Other(IgnoredAny),
}

#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    role: Option<Lenient>,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    Other(IgnoredAny),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<Lenient>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    Batch(Vec<Vec<i64>>),
    Other(IgnoredAny),
}

/// A string, or anything else (ignored).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Lenient {
    Text(String),
    Other(IgnoredAny),
}

impl Lenient {
    fn text(&self) -> Option<&str> {
        match self {
            Self::Text(s) => Some(s),
            Self::Other(_) => None,
        }
    }
}

/// The routing view of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peeked<'a> {
    /// `model`, when given (borrowed from the body unless it has escapes).
    pub model: Option<Cow<'a, str>>,
    pub key: RouteKey,
    /// `max_completion_tokens`, else `max_tokens`: what the request may generate (API keys' token limits).
    pub max_tokens: Option<u64>,
}

/// Appends up to `limit` bytes in total.
fn push(buf: &mut Vec<u8>, bytes: &[u8], limit: usize) {
    let room = limit.saturating_sub(buf.len());
    buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

fn prefix_text(peek: &Prompted, limit: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(limit.min(4096));
    if let Some(Messages::List(messages)) = &peek.messages {
        for message in messages {
            if buf.len() >= limit {
                break;
            }
            push(&mut buf, message.role.as_ref().and_then(Lenient::text).unwrap_or("").as_bytes(), limit);
            push(&mut buf, b"\n", limit);
            match &message.content {
                Some(Content::Text(text)) => push(&mut buf, text.as_bytes(), limit),
                Some(Content::Parts(parts)) => {
                    for text in parts.iter().filter_map(|p| p.text.as_ref().and_then(Lenient::text)) {
                        push(&mut buf, text.as_bytes(), limit);
                    }
                }
                Some(Content::Other(_)) | None => {}
            }
            push(&mut buf, b"\0", limit);
        }
    }
    match &peek.prompt {
        Some(Prompt::Text(text)) => push(&mut buf, text.as_bytes(), limit),
        Some(Prompt::Texts(texts)) => {
            if let Some(text) = texts.first() {
                push(&mut buf, text.as_bytes(), limit);
            }
        }
        Some(Prompt::Tokens(ids)) => push_ids(&mut buf, ids, limit),
        Some(Prompt::Batch(batch)) => {
            if let Some(ids) = batch.first() {
                push_ids(&mut buf, ids, limit);
            }
        }
        Some(Prompt::Other(_)) | None => {}
    }
    buf
}

fn push_ids(buf: &mut Vec<u8>, ids: &[i64], limit: usize) {
    for id in ids {
        if buf.len() >= limit {
            break;
        }
        push(buf, format!("{id},").as_bytes(), limit);
    }
}

/// Reads `body` for routing: the model, the session (the `session_header` value, else `user`) and the token cap;
/// `key.prefix` is left for [`prefix_key`]. A body that is not a JSON object, or a `model` that is not a string,
/// is a 400.
pub fn peek<'a>(body: &'a [u8], fields: &Fields, session_header: &http::HeaderName) -> Result<Peeked<'a>, ApiError> {
    let head: Head<'_> = parse_json(body)?;
    let session = match fields.get(session_header.as_str()) {
        Some(value) => Some(stable_hash(value)),
        None => head.user.as_ref().and_then(Lenient::text).map(|user| stable_hash(user.as_bytes())),
    };
    Ok(Peeked {
        model: head.model.map(|Text(model)| model),
        key: RouteKey { prefix: None, session },
        max_tokens: head.max_completion_tokens.as_ref().or(head.max_tokens.as_ref()).and_then(Count::get),
    })
}

/// The hash of the first `prefix_bytes` of the prompt's text (the chat messages' roles and text, or the completion
/// prompt); `None` without any (or for a body [`peek`] already found wanting).
pub fn prefix_key(body: &[u8], prefix_bytes: usize) -> Option<u64> {
    let prompted: Prompted = serde_json::from_slice(body).ok()?;
    let prefix = prefix_text(&prompted, prefix_bytes);
    (!prefix.is_empty()).then(|| stable_hash(&prefix))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use http::HeaderName;
    use serde_json::json;

    use super::*;

    /// The body's routing view, its model copied out of it.
    fn run(body: serde_json::Value, limit: usize) -> Peeked<'static> {
        let header = HeaderName::from_static("x-session-id");
        let text = body.to_string();
        let peeked = peek(text.as_bytes(), &Fields::default(), &header).unwrap();
        let model = peeked.model.map(|m| Cow::Owned(m.into_owned()));
        Peeked { model, key: RouteKey { prefix: prefix_key(text.as_bytes(), limit), ..peeked.key }, ..peeked }
    }

    #[test]
    fn chats_sharing_their_leading_text_share_a_key() {
        let system = "You are a helpful assistant. ".repeat(10);
        let a = run(
            json!({"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]}),
            64,
        );
        let b = run(
            json!({"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": "bye"}], "temperature": 0.5}),
            64,
        );
        assert_eq!(a.model.as_deref(), Some("m"));
        assert_eq!(a.key.prefix, b.key.prefix);
        let c = run(json!({"model": "m", "messages": [{"role": "system", "content": "Other"}]}), 64);
        assert_ne!(a.key.prefix, c.key.prefix);
        let parts = run(
            json!({"model": "m", "messages": [{"role": "system", "content": [{"type": "text", "text": system}]}]}),
            64,
        );
        assert_eq!(parts.key.prefix, a.key.prefix, "text parts hash like a string");
    }

    #[test]
    fn completion_prompts_of_every_shape_give_a_key() {
        for prompt in [json!("hello"), json!(["hello", "x"]), json!([1, 2, 3]), json!([[1, 2], [3]])] {
            assert!(run(json!({"model": "m", "prompt": prompt}), 16).key.prefix.is_some(), "{prompt}");
        }
        assert_eq!(run(json!({"model": "m", "prompt": 5}), 16).key.prefix, None, "left for the backend to refuse");
    }

    #[test]
    fn the_session_is_the_header_else_user() {
        let header = HeaderName::from_static("x-session-id");
        let body = json!({"model": "m", "prompt": "x", "user": "alice"}).to_string();
        let by_user = peek(body.as_bytes(), &Fields::default(), &header).unwrap();
        let by_header = peek(body.as_bytes(), &Fields::of(&[("X-Session-Id", "s1")]), &header).unwrap();
        assert!(by_user.key.session.is_some() && by_header.key.session.is_some());
        assert_ne!(by_user.key.session, by_header.key.session);
    }

    #[test]
    fn the_model_is_borrowed_from_the_body_unless_it_has_escapes() {
        let header = HeaderName::from_static("x-session-id");
        let plain = peek(br#"{"model": "m-1"}"#, &Fields::default(), &header).unwrap();
        assert!(matches!(plain.model, Some(Cow::Borrowed("m-1"))), "{:?}", plain.model);
        let escaped = peek(br#"{"model": "m\u002d1"}"#, &Fields::default(), &header).unwrap();
        assert!(matches!(escaped.model.as_deref(), Some("m-1")), "{:?}", escaped.model);
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_400() {
        let header = HeaderName::from_static("x-session-id");
        for body in [&b"not json"[..], b"[1]", br#"{"model": 5}"#] {
            let e = peek(body, &Fields::default(), &header).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(run(json!({"prompt": "x"}), 8).model, None);
    }
}
