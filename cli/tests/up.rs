#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `baleen up` through the real binaries: `baleen` starts the real `baleen-runtime serve` on 127.0.0.1 port 0,
//! answers OpenAI requests, and stops cleanly on SIGINT / SIGTERM; bad manifests fail naming the field.
//!
//! The runtime binary is the one cargo built next to `baleen` (`target/<profile>/baleen-runtime`).
//! `cargo test --workspace` (scripts/test.sh) builds it before any test runs; under `cargo test -p baleen` it is
//! built here when missing (`cargo build -p baleen-runtime`), and `BALEEN_RUNTIME_BIN` overrides the path.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// Loading the tiny model takes about a second; a loaded 2-core machine running tests in parallel needs slack.
const READY_WAIT: Duration = Duration::from_secs(180);
const EXIT_WAIT: Duration = Duration::from_secs(90);

fn baleen_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baleen")
}

#[path = "../../tests/support/runtime_bin.rs"]
mod runtime_bin;
use runtime_bin::runtime_bin;

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn get(url: &str) -> (u16, String) {
    let mut response = http().get(url).call().unwrap();
    (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
}

fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let mut response = http().post(url).header("Content-Type", "application/json").send(body.to_string()).unwrap();
    let text = response.body_mut().read_to_string().unwrap();
    (response.status().as_u16(), serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

/// A running `baleen up`, its stdout lines as they come and its stderr as a whole.
struct Up {
    child: Child,
    lines: Receiver<String>,
    stdout: Vec<String>,
    stderr: Arc<Mutex<String>>,
    /// The first head's pid.
    runtime_pid: Option<i32>,
    head_pids: Vec<i32>,
    rank_pids: Vec<i32>,
}

impl Up {
    fn start(extra: &[&str]) -> Self {
        let mut child = Command::new(baleen_bin())
            .arg("up")
            .args(extra)
            .args(["--port", "0", "--admin-port", "0", "--ready-timeout", "170", "--runtime-bin"])
            .arg(runtime_bin())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            child,
            lines,
            stdout: Vec::new(),
            stderr,
            runtime_pid: None,
            head_pids: Vec::new(),
            rank_pids: Vec::new(),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The first stdout line (from the start) containing `needle`; fails after `timeout` or at EOF.
    fn line_with(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(line) = self.stdout.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    // `loading model SOURCE (… processes: pid runtime 12, rank 1 34)…`: heads are `runtime` or `rN`.
                    if line.starts_with("loading model ")
                        && let Some(list) = line.split("pid ").nth(1)
                    {
                        for entry in list.trim_end_matches(")…").split(", ") {
                            let (name, pid) = entry.rsplit_once(' ').unwrap();
                            let pid = pid.parse::<i32>().unwrap();
                            if name == "runtime" || (name.starts_with('r') && !name.contains(['.', ' '])) {
                                self.runtime_pid.get_or_insert(pid);
                                self.head_pids.push(pid);
                            } else {
                                self.rank_pids.push(pid);
                            }
                        }
                    }
                    self.stdout.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no `{needle}` within {timeout:?}; stdout: {:#?}\nstderr:\n{}", self.stdout, self.stderr())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("stdout closed without `{needle}`; stdout: {:#?}\nstderr:\n{}", self.stdout, self.stderr())
                }
            }
        }
    }

    /// The printed OpenAI base URL, once the runtime is ready.
    fn base_url(&mut self) -> String {
        let line = self.line_with("OpenAI base URL: ", READY_WAIT);
        line.split("OpenAI base URL: ").nth(1).unwrap().trim().to_string()
    }

    /// The first head's own URL (`runtime listening on http://…`), behind the gateway: its `/metrics`.
    fn runtime_url(&mut self) -> String {
        let line = self.line_with(" listening on http://", READY_WAIT);
        format!("http://{}", line.split(" listening on http://").nth(1).unwrap().trim())
    }

    /// The gateway's `/metrics` URL, once ready.
    fn gateway_metrics(&mut self) -> String {
        let line = self.line_with("gateway metrics: ", Duration::from_secs(5));
        line.split("gateway metrics: ").nth(1).unwrap().trim().to_string()
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(i32::try_from(self.child.id()).unwrap()), signal).unwrap();
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads take the last output.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.stdout.push(line);
                }
                return status;
            }
            assert!(Instant::now() < deadline, "baleen still running after {timeout:?}; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    /// A failed test must not leave processes behind: ask, then kill `baleen` and its runtime.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && self.child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in self.head_pids.iter().chain(&self.rank_pids) {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}

fn host_port(base_url: &str) -> SocketAddr {
    base_url.trim_start_matches("http://").trim_end_matches("/v1").parse().unwrap()
}

fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn chat(base: &str, model: &str, max_tokens: u32) -> (u16, Value) {
    post_json(
        &format!("{base}/chat/completions"),
        &json!({
            "model": model,
            "messages": [{"role": "user", "content": "Hello, whale!"}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": true,
        }),
    )
}

fn write_manifest(dir: &Path, spec: &str) -> PathBuf {
    let path = dir.join("model.yaml");
    std::fs::write(
        &path,
        format!("apiVersion: baleen.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: whale\nspec:\n{spec}"),
    )
    .unwrap();
    path
}

fn run_to_end(args: &[&str]) -> Output {
    Command::new(baleen_bin()).args(args).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn up_without_a_manifest_serves_the_demo_and_ctrl_c_stops_it_cleanly() {
    let mut up = Up::start(&[]);
    let base = up.base_url();
    assert!(base.starts_with("http://127.0.0.1:") && base.ends_with("/v1"), "{base}");
    let addr = host_port(&base);
    assert_ne!(addr.port(), 0);
    assert!(up.line_with("model:", Duration::from_secs(5)).ends_with(" tiny-moe"));
    up.line_with("builtin:tiny-moe has random weights", Duration::from_secs(5));
    let runtime_pid = up.runtime_pid.expect("the runtime pid is printed");

    let (status, body) = chat(&base, "tiny-moe", 8);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(!body["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 8, "{body}");

    // The printed curl line works as printed.
    let curl = up.line_with("curl -sS ", Duration::from_secs(5));
    if Command::new("curl").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success()) {
        let out = Command::new("sh").arg("-c").arg(curl.trim()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["model"], "tiny-moe", "{v}");
        assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    }

    up.signal(Signal::SIGINT);
    let status = up.wait(EXIT_WAIT);
    assert!(status.success(), "{status}; stderr:\n{}", up.stderr());
    assert!(up.stdout.iter().any(|l| l.starts_with("stopped")), "{:#?}", up.stdout);
    assert!(!process_exists(runtime_pid), "the runtime {runtime_pid} outlived baleen");
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(), "{addr} still accepts connections");
    let stderr = up.stderr();
    assert!(stderr.contains("runtime | ") && stderr.contains("draining"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "forwarded logs carry colour codes:\n{stderr}");
}

#[test]
fn up_serves_a_manifest_under_its_served_name_and_sigterm_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        r#"  model:
    source: builtin:tiny-moe
    servedName: whale-demo
  runtime:
    maxNumSeqs: 4
    maxModelLen: 256
    kvCacheMemory: "16MiB"
    args: ["--max-waiting", "8"]
    env:
      - name: BALEEN_RUNTIME_BLOCK_SIZE
        value: "32"
"#,
    );
    let mut up = Up::start(&[manifest.to_str().unwrap()]);
    let base = up.base_url();
    assert!(up.line_with("model:", Duration::from_secs(5)).ends_with(" whale-demo"));

    let (status, models) = get(&format!("{base}/models"));
    assert_eq!(status, 200, "{models}");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "whale-demo", "{models}");
    let (status, body) = chat(&base, "whale-demo", 4);
    assert_eq!(status, 200, "{body}");
    // maxModelLen reached the runtime: a request that cannot fit in 256 tokens is refused.
    let (status, body) = chat(&base, "whale-demo", 1000);
    assert_eq!(status, 400, "{body}");
    // spec.runtime.env reached the runtime: its KV cache uses 32-token blocks.
    let root = up.runtime_url();
    let (status, metrics) = get(&format!("{root}/metrics"));
    assert_eq!(status, 200);
    let info = metrics.lines().find(|l| l.starts_with("vllm:cache_config_info{")).unwrap_or_default();
    assert!(info.contains("block_size=\"32\""), "{info}");

    up.signal(Signal::SIGTERM);
    let status = up.wait(EXIT_WAIT);
    assert!(status.success(), "{status}; stderr:\n{}", up.stderr());
    assert!(up.stdout.iter().any(|l| l.starts_with("stopped")), "{:#?}", up.stdout);
}

#[test]
fn ctrl_c_lets_in_flight_requests_finish() {
    let mut up = Up::start(&[]);
    let base = up.base_url();
    let root = up.runtime_url();
    let request = {
        let base = base.clone();
        std::thread::spawn(move || chat(&base, "tiny-moe", 2000))
    };
    // Wait until the request is in the running batch, then ask baleen to stop.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, metrics) = get(&format!("{root}/metrics"));
        let running = metrics.lines().any(|l| l.starts_with("vllm:num_requests_running{") && l.ends_with(" 1"));
        if running {
            break;
        }
        assert!(!request.is_finished(), "the request finished before the signal; make it longer");
        assert!(Instant::now() < deadline, "the request never ran:\n{metrics}");
        std::thread::sleep(Duration::from_millis(10));
    }
    up.signal(Signal::SIGINT);
    let (status, body) = request.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 2000, "{body}");
    assert!(up.wait(EXIT_WAIT).success(), "{}", up.stderr());
}

