//! The head's client of the expert service: one background task per remote rank keeps a handshaken
//! `Exchange` stream open (reconnecting with backoff), and routes responses to waiting [`Pending`]s by id.
//!
//! The engine thread is synchronous: the connections live on a [`Driver`] runtime that the calling thread drives
//! itself — `dispatch` queues the request and writes it to the peer's socket before returning, and
//! [`Pending::wait`] drives the runtime until the response arrives or the deadline passes. When a stream breaks,
//! every dispatch in flight to that peer fails at once with an error naming the peer.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Endpoint;

use super::proto::expert_service_client::ExpertServiceClient;
use super::proto::{DispatchRequest, DispatchResponse, HandshakeRequest};
use super::stats::{ExpertMetrics, PeerMetrics, Stats};
use super::{Driver, H2_CONNECTION_WINDOW, H2_STREAM_WINDOW, codec};
use crate::model::experts::Dispatch;
use crate::{Error, Result};

/// First reconnection delay after a failed attempt or a broken stream; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// HTTP/2 ping interval: a peer that vanished without closing its socket is noticed within this plus the
/// client's timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// How often `wait_ready` re-checks.
const READY_POLL: Duration = Duration::from_millis(5);

/// Clients of every other rank's expert service. See the module docs.
pub struct ExpertPeers {
    /// Indexed by rank; `None` at this rank.
    peers: Vec<Option<Arc<Peer>>>,
    self_rank: usize,
    timeout: Duration,
    next_id: AtomicU64,
    stats: Arc<Stats>,
    metrics: ExpertMetrics,
    stop: CancellationToken,
    driver: Driver,
}

impl ExpertPeers {
    /// `peers` = every rank's address in rank order (host:port), own included (skipped). Connects in the
    /// background and never blocks; `timeout` bounds connecting, the handshake and each dispatch's wait.
    pub fn new(
        peers: Vec<String>,
        self_rank: usize,
        model_fingerprint: String,
        placement_fingerprint: u64,
        timeout: Duration,
    ) -> Result<Self> {
        if self_rank >= peers.len() {
            return Err(Error::Expert(format!("rank {self_rank} is outside a group of {} peers", peers.len())));
        }
        let world_size = peers.len();
        let from_rank = u32::try_from(self_rank).map_err(|_| Error::Expert("rank does not fit in u32".into()))?;
        let driver = Driver::new("baleen-expert-io")?;
        let stats = Arc::new(Stats::default());
        let metrics = ExpertMetrics::new()?;
        let stop = CancellationToken::new();
        let hello = HandshakeRequest { from_rank, model_fingerprint, placement_fingerprint };
        let mut slots = Vec::with_capacity(world_size);
        for (rank, addr) in peers.into_iter().enumerate() {
            if rank == self_rank {
                slots.push(None);
                continue;
            }
            let peer = Arc::new(Peer {
                rank,
                addr,
                state: Mutex::new(PeerState { link: None, inflight: HashMap::new(), last_error: "connecting".into() }),
                ready: AtomicBool::new(false),
                metrics: metrics.peer(rank),
                stats: stats.clone(),
            });
            let link = Connector { peer: peer.clone(), hello: hello.clone(), world_size, timeout };
            driver.spawn(link.run(stop.clone()));
            slots.push(Some(peer));
        }
        Ok(Self { peers: slots, self_rank, timeout, next_id: AtomicU64::new(1), stats, metrics, stop, driver })
    }

