//! The API port's HTTP/1.1 server side, ours as the upstream client is (`backends/pool.rs`): one task per
//! connection reads a request's head, routes it ([`routes::route`]), reads the body of a request that is proxied
//! and hands it to [`proxy::forward`], and writes the answer, its head with the body bytes ready by then in one
//! `write`, the rest as it arrives.
//!
//! - A head must arrive within the connection's head timeout (from the end of the previous answer on a keep-alive
//!   connection): a connection idle that long is closed, a head begun and not finished gets a 408.
//! - A request answered without its body (a GET route, an unknown route or method, a missing API key) is answered
//!   before any body is read, and its connection then closed if a body was still to come. A proxied request's
//!   body comes by `Content-Length` or chunks (`Expect: 100-continue` answered first, HTTP/1.1 only), capped: a
//!   larger one is refused with 413 before it is read.
//! - Refused, each with an OpenAI-shaped JSON error and then the connection's close: a malformed head (400), a
//!   head over 64 KiB or 100 fields (431), a `Transfer-Encoding` that is empty, in an HTTP/1.0 request, beside a
//!   `Content-Length`, or whose last coding is not `chunked` (400, RFC 9112 §6.1 and §6.3: these make the body's
//!   length unreliable), one naming codings besides `chunked` (501).
//! - While its answer is awaited or streamed, the connection is watched: a client that closes it (or only its
//!   sending side, as hyper's server also reads it) drops the answer, which closes the upstream connection, so the
//!   backend cancels the request. The watch waits on the socket's readiness, which the read of a request that fit
//!   one read has left cleared: then it costs no system call.
//! - Answers of known length get `Content-Length`, others are chunked (HTTP/1.1) or end with the connection
//!   (HTTP/1.0). HTTP/1.1 connections are kept alive unless `Connection: close`, HTTP/1.0 ones only with
//!   `Connection: keep-alive`. Pipelined requests are answered in order. A connection closed after an answer has
//!   its sending side shut first, and what the client still sends is read and dropped for a moment, so that
//!   unread bytes do not reset the connection before the client has read the answer.
//! - `stop` ends a connection between requests; an answer under way is finished first.

use std::cell::Cell;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baleen_api::http::ApiError;
use baleen_api::names::{HEADER_GATEWAY_BACKEND, MODEL_UNKNOWN};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderName};
use http::{Method, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::App;
use crate::routes::body::Upstream;
use crate::routes::{self, ResponseBody, Route, proxy};
use crate::wire::{
    Chunk, Codings, Decoded, Fields, Framing, MAX_HEAD_BYTES, MAX_HEADERS, READ_CHUNK, add_content_length,
    connection_named, connection_options, head_end, is_hop_by_hop, itoa,
};

/// Body bytes read ahead per read at most (a large body is read in pieces of this size).
const BODY_READ_AHEAD: usize = 1024 * 1024;
/// How long a closing connection's remaining bytes are read and dropped (see the module docs).
const LINGER: Duration = Duration::from_secs(2);
/// A data frame at least this long is written on its own instead of copied behind the bytes before it.
const COPY_LIMIT: usize = 16 * 1024;

/// What a connection allows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How long a request's head may take to arrive (idle time before it on a keep-alive connection included).
    pub head_timeout: Duration,
    /// The largest request body read (a larger one gets a 413 and the connection is closed).
    pub max_body: usize,
}

/// A request's head as read: its request line, its end-to-end fields, how its body is framed, and what it says of
/// the connection.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    /// The fields passed on to the backend: all but one hop's (`Host` and `Expect` included, see
    /// `wire::is_hop_by_hop`, and those `Connection` names) and `Content-Length`.
    fields: Fields,
    framing: Framing,
    /// The connection may take another request after this one's answer.
    keep_alive: bool,
    /// `Expect: 100-continue`.
    expects_continue: bool,
}

/// 400 for what cannot be read as an HTTP/1.1 request.
fn malformed(what: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(format!("a malformed HTTP/1.1 request: {what}"))
}

fn head_too_large() -> ApiError {
    let message = format!("the request's head is over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} fields");
    ApiError { status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, ..ApiError::invalid(message) }
}

