#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! What a hostile or careless client meets at the runtime's HTTP edge, end to end against the real
//! `baleen-runtime serve` on 127.0.0.1: slow and idle connections, the connection cap, oversized and truncated
//! bodies, fields that would be ignored, type errors, `logit_bias`, API keys, CORS, the access log, and a
//! shutdown that cuts streams short.

#[path = "http/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "http/server.rs"]
#[allow(dead_code)]
mod server;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use client::{EventStream, get, post, request, request_with};
use serde_json::{Value, json};
use server::Server;

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const MODEL: &str = "tiny-moe";

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Krill"}], "max_tokens": 2});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

fn completion(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "prompt": "Krill", "max_tokens": 2});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// The error object of a `status` answer, checked for the OpenAI shape.
fn error_of(response: &client::Response, status: u16) -> Value {
    assert_eq!(response.status, status, "{}", response.text());
    assert!(response.header("content-type").unwrap().starts_with("application/json"), "{:?}", response.headers);
    let error = response.json()["error"].clone();
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
    assert!(error["type"].is_string() && error.get("param").is_some() && error.get("code").is_some(), "{error}");
    error
}

/// Reads from `stream` until the server closes it; `Some(bytes)` when it did within `within`.
fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let start = Instant::now();
    stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0; 4096];
    while start.elapsed() < within {
        match stream.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Some(got),
        }
    }
    None
}