    /// Sends one dispatch to `rank` without waiting; the returned handle waits for the response. Fails at once
    /// when the peer is currently down.
    pub fn dispatch(&self, rank: usize, batch: Dispatch<'_>) -> Result<Pending> {
        let Dispatch { layer, rows, experts, weights } = batch;
        let peer = self.peer(rank)?;
        let m = rows.dims().first().copied().unwrap_or(0);
        if experts.len() != m || weights.len() != m {
            return Err(Error::Expert(format!(
                "dispatch to {peer}: {m} rows but {} expert ids and {} weights",
                experts.len(),
                weights.len()
            )));
        }
        let request = DispatchRequest {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            layer: u32::try_from(layer).map_err(|_| Error::Expert(format!("layer {layer} does not fit in u32")))?,
            rows: Some(codec::encode(rows)?),
            experts: experts.to_vec(),
            weights: weights.to_vec(),
        };
        let (id, bytes) = (request.id, request.encoded_len() as u64);
        let (reply, rx) = oneshot::channel();
        {
            let mut state = peer.lock();
            let sent = state.link.as_ref().is_some_and(|link| link.send(request).is_ok());
            if !sent {
                drop(state);
                peer.count_error();
                return Err(peer.down_error());
            }
            state.inflight.insert(id, Waiter { layer, sent: Instant::now(), reply });
        }
        // Write it to the socket now, so the peer works on it while this thread computes its own share.
        self.driver.flush();
        self.stats.dispatches.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        peer.metrics.bytes_sent.inc_by(bytes);
        Ok(Pending {
            id,
            layer,
            peer: peer.clone(),
            rx,
            deadline: Instant::now() + self.timeout,
            timeout: self.timeout,
            driver: self.driver.clone(),
        })
    }

    /// True once every remote peer has answered a handshake with matching fingerprints and its stream is open.
    pub fn all_ready(&self) -> bool {
        self.peers.iter().flatten().all(|peer| peer.ready.load(Ordering::Acquire))
    }

    /// Blocks up to `timeout` for [`Self::all_ready`]; the error names every peer still not ready and why.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.driver.block_on(async {
            while !self.all_ready() {
                if Instant::now() >= deadline {
                    return Err(Error::Expert(format!(
                        "expert peers not ready after {timeout:?}: {}",
                        self.not_ready().join("; ")
                    )));
                }
                tokio::time::sleep(READY_POLL).await;
            }
            Ok(())
        })
    }

    /// The runtime the connections live on (a head's engine thread drives it while it waits and while idle).
    pub fn driver(&self) -> &Driver {
        &self.driver
    }

    /// Every remote peer that is not ready, as `rank R (ADDR): last error`.
    pub fn not_ready(&self) -> Vec<String> {
        self.peers
            .iter()
            .flatten()
            .filter(|peer| !peer.ready.load(Ordering::Acquire))
            .map(|peer| format!("{peer}: {}", peer.lock().last_error))
            .collect()
    }

    /// Ranks in the group (own included).
    pub fn world_size(&self) -> usize {
        self.peers.len()
    }

    pub fn self_rank(&self) -> usize {
        self.self_rank
    }

    /// Totals since creation.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Registers the transport's Prometheus metrics into `registry`.
    pub fn register(&self, registry: &prometheus::Registry) -> Result<()> {
        self.metrics.register(registry)
    }

    fn peer(&self, rank: usize) -> Result<&Arc<Peer>> {
        match self.peers.get(rank) {
            Some(Some(peer)) => Ok(peer),
            Some(None) => Err(Error::Expert(format!("rank {rank} is this rank; compute its experts locally"))),
            None => Err(Error::Expert(format!("rank {rank} is outside a group of {}", self.peers.len()))),
        }
    }
}

impl Drop for ExpertPeers {
    fn drop(&mut self) {
        self.stop.cancel();
        for peer in self.peers.iter().flatten() {
            peer.down("the expert client shut down".to_owned());
        }
        self.driver.shutdown();
    }
}

impl fmt::Debug for ExpertPeers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpertPeers")
            .field("self_rank", &self.self_rank)
            .field("world_size", &self.peers.len())
            .field("ready", &self.all_ready())
            .finish_non_exhaustive()
    }
}

/// A dispatch in flight; [`Pending::wait`] blocks for its output.
pub struct Pending {
    id: u64,
    layer: usize,
    peer: Arc<Peer>,
    rx: oneshot::Receiver<Result<Tensor>>,
    deadline: Instant,
    timeout: Duration,
    driver: Driver,
}

