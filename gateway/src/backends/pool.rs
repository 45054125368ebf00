//! Each backend's own keep-alive connections (HTTP/1.1, no Nagle), and the HTTP/1.1 client that drives them from
//! the request's own task: a request is written in one piece on a connection that is ready for one (its previous
//! answer fully read, and not closed by the backend meanwhile), else on a new one; the answer's head is parsed
//! where it is read, and its body is read from the socket as the client's connection asks for it
//! ([`UpstreamBody`]), after which the connection goes back to the pool. No connection task and no channel sits
//! between the two sockets, so a request crosses no task on its way through. No pool key, no absolute URI:
//! requests go out in origin form with the backend's `Host`.
//!
//! Idle connections are kept per event loop ([`set_event_loop`]): a connection is registered with the runtime of
//! the loop that opened it, so only that loop takes it again, and a request never waits on another thread's
//! event loop for its answer.

mod body;

use std::cell::Cell;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use baleen_api::names::HEADER_GATEWAY_BACKEND;
use bytes::{Bytes, BytesMut};
use http::{Method, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use body::UpstreamBody;

use crate::wire::{
    Chunk, Codings, Fields, Framing, MAX_HEAD_BYTES, MAX_HEADERS, READ_CHUNK, add_content_length, connection_named,
    connection_options, head_end, is_hop_by_hop, itoa,
};

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per backend and event loop at most (more are closed when their answer is done).
const MAX_POOLED: usize = 512;
/// A pooled connection last taken by a request that began this recently (so given back more recently still) is
/// taken without asking its socket whether the backend closed it, unless the event loop has seen something on it.
/// Backends close idle keep-alive connections after their idle timeout (seconds to minutes: never this soon) or
/// when they stop, whose close the event loop sees at its next turn; a request that meets a close in between fails
/// on that backend and is retried on another. (Bytes a faulty backend sends after its answer are caught the same
/// way, unless they arrive within that instant, when they are read as the start of the next answer.)
const FRESH: Duration = Duration::from_secs(1);
/// A connection keeps the buffer its request heads are written from unless a head made it larger than this.
const MAX_KEPT_HEAD: usize = 16 * 1024;
/// Event loops that keep idle connections apart (`--workers` is at most this); other threads share slot 0.
pub const MAX_EVENT_LOOPS: usize = 64;

thread_local! {
    /// The event loop this thread runs, from 1 (0: none of them — the admin port's runtime, tests).
    static EVENT_LOOP: Cell<usize> = const { Cell::new(0) };
}

/// Marks this thread as the API port's event loop `index` (1..=[`MAX_EVENT_LOOPS`]): the upstream connections it
/// opens are pooled apart from other loops' and reused only here.
pub fn set_event_loop(index: usize) {
    EVENT_LOOP.with(|slot| slot.set(index.min(MAX_EVENT_LOOPS)));
}

fn event_loop() -> usize {
    EVENT_LOOP.with(Cell::get)
}

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

/// A connection, the bytes read from it that nothing has consumed yet, and the event loop it is registered with.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// Where each request's head is written (kept for the next unless a head made it large).
    out: Vec<u8>,
    event_loop: usize,
    /// When the last request that took it began (it has been idle for less than the time since).
    last_used: Instant,
}

