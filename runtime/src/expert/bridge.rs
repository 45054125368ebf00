//! Where the model meets the transport: [`ExpertPeers`] as the model's [`ExpertDispatcher`], and the expert
//! service's compute for an expert-only rank ([`ShardCompute`]).

use baleen_api::topology::ExpertPlacement;
use candle_core::{Device, Tensor};

use super::{ExpertCompute, ExpertPeers, Pending};
use crate::error::{Error, Result};
use crate::model::{ExpertDispatcher, ExpertShard, ModelConfig, PendingRows};

/// Identifies a loaded model for the peer handshake: source, shape and dtype must agree across a group.
pub fn model_fingerprint(source: &str, config: &ModelConfig, dtype: candle_core::DType) -> String {
    format!(
        "{source}|{:?}|layers={}|hidden={}|experts={}|{dtype:?}",
        config.arch,
        config.num_hidden_layers,
        config.hidden_size,
        config.moe.as_ref().map_or(0, |m| m.n_routed_experts)
    )
}

/// A dispatch in flight over gRPC, delivered on the model's device.
struct OnDevice {
    pending: Pending,
    device: Device,
}

impl PendingRows for OnDevice {
    fn wait(self: Box<Self>) -> Result<Tensor> {
        Ok(self.pending.wait()?.to_device(&self.device)?)
    }
}

impl ExpertDispatcher for ExpertPeers {
    fn dispatch(
        &self,
        rank: usize,
        layer: usize,
        rows: &Tensor,
        experts: &[u32],
        weights: &[f32],
    ) -> Result<Box<dyn PendingRows>> {
        let pending = ExpertPeers::dispatch(self, rank, layer, rows, experts, weights)?;
        Ok(Box::new(OnDevice { pending, device: rows.device().clone() }))
    }
}

/// One request for the compute thread: layer, rows, experts, weights, and where to send the result.
type Job = (usize, Tensor, Vec<u32>, Vec<f32>, std::sync::mpsc::SyncSender<Result<Tensor>>);

/// The expert service of a rank that holds routed experts and no attention.
///
/// The shard computes on one dedicated thread that is the first worker of its own compute pool (sized by
/// `--threads`), as the head's engine thread does, rather than on whichever blocking-pool thread received the
/// request.
#[derive(Debug)]
pub struct ShardCompute {
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
    placement: ExpertPlacement,
    rank: usize,
    model_fingerprint: String,
    device: Device,
}

impl ShardCompute {
    pub fn new(
        shard: ExpertShard,
        placement: ExpertPlacement,
        rank: usize,
        model_fingerprint: String,
        device: Device,
        threads: usize,
    ) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("baleen-experts".into())
            .spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).use_current_thread().build();
                let serve = || {
                    for (layer, rows, experts, weights, reply) in rx {
                        let _ = reply.send(shard.compute(layer, &rows, &experts, &weights));
                    }
                };
                match pool {
                    Ok(pool) => pool.install(serve),
                    Err(e) => tracing::error!(error = %e, "cannot build the expert compute pool"),
                }
            })
            .map_err(|e| Error::Expert(format!("cannot start the expert compute thread: {e}")))?;
        Ok(Self { jobs: std::sync::Mutex::new(tx), placement, rank, model_fingerprint, device })
    }
}

impl ExpertCompute for ShardCompute {
    fn compute(&self, layer: usize, rows: &Tensor, experts: &[u32], weights: &[f32]) -> Result<Tensor> {
        let (reply, result) = std::sync::mpsc::sync_channel(1);
        let job = (layer, rows.to_device(&self.device)?, experts.to_vec(), weights.to_vec(), reply);
        self.jobs
            .lock()
            .map_err(|_| Error::Expert("the expert compute thread is gone".into()))?
            .send(job)
            .map_err(|_| Error::Expert("the expert compute thread is gone".into()))?;
        result.recv().map_err(|_| Error::Expert("the expert compute thread stopped".into()))?
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.placement.world_size()
    }

    fn model_fingerprint(&self) -> String {
        self.model_fingerprint.clone()
    }

    fn placement_fingerprint(&self) -> u64 {
        self.placement.fingerprint()
    }
}
