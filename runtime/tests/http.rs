#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The HTTP API of `baleen-runtime serve`, end to end: each test starts the real binary on 127.0.0.1 with a free
//! port (`builtin:tiny-moe`), talks plain HTTP/1.1 to it, and kills it when done.

#[path = "http/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "http/server.rs"]
#[allow(dead_code)]
mod server;

use std::time::{Duration, Instant};

use client::{EventStream, get, post, post_raw};
use serde_json::{Value, json};
use server::Server;

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const MODEL: &str = "tiny-moe";

/// Every vLLM metric the design exports.
const VLLM_METRICS: [&str; 14] = [
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:cache_config_info",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
];

fn chat_body(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me about whales."}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn completion_body(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "prompt": "Baleen whales filter"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The value of the first sample of `name` (any labels) in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample of {name} in:\n{text}"))
}

fn assert_openai_error(response: &client::Response, status: u16, kind: &str) -> Value {
    assert_eq!(response.status, status, "{}", response.text());
    let body = response.json();
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(error["type"], kind, "{body}");
    assert!(error.get("param").is_some() && error.get("code").is_some(), "{body}");
    body
}

fn assert_usage(usage: &Value, completion_tokens: Option<u64>) {
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(prompt > 0, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion, "{usage}");
    assert!(usage["prompt_tokens_details"]["cached_tokens"].as_u64().is_some(), "{usage}");
    if let Some(want) = completion_tokens {
        assert_eq!(completion, want, "{usage}");
    }
}

#[test]
fn models_lists_the_served_model_owned_by_baleen() {
    let server = Server::start(&[]);
    let r = get(server.addr, "/v1/models");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["owned_by"], "baleen");
    assert!(v["data"][0]["created"].as_u64().is_some());
}

#[test]
fn health_and_ready_answer_200_while_serving() {
    let server = Server::start(&[]);
    assert_eq!(get(server.addr, "/health").status, 200);
    assert_eq!(get(server.addr, "/ready").status, 200);
}