impl Conn {
    /// Whether a pooled connection can take a request that began at `now`: open, with nothing unread. One last
    /// used within [`FRESH`] on whose socket the event loop has seen nothing since is taken as it is (the common
    /// case under load: no system call, no clock read); any other is asked with a non-blocking peek, where a
    /// backend that closed the idle connection shows as end of stream even when the event loop has not seen it yet.
    fn is_idle_and_open(&self, now: Instant) -> bool {
        // (With the task's budget spent, tokio answers `Pending` whatever the socket's state: ask it then.)
        let mut nothing = Context::from_waker(Waker::noop());
        if tokio::task::coop::has_budget_remaining()
            && self.stream.poll_read_ready(&mut nothing).is_pending()
            && now.saturating_duration_since(self.last_used) < FRESH
        {
            return true;
        }
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        matches!(socket2::SockRef::from(&self.stream).peek(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// One slot's idle connections, on a cache line of its own (loops on other cores take their own slots' locks).
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot(Mutex<Vec<Conn>>);

/// A backend's idle connections, a list per event loop.
#[derive(Debug)]
struct IdleSlots(Box<[Slot]>);

impl IdleSlots {
    fn new() -> Self {
        Self((0..=MAX_EVENT_LOOPS).map(|_| Slot::default()).collect())
    }

    /// The idle connections of event loop `index`.
    fn of(&self, index: usize) -> MutexGuard<'_, Vec<Conn>> {
        self.0[index.min(MAX_EVENT_LOOPS)].0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `conn` for its event loop (closed if that loop has [`MAX_POOLED`] already).
    fn put(&self, conn: Conn) {
        let mut idle = self.of(conn.event_loop);
        if idle.len() < MAX_POOLED {
            idle.push(conn);
        }
    }
}

type Idle = Arc<IdleSlots>;

/// See the module docs.
#[derive(Debug)]
pub struct ConnPool {
    /// `host:port`.
    authority: Arc<str>,
    idle: Idle,
}

/// What goes to the backend: the request line's method and origin-form target, the end-to-end fields (one hop's,
/// `Host` and `Content-Length` left out by the server that read them; this client writes `Host` and the body's
/// `Content-Length`) and the body.
#[derive(Debug)]
pub struct Outgoing<'a> {
    pub method: &'a Method,
    pub target: &'a str,
    pub fields: &'a Fields,
    pub body: &'a Bytes,
    /// When this attempt began (the caller's clock read): pooled connections are aged against it.
    pub at: Instant,
}

impl ConnPool {
    pub fn new(authority: String) -> Self {
        Self { authority: authority.into(), idle: Arc::new(IdleSlots::new()) }
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Closes the idle connections event loop `index` opened (the loop has ended: they are registered with its
    /// runtime, of no use to another).
    pub fn forget_event_loop(&self, index: usize) {
        self.idle.of(index).clear();
    }

    /// A connection of this event loop's pool that can take a request (closed ones are dropped), if any.
    fn pooled(&self, now: Instant) -> Option<Conn> {
        let mut idle = self.idle.of(event_loop());
        while let Some(mut conn) = idle.pop() {
            if conn.is_idle_and_open(now) {
                conn.last_used = now;
                return Some(conn);
            }
        }
        None
    }

    async fn connect(&self, now: Instant) -> Result<Conn, SendError> {
        let connect = |reason: String| SendError::Connect { authority: self.authority.to_string(), reason };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&*self.authority))
            .await
            .map_err(|_| connect(format!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::new(),
            event_loop: event_loop(),
            last_used: now,
        })
    }

    /// Sends `request` and returns the answer's status, with a body that holds its end-to-end fields
    /// ([`UpstreamBody::fields`]) and is read from the connection as it is polled; the connection comes back to the
    /// pool when the body is done. A pooled connection whose write fails (the backend closed it idle between the
    /// probe and the write) is replaced by a new one once; once the request is written, nothing is sent again here
    /// (the backend may be running it).
    pub async fn send(&self, request: &Outgoing<'_>) -> Result<Response<UpstreamBody>, SendError> {
        if let Some(mut conn) = self.pooled(request.at) {
            match self.exchange(&mut conn, request).await {
                Ok(head) => return self.answer(conn, head, request.method),
                Err(Exchange::Unwritten(e)) => tracing::debug!("pooled connection to {} ended: {e}", self.authority),
                Err(Exchange::Failed(e)) => return Err(e),
            }
        }
        let mut conn = self.connect(request.at).await?;
        match self.exchange(&mut conn, request).await {
            Ok(head) => self.answer(conn, head, request.method),
            Err(Exchange::Unwritten(e) | Exchange::Failed(e)) => Err(e),
        }
    }

    /// Writes `request` (its head from the connection's own buffer, then the body as it is, in one system call
    /// where the socket takes both) and reads the answer's head (skipping interim 1xx answers).
    async fn exchange(&self, conn: &mut Conn, request: &Outgoing<'_>) -> Result<Head, Exchange> {
        let io = |source| SendError::Io { authority: self.authority.to_string(), source };
        let mut out = std::mem::take(&mut conn.out);
        out.clear();
        encode_head(&mut out, request, &self.authority);
        let written = write_both(&mut conn.stream, &out, request.body).await;
        if out.capacity() <= MAX_KEPT_HEAD {
            conn.out = out;
        }
        written.map_err(|e| Exchange::Unwritten(io(e)))?;
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
                    let when = "before its answer";
                    return Err(Exchange::Failed(SendError::Closed { authority: self.authority.to_string(), when }));
                }
                Ok(_) => {}
                Err(e) => return Err(Exchange::Failed(io(e))),
            }
        }
    }

