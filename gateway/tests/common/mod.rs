//! Shared by the gateway's integration tests: real `baleen-runtime serve --model builtin:tiny-moe` processes on
//! 127.0.0.1, the gateway in-process (its library) or as its binary, and a small HTTP client.
//!
//! The runtime binary is `BALEEN_RUNTIME_BIN`, else `target/<profile>/baleen-runtime` beside this test's
//! binaries (`cargo test --workspace` builds it first; under `cargo test -p baleen-gateway` it is built here when
//! missing).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baleen_api::names::{HEADER_GATEWAY_BACKEND, RUNTIME_LISTENING_PREFIX};
use baleen_gateway::Gateway;
use baleen_gateway::config::{PolicyKind, RoutingArgs};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Loading the tiny model takes about a second; a 2-core machine running tests in parallel needs slack.
pub const READY_WAIT: Duration = Duration::from_secs(180);
pub const MODEL: &str = "tiny-moe";

#[path = "../../../tests/support/runtime_bin.rs"]
mod runtime_bin;
pub use runtime_bin::runtime_bin;

/// One `baleen-runtime serve` process; killed when dropped.
#[derive(Debug)]
pub struct Runtime {
    child: Option<Child>,
    pub url: String,
    pub port: u16,
}

impl Runtime {
    /// Starts the tiny model on a free port (one compute thread) and waits for `/ready`.
    pub async fn start(extra: &[&str]) -> Self {
        Self::start_on(0, extra).await
    }

    /// Starts the tiny model on `port` (0: a free one) and waits for `/ready`.
    pub async fn start_on(port: u16, extra: &[&str]) -> Self {
        let port_arg = port.to_string();
        let mut args =
            vec!["serve", "--model", "builtin:tiny-moe", "--host", "127.0.0.1", "--port", &port_arg, "--threads", "1"];
        args.extend_from_slice(extra);
        let mut child = Command::new(runtime_bin())
            .args(&args)
            .env("BALEEN_RUNTIME_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let line = tokio::time::timeout(
            READY_WAIT,
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).unwrap();
                line
            }),
        )
        .await
        .expect("no listening line in time")
        .unwrap();
        let addr = line
            .trim()
            .strip_prefix(RUNTIME_LISTENING_PREFIX)
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        let runtime = Self { child: Some(child), url: format!("http://{addr}"), port };
        let deadline = Instant::now() + READY_WAIT;
        loop {
            if let Ok((StatusCode::OK, _)) = try_get(&format!("{}/ready", runtime.url)).await {
                return runtime;
            }
            assert!(Instant::now() < deadline, "{} never became ready", runtime.url);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: the process is gone at once, its connections reset.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The sum of a metric's series on the runtime's `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let (status, page) = get(&format!("{}/metrics", self.url)).await;
        assert_eq!(status, StatusCode::OK);
        metric(&page, name, "")
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The gateway, in-process on two free ports; stopped when dropped.
pub struct Gw {
    pub gateway: Gateway,
    pub url: String,
    pub admin: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Gw {
    /// One model, [`MODEL`], over `backends` with `policy`.
    pub async fn start(policy: PolicyKind, backends: &[&Runtime], routing: RoutingArgs) -> Self {
        let urls: Vec<String> = backends.iter().map(|r| r.url.clone()).collect();
        Self::start_models(&[(MODEL, policy, urls)], routing).await
    }

    pub async fn start_models(models: &[(&str, PolicyKind, Vec<String>)], routing: RoutingArgs) -> Self {
        let gateway = Gateway::new(routing.settings().unwrap()).unwrap();
        for (name, policy, urls) in models {
            gateway.set_model(name, *policy, urls).unwrap();
        }
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", api.local_addr().unwrap());
        let admin_url = format!("http://{}", admin.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = gateway.clone();
        let task = tokio::spawn(async move {
            serving
                .serve(api, admin, async {
                    let _ = stopped.await;
                })
                .await
                .expect("the gateway's event loops start");
        });
        // `serve` probes every backend before it accepts; wait for the port to answer.
        let deadline = Instant::now() + Duration::from_secs(30);
        while try_get(&format!("{url}/health")).await.is_err() {
            assert!(Instant::now() < deadline, "the gateway never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { gateway, url, admin: admin_url, stop: Some(stop), task: Some(task) }
    }

    /// The sum of the gateway's metric series whose labels contain `labels` (e.g. `code="200"`).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (status, page) = get(&format!("{}/metrics", self.admin)).await;
        assert_eq!(status, StatusCode::OK);
        metric(&page, name, labels)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(40), task).await.unwrap().unwrap();
        }
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Sums the samples of `name` (exact, with or without labels) whose label set contains `labels`.
pub fn metric(page: &str, name: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && line.contains(labels)
        })
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

pub fn client() -> baleen_gateway::Client {
    baleen_gateway::server::client()
}

async fn try_get(url: &str) -> Result<(StatusCode, String), String> {
    let request = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    let response = client().request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub async fn get(url: &str) -> (StatusCode, String) {
    try_get(url).await.unwrap()
}

/// A request with a raw body; the whole answer.
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Answer {
    let response = open(method, url, headers, body).await;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer { status: parts.status, headers: parts.headers, body }
}

/// A request; the answer with its body not read yet (for streams).
pub async fn open(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> http::Response<Incoming> {
    let mut request = Request::builder().method(method).uri(url).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client().request(request.body(Full::new(body.into())).unwrap()).await.unwrap()
}

pub async fn post(url: &str, body: &Value) -> Answer {
    send(Method::POST, url, &[], body.to_string()).await
}

/// A whole answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The backend that served it (the gateway's header).
    pub fn backend(&self) -> String {
        self.headers
            .get(HEADER_GATEWAY_BACKEND)
            .unwrap_or_else(|| panic!("no {HEADER_GATEWAY_BACKEND} header: {} {:?}", self.status, self.body))
            .to_str()
            .unwrap()
            .to_string()
    }

    /// The OpenAI error object, checked for shape.
    pub fn error(&self) -> Value {
        let body = self.json();
        let error = body["error"].clone();
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        assert!(error["type"].is_string(), "{body}");
        error
    }
}

/// A greedy chat request.
pub fn chat(content: &str, max_tokens: u32) -> Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// Routing settings for tests: fast probes unless a test drives them itself.
pub fn routing(scrape_interval: f64) -> RoutingArgs {
    RoutingArgs { scrape_interval, ..RoutingArgs::default() }
}

/// Polls `check` every 20 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