#[test]
fn chat_completion_returns_an_assistant_message_with_usage() {
    let server = Server::start(&[]);
    let r = post(server.addr, CHAT, &chat_body(json!({"max_tokens": 8, "ignore_eos": true})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").unwrap().starts_with("application/json"));
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_usage(&v["usage"], Some(8));
}

#[test]
fn completion_accepts_text_or_token_ids_and_reports_usage() {
    let server = Server::start(&[]);
    let r = post(server.addr, COMPLETIONS, &completion_body(json!({"max_tokens": 5, "ignore_eos": true})));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"), "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_usage(&v["usage"], Some(5));
    // "Baleen whales filter" in the byte-level tokenizer, plus BOS.
    assert_eq!(v["usage"]["prompt_tokens"], 21);

    let ids = json!({"prompt": [256, 66, 97, 108], "max_tokens": 3, "ignore_eos": true, "logprobs": 2});
    let v = post(server.addr, COMPLETIONS, &completion_body(ids)).json();
    assert_eq!(v["usage"]["prompt_tokens"], 4, "{v}");
    let logprobs = &v["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(logprobs["token_logprobs"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(logprobs["text_offset"].as_array().unwrap().len(), 3, "{v}");
    assert!(logprobs["top_logprobs"][0].as_object().unwrap().len() <= 2, "{v}");
}

#[test]
fn streamed_chat_sends_role_first_then_content_finish_usage_and_done() {
    let server = Server::start(&[]);
    let greedy = json!({"max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let whole = post(server.addr, CHAT, &chat_body(greedy.clone())).json();

    let mut body = chat_body(greedy);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let stream = EventStream::open(server.addr, CHAT, &body);
    assert_eq!(stream.status, 200);
    assert!(stream.header("content-type").unwrap().starts_with("text/event-stream"));
    let data = stream.collect_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.len() >= 3, "{data:?}");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id, "one id for the whole stream");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));

    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_usage(&usage_chunk["usage"], Some(12));

    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let mut text = String::new();
    for c in &chunks[1..chunks.len() - 2] {
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
        assert!(c["choices"][0]["delta"].get("role").is_none());
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    text.push_str(finish["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap(), "streamed = non-streamed (greedy)");
}

#[test]
fn streamed_completion_ends_with_finish_usage_and_done() {
    let server = Server::start(&[]);
    let body = completion_body(json!({
        "max_tokens": 6, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}
    }));
    let data = EventStream::open(server.addr, COMPLETIONS, &body).collect_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "length");
    assert_usage(&chunks[chunks.len() - 1]["usage"], Some(6));
}

#[test]
fn stop_strings_end_generation_before_the_stop_string() {
    let server = Server::start(&[]);
    let base = json!({"prompt": [256, 87, 104, 97, 108, 101], "max_tokens": 40, "temperature": 0, "ignore_eos": true});
    let free = post(server.addr, COMPLETIONS, &completion_body(base.clone())).json();
    let text = free["choices"][0]["text"].as_str().unwrap().to_string();
    // A printable ASCII character from the middle of the greedy text becomes the stop string.
    let (at, stop) = text
        .char_indices()
        .skip(2)
        .find(|(_, c)| c.is_ascii_alphanumeric())
        .unwrap_or_else(|| panic!("no ASCII letter or digit in {text:?}"));
    let mut body = completion_body(base);
    body["stop"] = json!([stop.to_string()]);
    let v = post(server.addr, COMPLETIONS, &body).json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let stopped = v["choices"][0]["text"].as_str().unwrap();
    assert!(!stopped.contains(stop), "{stopped:?} contains the stop string {stop:?}");
    assert_eq!(stopped, &text[..at], "the text up to the first occurrence of the stop string");
}

#[test]
fn max_tokens_ends_with_length_and_exactly_that_many_tokens() {
    let server = Server::start(&[]);
    for max_tokens in [1, 7] {
        let v = post(server.addr, CHAT, &chat_body(json!({"max_tokens": max_tokens, "ignore_eos": true}))).json();
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        assert_eq!(v["usage"]["completion_tokens"], max_tokens, "{v}");
    }
    let v = post(server.addr, CHAT, &chat_body(json!({"max_completion_tokens": 3, "ignore_eos": true}))).json();
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
}

#[test]
fn same_seed_and_temperature_reproduce_the_same_text() {
    let server = Server::start(&[]);
    let sample = |seed: u64| {
        let body = chat_body(json!({"max_tokens": 24, "temperature": 1.0, "seed": seed, "ignore_eos": true}));
        post(server.addr, CHAT, &body).json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    };
    let first = sample(42);
    assert_eq!(sample(42), first, "same seed, same text");
    assert_ne!(sample(7), first, "another seed gives another text");
}

#[test]
fn invalid_requests_are_400_in_the_openai_shape() {
    let server = Server::start(&[]);
    let bad_json = post_raw(server.addr, CHAT, b"{\"model\": ");
    assert_openai_error(&bad_json, 400, "invalid_request_error");
    let missing = post(server.addr, CHAT, &json!({"model": MODEL}));
    assert!(assert_openai_error(&missing, 400, "invalid_request_error").to_string().contains("messages"));

    let n2 = post(server.addr, CHAT, &chat_body(json!({"n": 2})));
    let body = assert_openai_error(&n2, 400, "invalid_request_error");
    assert_eq!(body["error"]["message"], "n: only 1 is supported");
    let cold = post(server.addr, CHAT, &chat_body(json!({"temperature": -1})));
    assert_eq!(assert_openai_error(&cold, 400, "invalid_request_error")["error"]["param"], "temperature");
    let top_p = post(server.addr, COMPLETIONS, &completion_body(json!({"top_p": 1.5})));
    assert_openai_error(&top_p, 400, "invalid_request_error");

    let long_prompt = "a".repeat(5000);
    let too_long = post(server.addr, COMPLETIONS, &completion_body(json!({"prompt": long_prompt})));
    let body = assert_openai_error(&too_long, 400, "invalid_request_error");
    assert!(body["error"]["message"].as_str().unwrap().contains("context length"), "{body}");
    let too_many = post(server.addr, COMPLETIONS, &completion_body(json!({"max_tokens": 100_000})));
    assert_openai_error(&too_many, 400, "invalid_request_error");

    let echo = post(server.addr, COMPLETIONS, &completion_body(json!({"echo": true})));
    assert_openai_error(&echo, 400, "invalid_request_error");
    let batch = post(server.addr, COMPLETIONS, &completion_body(json!({"prompt": ["a", "b"]})));
    assert_openai_error(&batch, 400, "invalid_request_error");
    let image = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]});
    assert_openai_error(&post(server.addr, CHAT, &image), 400, "invalid_request_error");
}