    /// The head at the start of `buf` (split off it), or `None` when more bytes are needed. Hop-by-hop fields are
    /// read for what they say of the connection and the framing, and left out of the head's end-to-end fields,
    /// whose values share the head's bytes.
    fn parse_head(&self, buf: &mut BytesMut) -> Result<Option<Head>, SendError> {
        let config = httparse::ParserConfig::default();
        let Some(len) = head_end(buf) else {
            // Not all here: bytes that cannot start an answer are refused now, not when their end comes.
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            return match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut slots) {
                Err(e) => Err(self.protocol(e.to_string())),
                Ok(_) => Ok(None),
            };
        };
        let raw = buf.split_to(len).freeze();
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        match config.parse_response_with_uninit_headers(&mut parsed, &raw, &mut slots) {
            Ok(httparse::Status::Complete(parsed_len)) if parsed_len == len => {}
            Ok(_) => return Err(self.protocol("a head whose end could not be read".into())),
            Err(e) => return Err(self.protocol(e.to_string())),
        }
        let Some(version) = parsed.version else { return Err(self.protocol("no HTTP version".into())) };
        let status = parsed
            .code
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or_else(|| self.protocol("no valid status code".into()))?;
        let (mut codings, mut close, mut length, mut bad_length) = (Codings::default(), false, None, None);
        // Fields the `Connection` header names are of this hop too (RFC 9110 §7.6.1): dropped once all are read.
        let mut named: Vec<&[u8]> = Vec::new();
        let mut fields = Fields::new(&raw, parsed.headers, |h| {
            if h.name.eq_ignore_ascii_case("content-length") {
                if let Err(reason) = add_content_length(&mut length, h.value) {
                    bad_length.get_or_insert(reason);
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                codings.add(h.value);
            } else if h.name.eq_ignore_ascii_case("connection") {
                close |= connection_options(h.value).0;
                named.extend(connection_named(h.value));
            } else {
                // (The gateway names the backend itself: a backend's own value would precede it.)
                return !is_hop_by_hop(h.name.as_bytes()) && !h.name.eq_ignore_ascii_case(HEADER_GATEWAY_BACKEND);
            }
            false
        });
        fields.remove(&named);
        let head = Head {
            status,
            fields,
            keep_alive: version == 1,
            codings,
            close,
            length: bad_length.map_or(Ok(length), Err),
        };
        Ok(Some(head))
    }

    fn protocol(&self, reason: String) -> SendError {
        SendError::Protocol { authority: self.authority.to_string(), reason }
    }

    /// The answer whose `head` was read on `conn`, its body framed as RFC 9112 §6.3 says. A `Transfer-Encoding`
    /// whose last coding is `chunked` is read by chunks, any other by the connection's end, a `Content-Length` beside
    /// one is not read (`Content-Length` is never passed on: the client gets the body framed anew). Conflicting or
    /// malformed lengths and a switch of protocol (no request asks for one) are refused.
    fn answer(&self, conn: Conn, head: Head, method: &Method) -> Result<Response<UpstreamBody>, SendError> {
        let Head { status, fields, keep_alive, codings, close, length } = head;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(self.protocol("101 Switching Protocols to a request that asked for no upgrade".into()));
        }
        let length = if codings.any() { None } else { length.map_err(|reason| self.protocol(reason))? };
        // (Interim 1xx answers never get here: `exchange` skips them, and 101 is refused above.)
        let framing =
            if *method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
                Framing::Length(0)
            } else if codings.last_chunked {
                Framing::Chunked(Chunk::Size)
            } else if codings.any() {
                Framing::UntilClose
            } else if let Some(length) = length {
                Framing::Length(length)
            } else {
                Framing::UntilClose
            };
        let reusable = keep_alive && framing != Framing::UntilClose && !close;
        let (idle, authority) = (Arc::clone(&self.idle), Arc::clone(&self.authority));
        let mut response = Response::new(UpstreamBody::new(conn, framing, reusable, idle, authority, fields));
        *response.status_mut() = status;
        Ok(response)
    }
}