/// The head at the start of `buf` (split off it, so that its fields share the buffer's bytes), or `None` when
/// more bytes are needed.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ApiError> {
    let config = httparse::ParserConfig::default();
    let Some(len) = head_end(buf) else {
        // Not all here: a start that cannot be a request is refused now, not when its end comes.
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut []);
        return match config.parse_request_with_uninit_headers(&mut parsed, buf, &mut slots) {
            Err(httparse::Error::TooManyHeaders) => Err(head_too_large()),
            Err(e) => Err(malformed(e)),
            Ok(_) if buf.len() > MAX_HEAD_BYTES => Err(head_too_large()),
            Ok(_) => Ok(None),
        };
    };
    if len > MAX_HEAD_BYTES {
        return Err(head_too_large());
    }
    let raw = buf.split_to(len).freeze();
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    match config.parse_request_with_uninit_headers(&mut parsed, &raw, &mut slots) {
        Ok(httparse::Status::Complete(parsed_len)) if parsed_len == len => {}
        Ok(_) => return Err(malformed("a head whose end could not be read")),
        Err(httparse::Error::TooManyHeaders) => return Err(head_too_large()),
        Err(e) => return Err(malformed(e)),
    }
    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version) else {
        return Err(malformed("an incomplete request line"));
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(malformed)?;
    let base = raw.as_ptr() as usize;
    let at = target.as_ptr() as usize - base;
    let uri = Uri::from_maybe_shared(raw.slice(at..at + target.len())).map_err(malformed)?;
    let (mut codings, mut close, mut keep, mut expects_continue) = (Codings::default(), false, false, false);
    let (mut length, mut bad_length) = (None, None);
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
            let (c, k) = connection_options(h.value);
            (close, keep) = (close || c, keep || k);
            named.extend(connection_named(h.value));
        } else if h.name.eq_ignore_ascii_case("expect") {
            expects_continue |= h.value.eq_ignore_ascii_case(b"100-continue");
        } else {
            return !is_hop_by_hop(h.name.as_bytes());
        }
        false
    });
    fields.remove(&named);
    if let Some(reason) = bad_length {
        return Err(malformed(reason));
    }
    let version = if minor == 1 { Version::HTTP_11 } else { Version::HTTP_10 };
    let framing = if codings.present {
        // (`last_chunked` is false when the field names no coding.)
        if !codings.last_chunked || version == Version::HTTP_10 || length.is_some() {
            return Err(malformed(
                "a Transfer-Encoding that is empty, does not end with `chunked`, comes in HTTP/1.0 or beside a \
                 Content-Length",
            ));
        }
        if codings.count > 1 {
            let message = "a Transfer-Encoding with codings besides `chunked`, which this server does not decode";
            return Err(ApiError { status: StatusCode::NOT_IMPLEMENTED, ..ApiError::invalid(message) });
        }
        Framing::Chunked(Chunk::Size)
    } else {
        Framing::Length(length.unwrap_or(0))
    };
    let keep_alive = !close && (version == Version::HTTP_11 || keep);
    let expects_continue = expects_continue && version == Version::HTTP_11;
    Ok(Some(Head { method, uri, version, fields, framing, keep_alive, expects_continue }))
}

thread_local! {
    /// The `Date` of answers made this second: (Unix second, its IMF-fixdate).
    static DATE: Cell<(u64, [u8; 29])> = const { Cell::new((0, [0; 29])) };
}

/// Appends a `Date` field for now (formatted once a second per thread).
fn put_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (cached, mut text) = DATE.get();
    if cached != second {
        let formatted = httpdate::fmt_http_date(now);
        if formatted.len() == text.len() {
            text.copy_from_slice(formatted.as_bytes());
            DATE.set((second, text));
        }
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(&text);
    out.extend_from_slice(b"\r\n");
}

/// How an answer's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body, no framing fields (1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, a length not known ahead).
    UntilClose,
}

