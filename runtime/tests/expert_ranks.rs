#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Expert parallelism across processes on 127.0.0.1: expert-only ranks (`serve --rank R`) and a head
//! (`logits`/`generate`/`serve --rank 0`) exchanging token rows over gRPC in every MoE layer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_baleen-runtime");

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).to_string_lossy().into_owned()
}

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `serve` and waits for its first stdout line starting with `prefix`; returns the process and the address.
fn start(args: &[String], prefix: &str) -> (Proc, String) {
    let mut child = Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().expect("a listening line").unwrap();
    let addr = line.strip_prefix(prefix).unwrap_or_else(|| panic!("unexpected line {line:?}")).to_string();
    std::thread::spawn(move || for _ in lines {});
    (Proc(child), addr)
}

fn expert_rank(model: &str, rank: usize, peers: &str, world: usize, extra: &[&str]) -> Proc {
    expert_rank_http(model, rank, peers, world, extra).0
}

/// An expert-only rank; returns it and the address of its probe/metrics HTTP port (the second listening line).
fn expert_rank_http(model: &str, rank: usize, peers: &str, world: usize, extra: &[&str]) -> (Proc, String) {
    let mut args: Vec<String> = ["serve", "--model", model, "--host", "127.0.0.1", "--port", "0", "--peers", peers]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--rank".into(), rank.to_string(), "--world-size".into(), world.to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(BIN).args(&args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = |prefix: &str| {
        let line = lines.next().expect("a listening line").unwrap();
        line.strip_prefix(prefix).unwrap_or_else(|| panic!("unexpected line {line:?}")).to_string()
    };
    next("baleen-runtime experts listening on grpc://");
    let http_addr = next("baleen-runtime listening on http://");
    std::thread::spawn(move || for _ in lines {});
    (Proc(child), http_addr)
}