/// How an exchange failed: the request could not be written (a pooled connection may be replaced), or later.
enum Exchange {
    Unwritten(SendError),
    Failed(SendError),
}

struct Head {
    status: StatusCode,
    /// The end-to-end fields (`Content-Length` too is left out: the answer is framed anew for the client).
    fields: Fields,
    /// HTTP/1.1 (an HTTP/1.0 answer's connection is not reused).
    keep_alive: bool,
    codings: Codings,
    /// `Connection: close`.
    close: bool,
    /// What its `Content-Length` fields say (`None`: it has none), or why they cannot be read.
    length: Result<Option<u64>, String>,
}

/// The request's head as it goes on the wire: request line, `Host`, the end-to-end fields, then `Content-Length`
/// (of `request.body`, which follows it).
fn encode_head(wire: &mut Vec<u8>, request: &Outgoing<'_>, authority: &str) {
    wire.extend_from_slice(request.method.as_str().as_bytes());
    wire.push(b' ');
    wire.extend_from_slice(request.target.as_bytes());
    wire.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    wire.extend_from_slice(authority.as_bytes());
    wire.extend_from_slice(b"\r\n");
    request.fields.write(wire);
    wire.extend_from_slice(b"content-length: ");
    wire.extend_from_slice(itoa(request.body.len() as u64, &mut [0; 20]));
    wire.extend_from_slice(b"\r\n\r\n");
}