impl Pending {
    /// Waits for the weighted expert outputs ([m, hidden], a CPU tensor in the dtype the peer computed).
    /// Fails fast with an error naming the peer when the peer is down or its stream broke, and fails when
    /// the timeout given to [`ExpertPeers::new`] passes.
    pub fn wait(mut self) -> Result<Tensor> {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let rx = &mut self.rx;
        match self.driver.block_on(async move { tokio::time::timeout(remaining, rx).await }) {
            Ok(Ok(result)) => result,
            Err(_elapsed) => {
                if self.peer.lock().inflight.remove(&self.id).is_none() {
                    // Answered between the timeout and the removal.
                    if let Ok(result) = self.rx.try_recv() {
                        return result;
                    }
                }
                self.peer.count_error();
                Err(Error::Expert(format!(
                    "{}: no response to the layer {} dispatch within {:?}",
                    self.peer, self.layer, self.timeout
                )))
            }
            Ok(Err(_closed)) => {
                Err(Error::Expert(format!("{}: the layer {} dispatch was dropped", self.peer, self.layer)))
            }
        }
    }

    /// The peer's rank.
    pub fn rank(&self) -> usize {
        self.peer.rank
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.peer.lock().inflight.remove(&self.id);
    }
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending").field("id", &self.id).field("peer", &self.peer.rank).finish_non_exhaustive()
    }
}

/// One remote rank, shared by the engine thread (dispatch, wait) and its connector task.
struct Peer {
    rank: usize,
    addr: String,
    state: Mutex<PeerState>,
    /// Handshaken and streaming.
    ready: AtomicBool,
    metrics: PeerMetrics,
    stats: Arc<Stats>,
}

struct PeerState {
    /// The open stream's request sender; `None` while the peer is down.
    link: Option<mpsc::UnboundedSender<DispatchRequest>>,
    /// Dispatches sent on the current stream and not yet answered, by id.
    inflight: HashMap<u64, Waiter>,
    /// Why the peer is (or last was) not ready.
    last_error: String,
}

struct Waiter {
    layer: usize,
    sent: Instant,
    reply: oneshot::Sender<Result<Tensor>>,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "expert peer rank {} ({})", self.rank, self.addr)
    }
}

impl Peer {
    fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count_error(&self) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.errors.inc();
    }

    fn down_error(&self) -> Error {
        Error::Expert(format!("{} is down: {}", self, self.lock().last_error))
    }

    /// The stream is open: accept dispatches.
    fn up(&self, link: mpsc::UnboundedSender<DispatchRequest>) {
        let mut state = self.lock();
        state.link = Some(link);
        state.last_error.clear();
        self.ready.store(true, Ordering::Release);
        self.metrics.peer_up.set(1);
        drop(state);
        tracing::info!(rank = self.rank, addr = %self.addr, "expert peer up");
    }

    /// The stream is gone: refuse new dispatches and fail every one in flight, naming the cause.
    fn down(&self, cause: String) {
        let mut state = self.lock();
        let was_up = state.link.take().is_some();
        self.ready.store(false, Ordering::Release);
        self.metrics.peer_up.set(0);
        let failed: Vec<Waiter> = state.inflight.drain().map(|(_, waiter)| waiter).collect();
        state.last_error = cause;
        let cause = state.last_error.clone();
        drop(state);
        if was_up {
            tracing::warn!(rank = self.rank, addr = %self.addr, %cause, "expert peer down");
        }
        for waiter in failed {
            self.count_error();
            let error = format!("{self}: layer {} dispatch failed: {cause}", waiter.layer);
            let _ = waiter.reply.send(Err(Error::Expert(error)));
        }
    }

    /// A connection attempt failed; log only when the reason changes.
    fn unreachable(&self, cause: String) {
        let mut state = self.lock();
        if state.last_error != cause {
            tracing::warn!(rank = self.rank, addr = %self.addr, %cause, "expert peer not reachable");
            state.last_error = cause;
        }
    }

    /// Routes one response to its waiter.
    fn complete(&self, response: DispatchResponse) {
        let Some(waiter) = self.lock().inflight.remove(&response.id) else {
            return; // Timed out or abandoned.
        };
        let elapsed = waiter.sent.elapsed();
        let result = if response.error.is_empty() {
            match response.output.as_ref() {
                Some(output) => codec::decode(output),
                None => Err(Error::Expert("response without output".into())),
            }
        } else {
            Err(Error::Expert(response.error))
        };
        let result = result.map_err(|e| Error::Expert(format!("{self}: layer {}: {e}", waiter.layer)));
        if result.is_ok() {
            self.stats.completed.fetch_add(1, Ordering::Relaxed);
            let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
            self.stats.latency_nanos.fetch_add(nanos, Ordering::Relaxed);
            self.metrics.dispatch_seconds.observe(elapsed.as_secs_f64());
        } else {
            self.count_error();
        }
        let _ = waiter.reply.send(result);
    }
}