/// An answer's head: status line, its fields less the ones of this hop, an upstream answer's own fields and its
/// backend (`x-baleen-backend`), `Date` when it has none, the framing, and `Connection` when the connection closes
/// after it (or is kept for an HTTP/1.0 client).
fn encode_head(
    out: &mut Vec<u8>,
    head: &http::response::Parts,
    upstream: Option<&Upstream>,
    framing: Out,
    keep_alive: bool,
    version: Version,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(head.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    for (name, value) in &head.headers {
        if is_framing(name) {
            continue;
        }
        dated |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(up) = upstream {
        let fields = up.inner.fields();
        fields.write(out);
        dated |= fields.get(header::DATE.as_str()).is_some();
        if let Some(backend) = &up.in_flight.backend.header {
            out.extend_from_slice(HEADER_GATEWAY_BACKEND.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(backend.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    if !dated {
        put_date(out);
    }
    match framing {
        Out::Length(length) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(length, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        Out::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Out::None | Out::UntilClose => {}
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Fields this server writes itself (or, for one hop's, never): left out of the answer's own.
fn is_framing(name: &HeaderName) -> bool {
    matches!(name.as_str(), "content-length" | "transfer-encoding" | "connection" | "keep-alive")
}

/// One client connection, the bytes read from it that no request has taken yet, and the buffer answers are
/// written from (kept for the next).
struct Connection {
    stream: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
}

/// Serves one API connection until the client closes it, a request is refused, an answer cannot be written, or
/// `stop` turns true between requests (see the module docs).
pub(crate) async fn serve(app: &Arc<App>, stream: TcpStream, limits: Limits, mut stop: watch::Receiver<bool>) {
    let mut conn = Connection { stream, buf: BytesMut::with_capacity(READ_CHUNK), out: Vec::with_capacity(1024) };
    // One timer per connection, moved on for each head (a later deadline only updates the timer's entry; it is
    // taken out of the wheel and put back when it fires, which an answer longer than the timeout lets it do).
    let mut deadline = pin!(tokio::time::sleep(limits.head_timeout));
    loop {
        deadline.as_mut().reset(Instant::now() + limits.head_timeout);
        let head = match conn.read_head(deadline.as_mut(), &mut stop, limits.head_timeout).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => return conn.refuse(app, e).await,
        };
        let arrived = std::time::Instant::now();
        let Head { method, uri, version, fields, framing, keep_alive, expects_continue } = head;
        let response = match routes::route(app, &method, uri.path(), &fields) {
            Route::Answer(response) => {
                // Its body, if it has one, is not read: the connection closes after the answer.
                let keep_alive = keep_alive && framing == Framing::Length(0) && !*stop.borrow();
                if !conn.answer(response, &method, version, keep_alive).await {
                    return conn.linger().await;
                }
                continue;
            }
            Route::Forward(key) => {
                let body = match conn.read_body(framing, expects_continue, limits.max_body).await {
                    Ok(body) => body,
                    Err(Some(e)) => return conn.refuse(app, e).await,
                    Err(None) => return,
                };
                let forwarded = proxy::forward(app, &method, &uri, &fields, body, arrived, key);
                tokio::select! {
                    biased;
                    response = forwarded => response,
                    () = conn.closed() => return,
                }
            }
        };
        let keep_alive = keep_alive && !*stop.borrow();
        if !conn.answer(response, &method, version, keep_alive).await {
            return conn.linger().await;
        }
    }
}

impl Connection {
    /// The next request's head; `None` when the client closed the connection (or it failed) between requests,
    /// stayed idle past the deadline, or `stop` turned true while it was idle.
    async fn read_head(
        &mut self,
        mut deadline: Pin<&mut Sleep>,
        stop: &mut watch::Receiver<bool>,
        timeout: Duration,
    ) -> Result<Option<Head>, ApiError> {
        loop {
            // Empty lines before a request are ignored (RFC 9112 §2.2: a client may send one after a body).
            while let Some(b'\r' | b'\n') = self.buf.first() {
                self.buf.advance(1);
            }
            if !self.buf.is_empty() {
                if let Some(head) = parse_head(&mut self.buf)? {
                    return Ok(Some(head));
                }
            } else if *stop.borrow() {
                return Ok(None);
            }
            self.buf.reserve(READ_CHUNK);
            let idle = self.buf.is_empty();
            tokio::select! {
                biased;
                read = self.stream.read_buf(&mut self.buf) => match read {
                    Ok(0) | Err(_) => return Ok(None),
                    Ok(_) => {}
                },
                () = deadline.as_mut() => {
                    return if idle { Ok(None) } else { Err(ApiError::request_timeout(timeout.as_secs())) };
                }
                changed = stop.changed(), if idle => {
                    if changed.is_err() {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// The request's body; `Err(None)` when the connection ended before it did.
    async fn read_body(
        &mut self,
        mut framing: Framing,
        expects_continue: bool,
        max: usize,
    ) -> Result<Bytes, Option<ApiError>> {
        match framing {
            Framing::Length(0) => return Ok(Bytes::new()),
            Framing::Length(length) if length > max as u64 => return Err(Some(ApiError::too_large(max))),
            _ => {}
        }
        if expects_continue && self.buf.is_empty() {
            self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.map_err(|_| None)?;
        }
        // The body's pieces: the first kept as it is (a body read in one piece is not copied), the rest joined.
        let (mut first, mut joined) = (None::<Bytes>, BytesMut::new());
        loop {
            match framing.decode(&mut self.buf) {
                Ok(Decoded::Data(data)) => {
                    let read = first.as_ref().map_or(0, Bytes::len) + joined.len() + data.len();
                    if read > max {
                        return Err(Some(ApiError::too_large(max)));
                    }
                    match first.take() {
                        None if joined.is_empty() => first = Some(data),
                        earlier => {
                            joined.extend_from_slice(earlier.as_deref().unwrap_or_default());
                            joined.extend_from_slice(&data);
                        }
                    }
                }
                Ok(Decoded::End) => return Ok(first.unwrap_or_else(|| joined.freeze())),
                Ok(Decoded::More) => {
                    let ahead = match framing {
                        Framing::Length(left) => usize::try_from(left).unwrap_or(usize::MAX).min(BODY_READ_AHEAD),
                        _ => READ_CHUNK,
                    };
                    self.buf.reserve(ahead.max(READ_CHUNK));
                    match self.stream.read_buf(&mut self.buf).await {
                        Ok(0) | Err(_) => return Err(None),
                        Ok(_) => {}
                    }
                }
                Err(reason) => return Err(Some(malformed(format!("its chunked body has {reason}")))),
            }
        }
    }

    /// Resolves when the client has closed the connection (or it failed). Bytes it sends meanwhile (pipelined
    /// requests) are kept for later, up to a head's size; past that, nothing more is read here.
    async fn closed(&mut self) {
        loop {
            if self.buf.len() >= MAX_HEAD_BYTES {
                return std::future::pending().await;
            }
            // (The room left behind the request is used first: the request's body still shares the buffer, and
            // reserving more would allocate a new one for every request.)
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(READ_CHUNK);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Counts and writes a refusal; the connection closes after it.
    async fn refuse(mut self, app: &App, e: ApiError) {
        app.metrics.request(MODEL_UNKNOWN, "", e.status.as_u16());
        self.answer(e.into_http(), &Method::GET, Version::HTTP_11, false).await;
        self.linger().await;
    }

    /// Closes the connection after its last answer: the sending side is shut, then what the client still sends
    /// (the rest of a body not read, requests pipelined behind) is read and dropped until it closes its side or
    /// [`LINGER`] has passed. Closed with bytes unread, the connection would be reset, and the client could lose
    /// the answer before reading it.
    async fn linger(mut self) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        self.buf.clear();
        let drain = async {
            loop {
                self.buf.reserve(READ_CHUNK);
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => self.buf.clear(),
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    /// Writes `response` to a request of `method`, streaming its body as the frames come; true when the connection
    /// can take another request.
    async fn answer(
        &mut self,
        response: Response<ResponseBody>,
        method: &Method,
        version: Version,
        keep_alive: bool,
    ) -> bool {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let kept = self.write_answer(&mut out, response, method, version, keep_alive).await;
        self.out = out;
        kept
    }

    /// [`Connection::answer`], writing from `out`.
    async fn write_answer(
        &mut self,
        out: &mut Vec<u8>,
        response: Response<ResponseBody>,
        method: &Method,
        version: Version,
        mut keep_alive: bool,
    ) -> bool {
        let (head, mut body) = response.into_parts();
        let status = head.status;
        let framing =
            if status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
                Out::None
            } else if let Some(length) = body.size_hint().exact() {
                Out::Length(length)
            } else if version == Version::HTTP_11 {
                Out::Chunked
            } else {
                keep_alive = false;
                Out::UntilClose
            };
        encode_head(out, &head, body.upstream(), framing, keep_alive, version);
        if *method == Method::HEAD || framing == Out::None {
            // The body (and the in-flight count it holds) ends before the client can see the answer's end.
            drop(body);
            return self.stream.write_all(out).await.is_ok() && keep_alive;
        }
        loop {
            let next = match body.frame().now_or_never() {
                Some(next) => next,
                None => {
                    if !out.is_empty() && self.stream.write_all(out).await.is_err() {
                        return false;
                    }
                    out.clear();
                    tokio::select! {
                        biased;
                        next = body.frame() => next,
                        () = self.closed() => return false,
                    }
                }
            };
            let data = match next {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    // Trailers are not passed on; empty frames say nothing.
                    _ => continue,
                },
                Some(Err(e)) => {
                    // The body cannot be finished: what came of it goes out, and the connection closes (the client
                    // sees the body cut short).
                    tracing::debug!("an answer's body failed: {e}");
                    let _ = self.stream.write_all(out).await;
                    return false;
                }
                None => break,
            };
            if framing == Out::Chunked {
                let _ = write!(out, "{:x}\r\n", data.len());
            }
            if data.len() >= COPY_LIMIT {
                if self.stream.write_all(out).await.is_err() || self.stream.write_all(&data).await.is_err() {
                    return false;
                }
                out.clear();
            } else {
                out.extend_from_slice(&data);
            }
            if framing == Out::Chunked {
                out.extend_from_slice(b"\r\n");
            }
        }
        if framing == Out::Chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        // The body is done: it (and the in-flight count it holds) ends before the client can see the answer's end,
        // so a client that reads its answer and then the metrics finds the request no longer in flight.
        drop(body);
        self.stream.write_all(out).await.is_ok() && keep_alive
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    use super::*;
    use crate::Gateway;
    use crate::config::{PolicyKind, RoutingArgs};

    const MODEL_BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

    /// A head's one-hop fields (`Host`, `Expect`, those `Connection` names) and `Content-Length` are read for
    /// what they say and not passed on; the others are, as they came.
    #[test]
    fn a_heads_end_to_end_fields_are_kept_as_they_came() {
        let mut buf = BytesMut::from(
            &b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
               Connection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\nExpect: 100-continue\r\nTE: trailers\r\n\
               Proxy-Authorization: x\r\nX-Secret: s\r\nX-Keep:  k \r\n\r\n{}NEXT"[..],
        );
        let head = parse_head(&mut buf).unwrap().unwrap();
        let fields: Vec<_> = head.fields.iter().collect();
        assert_eq!(fields, [(&b"Content-Type"[..], &b"application/json"[..]), (b"X-Keep", b"k")]);
        assert_eq!((head.method, head.uri.to_string()), (Method::POST, "/v1/completions?x=1".to_string()));
        assert_eq!(head.framing, Framing::Length(2));
        assert!(head.keep_alive && head.expects_continue);
        assert_eq!(&buf[..], b"{}NEXT", "the head is split off; its body and what follows stay");
    }

    /// What the test backend does with each request.
    #[derive(Clone, Copy)]
    enum Backend {
        /// Answers 200 with the request's body.
        Echo,
        /// Answers nothing.
        Hold,
        /// Sends a chunked head and one event, then nothing more.
        StreamThenHold,
    }

    /// What the test backend saw: a request's body, or the end of a connection.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Request(String),
        Closed,
    }

    async fn backend(mode: Backend) -> (String, mpsc::UnboundedReceiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            let mut piece = [0u8; 4096];
                            match stream.read(&mut piece).await {
                                Ok(0) | Err(_) => return tx.send(Seen::Closed).unwrap(),
                                Ok(n) => buf.extend_from_slice(&piece[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < end + 4 + length {
                            let mut piece = [0u8; 4096];
                            let n = stream.read(&mut piece).await.unwrap();
                            assert!(n > 0, "the body was cut short");
                            buf.extend_from_slice(&piece[..n]);
                        }
                        let body: Vec<u8> = buf.drain(..end + 4 + length).skip(end + 4).collect();
                        tx.send(Seen::Request(String::from_utf8(body.clone()).unwrap())).unwrap();
                        let answer = match mode {
                            Backend::Echo => {
                                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                                [head.into_bytes(), body].concat()
                            }
                            Backend::Hold => Vec::new(),
                            Backend::StreamThenHold => {
                                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n".to_vec()
                            }
                        };
                        stream.write_all(&answer).await.unwrap();
                    }
                });
            }
        });
        (url, seen)
    }

    /// The server on 127.0.0.1 with a model `m` on `backend` (marked ready), and its stop switch.
    async fn start(
        backend: Option<&str>,
        head_timeout: Duration,
        max_body: usize,
    ) -> (SocketAddr, watch::Sender<bool>) {
        let gateway = Gateway::new(RoutingArgs::default().settings().unwrap()).unwrap();
        if let Some(url) = backend {
            gateway.set_model("m", PolicyKind::RoundRobin, &[url.to_string()]).unwrap();
            gateway.app().registry.get("m").unwrap().backends()[0].health().ready = Some(true);
        }
        let app = Arc::clone(gateway.app());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let limits = Limits { head_timeout, max_body };
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (app, stop) = (Arc::clone(&app), stop.clone());
                tokio::spawn(async move { serve(&app, stream, limits, stop).await });
            }
        });
        (addr, stop_tx)
    }

    /// One answer from `stream` (bytes after it stay in `buf`): its head as text and its body, read by its framing.
    async fn answer(stream: &mut TcpStream, buf: &mut BytesMut) -> (String, String) {
        let (head, mut framing) = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(buf.split_to(end + 4).to_vec()).unwrap();
                let lower = head.to_ascii_lowercase();
                let framing = if lower.contains("transfer-encoding: chunked") {
                    Framing::Chunked(Chunk::Size)
                } else if let Some(length) = lower.lines().find_map(|l| l.strip_prefix("content-length: ")) {
                    Framing::Length(length.trim().parse().unwrap())
                } else {
                    Framing::UntilClose
                };
                break (head, framing);
            }
            assert!(stream.read_buf(buf).await.unwrap() > 0, "closed before an answer: {buf:?}");
        };
        let mut body = Vec::new();
        loop {
            match framing.decode(buf).unwrap() {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::End => break,
                Decoded::More => {
                    if stream.read_buf(buf).await.unwrap() == 0 {
                        assert_eq!(framing, Framing::UntilClose, "closed in a body");
                        break;
                    }
                }
            }
        }
        (head, String::from_utf8(body).unwrap())
    }

    /// True when the server closes `stream` (within 10 s) without sending anything more.
    async fn closes(stream: &mut TcpStream) -> bool {
        let mut rest = Vec::new();
        matches!(timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await, Ok(Ok(0)))
    }

    async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
        timeout(Duration::from_secs(30), test).await.expect("the test took over 30 s");
    }

    /// Pipelined requests are answered in order on one connection; a chunked body sent after `100 Continue`
    /// reaches the backend as one JSON body; answers carry their length and a date; an HTTP/1.0 client's
    /// connection closes after its answer, unless it asked to keep it.
    #[tokio::test]
    async fn keep_alive_pipelining_chunked_bodies_and_http_1_0() {
        bounded(async {
            let (url, mut seen) = backend(Backend::Echo).await;
            let (addr, _stop) = start(Some(&url), Duration::from_secs(10), 1024).await;
            let mut client = TcpStream::connect(addr).await.unwrap();
            let mut buf = BytesMut::new();
            client
                .write_all(b"GET /health HTTP/1.1\r\nhost: g\r\n\r\nGET /nowhere HTTP/1.1\r\nhost: g\r\n\r\n")
                .await
                .unwrap();
            let (head, body) = answer(&mut client, &mut buf).await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(head.contains("\r\ndate: ") && head.contains(&format!("content-length: {}\r\n", body.len())));
            assert_eq!(body, r#"{"status":"ok"}"#);
            let (head, body) = answer(&mut client, &mut buf).await;
            assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
            assert!(body.contains("no route for GET /nowhere"), "{body}");

            let chat = "POST /v1/chat/completions HTTP/1.1\r\nhost: g\r\ncontent-type: application/json\r\n\
                        transfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n";
            client.write_all(chat.as_bytes()).await.unwrap();
            let mut interim = [0u8; 25];
            client.read_exact(&mut interim).await.unwrap();
            assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
            let (a, b) = MODEL_BODY.split_at(10);
            let chunks = format!("{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\nx-trailer: 1\r\n\r\n", a.len(), b.len());
            client.write_all(chunks.as_bytes()).await.unwrap();
            let (head, body) = answer(&mut client, &mut buf).await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert_eq!((body.as_str(), seen.recv().await), (MODEL_BODY, Some(Seen::Request(MODEL_BODY.into()))));

            for (keep, closed) in [("", true), ("connection: keep-alive\r\n", false)] {
                let mut client = TcpStream::connect(addr).await.unwrap();
                client.write_all(format!("GET /health HTTP/1.0\r\n{keep}\r\n").as_bytes()).await.unwrap();
                let (head, _) = answer(&mut client, &mut BytesMut::new()).await;
                assert_eq!(head.contains("connection: close\r\n"), closed, "{head}");
                assert_eq!(head.contains("connection: keep-alive\r\n"), !closed, "{head}");
                if closed {
                    assert!(closes(&mut client).await);
                }
            }
        })
        .await;
    }

    /// Refusals are OpenAI-shaped JSON with the right status, and close the connection: a body over the cap
    /// (before it is sent), a transfer coding that is not chunked, empty, in HTTP/1.0 or beside a length, codings
    /// besides chunked (501), a malformed head, too many fields, a head that does not finish in time (408); an
    /// idle connection closes silently.
    #[tokio::test]
    async fn bad_requests_are_refused_with_json_and_the_connection_closes() {
        bounded(async {
            let (addr, _stop) = start(None, Duration::from_millis(300), 64).await;
            let many: String = (0..MAX_HEADERS + 1).map(|i| format!("x-{i}: 1\r\n")).collect();
            let cases = [
                ("POST /v1/completions HTTP/1.1\r\ncontent-length: 65\r\n\r\n".to_string(), "413"),
                ("POST /v1/completions HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n".into(), "400"),
                ("POST /v1/completions HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n".into(), "501"),
                ("POST /v1/completions HTTP/1.1\r\ntransfer-encoding: ,\r\n\r\n".into(), "400"),
                ("POST /v1/completions HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n".into(), "400"),
                (
                    "POST /v1/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n".into(),
                    "400",
                ),
                ("POST /v1/completions HTTP/1.1\r\ncontent-length: 1, 2\r\n\r\n".into(), "400"),
                ("GARBAGE\r\n\r\n".into(), "400"),
                // Refused before its end comes (else the head timeout would answer 408).
                ("GARBAGE\r\nx-a: 1\r\n".into(), "400"),
                (format!("GET /health HTTP/1.1\r\n{many}\r\n"), "431"),
                ("GET /health HTTP/1.1\r\nhost: g\r\n".into(), "408"),
            ];
            for (request, code) in cases {
                let mut client = TcpStream::connect(addr).await.unwrap();
                client.write_all(request.as_bytes()).await.unwrap();
                let (head, body) = answer(&mut client, &mut BytesMut::new()).await;
                assert!(head.starts_with(&format!("HTTP/1.1 {code} ")), "{request:?}: {head}");
                assert!(head.contains("connection: close\r\n"), "{head}");
                let error: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert!(error["error"]["message"].is_string(), "{body}");
                assert!(closes(&mut client).await, "{request:?}");
            }
            let mut idle = TcpStream::connect(addr).await.unwrap();
            assert!(closes(&mut idle).await, "an idle connection closes after the head timeout");
        })
        .await;
    }

    /// A client that leaves while its answer is awaited, or in the middle of a stream, closes the upstream
    /// connection (the backend sees it end, and would cancel the request).
    #[tokio::test]
    async fn a_client_that_leaves_closes_the_upstream_connection() {
        bounded(async {
            for mode in [Backend::Hold, Backend::StreamThenHold] {
                let (url, mut seen) = backend(mode).await;
                let (addr, _stop) = start(Some(&url), Duration::from_secs(10), 1024).await;
                let mut client = TcpStream::connect(addr).await.unwrap();
                let request = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\ncontent-length: {}\r\n\r\n{MODEL_BODY}",
                    MODEL_BODY.len()
                );
                client.write_all(request.as_bytes()).await.unwrap();
                assert_eq!(seen.recv().await, Some(Seen::Request(MODEL_BODY.into())));
                if matches!(mode, Backend::StreamThenHold) {
                    let mut buf = BytesMut::new();
                    while !buf.ends_with(b"data: 1\n\n\r\n") {
                        assert!(client.read_buf(&mut buf).await.unwrap() > 0);
                    }
                    assert!(buf.starts_with(b"HTTP/1.1 200 OK\r\n"));
                    assert!(String::from_utf8_lossy(&buf).contains("transfer-encoding: chunked\r\n"));
                }
                drop(client);
                assert_eq!(seen.recv().await, Some(Seen::Closed));
            }
        })
        .await;
    }

    /// Stopping closes an idle connection at once, and leaves one whose answer is under way open.
    #[tokio::test]
    async fn stop_closes_idle_connections_and_leaves_answers_under_way() {
        bounded(async {
            let (url, mut seen) = backend(Backend::StreamThenHold).await;
            let (addr, stop) = start(Some(&url), Duration::from_secs(10), 1024).await;
            let mut idle = TcpStream::connect(addr).await.unwrap();
            let mut busy = TcpStream::connect(addr).await.unwrap();
            let request =
                format!("POST /v1/completions HTTP/1.1\r\ncontent-length: {}\r\n\r\n{MODEL_BODY}", MODEL_BODY.len());
            busy.write_all(request.as_bytes()).await.unwrap();
            assert_eq!(seen.recv().await, Some(Seen::Request(MODEL_BODY.into())));
            idle.write_all(b"GET /health HTTP/1.1\r\n\r\n").await.unwrap();
            answer(&mut idle, &mut BytesMut::new()).await;
            stop.send(true).unwrap();
            assert!(closes(&mut idle).await);
            let mut buf = BytesMut::new();
            while !buf.ends_with(b"data: 1\n\n\r\n") {
                assert!(busy.read_buf(&mut buf).await.unwrap() > 0);
            }
            let more = timeout(Duration::from_millis(300), busy.read_buf(&mut buf)).await;
            assert!(more.is_err(), "the stream's connection stays open: {more:?}");
        })
        .await;
    }

    /// A request answered without its body (here an unknown route) is answered at once, without `100 Continue`
    /// and without waiting for the body, and its connection closes; empty lines before a request are skipped.
    #[tokio::test]
    async fn requests_answered_without_their_body_do_not_wait_for_it() {
        bounded(async {
            let (addr, _stop) = start(None, Duration::from_secs(10), 1 << 20).await;
            let mut client = TcpStream::connect(addr).await.unwrap();
            let head = "POST /v1/embeddings HTTP/1.1\r\ncontent-length: 100000\r\nexpect: 100-continue\r\n\r\n";
            client.write_all(head.as_bytes()).await.unwrap();
            let (head, body) = answer(&mut client, &mut BytesMut::new()).await;
            assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n") && head.contains("connection: close\r\n"), "{head}");
            assert!(body.contains("no route for POST /v1/embeddings"), "{body}");
            assert!(closes(&mut client).await);
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(b"\r\n\r\nGET /health HTTP/1.1\r\n\r\n").await.unwrap();
            let (head, _) = answer(&mut client, &mut BytesMut::new()).await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && !head.contains("connection: close"), "{head}");
        })
        .await;
    }
}
