//! Expert parallelism: the routed experts of a replica are sharded over the ranks of its group, and the head
//! sends each rank the rows routed to its experts over gRPC (`proto/expert.proto`, package `baleen.expert.v1`).
//!
//! - [`ExpertCompute`]: what a rank computes for its shard (implemented by the model).
//! - [`serve_experts`]: the tonic server every rank runs on its expert port (default 50051).
//! - [`ExpertPeers`]: the head's client, used from the synchronous engine thread. It keeps one long-lived
//!   `Exchange` stream per remote rank on a [`Driver`] runtime that the waiting thread drives itself, reconnects
//!   in the background, and fails pending dispatches at once, naming the peer, when a stream breaks.
//! - [`codec`]: candle tensors ↔ wire tensors (raw little-endian bytes, exact round trip).

pub mod codec;
mod peers;
mod service;
mod stats;

mod bridge;

pub use crate::driver::Driver;
pub use bridge::{ComputeObserver, HeldExperts, ShardCompute, model_fingerprint};
pub use peers::{ExpertPeers, Pending};
pub use service::serve_experts;
pub(crate) use stats::EXPERT_LATENCY_BUCKETS;
pub use stats::{ExpertMetrics, Stats};

/// Generated protobuf messages and the tonic client and server of `baleen.expert.v1`.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("baleen.expert.v1");
}

/// HTTP/2 per-stream flow-control window: large enough that a prefill-sized dispatch is not throttled by
/// the 64 KiB default.
pub(crate) const H2_STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 per-connection flow-control window.
pub(crate) const H2_CONNECTION_WINDOW: u32 = 16 << 20;

/// What a rank's expert service computes: for MoE layer `layer`, every row through its routed expert, weighted.
pub trait ExpertCompute: Send + Sync + 'static {
    /// `batch.rows` [m, hidden] (a CPU tensor, as decoded from the wire; move it to the compute device as
    /// needed) through `batch.experts[i]` weighted by `batch.weights[i]` for row i. Returns [m, hidden] =
    /// weights[i] * expert_{experts[i]}(rows[i]), on any device and in f32, bf16 or f16.
    fn compute(&self, batch: crate::model::experts::Dispatch<'_>) -> crate::Result<candle_core::Tensor>;
    /// This rank's index in its group.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// Identifies the loaded model (checkpoint and config); peers must agree on it.
    fn model_fingerprint(&self) -> String;
    /// Identifies the expert placement (which rank owns which experts); peers must agree on it.
    fn placement_fingerprint(&self) -> u64;
    /// Starts [`compute`](Self::compute) and returns at once; the result arrives on the receiver. Called from the
    /// expert service's async task. The default runs `compute` on tokio's blocking pool; an implementation with
    /// its own compute thread answers from that thread directly, one thread hand-off fewer each way.
    fn submit(
        self: std::sync::Arc<Self>,
        layer: usize,
        rows: candle_core::Tensor,
        experts: Vec<u32>,
        weights: Vec<f32>,
    ) -> tokio::sync::oneshot::Receiver<crate::Result<candle_core::Tensor>> {
        let (reply, result) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let batch = crate::model::experts::Dispatch { layer, rows: &rows, experts: &experts, weights: &weights };
            let _ = reply.send(self.compute(batch));
        });
        result
    }
}
