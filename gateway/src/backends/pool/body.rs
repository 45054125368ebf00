//! An upstream answer's body, read from its connection as the client's connection polls it: by length, by chunks
//! (extensions ignored, trailers dropped) or until the backend closes; the connection goes back to its pool when
//! the body is done.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use super::{Conn, Idle, READ_CHUNK, SendError};

/// A chunk-size line (with extensions) or a trailer line may take at most this many bytes.
const MAX_LINE_BYTES: usize = 4 * 1024;
/// Hex digits a chunk size may have at most (sizes stay far below `u64::MAX`).
const MAX_CHUNK_SIZE_DIGITS: usize = 15;

/// How an answer's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// Until the backend closes the connection (which is then not reused).
    UntilClose,
    Done,
}

/// Where a chunked body's reading stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
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
    authority: std::sync::Arc<str>,
}

impl UpstreamBody {
    pub(super) fn new(
        conn: Conn,
        framing: Framing,
        reusable: bool,
        idle: Idle,
        authority: std::sync::Arc<str>,
    ) -> Self {
        let mut body = Self { conn: Some(conn), framing, reusable, idle, authority };
        if framing == Framing::Length(0) {
            // No body to wait for: the connection can take the next request now.
            body.finish();
        }
        body
    }

    fn closed(&self, when: &'static str) -> SendError {
        SendError::Closed { authority: self.authority.to_string(), when }
    }

    fn protocol(&self, reason: &str) -> SendError {
        SendError::Protocol { authority: self.authority.to_string(), reason: reason.into() }
    }

    /// The body is read: the connection goes back to the pool when it may take another request (nothing unread
    /// after the body).
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            self.idle.put(conn);
        }
    }

    /// The body cannot be read further: its connection is closed, and the error goes to the client's connection.
    fn fail(&mut self, error: SendError) -> Poll<Option<Result<Frame<Bytes>, SendError>>> {
        self.framing = Framing::Done;
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }

    /// Reads more of the connection into its buffer: `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, SendError>> {
        let Some(conn) = self.conn.as_mut() else { return Poll::Ready(Ok(0)) };
        conn.buf.reserve(READ_CHUNK);
        match ready!(tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf)) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(source) => Poll::Ready(Err(SendError::Io { authority: self.authority.to_string(), source })),
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

/// The size of a chunk-size line: hex digits only, then optionally whitespace and `;` extensions
/// (`1a;name=value` → 26). Anything else (a sign, leading whitespace, an empty size) is refused.
pub(super) fn chunk_size(line: &[u8]) -> Option<u64> {
    let end = line.iter().position(|b| !b.is_ascii_hexdigit()).unwrap_or(line.len());
    let (digits, rest) = line.split_at(end);
    let rest = rest.trim_ascii_start();
    if digits.is_empty() || digits.len() > MAX_CHUNK_SIZE_DIGITS || !(rest.is_empty() || rest.starts_with(b";")) {
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
            let filled = match this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    this.finish();
                    continue;
                }
                Framing::Length(left) => {
                    if let Some(data) = this.take_data(left) {
                        this.framing = Framing::Length(left - data.len() as u64);
                        if this.framing == Framing::Length(0) {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(this.poll_fill(cx)) {
                        Ok(0) => return this.fail(this.closed("before the end of its answer's body")),
                        other => other,
                    }
                }
                Framing::UntilClose => {
                    if let Some(data) = this.take_data(u64::MAX) {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(this.poll_fill(cx)) {
                        Ok(0) => {
                            this.finish();
                            continue;
                        }
                        other => other,
                    }
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    if let Some(data) = this.take_data(left) {
                        let left = left - data.len() as u64;
                        this.framing = Framing::Chunked(if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) });
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(this.poll_fill(cx)) {
                        Ok(0) => return this.fail(this.closed("in the middle of a chunk")),
                        other => other,
                    }
                }
                Framing::Chunked(state) => {
                    let line = match this.take_line() {
                        Ok(line) => line,
                        Err(e) => return this.fail(e),
                    };
                    let Some(line) = line else {
                        match ready!(this.poll_fill(cx)) {
                            Ok(0) => return this.fail(this.closed("before the end of a chunked body")),
                            Ok(_) => continue,
                            Err(e) => return this.fail(e),
                        }
                    };
                    this.framing = match state {
                        Chunk::Size => match chunk_size(&line) {
                            Some(0) => Framing::Chunked(Chunk::Trailers),
                            Some(size) => Framing::Chunked(Chunk::Data(size)),
                            None => return this.fail(this.protocol("an invalid chunk size")),
                        },
                        Chunk::DataEnd if line.is_empty() => Framing::Chunked(Chunk::Size),
                        Chunk::DataEnd => return this.fail(this.protocol("chunk data longer than its size")),
                        // Trailer fields are dropped; an empty line ends the body.
                        Chunk::Trailers if line.is_empty() => {
                            this.finish();
                            Framing::Done
                        }
                        Chunk::Trailers | Chunk::Data(_) => Framing::Chunked(state),
                    };
                    continue;
                }
            };
            if let Err(e) = filled {
                return this.fail(e);
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

    #[test]
    fn chunk_sizes_are_hex_digits_then_optional_extensions() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"1A;name=value"), Some(26));
        assert_eq!(chunk_size(b"1a ;name"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        for bad in [&b""[..], b"xyz", b"+a", b" 1a", b"1a x", b"ffffffffffffffffff", b";x"] {
            assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