#[test]
fn a_slow_header_client_is_cut_at_the_header_read_timeout_and_idle_connections_close() {
    let server = Server::start(&["--header-read-timeout", "1"]);
    // Slowloris: a header line every 200 ms, never the blank line that ends the head.
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    slow.write_all(format!("GET /health HTTP/1.1\r\nHost: {}\r\n", server.addr).as_bytes()).unwrap();
    let start = Instant::now();
    let mut buf = [0; 512];
    let cut = loop {
        assert!(start.elapsed() < Duration::from_secs(20), "still connected after 20 s of trickled headers");
        if slow.write_all(b"X-Slow: 1\r\n").is_err() {
            break start.elapsed();
        }
        match slow.read(&mut buf) {
            Ok(n) => {
                let head = String::from_utf8_lossy(&buf[..n]);
                assert!(n == 0 || !head.contains(" 200 "), "a head that never ended was answered: {head}");
                break start.elapsed();
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break start.elapsed(),
        }
    };
    assert!(cut >= Duration::from_millis(800), "cut after {cut:?}, before the 1 s timeout");

    // An idle keep-alive connection is closed after the same timeout once its request is answered.
    let mut idle = TcpStream::connect(server.addr).unwrap();
    idle.write_all(format!("GET /health HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr).as_bytes()).unwrap();
    let answered = read_until_closed(&mut idle, Duration::from_secs(20)).expect("the idle connection stays open");
    assert!(String::from_utf8_lossy(&answered).starts_with("HTTP/1.1 200"), "{answered:?}");
    assert_eq!(get(server.addr, "/health").status, 200);
}

#[test]
fn idle_connections_over_the_cap_leave_the_probes_answering_and_the_api_503() {
    let server = Server::start(&["--max-connections", "8"]);
    let idle: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(server.addr).unwrap()).collect();
    // The first eight hold the server's connection slots (they have 60 s to send headers); the rest are over the cap.
    std::thread::sleep(Duration::from_millis(300));
    for probe in ["/health", "/metrics"] {
        assert_eq!(get(server.addr, probe).status, 200, "{probe}");
    }
    let refused = post(server.addr, COMPLETIONS, &completion(json!({})));
    let error = error_of(&refused, 503);
    assert!(error["message"].as_str().unwrap().contains("open connections"), "{error}");
    assert_eq!(refused.header("retry-after"), Some("1"));

    // 192 over the cap are open; 100 more pass the 256 probe-only connections: the last ones are closed at once
    // (long before the 2 s header timeout of the probe-only connections).
    let more: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(server.addr).unwrap()).collect();
    let mut last = more.last().unwrap().try_clone().unwrap();
    let closed = read_until_closed(&mut last, Duration::from_millis(1500));
    assert_eq!(closed, Some(Vec::new()), "a connection past both caps is closed without an answer");

    drop((idle, more));
    let start = Instant::now();
    let body = completion(json!({})).to_string();
    loop {
        // Until the server has seen the dropped connections close, a new one may still be past both caps and be
        // closed at once (a reset here), or get the 503.
        let outcome = match request(server.addr, "POST", COMPLETIONS, Some(body.as_bytes())) {
            Ok(r) if r.status == 200 => break,
            Ok(r) => r.text(),
            Err(e) => e.to_string(),
        };
        assert!(start.elapsed() < Duration::from_secs(20), "slots never freed: {outcome}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_declared_body_over_the_limit_is_413_at_once_without_100_continue() {
    let server = Server::start(&["--max-request-bytes", "1000"]);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST {COMPLETIONS} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\
         Expect: 100-continue\r\n\r\n",
        server.addr
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    assert!(status_line.starts_with("HTTP/1.1 413"), "the first answer is {status_line:?}");
}

#[test]
fn a_body_cut_short_is_408_at_the_body_read_timeout() {
    let server = Server::start(&["--body-read-timeout", "1"]);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST {COMPLETIONS} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"pro",
        server.addr
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
}

#[test]
fn fields_that_would_be_ignored_are_refused_naming_them() {
    let server = Server::start(&[]);
    let refused = [
        (CHAT, chat(json!({"response_format": {"type": "grammar", "grammar": "x"}})), "response_format"),
        (CHAT, chat(json!({"functions": [{"name": "f"}]})), "functions"),
        (CHAT, chat(json!({"function_call": "auto"})), "function_call"),
        (COMPLETIONS, completion(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})), "tools"),
        (CHAT, chat(json!({"min_p": 0.1})), "min_p"),
        (COMPLETIONS, completion(json!({"suffix": "end"})), "suffix"),
        (COMPLETIONS, completion(json!({"guided_json": {"type": "object"}})), "guided_json"),
    ];
    for (path, body, field) in refused {
        let error = error_of(&post(server.addr, path, &body), 400);
        assert_eq!(error["param"], field, "{error}");
        assert_eq!(error["code"], "unsupported_parameter", "{error}");
        assert!(error["message"].as_str().unwrap().contains(field), "{error}");
    }
    // Values that ask for the default behaviour, metadata and nulls are fine.
    let accepted = [
        chat(json!({"response_format": {"type": "text"}, "functions": [], "function_call": "none"})),
        chat(json!({"tools": [], "tool_choice": "none", "parallel_tool_calls": true})),
        chat(json!({"metadata": {"team": "whales"}, "store": false, "user": "u1", "min_p": null})),
    ];
    for body in accepted {
        let r = post(server.addr, CHAT, &body);
        assert_eq!(r.status, 200, "{body}: {}", r.text());
    }
}

#[test]
fn type_errors_and_cost_limits_name_the_parameter() {
    let server = Server::start(&[]);
    let cases = [
        (CHAT, chat(json!({"max_tokens": "abc"})), "max_tokens"),
        (CHAT, chat(json!({"max_tokens": -1})), "max_tokens"),
        (CHAT, chat(json!({"max_tokens": 1.5})), "max_tokens"),
        (CHAT, chat(json!({"temperature": "hot"})), "temperature"),
        (CHAT, chat(json!({"stop": 5})), "stop"),
        (CHAT, chat(json!({"messages": [{"role": "user", "content": 5}]})), "messages[0].content"),
        (CHAT, chat(json!({"messages": [{"role": "wizard", "content": "hi"}]})), "messages[0].role"),
        (COMPLETIONS, completion(json!({"prompt": "a".repeat(5000)})), "prompt"),
        (COMPLETIONS, completion(json!({"stop": vec!["x"; 17]})), "stop"),
        (COMPLETIONS, completion(json!({"stop": ["y".repeat(257)]})), "stop"),
        (COMPLETIONS, completion(json!({"stop_token_ids": vec![1; 65]})), "stop_token_ids"),
        (COMPLETIONS, completion(json!({"stop_token_ids": [1_000_000]})), "stop_token_ids"),
        (COMPLETIONS, completion(json!({"logit_bias": {"abc": 1}})), "logit_bias"),
        (COMPLETIONS, completion(json!({"logit_bias": {"65": "x"}})), "logit_bias"),
        (COMPLETIONS, completion(json!({"logit_bias": {"65": 101}})), "logit_bias"),
        (COMPLETIONS, completion(json!({"logit_bias": {"1000000": 1}})), "logit_bias"),
        (COMPLETIONS, completion(json!({"logit_bias": {"5": 100, "05": 100}})), "logit_bias"),
        (COMPLETIONS, completion(json!({"prompt": [65, 4_000_000_000_u32]})), "prompt"),
    ];
    for (path, body, param) in cases {
        let error = error_of(&post(server.addr, path, &body), 400);
        assert_eq!(error["param"], param, "{body}: {error}");
        assert_eq!(error["type"], "invalid_request_error", "{error}");
        let message = error["message"].as_str().unwrap();
        assert!(!message.contains("template"), "the message exposes internals: {message}");
    }
    let many: serde_json::Map<String, Value> = (0..301).map(|i| (i.to_string(), json!(1))).collect();
    let error = error_of(&post(server.addr, COMPLETIONS, &completion(json!({"logit_bias": many}))), 400);
    assert_eq!(error["param"], "logit_bias", "{error}");
    assert!(error["message"].as_str().unwrap().contains("300"), "the message names the limit: {error}");
}

#[test]
fn logit_bias_forces_and_bans_tokens() {
    let server = Server::start(&[]);
    // The built-in byte tokenizer: token 65 is "A".
    let body = completion(json!({"max_tokens": 6, "temperature": 1.0, "seed": 3, "ignore_eos": true,
                                 "logit_bias": {"65": 100}}));
    let v = post(server.addr, COMPLETIONS, &body).json();
    assert_eq!(v["choices"][0]["text"], "AAAAAA", "{v}");

    let greedy = completion(json!({"max_tokens": 8, "temperature": 0, "ignore_eos": true, "logprobs": 1}));
    let free = post(server.addr, COMPLETIONS, &greedy).json();
    let first = free["choices"][0]["text"].as_str().unwrap().as_bytes()[0];
    let mut banned = greedy.clone();
    banned["logit_bias"] = json!({first.to_string(): -100});
    let v = post(server.addr, COMPLETIONS, &banned).json();
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(!text.as_bytes().contains(&first), "banned byte {first} in {text:?}");
}

#[test]
fn api_keys_guard_v1_and_leave_the_probes_open() {
    let server = Server::start(&["--api-key", "key-one,key-two"]);
    let body = completion(json!({})).to_string();
    for headers in [vec![], vec![("Authorization", "Bearer wrong")], vec![("Authorization", "key-one")]] {
        let r = request_with(server.addr, "POST", COMPLETIONS, &headers, Some(body.as_bytes())).unwrap();
        let error = error_of(&r, 401);
        assert_eq!(error["type"], "authentication_error", "{error}");
    }
    let ok =
        request_with(server.addr, "POST", COMPLETIONS, &[("Authorization", "Bearer key-two")], Some(body.as_bytes()));
    assert_eq!(ok.unwrap().status, 200);
    let models = request_with(server.addr, "GET", "/v1/models", &[("Authorization", "Bearer key-one")], None);
    assert_eq!(models.unwrap().status, 200);
    assert_eq!(get(server.addr, "/v1/models").status, 401);
    for probe in ["/health", "/ready", "/metrics"] {
        assert_eq!(get(server.addr, probe).status, 200, "{probe}");
    }
}

#[test]
fn cors_answers_preflights_and_echoes_only_allowed_origins() {
    let server = Server::start(&["--allowed-origins", "https://app.example", "--api-key", "k"]);
    let preflight = [
        ("Origin", "https://app.example"),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "authorization, content-type, x-stainless-os"),
    ];
    let r = request_with(server.addr, "OPTIONS", CHAT, &preflight, None).unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example"));
    assert!(r.header("access-control-allow-methods").unwrap().contains("POST"));
    assert_eq!(r.header("access-control-allow-headers"), Some("authorization, content-type, x-stainless-os"));
    assert!(r.header("access-control-expose-headers").unwrap().contains("retry-after"));

    // A browser can read the error of an allowed origin; another origin gets no CORS headers.
    let allowed = request_with(server.addr, "GET", "/v1/models", &[("Origin", "https://app.example")], None).unwrap();
    assert_eq!(allowed.status, 401);
    assert_eq!(allowed.header("access-control-allow-origin"), Some("https://app.example"));
    let other = request_with(server.addr, "GET", "/v1/models", &[("Origin", "https://evil.example")], None).unwrap();
    assert_eq!(other.header("access-control-allow-origin"), None);
    let evil_preflight = [("Origin", "https://evil.example"), ("Access-Control-Request-Method", "POST")];
    let r = request_with(server.addr, "OPTIONS", CHAT, &evil_preflight, None).unwrap();
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_ne!(r.status, 204);
}