#[test]
fn the_example_manifest_runs_locally() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/tiny-local.yaml");
    let mut up = Up::start(&[example.to_str().unwrap()]);
    let base = up.base_url();
    let (status, _) = get(&format!("{}/ready", base.trim_end_matches("/v1")));
    assert_eq!(status, 200);
    let (status, body) = chat(&base, "tiny-moe", 2);
    assert_eq!(status, 200, "{body}");
    up.signal(Signal::SIGINT);
    assert!(up.wait(EXIT_WAIT).success(), "{}", up.stderr());
}

#[test]
fn the_expert_parallel_example_runs_a_group_of_ranks_locally() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/tiny-cpu-ep2.yaml");
    let mut up = Up::start(&[example.to_str().unwrap()]);
    let base = up.base_url();
    assert_eq!(up.rank_pids.len(), 1, "{:#?}", up.stdout);
    let (status, body) = chat(&base, "tiny-moe", 4);
    assert_eq!(status, 200, "{body}");
    // The head really sent rows to rank 1 over gRPC.
    let (status, metrics) = get(&format!("{}/metrics", up.runtime_url()));
    assert_eq!(status, 200);
    let line = |prefix: &str| metrics.lines().find(|l| l.starts_with(prefix)).unwrap_or_default().to_string();
    assert!(line("baleen_runtime_expert_peer_up{").ends_with(" 1"), "{metrics}");
    let dispatches = line("baleen_runtime_expert_dispatch_seconds_count{");
    assert!(dispatches.rsplit(' ').next().unwrap().parse::<u64>().unwrap() > 0, "{metrics}");

    up.signal(Signal::SIGINT);
    assert!(up.wait(EXIT_WAIT).success(), "{}", up.stderr());
    for pid in up.runtime_pid.iter().chain(&up.rank_pids) {
        assert!(!process_exists(*pid), "process {pid} outlived `baleen up`");
    }
}

