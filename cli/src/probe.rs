//! A minimal HTTP/1.0 GET for the runtime's own endpoints on this machine (`/ready`, `/v1/models`).
//!
//! HTTP/1.0 with `Connection: close` means the body is the rest of the stream (servers do not send chunked bodies
//! to HTTP/1.0 clients), so no client library is needed to ask a local process two questions.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::Error;

/// The runtime's readiness endpoint (200 once the model is loaded).
pub(crate) const READY_PATH: &str = "/ready";
/// Pause between two `/ready` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Time limit of one request to the runtime.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response read; the runtime's answers to these GETs are tiny.
const MAX_RESPONSE_BYTES: u64 = 1 << 20;

/// Polls `/ready` until it answers 200.
pub(crate) async fn wait_ready(addr: SocketAddr) {
    loop {
        match get(addr, READY_PATH, PROBE_TIMEOUT).await {
            Ok(response) if response.status == 200 => return,
            Ok(response) => tracing::debug!(status = response.status, "not ready yet"),
            Err(e) => tracing::debug!(error = %e, "not ready yet"),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET path` from `addr`, all of it within `timeout`.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, Error> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(Error::ProbeIo)?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(Error::ProbeIo)?;
        let mut raw = Vec::new();
        stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut raw).await.map_err(Error::ProbeIo)?;
        parse_response(&raw)
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| Error::ProbeTimeout(timeout))?
}

fn parse_response(raw: &[u8]) -> Result<Response, Error> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(Error::ProbeMalformed("no end of headers"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(Error::ProbeMalformed("no HTTP/1.x status line"));
    }
    let status = parts.next().and_then(|s| s.parse().ok()).ok_or(Error::ProbeMalformed("no status code"))?;
    let chunked = head.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked")
        })
    });
    let body = if chunked { dechunk(body)? } else { body.to_string() };
    Ok(Response { status, body })
}

/// Joins the chunks of a chunked body (for servers that send one to an HTTP/1.0 client anyway).
fn dechunk(mut rest: &str) -> Result<String, Error> {
    let mut body = String::new();
    loop {
        let (size_line, after) = rest.split_once("\r\n").ok_or(Error::ProbeMalformed("truncated chunk size"))?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| Error::ProbeMalformed("bad chunk size"))?;
        if size == 0 {
            return Ok(body);
        }
        let chunk = after.get(..size).ok_or(Error::ProbeMalformed("truncated chunk"))?;
        body.push_str(chunk);
        rest = after.get(size..).and_then(|r| r.strip_prefix("\r\n")).ok_or(Error::ProbeMalformed("chunk end"))?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn plain_and_chunked_bodies_parse() {
        let r = parse_response(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok").unwrap();
        assert_eq!(r, Response { status: 200, body: "ok".into() });
        let r = parse_response(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
            .unwrap();
        assert_eq!(r, Response { status: 503, body: "abcde".into() });
    }

    #[test]
    fn garbage_is_malformed() {
        for raw in [
            &b""[..],
            b"hello\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert!(matches!(parse_response(raw), Err(Error::ProbeMalformed(_))), "{raw:?}");
        }
    }

    #[tokio::test]
    async fn get_reads_a_local_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 1024];
            let n = socket.read(&mut buf).await.unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            socket.write_all(b"HTTP/1.0 200 OK\r\n\r\n{\"ok\":true}").await.unwrap();
            request
        });
        let response = get(addr, "/ready", Duration::from_secs(5)).await.unwrap();
        assert_eq!(response, Response { status: 200, body: "{\"ok\":true}".into() });
        assert!(server.await.unwrap().starts_with("GET /ready HTTP/1.0\r\n"));
    }

    #[tokio::test]
    async fn a_closed_port_is_an_io_error() {
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        assert!(matches!(get(addr, "/ready", Duration::from_secs(5)).await, Err(Error::ProbeIo(_))));
    }
}
