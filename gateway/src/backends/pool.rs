//! Each backend's own keep-alive connections (HTTP/1.1, no Nagle), and the HTTP/1.1 client that drives them from
//! the request's own task: a request is written in one piece on a connection that is ready for one (its previous
//! answer fully read), else on a new one; the answer's head is parsed where it is read, and its body is read from
//! the socket as the client's connection asks for it ([`UpstreamBody`]), after which the connection goes back to
//! the pool. No connection task and no channel sits between the two sockets, so a request crosses no task on its
//! way through. No pool key, no absolute URI: requests go out in origin form with the backend's `Host`.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections kept per backend at most (more are closed when their answer is done).
const MAX_POOLED: usize = 512;
/// An answer's head may take at most this many bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Headers an answer may have at most.
const MAX_HEADERS: usize = 100;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 * 1024;
/// A chunk-size line (with extensions) or a trailer line may take at most this many bytes.
const MAX_LINE_BYTES: usize = 4 * 1024;

/// Why a request got no answer head, or an answer's body ended early.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nothing reached the backend: the connection could not be opened.
    #[error("cannot connect to {authority}: {reason}")]
    Connect { authority: String, reason: String },
    /// The connection failed while the request was written or the answer read.
    #[error("connection to {authority}: {source}")]
    Io { authority: String, source: std::io::Error },
    /// The backend closed the connection before its answer was complete.
    #[error("{authority} closed the connection {when}")]
    Closed { authority: String, when: &'static str },
    /// The answer is not HTTP/1.1 as this client reads it.
    #[error("{authority} answered with an invalid HTTP/1.1 message: {reason}")]
    Protocol { authority: String, reason: String },
}

impl SendError {
    /// True when the backend never saw the request.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }
}

/// A connection and the bytes read from it that nothing has consumed yet.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Whether a pooled connection can take a request: open, and with nothing unread (a backend that closed an
    /// idle connection shows as readable end of stream).
    fn is_idle_and_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

type Idle = Arc<Mutex<Vec<Conn>>>;

/// See the module docs.
#[derive(Debug)]
pub struct ConnPool {
    /// `host:port`.
    authority: String,
    idle: Idle,
}

/// What goes to the backend: the request line's method and origin-form target, the headers (hop-by-hop ones and
/// `Host` already removed; `Content-Length` is written from `body`) and the body.
#[derive(Debug)]
pub struct Outgoing<'a> {
    pub method: &'a Method,
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a Bytes,
}

