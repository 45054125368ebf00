//! An upstream answer's body, read from its connection as the client's connection polls it: by length, by chunks
//! (extensions ignored, trailers dropped) or until the backend closes; the connection goes back to its pool when
//! the body is done.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::{Conn, Idle, SendError};
use crate::wire::{Decoded, Fields, Framing, READ_CHUNK};

/// An answer's body, read from its connection as it is polled, and the answer's end-to-end fields; the connection
/// goes back to the pool when the body is done (if it may be reused). Dropped before that (the client went away),
/// it closes the connection, so the backend cancels the request and frees its KV cache.
#[derive(Debug)]
pub struct UpstreamBody {
    conn: Option<Conn>,
    framing: Framing,
    reusable: bool,
    idle: Idle,
    authority: std::sync::Arc<str>,
    fields: Fields,
}

impl UpstreamBody {
    pub(super) fn new(
        conn: Conn,
        framing: Framing,
        reusable: bool,
        idle: Idle,
        authority: std::sync::Arc<str>,
        fields: Fields,
    ) -> Self {
        let mut body = Self { conn: Some(conn), framing, reusable, idle, authority, fields };
        if framing == Framing::Length(0) {
            // No body to wait for: the connection can take the next request now.
            body.finish();
        }
        body
    }

    /// The answer's end-to-end fields (framing, one hop's fields and `x-baleen-backend` left out), as the backend
    /// sent them. They share the bytes the connection read them into, so a body read in more than that first read
    /// is read into a new buffer.
    pub fn fields(&self) -> &Fields {
        &self.fields
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
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = SendError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, SendError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match this.framing.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.framing == Framing::Length(0) {
                        // The last bytes: the connection can take the next request before this frame is sent on.
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(reason) => return this.fail(this.protocol(reason)),
            }
            match ready!(this.poll_fill(cx)) {
                Ok(0) if this.framing == Framing::UntilClose => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(this.closed(this.framing.cut_short())),
                Ok(_) => {}
                Err(e) => return this.fail(e),
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
