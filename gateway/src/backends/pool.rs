//! Each backend's own keep-alive connections (HTTP/1.1, no Nagle): a request takes a connection that is ready
//! for one (its previous answer fully read), else opens one; the connection goes back to the pool as soon as the
//! answer's head is in, and becomes ready again when its body has been read. No pool key, no absolute URI:
//! requests go out in origin form with the backend's `Host`.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections kept per backend at most (more are closed when their answer is done).
const MAX_POOLED: usize = 512;

/// Why a request got no answer head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nothing reached the backend: the connection could not be opened.
    #[error("cannot connect to {authority}: {reason}")]
    Connect { authority: String, reason: String },
    /// The connection failed while the request was sent or the head read.
    #[error("{0}")]
    Request(#[from] hyper::Error),
}

impl SendError {
    /// True when the backend never saw the request.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct ConnPool {
    /// `host:port`.
    authority: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl ConnPool {
    pub fn new(authority: String) -> Self {
        Self { authority, idle: Mutex::new(Vec::new()) }
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// A connection ready for a request: a pooled one (closed ones are dropped), else a new one.
    async fn checkout(&self) -> Result<SendRequest<Full<Bytes>>, SendError> {
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.retain(|c| !c.is_closed());
            if let Some(i) = idle.iter().rposition(SendRequest::is_ready) {
                return Ok(idle.swap_remove(i));
            }
        }
        let connect = |reason: String| SendError::Connect { authority: self.authority.clone(), reason };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| connect(format!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Sends `request` (origin-form URI, `Host` set by the caller) and returns the answer's head; its body streams
    /// from the connection, which is back in the pool meanwhile. A pooled connection that turns out closed before
    /// the request went out (the backend's keep-alive timeout raced us) is replaced by a new one once.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response<Incoming>, SendError> {
        let mut sender = self.checkout().await?;
        let request = match sender.try_send_request(request).await {
            Ok(response) => return Ok(self.keep(sender, response)),
            Err(mut e) => match e.take_message() {
                Some(unsent) => unsent,
                None => return Err(SendError::Request(e.into_error())),
            },
        };
        let mut sender = self.checkout().await?;
        let response = sender.send_request(request).await?;
        Ok(self.keep(sender, response))
    }

    /// Puts `sender` back (it takes the next request once `response`'s body is read).
    fn keep(&self, sender: SendRequest<Full<Bytes>>, response: Response<Incoming>) -> Response<Incoming> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_POOLED {
            idle.push(sender);
        }
        response
    }
}