impl ConnPool {
    pub fn new(authority: String) -> Self {
        Self { authority, idle: Idle::default() }
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// A pooled connection that can take a request (closed ones are dropped), if any.
    fn pooled(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if conn.is_idle_and_open() {
                return Some(conn);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let connect = |reason: String| SendError::Connect { authority: self.authority.clone(), reason };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| connect(format!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn { stream, buf: BytesMut::with_capacity(READ_CHUNK) })
    }

    /// Sends `request` and returns the answer's head; its body is read from the connection as it is polled, and
    /// the connection comes back to the pool when the body is done. A pooled connection that ends before any byte
    /// of an answer (the backend closed it idle while the request went out) is replaced by a new one once: a
    /// backend that closes an idle keep-alive connection has not read the request on it.
    pub async fn send(&self, request: &Outgoing<'_>) -> Result<Response<UpstreamBody>, SendError> {
        let wire = encode(request, &self.authority);
        if let Some(mut conn) = self.pooled() {
            match self.exchange(&mut conn, &wire).await {
                Ok(head) => return Ok(self.answer(conn, head, request.method)),
                Err(Exchange::Unanswered(e)) => tracing::debug!("pooled connection to {} ended: {e}", self.authority),
                Err(Exchange::Failed(e)) => return Err(e),
            }
        }
        let mut conn = self.connect().await?;
        match self.exchange(&mut conn, &wire).await {
            Ok(head) => Ok(self.answer(conn, head, request.method)),
            Err(Exchange::Unanswered(e) | Exchange::Failed(e)) => Err(e),
        }
    }

    /// Writes `wire` and reads the answer's head (skipping interim 1xx answers).
    async fn exchange(&self, conn: &mut Conn, wire: &[u8]) -> Result<Head, Exchange> {
        let io = |source| SendError::Io { authority: self.authority.clone(), source };
        conn.stream.write_all(wire).await.map_err(|e| Exchange::Unanswered(io(e)))?;
        // Whether any byte of an answer came back (after which a failure is the backend's, not a stale connection's).
        let mut received = !conn.buf.is_empty();
        loop {
            if let Some(head) = self.parse_head(&mut conn.buf).map_err(Exchange::Failed)? {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                return Ok(head);
            }
            if conn.buf.len() > MAX_HEAD_BYTES {
                return Err(Exchange::Failed(self.protocol(format!("a head over {MAX_HEAD_BYTES} bytes"))));
            }
            conn.buf.reserve(READ_CHUNK);
            match conn.stream.read_buf(&mut conn.buf).await {
                Ok(0) => {
                    let closed = SendError::Closed { authority: self.authority.clone(), when: "before its answer" };
                    return Err(if received { Exchange::Failed(closed) } else { Exchange::Unanswered(closed) });
                }
                Ok(_) => received = true,
                Err(e) if !received && e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(Exchange::Unanswered(io(e)));
                }
                Err(e) => return Err(Exchange::Failed(io(e))),
            }
        }
    }

    /// The head at the start of `buf` (consumed), or `None` when more bytes are needed.
    fn parse_head(&self, buf: &mut BytesMut) -> Result<Option<Head>, SendError> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut slots);
        let len = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(self.protocol(e.to_string())),
        };
        let Some(version) = parsed.version else { return Err(self.protocol("no HTTP version".into())) };
        let status = parsed
            .code
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or_else(|| self.protocol("no valid status code".into()))?;
        let mut headers = HeaderMap::with_capacity(parsed.headers.len());
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| self.protocol(e.to_string()))?;
            let value = HeaderValue::from_bytes(h.value).map_err(|e| self.protocol(e.to_string()))?;
            headers.append(name, value);
        }
        buf.advance(len);
        Ok(Some(Head { status, headers, keep_alive: version == 1 }))
    }

    fn protocol(&self, reason: String) -> SendError {
        SendError::Protocol { authority: self.authority.clone(), reason }
    }

    /// The answer whose `head` was read on `conn`, its body framed as RFC 9112 §6.3 says.
    fn answer(&self, conn: Conn, head: Head, method: &Method) -> Response<UpstreamBody> {
        let Head { status, headers, keep_alive } = head;
        let chunked = headers.get_all(header::TRANSFER_ENCODING).iter().next_back().is_some_and(|v| {
            v.as_bytes().rsplit(|&b| b == b',').next().is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        });
        let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        let framing = if *method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked(Chunk::Size)
        } else if let Some(length) = length {
            Framing::Length(length)
        } else {
            Framing::UntilClose
        };
        let reusable = keep_alive
            && !matches!(framing, Framing::UntilClose)
            && !headers
                .get_all(header::CONNECTION)
                .iter()
                .any(|v| v.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close")));
        let mut body = UpstreamBody {
            conn: Some(conn),
            framing,
            reusable,
            idle: Arc::clone(&self.idle),
            authority: self.authority.clone(),
        };
        if let Framing::Length(0) = framing {
            // No body to wait for: the connection can take the next request now.
            body.finish();
        }
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }
}

/// How an exchange failed: before any byte of an answer came back (a pooled connection may be retried), or after.
enum Exchange {
    Unanswered(SendError),
    Failed(SendError),
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    /// HTTP/1.1 (an HTTP/1.0 answer's connection is not reused).
    keep_alive: bool,
}

/// The request as it goes on the wire: request line, `Host`, the headers, `Content-Length`, the body.
fn encode(request: &Outgoing<'_>, authority: &str) -> Vec<u8> {
    let headers_len: usize = request.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    let mut wire = Vec::with_capacity(64 + request.target.len() + headers_len + request.body.len());
    wire.extend_from_slice(request.method.as_str().as_bytes());
    wire.push(b' ');
    wire.extend_from_slice(request.target.as_bytes());
    wire.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    wire.extend_from_slice(authority.as_bytes());
    wire.extend_from_slice(b"\r\n");
    for (name, value) in request.headers {
        if name == header::CONTENT_LENGTH {
            continue;
        }
        wire.extend_from_slice(name.as_str().as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(value.as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"content-length: ");
    wire.extend_from_slice(request.body.len().to_string().as_bytes());
    wire.extend_from_slice(b"\r\n\r\n");
    wire.extend_from_slice(request.body);
    wire
}

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// Until the backend closes the connection (which is then not reused).
    UntilClose,
    Done,
}

/// Where a chunked body's reading stands.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// At the line break after a chunk's data.
    DataEnd,
    /// In the trailer section after the last chunk.
    Trailers,
}