#[test]
fn replicas_of_data_parallel_groups_are_served_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        "  model: {source: builtin:tiny-moe}\n  replicas: 2\n  parallelism: {expert: 2, dataParallelAttention: true}\n  \
         routing: {policy: round-robin}\n  runtime: {args: [\"--threads\", \"1\"]}\n",
    );
    let mut up = Up::start(&[manifest.to_str().unwrap()]);
    let base = up.base_url();
    let metrics_url = up.gateway_metrics();
    assert_eq!(up.head_pids.len(), 2, "{:#?}", up.stdout);
    assert_eq!(up.rank_pids.len(), 2, "{:#?}", up.stdout);
    assert!(
        up.stdout.iter().any(|l| l.contains("2 (4 heads behind the gateway, round-robin routing)")),
        "{:#?}",
        up.stdout
    );
    // Round robin over four heads: eight requests reach each head twice.
    let mut served = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..8 {
        let mut response = http()
            .post(&format!("{base}/chat/completions"))
            .header("Content-Type", "application/json")
            .send(json!({"model": "tiny-moe", "messages": [{"role": "user", "content": format!("hi {i}")}], "max_tokens": 2}).to_string())
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{}", response.body_mut().read_to_string().unwrap());
        let backend = response.headers().get("x-baleen-backend").unwrap().to_str().unwrap().to_string();
        *served.entry(backend).or_default() += 1;
    }
    assert_eq!(served.len(), 4, "{served:?}");
    assert!(served.values().all(|n| *n == 2), "{served:?}");
    let (status, metrics) = get(&metrics_url);
    assert_eq!(status, 200);
    let ready = metrics.lines().find(|l| l.starts_with("baleen_gateway_ready_replicas{")).unwrap_or_default();
    assert!(ready.ends_with(" 4"), "{metrics}");

    up.signal(Signal::SIGTERM);
    assert!(up.wait(EXIT_WAIT).success(), "{}", up.stderr());
    for pid in up.head_pids.iter().chain(&up.rank_pids) {
        assert!(!process_exists(*pid), "process {pid} outlived `baleen up`");
    }
}

