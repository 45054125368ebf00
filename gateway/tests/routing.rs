#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The gateway in front of real runtime processes (`builtin:tiny-moe` on 127.0.0.1): load spreading, prefix
//! affinity measured by the runtimes' own prefix-cache counters, streaming, client disconnects, failover and the
//! error answers.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use baleen_api::names::{
    METRIC_GATEWAY_BACKEND_HEALTHY, METRIC_GATEWAY_EJECTIONS_TOTAL, METRIC_GATEWAY_IN_FLIGHT,
    METRIC_GATEWAY_REQUESTS_TOTAL, METRIC_GATEWAY_RETRIES_TOTAL, METRIC_GATEWAY_TIME_TO_FIRST_BYTE_SECONDS,
    METRIC_NUM_REQUESTS_RUNNING, METRIC_NUM_REQUESTS_WAITING, METRIC_PREFIX_CACHE_HITS_TOTAL,
    METRIC_REQUEST_SUCCESS_TOTAL, PATH_GATEWAY_TARGETS,
};
use baleen_gateway::config::{PolicyKind, RoutingArgs};
use common::*;
use http::{Method, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_load_spreads_concurrent_requests_over_the_replicas() {
    let a = Runtime::start(&[]).await;
    let b = Runtime::start(&[]).await;
    let gw = Gw::start(PolicyKind::LeastLoad, &[&a, &b], routing(0.2)).await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let requests: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move { post(&url, &chat(&format!("request number {i}"), 48)).await })
        })
        .collect();
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for request in requests {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert_eq!(answer.json()["usage"]["completion_tokens"], 48);
        *served.entry(answer.backend()).or_default() += 1;
    }
    // In-flight counting alone alternates concurrent arrivals; each replica takes a fair share.
    for runtime in [&a, &b] {
        let n = served.get(&runtime.url).copied().unwrap_or(0);
        assert!(n >= 3, "{} served {n} of 8: {served:?}", runtime.url);
        let counted =
            gw.metric(METRIC_GATEWAY_REQUESTS_TOTAL, &format!("backend=\"{}\",code=\"200\"", runtime.url)).await;
        assert_eq!(counted, n as f64, "requests_total of {}", runtime.url);
        assert_eq!(gw.metric(METRIC_GATEWAY_BACKEND_HEALTHY, &format!("backend=\"{}\"", runtime.url)).await, 1.0);
    }
    assert_eq!(gw.metric(METRIC_GATEWAY_IN_FLIGHT, "").await, 0.0);
    assert_eq!(gw.metric(&format!("{METRIC_GATEWAY_TIME_TO_FIRST_BYTE_SECONDS}_count"), "").await, 8.0);
    // The admin port lists the backends as Prometheus HTTP service discovery: one target group per model.
    let (status, targets) = get(&format!("{}{PATH_GATEWAY_TARGETS}", gw.admin)).await;
    assert_eq!(status, StatusCode::OK);
    let hosts: Vec<String> = [&a, &b].iter().map(|r| r.url.trim_start_matches("http://").to_string()).collect();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&targets).unwrap(), json!([{"targets": hosts, "labels": {}}]));
    gw.stop().await;
}

