//! The body of every gateway answer: our own (JSON, metrics) or an upstream's, streamed through frame by frame.
//! An upstream body holds the request's in-flight guard (released when the answer ends or the client goes away)
//! and observes the time to its first byte.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use crate::backends::Backend;
use crate::backends::pool::{SendError, UpstreamBody};

/// One request in flight on a backend: counted from creation to drop, in the backend's own count (routing) and
/// in its in-flight gauge (once [`Backend::metrics`] has looked its series up).
#[derive(Debug)]
pub struct InFlight {
    pub backend: Arc<Backend>,
}

impl InFlight {
    pub fn new(backend: Arc<Backend>) -> Self {
        backend.begin();
        if let Some(series) = backend.series() {
            series.in_flight.inc();
        }
        Self { backend }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.end();
        if let Some(series) = self.backend.series() {
            series.in_flight.dec();
        }
    }
}

/// An upstream answer's body on its way to the client, with the answer's end-to-end fields (`inner.fields()`) and
/// the backend it came from, which the client's connection writes after the answer's own head fields, and names in
/// `x-baleen-backend`. Dropping it (the client disconnected) drops the upstream connection, so the backend cancels
/// the request and frees its KV cache. `first_byte`: when the request arrived, until its first byte is sent (the
/// backend's time-to-first-byte histogram observes it then).
#[derive(Debug)]
pub struct Upstream {
    pub inner: UpstreamBody,
    pub first_byte: Option<Instant>,
    pub in_flight: InFlight,
}

/// See the module docs.
#[derive(Debug)]
pub enum ResponseBody {
    Full(Full<Bytes>),
    Upstream(Box<Upstream>),
}

impl ResponseBody {
    /// The upstream answer this body is, if it is one.
    pub fn upstream(&self) -> Option<&Upstream> {
        match self {
            Self::Full(_) => None,
            Self::Upstream(up) => Some(up),
        }
    }
}

impl From<Bytes> for ResponseBody {
    fn from(bytes: Bytes) -> Self {
        Self::Full(Full::new(bytes))
    }
}

impl From<String> for ResponseBody {
    fn from(text: String) -> Self {
        Self::Full(Full::new(Bytes::from(text)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = SendError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, SendError>>> {
        match self.get_mut() {
            Self::Full(full) => match Pin::new(full).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            Self::Upstream(up) => {
                let polled = Pin::new(&mut up.inner).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled
                    && frame.is_data()
                    && let Some(arrived) = up.first_byte.take()
                    && let Some(series) = up.in_flight.backend.series()
                {
                    series.ttfb.observe(arrived.elapsed().as_secs_f64());
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(full) => full.is_end_stream(),
            Self::Upstream(up) => up.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(full) => full.size_hint(),
            Self::Upstream(up) => up.inner.size_hint(),
        }
    }
}