/// The background task of one peer: connect, handshake, stream, and again after any failure.
struct Connector {
    peer: Arc<Peer>,
    hello: HandshakeRequest,
    world_size: usize,
    timeout: Duration,
}

impl Connector {
    async fn run(self, stop: CancellationToken) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let attempt = tokio::select! {
                () = stop.cancelled() => return,
                attempt = self.connect() => attempt,
            };
            match attempt {
                Ok((link, inbound)) => {
                    self.peer.up(link);
                    backoff = MIN_BACKOFF;
                    let cause = tokio::select! {
                        () = stop.cancelled() => "the expert client shut down".to_owned(),
                        cause = self.pump(inbound) => cause,
                    };
                    self.peer.down(cause);
                }
                Err(cause) => self.peer.unreachable(cause),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {},
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Connects, handshakes and opens the `Exchange` stream.
    async fn connect(
        &self,
    ) -> std::result::Result<(mpsc::UnboundedSender<DispatchRequest>, Streaming<DispatchResponse>), String> {
        let timeout = self.timeout;
        let endpoint = Endpoint::from_shared(format!("http://{}", self.peer.addr))
            .map_err(|e| format!("invalid address: {e}"))?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW);
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| format!("connect timed out after {timeout:?}"))?
            .map_err(|e| format!("connect failed: {}", source_chain(&e)))?;
        let mut client = ExpertServiceClient::new(channel).max_decoding_message_size(usize::MAX);

        let theirs = tokio::time::timeout(timeout, client.handshake(self.hello.clone()))
            .await
            .map_err(|_| format!("handshake timed out after {timeout:?}"))?
            .map_err(|status| format!("handshake rejected: {}", status.message()))?
            .into_inner();
        if theirs.rank as usize != self.peer.rank || theirs.world_size as usize != self.world_size {
            return Err(format!(
                "handshake: the service at this address is rank {} of {}, expected rank {} of {}",
                theirs.rank, theirs.world_size, self.peer.rank, self.world_size
            ));
        }
        if theirs.model_fingerprint != self.hello.model_fingerprint
            || theirs.placement_fingerprint != self.hello.placement_fingerprint
        {
            return Err(format!(
                "handshake: fingerprint mismatch: peer has model `{}` placement {:#018x}, we have `{}` {:#018x}",
                theirs.model_fingerprint,
                theirs.placement_fingerprint,
                self.hello.model_fingerprint,
                self.hello.placement_fingerprint
            ));
        }

        let (link, requests) = mpsc::unbounded_channel();
        let inbound = tokio::time::timeout(timeout, client.exchange(UnboundedReceiverStream::new(requests)))
            .await
            .map_err(|_| format!("opening the dispatch stream timed out after {timeout:?}"))?
            .map_err(|status| format!("opening the dispatch stream failed: {}", status.message()))?
            .into_inner();
        Ok((link, inbound))
    }

    /// Routes responses until the stream ends; returns why it ended.
    async fn pump(&self, mut inbound: Streaming<DispatchResponse>) -> String {
        loop {
            match inbound.message().await {
                Ok(Some(response)) => self.peer.complete(response),
                Ok(None) => return "the peer closed the dispatch stream".to_owned(),
                Err(status) => return format!("the dispatch stream broke: {}", status_text(&status)),
            }
        }
    }
}

fn status_text(status: &tonic::Status) -> String {
    let message = status.message();
    if message.is_empty() { format!("{:?}", status.code()) } else { format!("{:?}: {message}", status.code()) }
}

/// An error and its sources, `: `-joined (transport errors hide the useful part in the chain).
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