#[test]
fn a_runtime_that_dies_while_serving_is_restarted_with_back_off() {
    let mut up = Up::start(&[]);
    let base = up.base_url();
    let mut pid = up.runtime_pid.unwrap();
    for (restart, delay) in [(1, 1), (2, 2)] {
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        let line = up.line_with(&format!("runtime restarting (restart {restart}): pid runtime "), READY_WAIT);
        pid = line.rsplit(' ').next().unwrap().parse().unwrap();
        let stderr = up.stderr();
        assert!(stderr.contains("exited on its own"), "{stderr}");
        assert!(stderr.contains(&format!("restarting runtime in {delay} s")), "the back-off doubles: {stderr}");
        // Ready again behind the same URL.
        let deadline = Instant::now() + READY_WAIT;
        loop {
            let body = json!({"model": "tiny-moe", "prompt": "hi", "max_tokens": 2});
            let (status, answer) = post_json(&format!("{base}/completions"), &body);
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "{answer}");
            assert!(Instant::now() < deadline, "not serving again after restart {restart}: {answer}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(up.stdout.iter().any(|l| l.contains("runtime ready in")), "{:#?}", up.stdout);
    up.signal(Signal::SIGTERM);
    assert!(up.wait(EXIT_WAIT).success(), "{}", up.stderr());
    assert!(!process_exists(pid), "the restarted runtime {pid} outlived `baleen up`");
}

#[test]
fn a_runtime_that_fails_to_start_makes_up_fail_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        "  model: {source: builtin:tiny-moe}\n  runtime: {args: [\"--block-size\", \"0\"]}\n",
    );
    let mut up = Up::start(&[manifest.to_str().unwrap()]);
    let status = up.wait(EXIT_WAIT);
    assert!(!status.success());
    let stderr = up.stderr();
    assert!(stderr.contains("block-size") && stderr.contains("exited before it was ready"), "{stderr}");
}

#[test]
fn invalid_manifests_fail_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &[&str]); 7] = [
        (
            "bad kind",
            "apiVersion: baleen.dev/v1alpha1\nkind: Deployment\nmetadata: {name: x}\nspec: {model: {source: builtin:tiny-moe}}\n",
            &["`kind`", "ModelDeployment"],
        ),
        (
            "bad apiVersion",
            "apiVersion: baleen.dev/v1\nkind: ModelDeployment\nmetadata: {name: x}\nspec: {model: {source: builtin:tiny-moe}}\n",
            &["`apiVersion`", "baleen.dev/v1alpha1"],
        ),
        ("misspelt field", "  model:\n    sorce: builtin:tiny-moe\n", &["spec.model", "unknown field `sorce`"]),
        (
            "pvc source",
            "  model: {source: pvc://weights/v3}\n",
            &["`spec.model.source`", "pvc://weights/v3", "cluster", "hf://", "file://"],
        ),
        (
            "unknown policy",
            "  model: {source: builtin:tiny-moe}\n  routing: {policy: fastest}\n",
            &["spec.routing.policy", "fastest"],
        ),
        ("zero replicas", "  model: {source: builtin:tiny-moe}\n  replicas: 0\n", &["`spec.replicas`"]),
        ("unknown scheme", "  model: {source: s3://bucket/model}\n", &["`spec.model.source`", "s3://bucket/model"]),
    ];
    for (what, yaml, wants) in cases {
        let path = dir.path().join("m.yaml");
        let text = if yaml.starts_with("apiVersion") {
            yaml.to_string()
        } else {
            format!("apiVersion: baleen.dev/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: m\nspec:\n{yaml}")
        };
        std::fs::write(&path, text).unwrap();
        let out = run_to_end(&[
            "up",
            path.to_str().unwrap(),
            "--port",
            "0",
            "--admin-port",
            "0",
            "--runtime-bin",
            "/nonexistent/rt",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: succeeded");
        for want in wants {
            assert!(stderr.contains(want), "{what}: stderr lacks `{want}`:\n{stderr}");
        }
        assert!(out.stdout.is_empty(), "{what}: started something: {}", String::from_utf8_lossy(&out.stdout));
    }
    let out = run_to_end(&["up", "/nonexistent/model.yaml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading the manifest /nonexistent/model.yaml"));
}

#[test]
fn a_missing_runtime_binary_says_how_to_build_it() {
    let out = run_to_end(&["up", "--port", "0", "--admin-port", "0", "--runtime-bin", "/nonexistent/baleen-runtime"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/baleen-runtime") && stderr.contains("cargo build --release"), "{stderr}");
}

/// The value of the gateway metric series starting with `prefix` (e.g. `name{model="m"}`), 0 when absent.
fn gauge(metrics_url: &str, prefix: &str) -> f64 {
    let (_, text) = get(metrics_url);
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

/// The end of an autoscaling run at 2 replicas: idle, down to one after the scale-down window and to zero after
/// the idle time, each replica drained; one request served from zero again; every answer the gateway gave (the
/// `answers` before this, and that one) a 200; a clean stop.
fn idle_to_zero_and_back_without_failures(mut up: Up, base: &str, metrics: &str, answers: u32) {
    up.line_with("from 2 to 1 replica", Duration::from_secs(60));
    up.line_with("from 1 to 0 replicas (ToZero", Duration::from_secs(60));
    up.line_with("r1 stopped (drained)", Duration::from_secs(30));
    up.line_with("r2 stopped (drained)", Duration::from_secs(30));
    assert_eq!(gauge(metrics, "baleen_gateway_desired_replicas{model=\"tiny-moe\"}"), 0.0);

    let (status, body) = chat(base, "tiny-moe", 2);
    assert_eq!(status, 200, "{body}");
    up.line_with("r3 ready in", Duration::from_secs(5));

    let (_, text) = get(metrics);
    let counted: Vec<&str> = text.lines().filter(|l| l.starts_with("baleen_gateway_requests_total{")).collect();
    assert!(counted.iter().all(|l| l.contains("code=\"200\"")), "{counted:#?}");
    let ok: f64 = counted.iter().filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
    assert_eq!(ok, f64::from(answers + 1), "{counted:#?}");
    up.signal(Signal::SIGINT);
    assert!(up.wait(EXIT_WAIT).success(), "{}", up.stderr());
}

#[test]
fn autoscaling_starts_from_zero_on_a_request_scales_up_under_load_and_back_to_zero_without_failures() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        "  model: {source: builtin:tiny-moe}\n  replicas: 0\n  autoscaling:\n    minReplicas: 0\n    maxReplicas: 2\n    \
         metric: {type: RunningRequests}\n    target: 1\n    scaleDownStabilizationSeconds: 2\n    \
         scaleToZeroAfterSeconds: 6\n  runtime: {args: [\"--threads\", \"1\"]}\n",
    );
    let windows = ["--scrape-interval", "0.2", "--autoscale-stable-window", "1", "--autoscale-panic-window", "0.4"];
    let mut up = Up::start(&[&[manifest.to_str().unwrap()][..], &windows[..]].concat());
    let base = up.base_url();
    let metrics = up.gateway_metrics();
    assert!(up.stdout.iter().any(|l| l.contains("0 replicas until the first request")), "{:#?}", up.stdout);
    assert!(up.stdout.iter().any(|l| l.contains("autoscaled 0..=2 on RunningRequests")), "{:#?}", up.stdout);
    // At zero the model is listed, nothing runs, and the autoscaler wants nothing.
    let (status, models) = get(&format!("{base}/models"));
    assert_eq!(status, 200);
    assert!(models.contains("\"tiny-moe\""), "{models}");
    assert_eq!(gauge(&metrics, "baleen_gateway_desired_replicas{model=\"tiny-moe\"}"), 0.0);
    assert_eq!(gauge(&metrics, "baleen_gateway_ready_replicas{model=\"tiny-moe\"}"), 0.0);

    // One request at zero is held, starts a replica, and is served.
    let cold = Instant::now();
    let (status, body) = chat(&base, "tiny-moe", 4);
    let cold_start = cold.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    assert!(up.line_with("r1 ready in", Duration::from_secs(5)).starts_with("r1 ready"));
    assert!(up.stdout.iter().any(|l| l.contains("from 0 to 1 replica (FromZero")), "{:#?}", up.stdout);
    eprintln!("cold start from zero (tiny-moe, request to answer): {cold_start:?}");

    // Concurrent long requests: the running count swamps one replica, the second starts.
    let wave = |n: usize, max_tokens: u32| -> Vec<std::thread::JoinHandle<(u16, Value)>> {
        (0..n)
            .map(|_| {
                let base = base.clone();
                std::thread::spawn(move || chat(&base, "tiny-moe", max_tokens))
            })
            .collect()
    };
    let burst = Instant::now();
    let first = wave(4, 600);
    // Panic or stable-window scale-up, depending on where the scrapes fall.
    let up_line = up.line_with("from 1 to 2 replicas (", Duration::from_secs(60));
    let reaction = burst.elapsed();
    up.line_with("r2 ready in", Duration::from_secs(60));
    eprintln!(
        "burst reaction (direct scrapes): decided after {reaction:?}, second replica ready after {:?}",
        burst.elapsed()
    );
    assert!(up_line.contains("(Panic;") || up_line.contains("(ScaleUp;"), "{up_line}");
    let second = wave(4, 64);
    let mut answers = 0;
    for request in first.into_iter().chain(second) {
        let (status, body) = request.join().unwrap();
        assert_eq!(status, 200, "{body}");
        answers += 1;
    }

    answers += 1; // the request served from zero
    idle_to_zero_and_back_without_failures(up, &base, &metrics, answers);
}

/// The Debian `prometheus` binary (`scripts/test.sh` installs it); `None` (a loud skip) only outside CI.
fn prometheus_bin() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("prometheus"))
        .find(|path| path.is_file());
    if found.is_none() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "prometheus is not installed (CI=true: a failure)");
        eprintln!("SKIPPING: prometheus is not installed (apt-get install prometheus; scripts/test.sh does)");
    }
    found
}