fn run_json(args: &[&str]) -> Value {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn max_diff(a: &Value, b: &Value) -> f64 {
    let rows = |v: &Value| -> Vec<f64> {
        v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect()
    };
    rows(a).iter().zip(rows(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

const IDS: &str = "0,45,90,312,71,5,17,200,3,99,150,250";

#[test]
fn two_and_four_rank_groups_match_one_process() {
    for model in [fixture("tiny-v3"), fixture("tiny-v2")] {
        let single = run_json(&["logits", "--model", &model, "--ids", IDS]);
        let single_ids = run_json(&["generate", "--model", &model, "--ids", "0,45,90,312,71", "--max-tokens", "10"]);
        for (world, replicate) in [(2, ""), (4, ""), (4, "7@0,2@3,3@1")] {
            let ports = free_ports(world);
            let peers = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
            let extra: Vec<&str> = if replicate.is_empty() { vec![] } else { vec!["--replicate", replicate] };
            let _ranks: Vec<Proc> = (1..world).map(|r| expert_rank(&model, r, &peers, world, &extra)).collect();
            let ws = world.to_string();
            let mut head = vec!["--rank", "0", "--world-size", &ws, "--peers", &peers];
            head.extend(&extra);
            let mut args = vec!["logits", "--model", &model, "--ids", IDS];
            args.extend(&head);
            let diff = max_diff(&run_json(&args), &single);
            assert!(diff <= 1e-5, "{model} over {world} ranks ({replicate}): logits differ by {diff}");
            let mut args = vec!["generate", "--model", &model, "--ids", "0,45,90,312,71", "--max-tokens", "10"];
            args.extend(&head);
            assert_eq!(run_json(&args)["ids"], single_ids["ids"], "{model} over {world} ranks: greedy ids");
        }
    }
}

fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

fn wait_for(addr: &str, want: u16) {
    let start = Instant::now();
    while http(addr, "GET", "/ready", "").0 != want {
        assert!(start.elapsed() < Duration::from_secs(10), "/ready never became {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_dead_peer_fails_requests_fast_and_the_group_recovers_when_it_returns() {
    let model = "builtin:tiny-moe";
    let ports = free_ports(2);
    let peers = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let rank1 = expert_rank(model, 1, &peers, 2, &[]);
    let args: Vec<String> = ["serve", "--model", model, "--host", "127.0.0.1", "--port", "0", "--peers", &peers]
        .iter()
        .map(|s| s.to_string())
        .chain(["--rank", "0", "--world-size", "2", "--expert-timeout", "2"].iter().map(|s| s.to_string()))
        .collect();
    let (_head, addr) = start(&args, "baleen-runtime listening on http://");
    let body = r#"{"prompt": "Hello", "max_tokens": 8, "temperature": 0}"#;
    wait_for(&addr, 200);
    assert_eq!(http(&addr, "POST", "/v1/completions", body).0, 200);

    drop(rank1);
    let started = Instant::now();
    let (status, text) = http(&addr, "POST", "/v1/completions", body);
    assert!(status >= 500, "expected a server error with the peer gone, got {status}: {text}");
    assert!(started.elapsed() < Duration::from_secs(5), "failing took {:?}", started.elapsed());
    wait_for(&addr, 503);

    let _rank1 = expert_rank(model, 1, &peers, 2, &[]);
    wait_for(&addr, 200);
    assert_eq!(http(&addr, "POST", "/v1/completions", body).0, 200);
}

fn completion_text(addr: &str) -> String {
    let body = r#"{"prompt": "The whale", "max_tokens": 12, "temperature": 0, "ignore_eos": true}"#;
    let (status, raw) = http(addr, "POST", "/v1/completions", body);
    assert_eq!(status, 200, "{raw}");
    let json = raw.split("\r\n\r\n").nth(1).unwrap();
    let v: Value = serde_json::from_str(json).unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

fn head_args(model: &str, rank: usize, world: usize, peers: &str) -> Vec<String> {
    let mut args: Vec<String> =
        ["serve", "--model", model, "--host", "127.0.0.1", "--port", "0"].iter().map(|s| s.to_string()).collect();
    if world > 1 {
        args.extend(["--rank".into(), rank.to_string(), "--world-size".into(), world.to_string()]);
        args.extend(["--peers".into(), peers.into(), "--data-parallel-attention".into()]);
    }
    args
}

#[test]
fn data_parallel_heads_each_serve_what_one_process_serves() {
    let model = "builtin:tiny-moe";
    let (_single, addr) = start(&head_args(model, 0, 1, ""), "baleen-runtime listening on http://");
    wait_for(&addr, 200);
    let want = completion_text(&addr);

    let ports = free_ports(2);
    let peers = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    // Both heads start together: each serves its experts first, then waits for the other.
    let h1 = std::thread::spawn({
        let peers = peers.clone();
        move || start(&head_args(model, 1, 2, &peers), "baleen-runtime listening on http://")
    });
    let (h0, a0) = start(&head_args(model, 0, 2, &peers), "baleen-runtime listening on http://");
    let (_h1, a1) = h1.join().unwrap();
    for addr in [&a0, &a1] {
        wait_for(addr, 200);
        assert_eq!(completion_text(addr), want, "head {addr}");
    }

    // SIGTERM one head: it drains, stops serving its experts and exits 0 at once; the other head fails requests
    // that need those experts, naming the peer, and turns not ready, then recovers when the head returns.
    let mut h0 = h0;
    let stopped = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &h0.0.id().to_string()]).status().unwrap().success());
    let status = h0.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(stopped.elapsed() < Duration::from_secs(5), "stopping took {:?}", stopped.elapsed());
    let (status, text) = http(&a1, "POST", "/v1/completions", r#"{"prompt": "The whale", "max_tokens": 4}"#);
    assert_eq!(status, 500, "{text}");
    assert!(text.contains(&format!("127.0.0.1:{}", ports[0])), "{text}");
    wait_for(&a1, 503);
    let (_h0, a0) = start(&head_args(model, 0, 2, &peers), "baleen-runtime listening on http://");
    wait_for(&a1, 200);
    wait_for(&a0, 200);
    assert_eq!(completion_text(&a1), want);
    assert_eq!(completion_text(&a0), want);
}

#[test]
fn an_expert_rank_serves_probes_and_metrics_but_no_api() {
    let model = "builtin:tiny-moe";
    let ports = free_ports(2);
    let peers = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let (_rank1, addr) = expert_rank_http(model, 1, &peers, 2, &[]);
    assert_eq!(http(&addr, "GET", "/health", "").0, 200);
    let (status, text) = http(&addr, "GET", "/ready", "");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"rank\":1"), "{text}");
    let (status, text) = http(&addr, "POST", "/v1/completions", r#"{"prompt": "x"}"#);
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("\"error\"") && text.contains("head (rank 0)"), "{text}");

    let rows = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("baleen_runtime_expert_rows_served_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let (status, before) = http(&addr, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert_eq!(rows(&before), 0, "{before}");
    let held = before
        .lines()
        .find_map(|l| l.strip_prefix("baleen_runtime_model_weight_bytes{weight_format=\"f32\"} "))
        .unwrap_or_else(|| panic!("no weight bytes in {before}"));
    assert!(held.parse::<u64>().unwrap() > 0, "{held}");
    let ids = "1,2,3,4,5";
    run_json(&[
        "generate",
        "--model",
        model,
        "--ids",
        ids,
        "--max-tokens",
        "4",
        "--rank",
        "0",
        "--world-size",
        "2",
        "--peers",
        &peers,
    ]);
    let (_, after) = http(&addr, "GET", "/metrics", "");
    assert!(rows(&after) > 0, "rank 1 computed no rows for the head: {after}");
    assert!(after.contains("baleen_runtime_expert_compute_seconds_count"), "{after}");
}

#[test]
fn a_head_started_before_its_peers_serves_not_ready_until_they_arrive() {
    let model = "builtin:tiny-moe";
    let ports = free_ports(2);
    let peers = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let args: Vec<String> = ["serve", "--model", model, "--host", "127.0.0.1", "--port", "0", "--peers", &peers]
        .iter()
        .map(|s| s.to_string())
        .chain(["--rank", "0", "--world-size", "2", "--expert-timeout", "1"].iter().map(|s| s.to_string()))
        .collect();
    // The peer is not there: past the start-up wait the head serves anyway, not ready, naming the peer.
    let (_head, addr) = start(&args, "baleen-runtime listening on http://");
    let (status, text) = http(&addr, "GET", "/ready", "");
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("expert peers not ready"), "{text}");
    let _rank1 = expert_rank(model, 1, &peers, 2, &[]);
    wait_for(&addr, 200);
    let body = r#"{"prompt": "Hello", "max_tokens": 4, "temperature": 0}"#;
    assert_eq!(http(&addr, "POST", "/v1/completions", body).0, 200);
}
