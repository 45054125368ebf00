#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Structured outputs and tool calls end to end against the real `baleen-runtime serve` (`builtin:tiny-moe`,
//! random weights): `response_format` `json_schema` and `json_object` constrain every sampled token, so even a
//! model that writes noise answers JSON that parses and follows the schema; bad schemas are 400s naming
//! `response_format`. Forced tool calls (`tool_choice: required` or a named function) carry arguments valid
//! against the function's schema, the same streamed as not.

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

/// Two tools: one whose arguments are a whale, one without parameters (an empty argument list).
fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "record_whale", "description": "Log a sighting",
                                          "parameters": whale_schema(), "strict": true}},
        {"type": "function", "function": {"name": "get_time"}}
    ])
}

/// The calls of a streamed answer, put together from their deltas: (name, arguments) per call, and the finish.
fn streamed_calls(server: &Server, body: &Value) -> (Vec<(String, String)>, Value) {
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let data = EventStream::open(server.addr, CHAT, &streamed).collect_data();
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut finish = Value::Null;
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap();
        let choice = &chunk["choices"][0];
        assert!(choice["delta"]["content"].as_str().is_none_or(str::is_empty), "no content with a forced call: {d}");
        for call in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap() as usize;
            if let Some(name) = call["function"]["name"].as_str() {
                assert_eq!(index, calls.len(), "{d}");
                assert!(call["id"].as_str().is_some_and(|id| !id.is_empty()) && call["type"] == "function", "{d}");
                calls.push((name.to_string(), String::new()));
            }
            calls[index].1.push_str(call["function"]["arguments"].as_str().unwrap_or_default());
        }
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    (calls, finish)
}

/// The calls of an answer: (name, arguments) per call.
fn answer_calls(v: &Value) -> Vec<(String, String)> {
    let message = &v["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null, "a forced call has no content: {v}");
    message["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {v}"))
        .iter()
        .map(|c| {
            assert!(c["id"].as_str().is_some_and(|id| id.starts_with("call")) && c["type"] == "function", "{c}");
            (c["function"]["name"].as_str().unwrap().to_string(), c["function"]["arguments"].as_str().unwrap().into())
        })
        .collect()
}

fn assert_call(name: &str, arguments: &str) {
    match name {
        "record_whale" => assert_whale(arguments),
        "get_time" => assert_eq!(arguments, "{}", "no parameters: an empty argument list"),
        other => panic!("unknown function {other}"),
    }
}

#[test]
fn forced_tool_calls_carry_valid_arguments_streamed_and_not() {
    let server = Server::start(&[]);
    let named = json!({"type": "function", "function": {"name": "record_whale"}});
    for (choice, parallel) in [(named, true), (json!("required"), true), (json!("required"), false)] {
        let mut calls_seen = 0;
        for seed in 0..6 {
            let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Saw a whale."}],
                              "max_tokens": 300, "temperature": 1.0, "seed": seed, "tools": tools(),
                              "tool_choice": choice, "parallel_tool_calls": parallel});
            let v = post(server.addr, CHAT, &body).json();
            // A named function's call finishes with `stop`, as OpenAI's does; `required` with `tool_calls`.
            let finish = if choice.is_object() { "stop" } else { "tool_calls" };
            assert_eq!(v["choices"][0]["finish_reason"], finish, "{choice}: {v}");
            let calls = answer_calls(&v);
            assert!(!calls.is_empty(), "{v}");
            if choice.is_object() {
                assert_eq!(calls.len(), 1, "{v}");
                assert_eq!(calls[0].0, "record_whale");
            }
            if !parallel {
                assert_eq!(calls.len(), 1, "parallel_tool_calls: false allows one call: {v}");
            }
            calls.iter().for_each(|(name, arguments)| assert_call(name, arguments));
            calls_seen += calls.len();
            let (streamed, streamed_finish) = streamed_calls(&server, &body);
            assert_eq!(streamed, calls, "streamed = non-streamed for the same seed ({choice})");
            assert_eq!(streamed_finish, finish);
        }
        assert!(calls_seen >= 6, "{choice}");
    }
}

#[test]
fn tools_reach_the_template_and_conversations_carry_calls_and_results() {
    let server = Server::start(&[]);
    let user = json!({"role": "user", "content": "Saw a whale."});
    let prompt_tokens = |body: Value| {
        let v = post(server.addr, CHAT, &body).json();
        assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let plain = prompt_tokens(json!({"messages": [user], "max_tokens": 2}));
    let auto = prompt_tokens(json!({"messages": [user], "max_tokens": 2, "tools": tools()}));
    let none = prompt_tokens(json!({"messages": [user], "max_tokens": 2, "tools": tools(), "tool_choice": "none"}));
    assert!(auto > plain + 100, "the tools are described to the model: {auto} vs {plain}");
    assert_eq!(none, plain, "tool_choice none keeps the tools from the model");
    let call = json!({"id": "call_1", "type": "function",
                      "function": {"name": "get_time", "arguments": "{}"}});
    let conversation = json!({"max_tokens": 2, "tools": tools(), "messages": [
        user, {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]});
    let with_turns = prompt_tokens(conversation);
    assert!(with_turns > auto + 20, "{with_turns} vs {auto}");

    for (body, param) in [
        (json!({"messages": [user], "tool_choice": "required"}), "tool_choice"),
        (json!({"messages": [user], "tools": tools(), "response_format": {"type": "json_object"}}), "response_format"),
        (
            json!({"messages": [user], "tools": [{"type": "function", "function": {"name": "a b"}}]}),
            "tools[0].function.name",
        ),
        (json!({"messages": [user], "functions": [{"name": "f"}]}), "functions"),
        (json!({"messages": [{"role": "user", "content": "x", "tool_calls": [call]}]}), "messages[0].tool_calls"),
        (json!({"messages": [user], "tools": "x"}), "tools"),
        (
            json!({"messages": [user], "tool_choice": "required", "tools": [{"type": "function", "function": {
                "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "frobnicate"}}}}}]}),
            "tools",
        ),
        (
            json!({"messages": [user], "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}),
            "tools[0].function.parameters",
        ),
    ] {
        let r = post(server.addr, CHAT, &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{body}: {}", r.text());
    }
}

#[test]
fn chat_template_flag_replaces_the_models_template() {
    let template = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/chat-templates/deepseek-v3-tools.jinja");
    let server = Server::start(&["--chat-template", template]);
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "tools": tools()});
    let v = post(server.addr, CHAT, &body).json();
    // The byte tokenizer: one token per byte, `<|bos|>` one token; the template's text is known.
    let expected = "<｜User｜>Hi<｜Assistant｜>".len() + 1;
    let with_tools = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert!(with_tools > expected + 300, "the template lists the tools: {v}");
    let plain = post(server.addr, CHAT, &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}));
    assert_eq!(plain.json()["usage"]["prompt_tokens"], expected, "{}", plain.text());
}