/// Four documents, four questions each, asked one after another; returns the prefix-cache hits (tokens) the
/// runtimes counted meanwhile and the backends each document went to.
async fn documents(gw: &Gw, replicas: &[&Runtime], tag: &str) -> (f64, Vec<BTreeSet<String>>) {
    let hits = || async {
        let mut sum = 0.0;
        for r in replicas {
            sum += r.metric(METRIC_PREFIX_CACHE_HITS_TOTAL).await;
        }
        sum
    };
    let before = hits().await;
    let mut placement = Vec::new();
    for d in 0..4 {
        // Longer than the gateway's 256 hashed bytes, so the questions after it do not change the hash.
        let document = format!("{tag} document {d}: ") + &"the quick brown fox jumps over the lazy dog. ".repeat(9);
        let mut backends = BTreeSet::new();
        for q in 0..4 {
            let body = json!({
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": document},
                    {"role": "user", "content": format!("question {q}?")},
                ],
                "max_tokens": 2,
                "temperature": 0,
            });
            let answer = post(&format!("{}/v1/chat/completions", gw.url), &body).await;
            assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
            backends.insert(answer.backend());
        }
        placement.push(backends);
    }
    (hits().await - before, placement)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_affinity_keeps_a_prefix_on_one_replica_and_raises_cache_hits_over_round_robin() {
    let a = Runtime::start(&[]).await;
    let b = Runtime::start(&[]).await;
    let gw = Gw::start(PolicyKind::PrefixAffinity, &[&a, &b], routing(0.2)).await;
    let (affinity_hits, placement) = documents(&gw, &[&a, &b], "alpha").await;
    for (d, backends) in placement.iter().enumerate() {
        assert_eq!(backends.len(), 1, "document {d} went to {backends:?}");
    }
    // Same replicas, the baseline policy, new documents of the same shape.
    gw.gateway.set_model(MODEL, PolicyKind::RoundRobin, &[a.url.clone(), b.url.clone()]).unwrap();
    let (round_robin_hits, placement) = documents(&gw, &[&a, &b], "bravo").await;
    assert!(placement.iter().all(|backends| backends.len() == 2), "round robin alternates: {placement:?}");
    eprintln!("prefix-cache hits (tokens): prefix-affinity {affinity_hits}, round-robin {round_robin_hits}");
    // Affinity misses each document once (3 of 4 asks hit); round robin once per replica (2 of 4).
    assert!(
        affinity_hits > 1.3 * round_robin_hits,
        "prefix-affinity {affinity_hits} hit tokens vs round-robin {round_robin_hits}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_as_they_are_made_and_a_client_that_leaves_frees_the_replica() {
    let a = Runtime::start(&[]).await;
    let gw = Gw::start(PolicyKind::LeastLoad, &[&a], routing(0.2)).await;
    let mut body = chat("tell me a long story", 3500);
    body["stream"] = json!(true);
    let response = open(Method::POST, &format!("{}/v1/chat/completions", gw.url), &[], body.to_string()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = response.into_body();
    let mut events = 0;
    while events < 3 {
        let frame = body.frame().await.expect("the stream ended early").unwrap();
        if let Some(data) = frame.data_ref() {
            events += String::from_utf8_lossy(data).matches("data: ").count();
        }
    }
    // The first events are here while the replica is still generating: nothing waited for the end.
    assert_eq!(a.metric(METRIC_NUM_REQUESTS_RUNNING).await, 1.0, "the request should still be running");
    assert_eq!(gw.metric(METRIC_GATEWAY_IN_FLIGHT, "").await, 1.0);
    drop(body);
    let freed = eventually(Duration::from_secs(10), || async { a.metric(METRIC_NUM_REQUESTS_RUNNING).await == 0.0 });
    assert!(freed.await, "the replica still runs the abandoned request");
    let page = get(&format!("{}/metrics", a.url)).await.1;
    assert_eq!(metric(&page, METRIC_REQUEST_SUCCESS_TOTAL, "finished_reason=\"abort\""), 1.0, "{page}");
    assert!(
        eventually(Duration::from_secs(5), || async { gw.metric(METRIC_GATEWAY_IN_FLIGHT, "").await == 0.0 }).await
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_is_retried_none_left_is_503_and_a_returning_replica_is_served() {
    let mut a = Runtime::start(&[]).await;
    let mut b = Runtime::start(&[]).await;
    // Probes only when the test asks for them: the gateway learns of the kill from failed requests alone.
    let gw = Gw::start(PolicyKind::RoundRobin, &[&a, &b], routing(3600.0)).await;
    let url = format!("{}/v1/chat/completions", gw.url);
    a.kill();
    for i in 0..6 {
        let answer = post(&url, &chat(&format!("after the kill {i}"), 4)).await;
        assert_eq!(answer.status, StatusCode::OK, "request {i}: {:?}", answer.body);
        assert_eq!(answer.backend(), b.url);
    }
    assert!(gw.metric(METRIC_GATEWAY_RETRIES_TOTAL, "").await >= 1.0);
    assert_eq!(gw.metric(METRIC_GATEWAY_EJECTIONS_TOTAL, &format!("backend=\"{}\"", a.url)).await, 1.0);

    b.kill();
    let answer = post(&url, &chat("nobody home", 4)).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", answer.body);
    assert!(answer.headers.contains_key(header::RETRY_AFTER));
    let error = answer.error();
    assert_eq!(error["type"], "service_unavailable");
    assert!(error["message"].as_str().unwrap().contains(MODEL), "{error}");

    let back = Runtime::start_on(a.port, &[]).await;
    assert_eq!(back.url, a.url);
    let served = eventually(Duration::from_secs(20), || async {
        gw.gateway.probe_now().await;
        let answer = post(&url, &chat("welcome back", 4)).await;
        answer.status == StatusCode::OK && answer.backend() == back.url
    });
    assert!(served.await, "the returning replica was not served again");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_with_the_right_status() {
    // One running sequence and one waiting at most: the third concurrent request is refused.
    let a = Runtime::start(&["--max-num-seqs", "1", "--max-waiting", "1"]).await;
    let models = [
        (MODEL, PolicyKind::LeastLoad, vec![a.url.clone()]),
        ("ghost", PolicyKind::LeastLoad, vec!["http://127.0.0.1:1".to_string()]),
    ];
    let gw = Gw::start_models(&models, RoutingArgs { max_request_bytes: 4096, ..routing(0.2) }).await;
    let chat_url = format!("{}/v1/chat/completions", gw.url);

    let (status, list) = get(&format!("{}/v1/models", gw.url)).await;
    assert_eq!(status, StatusCode::OK);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "only models with a ready backend: {list}");
    assert_eq!(list["data"][0]["id"], MODEL);

    let answer = send(Method::POST, &chat_url, &[], "{\"model\": ").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.error()["type"], "invalid_request_error");

    let answer = send(Method::POST, &chat_url, &[], json!({"messages": []}).to_string()).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "two models: `model` is required");
    assert_eq!(answer.error()["param"], "model");

    let answer = post(&chat_url, &json!({"model": "gpt-4o", "messages": []})).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let error = answer.error();
    assert_eq!(error["code"], "model_not_found");
    assert!(error["message"].as_str().unwrap().contains(MODEL), "names what is served: {error}");

    let big = chat(&"x".repeat(8192), 4);
    let answer = post(&chat_url, &big).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    answer.error();

    let answer = send(Method::GET, &chat_url, &[], "").await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    answer.error();
    let answer = send(Method::POST, &format!("{}/v1/embeddings", gw.url), &[], "{}").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    answer.error();

    let answer = post(&chat_url, &json!({"model": "ghost", "messages": []})).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.headers.contains_key(header::RETRY_AFTER));
    assert!(answer.error()["message"].as_str().unwrap().contains("ghost"));

    // 429: the replica's one slot runs a stream and its one queue place holds a second request.
    let mut long = chat("a long one", 3500);
    long["stream"] = json!(true);
    let stream = open(Method::POST, &chat_url, &[], long.to_string()).await;
    assert_eq!(stream.status(), StatusCode::OK);
    let mut stream = stream.into_body();
    stream.frame().await.unwrap().unwrap();
    let running = eventually(Duration::from_secs(10), || async { a.metric(METRIC_NUM_REQUESTS_RUNNING).await == 1.0 });
    assert!(running.await, "the stream never ran");
    let queued = {
        let url = chat_url.clone();
        tokio::spawn(async move { post(&url, &chat("queued", 4)).await })
    };
    let waiting = eventually(Duration::from_secs(10), || async { a.metric(METRIC_NUM_REQUESTS_WAITING).await == 1.0 });
    assert!(waiting.await, "{}", get(&format!("{}/metrics", a.url)).await.1);
    let answer = post(&chat_url, &chat("one too many", 4)).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", answer.body);
    assert!(answer.headers.contains_key(header::RETRY_AFTER));
    answer.error();
    drop(stream);
    let queued = queued.await.unwrap();
    assert_eq!(
        queued.status,
        StatusCode::OK,
        "the queued request is served once the stream is gone: {:?}",
        queued.body
    );

    for code in ["400", "404", "405", "413", "429", "503"] {
        assert!(
            gw.metric(METRIC_GATEWAY_REQUESTS_TOTAL, &format!("code=\"{code}\"")).await >= 1.0,
            "no {code} counted"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_required_and_their_limits_refuse_with_429() {
    let a = Runtime::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.yaml");
    std::fs::write(
        &path,
        format!(
            "keys:\n  - name: few-requests\n    sha256: {}\n    requestsPerMinute: 2\n  - name: few-tokens\n    sha256: {}\n    \
             tokensPerMinute: 20\n",
            baleen_gateway::auth::hash_key("sk-requests"),
            baleen_gateway::auth::hash_key("sk-tokens"),
        ),
    )
    .unwrap();
    let routing = RoutingArgs { api_keys: Some(path), ..routing(0.2) };
    let gw = Gw::start(PolicyKind::LeastLoad, &[&a], routing).await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let body = chat("hello", 8).to_string();
    let with = |key: &'static str| [("authorization", key)];

    let answer = send(Method::POST, &url, &[], body.clone()).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.headers[header::WWW_AUTHENTICATE], "Bearer");
    assert_eq!(answer.error()["type"], "authentication_error");
    let answer = send(Method::POST, &url, &with("Bearer sk-wrong"), body.clone()).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let (status, _) = get(&format!("{}/v1/models", gw.url)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the model list needs a key too");
    let (status, _) = get(&format!("{}/health", gw.url)).await;
    assert_eq!(status, StatusCode::OK, "probes need none");

    for _ in 0..2 {
        let answer = send(Method::POST, &url, &with("Bearer sk-requests"), body.clone()).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    }
    let answer = send(Method::POST, &url, &with("Bearer sk-requests"), body.clone()).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.headers[header::RETRY_AFTER], "30");
    assert!(answer.error()["message"].as_str().unwrap().contains("few-requests"));

    // 20 tokens a minute: 8 + 8 pass, the next 8 waits; no max_tokens is refused.
    for _ in 0..2 {
        let answer = send(Method::POST, &url, &with("Bearer sk-tokens"), body.clone()).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    }
    let answer = send(Method::POST, &url, &with("Bearer sk-tokens"), body.clone()).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    let unbounded = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let answer = send(Method::POST, &url, &with("Bearer sk-tokens"), unbounded).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.error()["param"], "max_tokens");

    assert_eq!(
        gw.metric(baleen_api::names::METRIC_GATEWAY_RATE_LIMITED_TOTAL, "key=\"few-requests\",limit=\"requests\"")
            .await,
        1.0
    );
    assert_eq!(
        gw.metric(baleen_api::names::METRIC_GATEWAY_RATE_LIMITED_TOTAL, "key=\"few-tokens\",limit=\"tokens\"").await,
        1.0
    );
    assert!(gw.metric(METRIC_GATEWAY_REQUESTS_TOTAL, "code=\"401\"").await >= 3.0);
    gw.stop().await;
}