/// An answer's body, read from its connection as it is polled; the connection goes back to the pool when the body
/// is done (if it may be reused). Dropped before that (the client went away), it closes the connection, so the
/// backend cancels the request and frees its KV cache.
#[derive(Debug)]
pub struct UpstreamBody {
    conn: Option<Conn>,
    framing: Framing,
    reusable: bool,
    idle: Idle,
    authority: String,
}

impl UpstreamBody {
    fn closed(&self, when: &'static str) -> SendError {
        SendError::Closed { authority: self.authority.clone(), when }
    }

    fn protocol(&self, reason: &str) -> SendError {
        SendError::Protocol { authority: self.authority.clone(), reason: reason.into() }
    }

    /// The body is read: the connection goes back to the pool when it may take another request.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < MAX_POOLED {
                idle.push(conn);
            }
        }
    }

    /// Reads more of the connection into its buffer: `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, SendError>> {
        let Some(conn) = self.conn.as_mut() else { return Poll::Ready(Ok(0)) };
        let start = conn.buf.len();
        conn.buf.resize(start + READ_CHUNK, 0);
        let mut read = ReadBuf::new(&mut conn.buf[start..]);
        let polled = Pin::new(&mut conn.stream).poll_read(cx, &mut read);
        let n = read.filled().len();
        conn.buf.truncate(start + n);
        match ready!(polled) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(source) => Poll::Ready(Err(SendError::Io { authority: self.authority.clone(), source })),
        }
    }

    /// Up to `left` bytes of data from the buffer (none when it is empty).
    fn take_data(&mut self, left: u64) -> Option<Bytes> {
        let conn = self.conn.as_mut()?;
        if conn.buf.is_empty() || left == 0 {
            return None;
        }
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(conn.buf.len());
        Some(conn.buf.split_to(n).freeze())
    }

    /// A whole line (without its CRLF) from the buffer, or `None` when it has not all arrived.
    fn take_line(&mut self) -> Result<Option<BytesMut>, SendError> {
        let Some(conn) = self.conn.as_mut() else { return Ok(None) };
        match conn.buf.windows(2).position(|w| w == b"\r\n") {
            Some(at) => {
                let line = conn.buf.split_to(at);
                conn.buf.advance(2);
                Ok(Some(line))
            }
            None if conn.buf.len() > MAX_LINE_BYTES => Err(self.protocol("a chunk line over 4 KiB")),
            None => Ok(None),
        }
    }
}

