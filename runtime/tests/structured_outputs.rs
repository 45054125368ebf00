#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Structured outputs end to end against the real `baleen-runtime serve` (`builtin:tiny-moe`, random weights):
//! `response_format` `json_schema` and `json_object` constrain every sampled token, so even a model that writes
//! noise answers JSON that parses and follows the schema; bad schemas are 400s naming `response_format`.

#[path = "http/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "http/server.rs"]
#[allow(dead_code)]
mod server;

use client::{EventStream, post};
use serde_json::{Value, json};
use server::Server;

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const MODEL: &str = "tiny-moe";

/// The five-field schema the Python suite and `scripts/bench-structured.py` use too.
fn whale_schema() -> Value {
    serde_json::from_str(include_str!("../../tests/support/whale-schema.json")).unwrap()
}

/// The schema's rules, checked by hand (the Python suite validates with the `jsonschema` package).
fn assert_whale(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    let o = v.as_object().unwrap_or_else(|| panic!("not an object: {text}"));
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["krill", "length_m", "name", "species", "tags"], "{text}");
    assert!(o["name"].as_str().is_some_and(|s| s.chars().count() <= 12), "{text}");
    assert!(o["length_m"].as_i64().is_some_and(|n| (1..=40).contains(&n)), "{text}");
    assert!(["blue", "humpback", "minke"].contains(&o["species"].as_str().unwrap_or("")), "{text}");
    assert!(o["krill"].is_boolean(), "{text}");
    let tags = o["tags"].as_array().unwrap_or_else(|| panic!("tags: {text}"));
    assert!(tags.len() <= 3 && tags.iter().all(|t| t.as_str().is_some_and(|s| s.chars().count() <= 5)), "{text}");
}

fn schema_format() -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "whale", "schema": whale_schema(), "strict": true}})
}

#[test]
fn json_schema_outputs_follow_the_schema_streamed_and_not() {
    let server = Server::start(&[]);
    for seed in 0..12 {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "A whale, as JSON."}],
                          "max_tokens": 200, "temperature": 1.0, "seed": seed, "response_format": schema_format()});
        let v = post(server.addr, CHAT, &body).json();
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "the grammar ends the answer: {v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        assert_whale(&text);

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let data = EventStream::open(server.addr, CHAT, &streamed).collect_data();
        let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
        let joined: String =
            chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
        assert_eq!(joined, text, "streamed = non-streamed for the same seed");
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    }
}

#[test]
fn json_object_outputs_are_json_objects_on_completions_too() {
    let server = Server::start(&[]);
    let mut stopped = 0;
    for seed in 0..12 {
        let body = json!({"model": MODEL, "prompt": "{", "max_tokens": 256, "temperature": 0.7, "seed": seed,
                          "response_format": {"type": "json_object"}});
        let v = post(server.addr, COMPLETIONS, &body).json();
        let text = v["choices"][0]["text"].as_str().unwrap();
        assert!(text.starts_with('{'), "{text:?}");
        if v["choices"][0]["finish_reason"] == "stop" {
            stopped += 1;
            let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
            assert!(parsed.is_object(), "{text}");
        }
    }
    assert!(stopped > 0, "no json_object answer completed within 256 tokens");
}

#[test]
fn bad_response_formats_are_400_naming_response_format() {
    let server = Server::start(&[]);
    let chat = |format: Value| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
               "response_format": format})
    };
    let cases = [
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}),
        json!({"type": "json_schema", "json_schema": {"name": "x"}}),
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["a".repeat(70_000)]}}}),
        json!({"type": "grammar", "grammar": "root ::= x"}),
        json!({"json_schema": {}}),
    ];
    for format in cases {
        let r = post(server.addr, CHAT, &chat(format.clone()));
        assert_eq!(r.status, 400, "{format}: {}", r.text());
        let error = &r.json()["error"];
        assert_eq!(error["param"], "response_format", "{error}");
        assert!(error["message"].as_str().unwrap().contains("response_format"), "{error}");
    }
    // text is the default and constrains nothing.
    let r = post(server.addr, CHAT, &chat(json!({"type": "text"})));
    assert_eq!(r.status, 200, "{}", r.text());
}