/// Writes `head` then `body`, both in one vectored write while the socket takes them.
async fn write_both(stream: &mut TcpStream, mut head: &[u8], mut body: &[u8]) -> std::io::Result<()> {
    while !head.is_empty() && !body.is_empty() {
        let n = stream.write_vectored(&[IoSlice::new(head), IoSlice::new(body)]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if n < head.len() {
            head = &head[n..];
        } else {
            body = &body[n - head.len()..];
            head = &[];
        }
    }
    stream.write_all(head).await?;
    stream.write_all(body).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::{Notify, mpsc};
    use tokio::time::timeout;

    use super::*;

    /// What the test backend does with the next request.
    #[derive(Clone, Copy)]
    enum Step {
        /// Writes these bytes (`|` pauses 5 ms, `^` waits for the test's gate), then closes the connection if true.
        Answer(&'static [u8], bool),
        /// Closes the connection without answering.
        Close,
    }

    /// A backend on 127.0.0.1 taking the steps in order across its connections; counts connections, and reports
    /// each connection's end (seen by the backend's read) on the channel.
    struct Backend {
        authority: String,
        connections: Arc<AtomicUsize>,
        gate: Arc<Notify>,
        ended: mpsc::UnboundedReceiver<()>,
    }

    async fn backend(steps: Vec<Step>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let (connections, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let (tx, ended) = mpsc::unbounded_channel();
        let steps = Arc::new(Mutex::new(steps.into_iter()));
        let (counted, opened) = (Arc::clone(&connections), Arc::clone(&gate));
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let (steps, gate, tx) = (Arc::clone(&steps), Arc::clone(&opened), tx.clone());
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufStream::new(stream);
                    loop {
                        // One request: head lines, then its content-length body.
                        let mut length = 0usize;
                        loop {
                            let mut line = String::new();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                let _ = tx.send(());
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
                        let next = steps.lock().unwrap().next();
                        let Some(Step::Answer(answer, close)) = next else { return };
                        for piece in answer.split_inclusive(|&b| b == b'|' || b == b'^') {
                            let (bytes, mark) = piece
                                .split_at(piece.len() - usize::from(piece.ends_with(b"|") || piece.ends_with(b"^")));
                            if stream.write_all(bytes).await.is_err() || stream.flush().await.is_err() {
                                let _ = tx.send(());
                                return;
                            }
                            match mark {
                                b"|" => tokio::time::sleep(Duration::from_millis(5)).await,
                                b"^" => gate.notified().await,
                                _ => {}
                            }
                        }
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        Backend { authority, connections, gate, ended }
    }

    impl Backend {
        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }
    }

    async fn send(pool: &ConnPool, method: Method) -> Result<Response<UpstreamBody>, SendError> {
        let (fields, body) = (Fields::default(), Bytes::from_static(b"{\"x\": 1}"));
        let at = Instant::now();
        pool.send(&Outgoing { method: &method, target: "/v1/completions", fields: &fields, body: &body, at }).await
    }

    async fn frames(response: Response<UpstreamBody>) -> Result<Vec<Bytes>, SendError> {
        let mut body = response.into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame?.into_data().unwrap());
        }
        Ok(frames)
    }

    async fn post(pool: &ConnPool) -> Result<(StatusCode, Vec<u8>), SendError> {
        let response = send(pool, Method::POST).await?;
        let status = response.status();
        Ok((status, frames(response).await?.concat()))
    }

    /// Every test is bounded: a framing bug that waits forever fails instead of hanging the suite.
    async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
        tokio::time::timeout(Duration::from_secs(20), test).await.expect("the test took over 20 s");
    }

    /// A length-delimited answer (its one-hop fields left out); a chunked one whose first chunk reaches the caller
    /// before the backend sends the rest (a size line and a chunk's CRLF split over reads, an extension, a
    /// trailer); a 204 and an answer to HEAD (no body, whatever Content-Length says): all on one reused connection.
    #[tokio::test]
    async fn answers_are_read_by_length_and_by_chunks_on_one_connection() {
        bounded(async {
            let b = backend(vec![
                Step::Answer(
                    b"HTTP/1.1 200 OK\r\nX-Hop: 1\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n\
                      X-Id: 7\r\nX-Empty:\r\ncontent-length: 5\r\n\r\nhello",
                    false,
                ),
                Step::Answer(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n|7;e|xt=1\r\ndata: ^a\r|\n3\r\nxyz\r\n|0\r\nx-trailer: 1\r\n\r\n",
                    false,
                ),
                Step::Answer(b"HTTP/1.1 204 No Content\r\n\r\n", false),
                Step::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false),
                // An empty line before the head is skipped (as httparse does); the backend cannot name itself.
                Step::Answer(b"\r\nHTTP/1.1 200 OK\r\nx-baleen-backend: me\r\ncontent-length: 2\r\n\r\nok", false),
            ])
            .await;
            let pool = ConnPool::new(b.authority.clone());
            let response = send(&pool, Method::POST).await.unwrap();
            let fields: Vec<_> = response.body().fields().iter().collect();
            assert_eq!(fields, [(&b"X-Id"[..], &b"7"[..]), (b"X-Empty", b"")], "the end-to-end fields only");
            assert_eq!(response.body().fields().get("x-id"), Some(&b"7"[..]));
            assert_eq!(frames(response).await.unwrap().concat(), b"hello");
            let response = send(&pool, Method::POST).await.unwrap();
            let mut body = response.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(&first[..], b"data: ", "the first piece before the backend sends the rest");
            b.gate.notify_one();
            let rest = frames(Response::new(body)).await.unwrap().concat();
            assert_eq!(rest, b"axyz");
            let response = send(&pool, Method::POST).await.unwrap();
            assert_eq!((response.status(), frames(response).await.unwrap().len()), (StatusCode::NO_CONTENT, 0));
            let response = send(&pool, Method::HEAD).await.unwrap();
            assert_eq!(response.body().fields().get("content-length"), None, "framed anew for the client");
            assert!(frames(response).await.unwrap().is_empty());
            let response = send(&pool, Method::POST).await.unwrap();
            assert_eq!(response.body().fields().get(HEADER_GATEWAY_BACKEND), None);
            assert_eq!(frames(response).await.unwrap().concat(), b"ok");
            assert_eq!(b.connections(), 1);
        })
        .await;
    }

    /// A pooled connection the backend closed while idle is not used (a new one takes the request); one that the
    /// backend closes on receiving the request is a `Closed` error, not sent again; `Connection: close` and
    /// HTTP/1.0 answers (read until the end) are not reused; a body cut short is an error.
    #[tokio::test]
    async fn closed_connections_are_replaced_or_fail_and_cut_bodies_fail() {
        bounded(async {
            let b = backend(vec![
                Step::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true),
                Step::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
                Step::Close,
                Step::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok", true),
                Step::Answer(b"HTTP/1.0 200 OK\r\n\r\nuntil close", true),
                Step::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort", true),
            ])
            .await;
            let pool = ConnPool::new(b.authority.clone());
            assert_eq!(post(&pool).await.unwrap().1, b"ok");
            // The backend closed that connection after answering: the probe sees it, a new one is opened.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(post(&pool).await.unwrap().1, b"ok");
            assert_eq!(b.connections(), 2);
            let err = post(&pool).await.unwrap_err();
            assert!(matches!(err, SendError::Closed { .. }), "{err}");
            assert_eq!(b.connections(), 2, "a written request is not sent again");
            assert_eq!(post(&pool).await.unwrap().1, b"ok");
            assert_eq!(post(&pool).await.unwrap().1, b"until close");
            assert_eq!(b.connections(), 4);
            let err = post(&pool).await.unwrap_err();
            assert!(matches!(err, SendError::Closed { .. }), "{err}");
            assert_eq!(b.connections(), 5);
        })
        .await;
    }

    /// Bad framing is refused (the client gets a 502 from the proxy, not a broken answer): malformed or
    /// conflicting lengths, a switch of protocol; a Content-Length beside a chunked Transfer-Encoding is dropped.
    #[tokio::test]
    async fn bad_framing_is_refused_and_a_length_beside_chunks_is_dropped() {
        bounded(async {
            let b = backend(vec![
                Step::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n", true),
                Step::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello", true),
                Step::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello", true),
                Step::Answer(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n", true),
                Step::Answer(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                    false,
                ),
                Step::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello", false),
            ])
            .await;
            let pool = ConnPool::new(b.authority.clone());
            for _ in 0..4 {
                let err = post(&pool).await.unwrap_err();
                assert!(matches!(err, SendError::Protocol { .. }), "{err}");
            }
            let response = send(&pool, Method::POST).await.unwrap();
            assert!(response.body().fields().get("content-length").is_none());
            assert!(response.body().fields().get("transfer-encoding").is_none(), "one hop's framing");
            assert_eq!(frames(response).await.unwrap().concat(), b"ok");
            assert_eq!(post(&pool).await.unwrap().1, b"hello");
        })
        .await;
    }

    /// Dropping an answer's body before its end (the client went away) closes the connection: the backend sees
    /// it end (and would cancel the request).
    #[tokio::test]
    async fn a_body_dropped_midway_closes_its_connection() {
        bounded(async {
            let mut b = backend(vec![Step::Answer(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n^0\r\n\r\n",
                false,
            )])
            .await;
            let pool = ConnPool::new(b.authority.clone());
            let mut body = send(&pool, Method::POST).await.unwrap().into_body();
            assert_eq!(&body.frame().await.unwrap().unwrap().into_data().unwrap()[..], b"abc");
            drop(body);
            b.gate.notify_one();
            b.ended.recv().await.unwrap();
            assert_eq!(pool.idle.of(0).len(), 0);
        })
        .await;
    }

    /// Each event loop takes again only the connections it opened (they are registered with its runtime): a
    /// second loop opens its own rather than borrow the first one's idle connection, and each reuses its own.
    #[test]
    fn each_event_loop_reuses_only_the_connections_it_opened() {
        let backend_runtime = tokio::runtime::Runtime::new().unwrap();
        let ok = || Step::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false);
        let b = backend_runtime.block_on(backend((0..4).map(|_| ok()).collect()));
        let pool = Arc::new(ConnPool::new(b.authority.clone()));
        // Three turns (loop 1 sends, then loop 2, then both), each closed by two meetings: the loops have sent,
        // then the test thread has checked. Failures are collected, not asserted, so no thread leaves a meeting.
        let meet = Arc::new(std::sync::Barrier::new(3));
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let loops: Vec<_> = [(1, 0), (2, 1)]
            .into_iter()
            .map(|(index, first_turn)| {
                let (pool, meet, failures) = (Arc::clone(&pool), Arc::clone(&meet), Arc::clone(&failures));
                std::thread::spawn(move || {
                    set_event_loop(index);
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    for turn in 0..3 {
                        if turn == first_turn || turn == 2 {
                            let send =
                                || runtime.block_on(async { timeout(Duration::from_secs(20), post(&pool)).await });
                            let sent = std::panic::catch_unwind(std::panic::AssertUnwindSafe(send));
                            if !matches!(&sent, Ok(Ok(Ok((StatusCode::OK, body)))) if body == b"ok") {
                                failures.lock().unwrap().push(format!("loop {index}, turn {turn}: {sent:?}"));
                            }
                        }
                        meet.wait();
                        meet.wait();
                    }
                })
            })
            .collect();
        let mut connections = Vec::new();
        for _ in 0..3 {
            meet.wait();
            connections.push(b.connections());
            meet.wait();
        }
        for handle in loops {
            handle.join().unwrap();
        }
        assert_eq!(*failures.lock().unwrap(), Vec::<String>::new());
        assert_eq!(connections, [1, 2, 2], "loop 2 opened its own connection, then each took its own again");
        assert_eq!((pool.idle.of(0).len(), pool.idle.of(1).len(), pool.idle.of(2).len()), (0, 1, 1));
    }

    /// Nothing listening: a connect error (the backend never saw the request).
    #[tokio::test]
    async fn an_unreachable_backend_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        drop(listener);
        let err = post(&ConnPool::new(authority)).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
    }

    /// A body larger than the socket takes in one write goes out whole behind its head (the vectored write
    /// resumed where it stopped, in the head or in the body).
    #[tokio::test]
    async fn a_large_body_is_written_whole_behind_its_head() {
        bounded(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let authority = listener.local_addr().unwrap().to_string();
            let body: Bytes = (0..4 * 1024 * 1024 + 7).map(|i: u32| (i * 31 % 251) as u8).collect::<Vec<_>>().into();
            let expected = body.clone();
            tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                let mut stream = tokio::io::BufStream::new(stream);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    stream.read_line(&mut line).await.unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                // Read slowly at first, so that the gateway's writes stop part-way.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let mut got = vec![0u8; length];
                stream.read_exact(&mut got).await.unwrap();
                let answer: &[u8] = if got == expected { b"same" } else { b"diff" };
                stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n").await.unwrap();
                stream.write_all(answer).await.unwrap();
                stream.flush().await.unwrap();
            });
            let pool = ConnPool::new(authority);
            let (method, target, at) = (&Method::POST, "/v1/completions", Instant::now());
            let request = Outgoing { method, target, fields: &Fields::default(), body: &body, at };
            let response = pool.send(&request).await.unwrap();
            assert_eq!(frames(response).await.unwrap().concat(), b"same");
        })
        .await;
    }

    /// (Which fields are end-to-end is the server's to say: `server::http1` tests it.)
    #[test]
    fn requests_go_out_in_origin_form_with_the_backends_host_and_their_length() {
        let fields = Fields::of(&[("Content-Type", "application/json"), ("X-A", "1")]);
        let body = Bytes::from_static(b"{}");
        let (method, target, at) = (&Method::POST, "/v1/completions?x=1", Instant::now());
        let request = Outgoing { method, target, fields: &fields, body: &body, at };
        let mut wire = Vec::new();
        encode_head(&mut wire, &request, "10.0.0.1:8000");
        assert_eq!(
            std::str::from_utf8(&wire).unwrap(),
            "POST /v1/completions?x=1 HTTP/1.1\r\nhost: 10.0.0.1:8000\r\nContent-Type: application/json\r\n\
             X-A: 1\r\ncontent-length: 2\r\n\r\n"
        );
    }
}