/// The size of a chunk-size line (`1a;ext=value` → 26).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?.trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = SendError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, SendError>>> {
        let this = &mut *self;
        loop {
            match this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => this.finish(),
                Framing::Length(left) => {
                    if let Some(data) = this.take_data(left) {
                        this.framing = Framing::Length(left - data.len() as u64);
                        if let Framing::Length(0) = this.framing {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(this.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err(this.closed("before the end of its answer's body"))));
                    }
                }
                Framing::UntilClose => {
                    if let Some(data) = this.take_data(u64::MAX) {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(this.poll_fill(cx))? == 0 {
                        this.finish();
                    }
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    if let Some(data) = this.take_data(left) {
                        let left = left - data.len() as u64;
                        this.framing = Framing::Chunked(if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) });
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(this.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err(this.closed("in the middle of a chunk"))));
                    }
                }
                Framing::Chunked(state) => {
                    let Some(line) = this.take_line()? else {
                        if ready!(this.poll_fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(this.closed("before the end of a chunked body"))));
                        }
                        continue;
                    };
                    this.framing = match state {
                        Chunk::Size => match chunk_size(&line) {
                            Some(0) => Framing::Chunked(Chunk::Trailers),
                            Some(size) => Framing::Chunked(Chunk::Data(size)),
                            None => return Poll::Ready(Some(Err(this.protocol("an invalid chunk size")))),
                        },
                        Chunk::DataEnd if line.is_empty() => Framing::Chunked(Chunk::Size),
                        Chunk::DataEnd => {
                            return Poll::Ready(Some(Err(this.protocol("chunk data longer than its size"))));
                        }
                        // Trailer fields are dropped; an empty line ends the body.
                        Chunk::Trailers if line.is_empty() => {
                            this.finish();
                            Framing::Done
                        }
                        Chunk::Trailers | Chunk::Data(_) => Framing::Chunked(state),
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::TcpListener;

    /// A backend on 127.0.0.1 that answers the requests on each connection with the next of `answers` (raw bytes,
    /// `|` marking where it pauses, and whether it closes the connection after; `None` closes it instead of
    /// answering), counting connections.
    async fn backend(answers: Vec<Option<(&'static [u8], bool)>>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        let answers = Arc::new(Mutex::new(answers.into_iter()));
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let answers = Arc::clone(&answers);
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufStream::new(stream);
                    loop {
                        // Read one request: head lines, then its content-length body.
                        let mut length = 0usize;
                        loop {
                            let mut line = String::new();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                                length = v.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0u8; length];
                        stream.read_exact(&mut body).await.unwrap();
                        let next = answers.lock().unwrap().next().flatten();
                        let Some((answer, close)) = next else { return };
                        for piece in answer.split_inclusive(|&b| b == b'|') {
                            let piece = piece.strip_suffix(b"|").unwrap_or(piece);
                            stream.write_all(piece).await.unwrap();
                            stream.flush().await.unwrap();
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (authority, connections)
    }

    async fn get(pool: &ConnPool) -> Result<(StatusCode, Vec<Bytes>), SendError> {
        let (headers, body) = (HeaderMap::new(), Bytes::from_static(b"{\"x\": 1}"));
        let request = Outgoing { method: &Method::POST, target: "/v1/completions", headers: &headers, body: &body };
        let response = pool.send(&request).await?;
        let status = response.status();
        let mut body = response.into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame?.into_data().unwrap());
        }
        Ok((status, frames))
    }

    /// A length-delimited answer, then a chunked one streamed in pieces (a chunk extension, a trailer): both read
    /// whole, each chunk as its own frame, on one reused connection.
    #[tokio::test]
    async fn answers_are_read_by_length_and_by_chunks_on_one_connection() {
        let (authority, connections) = backend(vec![
            Some((b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", false)),
            Some((
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n|7;ext=1\r\ndata: |a\r\n|3\r\nxyz\r\n|0\r\nx-trailer: 1\r\n\r\n",
                false,
            )),
            Some((b"HTTP/1.1 204 No Content\r\n\r\n", false)),
        ])
        .await;
        let pool = ConnPool::new(authority);
        let (status, frames) = get(&pool).await.unwrap();
        assert_eq!((status, frames.concat()), (StatusCode::OK, b"hello".to_vec()));
        let (status, frames) = get(&pool).await.unwrap();
        assert_eq!((status, frames.concat()), (StatusCode::OK, b"data: axyz".to_vec()));
        assert!(frames.len() >= 2, "{frames:?}");
        let (status, frames) = get(&pool).await.unwrap();
        assert_eq!((status, frames.len()), (StatusCode::NO_CONTENT, 0));
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    /// A pooled connection the backend closed is replaced by a new one; `Connection: close` and an answer read
    /// until the end of the stream are not reused; a body cut short is an error.
    #[tokio::test]
    async fn closed_connections_are_replaced_and_cut_bodies_fail() {
        let (authority, connections) = backend(vec![
            Some((b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false)),
            None,
            Some((b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok", true)),
            Some((b"HTTP/1.0 200 OK\r\n\r\nuntil close", true)),
            Some((b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort", true)),
        ])
        .await;
        let pool = ConnPool::new(authority);
        assert_eq!(get(&pool).await.unwrap().1.concat(), b"ok");
        // The backend closes the pooled connection on the next request (unanswered): a new one takes it.
        assert_eq!(get(&pool).await.unwrap().1.concat(), b"ok");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        let answer = get(&pool).await;
        let (_, frames) = answer.unwrap();
        assert_eq!(frames.concat(), b"until close");
        assert_eq!(connections.load(Ordering::SeqCst), 3);
        let err = get(&pool).await.unwrap_err();
        assert!(matches!(err, SendError::Closed { .. }), "{err}");
        assert_eq!(connections.load(Ordering::SeqCst), 4);
    }

    /// Nothing listening: a connect error (the backend never saw the request).
    #[tokio::test]
    async fn an_unreachable_backend_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        drop(listener);
        let err = get(&ConnPool::new(authority)).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
    }

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"1A;name=value"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"xyz"), None);
        assert_eq!(chunk_size(b"ffffffffffffffffff"), None);
    }

    #[test]
    fn requests_go_out_in_origin_form_with_the_backends_host_and_their_length() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let body = Bytes::from_static(b"{}");
        let request = Outgoing { method: &Method::POST, target: "/v1/completions?x=1", headers: &headers, body: &body };
        let wire = encode(&request, "10.0.0.1:8000");
        assert_eq!(
            std::str::from_utf8(&wire).unwrap(),
            "POST /v1/completions?x=1 HTTP/1.1\r\nhost: 10.0.0.1:8000\r\ncontent-type: application/json\r\n\
             content-length: 2\r\n\r\n{}"
        );
    }
}