/// A real Prometheus server on 127.0.0.1, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `bin` on `port`, scraping every second the targets the gateway lists at `targets_url`.
    fn start(bin: &Path, port: u16, targets_url: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: baleen\n    \
                 http_sd_configs: [{{url: \"{targets_url}\", refresh_interval: 1s}}]\n"
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while http().get(&format!("{url}/-/ready")).call().map(|r| r.status().as_u16()).ok() != Some(200) {
            assert!(Instant::now() < deadline, "prometheus did not get ready on {url}");
            std::thread::sleep(Duration::from_millis(200));
        }
        Self { child, url, _dir: dir }
    }

    /// The one number `query` evaluates to now (0 when it selects nothing).
    fn number(&self, query: &str) -> f64 {
        let mut response = http().get(&format!("{}/api/v1/query", self.url)).query("query", query).call().unwrap();
        let answer: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(answer["status"], "success", "{answer}");
        answer["data"]["result"][0]["value"][1].as_str().map_or(0.0, |v| v.parse().unwrap())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn autoscaling_on_a_real_prometheus_server_rises_under_load_falls_to_zero_and_serves_from_zero() {
    let Some(prometheus_bin) = prometheus_bin() else { return };
    let prometheus_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    // Type PromQL: only a Prometheus server answers it (the gateway's own scrapes refuse it), so every decision
    // below came through Prometheus. Per replica: its running requests.
    let manifest = write_manifest(
        dir.path(),
        "  model: {source: builtin:tiny-moe}\n  replicas: 0\n  autoscaling:\n    minReplicas: 0\n    maxReplicas: 2\n    \
         metric:\n      type: PromQL\n      query: 'avg(vllm:num_requests_running{model_name=\"$model\"})'\n    \
         target: 1\n    scaleDownStabilizationSeconds: 2\n    scaleToZeroAfterSeconds: 15\n  \
         runtime: {args: [\"--threads\", \"1\"]}\n",
    );
    let prometheus_url = format!("http://127.0.0.1:{prometheus_port}");
    let flags = ["--scrape-interval", "0.5", "--autoscale-stable-window", "2", "--autoscale-panic-window", "1"];
    let mut up = Up::start(&[&[manifest.to_str().unwrap(), "--prometheus-url", &prometheus_url][..], &flags].concat());
    let base = up.base_url();
    let metrics = up.gateway_metrics();
    let targets = metrics.replace("/metrics", "/targets");
    let prometheus = Prometheus::start(&prometheus_bin, prometheus_port, &targets);
    assert!(up.stdout.iter().any(|l| l.contains("autoscaled 0..=2 on PromQL")), "{:#?}", up.stdout);
    assert_eq!(gauge(&metrics, "baleen_gateway_ready_replicas{model=\"tiny-moe\"}"), 0.0);

    // A request at zero is held, starts a replica, and is served.
    let (status, body) = chat(&base, "tiny-moe", 4);
    assert_eq!(status, 200, "{body}");
    up.line_with("r1 ready in", Duration::from_secs(5));
    assert!(up.stdout.iter().any(|l| l.contains("from 0 to 1 replica (FromZero")), "{:#?}", up.stdout);

    // Prometheus applies newly discovered targets at most every 5 s: the burst starts once it scrapes r1.
    let query = "count(vllm:num_requests_running{model_name=\"tiny-moe\"})";
    let scraped = |n: f64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while prometheus.number(query) < n {
            assert!(Instant::now() < deadline, "prometheus never scraped {n} replicas");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    scraped(1.0);

    // Sustained load: 4 clients, each sending one request after another. Prometheus scrapes the replica (found
    // through the gateway's /targets), the gateway's query sees 4 running on 1 replica, the second one starts.
    let burst = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (base, stop) = (base.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut answered = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, body) = chat(&base, "tiny-moe", 300);
                    assert_eq!(status, 200, "{body}");
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let decided = up.line_with("from 1 to 2 replicas (", Duration::from_secs(60));
    let reaction = burst.elapsed();
    up.line_with("r2 ready in", Duration::from_secs(60));
    let second_ready = burst.elapsed();
    assert!(decided.contains("(Panic;") || decided.contains("(ScaleUp;"), "{decided}");
    assert_eq!(gauge(&metrics, "baleen_gateway_desired_replicas{model=\"tiny-moe\"}"), 2.0);
    eprintln!(
        "burst reaction through Prometheus: decided after {reaction:?}, second replica ready after {second_ready:?}"
    );
    // The load goes on until Prometheus scrapes the second replica too.
    scraped(2.0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = 1;
    for client in clients {
        answers += client.join().unwrap();
    }

    idle_to_zero_and_back_without_failures(up, &base, &metrics, answers);
}