#[test]
fn every_request_gets_one_access_log_line_without_prompt_text() {
    let server = Server::start_logging(&[], "warn,baleen_access=info");
    let secret = "the-secret-prompt-text";
    let body = completion(json!({"prompt": secret, "max_tokens": 3, "ignore_eos": true}));
    assert_eq!(post(server.addr, COMPLETIONS, &body).status, 200);
    let mut stream_body = chat(json!({"max_tokens": 4, "ignore_eos": true, "stream": true}));
    stream_body["messages"][0]["content"] = json!(secret);
    assert_eq!(EventStream::open(server.addr, CHAT, &stream_body).collect_data().last().unwrap(), "[DONE]");
    assert_eq!(get(server.addr, "/v1/nothing").status, 404);

    let start = Instant::now();
    let lines = loop {
        let lines: Vec<String> = server.stderr_lines().into_iter().filter(|l| l.contains("baleen_access")).collect();
        if lines.len() >= 3 || start.elapsed() > Duration::from_secs(10) {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines.iter().all(|l| !l.contains(secret)), "{lines:#?}");
    let find = |path: &str| lines.iter().find(|l| l.contains(&format!("path={path}"))).unwrap().clone();
    let completion_line = find(COMPLETIONS);
    for part in ["method=POST", "status=200", "completion_tokens=3", "finish_reason=\"length\"", "request_id=\"cmpl-"] {
        assert!(completion_line.contains(part), "{part} missing: {completion_line}");
    }
    let stream_line = find(CHAT);
    for part in ["status=200", "completion_tokens=4", "finish_reason=\"length\"", "request_id=\"chatcmpl-"] {
        assert!(stream_line.contains(part), "{part} missing: {stream_line}");
    }
    assert!(find("/v1/nothing").contains("status=404"));
}

#[test]
fn a_drain_cut_short_ends_streams_with_abort_and_exits_one() {
    let mut server = Server::start(&["--drain-timeout", "1"]);
    let body = chat(json!({"max_tokens": 4000, "ignore_eos": true, "stream": true,
                           "stream_options": {"include_usage": true}}));
    // One 4,000-token stream of the tiny model can finish within the second the drain waits (its context ends at
    // 4,096), so seven more share its decode steps and make each step, and so the stream, take longer.
    let others: Vec<_> = (0..7)
        .map(|_| {
            let mut other = EventStream::open(server.addr, CHAT, &body);
            other.next_data().unwrap();
            std::thread::spawn(move || other.collect_data())
        })
        .collect();
    let mut stream = EventStream::open(server.addr, CHAT, &body);
    stream.next_data().unwrap();
    stream.next_data().unwrap();
    server.sigterm();
    for other in others {
        let data = other.join().unwrap();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    }
    let data = stream.collect_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let errors: Vec<&Value> = chunks.iter().filter(|c| c.get("error").is_some()).collect();
    assert!(errors.is_empty(), "error events: {errors:?}");
    let usage = chunks.last().unwrap();
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() < 4000, "{usage}");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "abort", "{finish}");
    let status = server.wait_exit(Duration::from_secs(30)).expect("serve exits after the drain timeout");
    assert_eq!(status.code(), Some(1), "a drain cut short exits 1");
}

#[test]
fn a_second_signal_aborts_at_once() {
    let mut server = Server::start(&["--drain-timeout", "600"]);
    let body = completion(json!({"max_tokens": 4000, "ignore_eos": true, "stream": true}));
    let mut stream = EventStream::open(server.addr, COMPLETIONS, &body);
    stream.next_data().unwrap();
    server.sigterm();
    std::thread::sleep(Duration::from_millis(300));
    server.sigterm();
    let data = stream.collect_data();
    let finish: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "abort", "{finish}");
    let status = server.wait_exit(Duration::from_secs(30)).expect("serve exits at the second signal");
    assert_eq!(status.code(), Some(1));
}
