//! A scripted mock API server for tests (the kube-rs controller-rs pattern): the code under test talks to a
//! `kube::Client` whose transport is a `tower-test` mock; the test answers each request in turn and asserts its
//! method, path and body.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// How long the test waits for the next request the code under test must make.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the test waits to be sure that no further request comes.
const QUIET_TIMEOUT: Duration = Duration::from_millis(200);

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// The query string (`""` when none), percent-decoded.
    pub query: String,
    /// The body as JSON (`Null` when empty).
    pub body: Value,
}

/// The test's side of the mock API server.
pub(crate) struct ApiServer {
    handle: Handle,
}

/// A client talking to a new mock API server.
pub(crate) fn pair() -> (kube::Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), ApiServer { handle })
}

fn decode(query: &str) -> String {
    let bytes = query.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

impl ApiServer {
    /// Waits for the next request, asserts its method and path, and answers `status` with `body`.
    pub async fn expect(&mut self, method: Method, path: &str, status: StatusCode, body: Value) -> Seen {
        self.expect_with(method, path, |_| (status, body)).await
    }

    /// Like [`expect`](Self::expect), answering with what `respond` makes of the request.
    pub async fn expect_with(
        &mut self,
        method: Method,
        path: &str,
        respond: impl FnOnce(&Seen) -> (StatusCode, Value),
    ) -> Seen {
        let next = tokio::time::timeout(REQUEST_TIMEOUT, self.handle.next_request()).await;
        let (request, send) = next
            .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
            .unwrap_or_else(|| panic!("the client went away before {method} {path}"));
        let seen_method = request.method().clone();
        let uri = request.uri().clone();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        let seen =
            Seen { method: seen_method, path: uri.path().to_string(), query: decode(uri.query().unwrap_or("")), body };
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&method, path),
            "unexpected request {} {}?{}: {}",
            seen.method,
            seen.path,
            seen.query,
            seen.body
        );
        let (status, reply) = respond(&seen);
        let response = Response::builder().status(status).body(Body::from(serde_json::to_vec(&reply).unwrap()));
        send.send_response(response.unwrap());
        seen
    }

    /// Answers the next request by echoing its body (what a server-side apply or a create returns, near enough).
    pub async fn expect_echo(&mut self, method: Method, path: &str) -> Seen {
        self.expect_with(method, path, |seen| (StatusCode::OK, seen.body.clone())).await
    }

    /// Waits for `task` to finish, failing on any further request it makes.
    pub async fn finish<T>(&mut self, task: impl Future<Output = T>) -> T {
        let task = tokio::time::timeout(REQUEST_TIMEOUT, task);
        tokio::pin!(task);
        tokio::select! {
            biased;
            out = &mut task => out.expect("the task did not finish"),
            request = self.handle.next_request() => match request {
                Some((r, _)) => panic!("unexpected extra request {} {}", r.method(), r.uri()),
                // The client was dropped: the task is ending.
                None => task.await.expect("the task did not finish"),
            },
        }
    }

    /// Asserts that no request arrives for a short while.
    pub async fn expect_quiet(&mut self) {
        if let Ok(Some((r, _))) = tokio::time::timeout(QUIET_TIMEOUT, self.handle.next_request()).await {
            panic!("unexpected extra request {} {}", r.method(), r.uri());
        }
    }
}

/// A Kubernetes `Status` error body.
pub(crate) fn status_error(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": reason, "code": code,
           "message": reason})
}

/// An empty list of `kind`.
pub(crate) fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({"kind": format!("{kind}List"), "apiVersion": api_version, "metadata": {"resourceVersion": "1"},
           "items": items})
}
