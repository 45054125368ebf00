//! The expert gRPC service every rank runs for its shard of the routed experts: `Handshake` checks that the
//! caller loaded the same model with the same placement, `Exchange` runs each dispatch of a long-lived stream
//! through [`ExpertCompute`] and answers it by id.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use super::proto::expert_service_server::{ExpertService, ExpertServiceServer};
use super::proto::{DispatchRequest, DispatchResponse, HandshakeRequest, HandshakeResponse};
use super::{ExpertCompute, H2_CONNECTION_WINDOW, H2_STREAM_WINDOW, codec};
use crate::{Error, Result};

/// Responses buffered per stream before the service waits for the client to read.
const RESPONSE_BUFFER: usize = 32;

/// Serves the expert service on `listener` until `shutdown` completes. On shutdown every open `Exchange`
/// stream is ended (clients see the peer go away at once) and the server waits for connections to close.
pub async fn serve_experts(
    listener: TcpListener,
    compute: Arc<dyn ExpertCompute>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let stop = CancellationToken::new();
    let service = Service { compute, stop: stop.clone() };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .add_service(ExpertServiceServer::new(service).max_decoding_message_size(usize::MAX))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            stop.cancel();
        })
        .await
        .map_err(|e| Error::Expert(format!("expert gRPC server: {e}")))
}

struct Service {
    compute: Arc<dyn ExpertCompute>,
    /// Cancelled at shutdown: ends every `Exchange` stream so graceful shutdown does not wait on them forever.
    stop: CancellationToken,
}

impl Service {
    fn me(&self) -> String {
        format!("rank {}", self.compute.rank())
    }
}

#[tonic::async_trait]
impl ExpertService for Service {
    async fn handshake(&self, request: Request<HandshakeRequest>) -> Result<Response<HandshakeResponse>, Status> {
        let req = request.into_inner();
        let model = self.compute.model_fingerprint();
        let placement = self.compute.placement_fingerprint();
        if req.model_fingerprint != model {
            return Err(Status::failed_precondition(format!(
                "model fingerprint mismatch: rank {} has `{}`, {} has `{model}`",
                req.from_rank,
                req.model_fingerprint,
                self.me()
            )));
        }
        if req.placement_fingerprint != placement {
            return Err(Status::failed_precondition(format!(
                "placement fingerprint mismatch: rank {} has {:#018x}, {} has {placement:#018x}",
                req.from_rank,
                req.placement_fingerprint,
                self.me()
            )));
        }
        let (rank, world_size) = (self.compute.rank(), self.compute.world_size());
        tracing::info!(from_rank = req.from_rank, rank, "expert handshake accepted");
        Ok(Response::new(HandshakeResponse {
            rank: u32::try_from(rank).map_err(|_| Status::internal("rank does not fit in u32"))?,
            world_size: u32::try_from(world_size).map_err(|_| Status::internal("world size does not fit in u32"))?,
            model_fingerprint: model,
            placement_fingerprint: placement,
        }))
    }

    type ExchangeStream = ReceiverStream<Result<DispatchResponse, Status>>;

    async fn exchange(
        &self,
        request: Request<Streaming<DispatchRequest>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        // The task ends when the client closes its side, the client stops reading, or the server shuts down.
        tokio::spawn(run_exchange(inbound, tx, self.compute.clone(), self.stop.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Answers the dispatches of one stream in order.
async fn run_exchange(
    mut inbound: Streaming<DispatchRequest>,
    tx: mpsc::Sender<Result<DispatchResponse, Status>>,
    compute: Arc<dyn ExpertCompute>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => break,
            next = inbound.message() => next,
        };
        let request = match next {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(%status, "expert exchange stream ended");
                break;
            }
        };
        let id = request.id;
        let response = tokio::select! {
            () = stop.cancelled() => break,
            result = run_dispatch(request, compute.clone()) => match result {
                Ok(output) => DispatchResponse { id, output: Some(output), error: String::new() },
                Err(e) => DispatchResponse { id, output: None, error: e.to_string() },
            },
        };
        if tx.send(Ok(response)).await.is_err() {
            break;
        }
    }
}

/// Dispatches up to this many row bytes are decoded and encoded on the async task itself (microseconds); larger
/// ones (prefill) on the blocking pool, so a worker thread is never held for long.
const INLINE_CODEC_BYTES: usize = 256 << 10;

/// Decodes one dispatch, hands it to the rank's compute (which answers this task directly) and encodes the
/// output.
async fn run_dispatch(request: DispatchRequest, compute: Arc<dyn ExpertCompute>) -> Result<super::proto::Tensor> {
    let DispatchRequest { layer, rows, experts, weights, .. } = request;
    let rows = rows.ok_or_else(|| Error::Expert("dispatch without rows".to_owned()))?;
    let inline = rows.data.len() <= INLINE_CODEC_BYTES;
    let rows = if inline { codec::decode(&rows)? } else { blocking(move || codec::decode(&rows)).await? };
    let m = rows.dims().first().copied().unwrap_or(0);
    if experts.len() != m || weights.len() != m {
        return Err(Error::Expert(format!(
            "dispatch has {m} rows but {} expert ids and {} weights",
            experts.len(),
            weights.len()
        )));
    }
    let shape = rows.shape().clone();
    let output = compute
        .submit(layer as usize, rows, experts, weights)
        .await
        .map_err(|_| Error::Expert("the expert computation was dropped".to_owned()))??;
    if output.shape() != &shape {
        return Err(Error::Expert(format!(
            "expert compute returned shape {:?} for rows of shape {shape:?}",
            output.shape()
        )));
    }
    if inline { codec::encode(&output) } else { blocking(move || codec::encode(&output)).await }
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(|e| Error::Expert(format!("expert codec task failed: {e}")))?
}