#[test]
fn unknown_models_routes_and_methods_are_404_and_405_json() {
    let server = Server::start(&[]);
    let r = post(server.addr, CHAT, &chat_body(json!({"model": "gpt-4o"})));
    let body = assert_openai_error(&r, 404, "NotFoundError");
    assert_eq!(body["error"]["code"], "model_not_found");
    let r = post(server.addr, COMPLETIONS, &completion_body(json!({"model": "nope"})));
    assert_openai_error(&r, 404, "NotFoundError");

    assert_openai_error(&get(server.addr, "/v1/nothing"), 404, "NotFoundError");
    let wrong_method = client::request(server.addr, "GET", CHAT, None).unwrap();
    assert_eq!(wrong_method.status, 405);
    assert!(wrong_method.json()["error"]["message"].is_string());
}

#[test]
fn oversized_bodies_are_413_before_parsing() {
    let server = Server::start(&["--max-request-bytes", "1000"]);
    let small = post(server.addr, COMPLETIONS, &completion_body(json!({"max_tokens": 1})));
    assert_eq!(small.status, 200, "{}", small.text());
    // Not even JSON: the limit applies before the body is parsed.
    let mut big = b"{\"prompt\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'x', 4000));
    let r = post_raw(server.addr, COMPLETIONS, &big);
    assert_openai_error(&r, 413, "invalid_request_error");
    let mut big_chat = chat_body(json!({}));
    big_chat["messages"][0]["content"] = json!("y".repeat(2000));
    assert_openai_error(&post(server.addr, CHAT, &big_chat), 413, "invalid_request_error");
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let server = Server::start(&["--max-num-seqs", "1", "--max-waiting", "1"]);
    let addr = server.addr;
    let body = completion_body(json!({"max_tokens": 300, "ignore_eos": true}));
    let responses: Vec<client::Response> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20).map(|_| s.spawn(|| post(addr, COMPLETIONS, &body))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let limited: Vec<_> = responses.iter().filter(|r| r.status == 429).collect();
    assert!(ok >= 1, "statuses: {:?}", responses.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(!limited.is_empty(), "statuses: {:?}", responses.iter().map(|r| r.status).collect::<Vec<_>>());
    assert_eq!(ok + limited.len(), 20, "only 200 and 429");
    for r in limited {
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_openai_error(r, 429, "rate_limit_error");
    }
}

#[test]
fn metrics_export_every_vllm_name_with_the_model_name_label() {
    let server = Server::start(&[]);
    assert_eq!(post(server.addr, CHAT, &chat_body(json!({"max_tokens": 4, "ignore_eos": true}))).status, 200);
    // Metrics are eventually consistent with responses (the engine may count a request just after its last
    // event went out), so wait briefly for the finished request to be counted.
    let finished = "vllm:request_success_total{finished_reason=\"length\",model_name=\"tiny-moe\"} 1";
    let start = Instant::now();
    let r = loop {
        let r = get(server.addr, "/metrics");
        if r.text().contains(finished) || start.elapsed() > Duration::from_secs(2) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    let text = r.text();
    for name in VLLM_METRICS {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        let sample = text.lines().find(|l| l.starts_with(name) && !l.starts_with('#')).unwrap();
        assert!(sample.contains(&format!("model_name=\"{MODEL}\"")), "{sample}");
    }
    assert!(metric(&text, "vllm:generation_tokens_total") >= 4.0);
    assert!(metric(&text, "vllm:prompt_tokens_total") > 0.0);
    assert!(text.contains(finished), "{text}");
    assert!(text.contains("vllm:cache_config_info{"));
    assert!(text.contains("baleen_runtime_http_requests_total{code=\"200\",route=\"/v1/chat/completions\"} 1"));
    // Every token row of every MoE layer is counted once per routed expert (tiny-moe: layers 1–3, top-4).
    let routed: f64 = text
        .lines()
        .filter(|l| l.starts_with("baleen_runtime_expert_tokens_total{") && l.contains("layer=\"1\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    let tokens = metric(&text, "vllm:prompt_tokens_total") + metric(&text, "vllm:generation_tokens_total") - 1.0;
    assert_eq!(routed, 4.0 * tokens, "expert token counts of layer 1");
}

/// `serve --quantize int8` answers on int8 weights and reports the bytes it holds, less than half of f32's.
#[test]
fn a_server_on_int8_weights_reports_its_resident_bytes() {
    let gauge = |text: &str, format: &str| {
        metric(text, &format!("baleen_runtime_model_weight_bytes{{weight_format=\"{format}\"}}"))
    };
    let wide = Server::start(&[]);
    let f32_bytes = gauge(&get(wide.addr, "/metrics").text(), "f32");
    let server = Server::start(&["--quantize", "int8"]);
    assert_eq!(post(server.addr, CHAT, &chat_body(json!({"max_tokens": 4, "ignore_eos": true}))).status, 200);
    let int8_bytes = gauge(&get(server.addr, "/metrics").text(), "int8");
    assert!(int8_bytes > 0.0 && 2.0 * int8_bytes < f32_bytes, "int8 {int8_bytes} bytes, f32 {f32_bytes}");
}

/// Waits until the engine reports no running request, and returns how many tokens were generated by then.
fn wait_until_nothing_runs(server: &Server, within: Duration) -> f64 {
    let start = Instant::now();
    loop {
        let text = get(server.addr, "/metrics").text();
        if metric(&text, "vllm:num_requests_running") == 0.0 {
            return metric(&text, "vllm:generation_tokens_total");
        }
        assert!(start.elapsed() < within, "still running {within:?} after the client left");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_until_running(server: &Server) {
    let start = Instant::now();
    while metric(&get(server.addr, "/metrics").text(), "vllm:num_requests_running") < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(10), "the request never started running");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_client_disconnect_cancels_its_stream() {
    let server = Server::start(&[]);
    let mut body = chat_body(json!({"max_tokens": 4000, "ignore_eos": true, "stream": true}));
    body["messages"][0]["content"] = json!("hi");
    let mut stream = EventStream::open(server.addr, CHAT, &body);
    assert_eq!(stream.status, 200);
    let role = stream.next_data().unwrap();
    assert!(role.contains("\"role\":\"assistant\""), "{role}");
    stream.next_data().unwrap();
    let running = metric(&get(server.addr, "/metrics").text(), "vllm:num_requests_running");
    assert_eq!(running, 1.0, "the request runs while streaming");
    drop(stream);

    let generated = wait_until_nothing_runs(&server, Duration::from_secs(5));
    assert!(generated < 4000.0, "cancelled before the end: {generated} tokens generated");
    assert_eq!(get(server.addr, "/ready").status, 200);
}

#[test]
fn a_client_disconnect_cancels_a_non_streamed_request() {
    let server = Server::start(&[]);
    let body = completion_body(json!({"max_tokens": 4000, "ignore_eos": true}));
    let connection = client::send_only(server.addr, "POST", COMPLETIONS, body.to_string().as_bytes());
    wait_until_running(&server);
    drop(connection);
    let generated = wait_until_nothing_runs(&server, Duration::from_secs(5));
    assert!(generated < 4000.0, "cancelled before the end: {generated} tokens generated");
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let mut server = Server::start(&[]);
    let addr = server.addr;
    let body = completion_body(json!({"max_tokens": 1500, "ignore_eos": true}));
    let in_flight = std::thread::spawn(move || post(addr, COMPLETIONS, &body));
    wait_until_running(&server);
    server.sigterm();

    // Draining: new work is refused with 503 (or, once the server has exited, the connection is refused).
    std::thread::sleep(Duration::from_millis(100));
    match client::request(
        addr,
        "POST",
        COMPLETIONS,
        Some(completion_body(json!({"max_tokens": 1})).to_string().as_bytes()),
    ) {
        Ok(r) => {
            assert_openai_error(&r, 503, "service_unavailable");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
    };
    if let Ok(r) = client::request(addr, "GET", "/ready", None) {
        assert_eq!(r.status, 503);
    }

    let done = in_flight.join().unwrap();
    assert_eq!(done.status, 200, "{}", done.text());
    assert_eq!(done.json()["usage"]["completion_tokens"], 1500);
    let status = server.wait_exit(Duration::from_secs(30)).expect("serve exits after draining");
    assert!(status.success(), "exit status {status:?}");
    // stdout is a contract: the listening line only (the final state goes to the log on stderr).
    let last = server.stdout_after_listening();
    assert!(last.is_empty(), "{last:?}");
}
