//! Where the model meets the transport: [`ExpertPeers`] as the model's [`ExpertDispatcher`], and the expert
//! service's compute for an expert-only rank ([`ShardCompute`]).

use baleen_api::topology::ExpertPlacement;
use candle_core::{Device, Tensor};

use super::{Driver, ExpertCompute, ExpertPeers, Pending};
use crate::error::{Error, Result};
use crate::model::experts::Dispatch;
use crate::model::host::Quantize;
use crate::model::{DeepseekModel, ExpertDispatcher, ExpertShard, ModelConfig, PendingRows};

/// Identifies a loaded model for the peer handshake: source, shape and dtype must agree across a group.
pub fn model_fingerprint(source: &str, config: &ModelConfig, dtype: candle_core::DType, quantize: Quantize) -> String {
    format!(
        "{source}|{:?}|layers={}|hidden={}|experts={}|{dtype:?}|{}",
        config.arch,
        config.num_hidden_layers,
        config.hidden_size,
        config.moe.as_ref().map_or(0, |m| m.n_routed_experts),
        quantize.as_str()
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
    fn dispatch(&self, rank: usize, batch: Dispatch<'_>) -> Result<Box<dyn PendingRows>> {
        let pending = ExpertPeers::dispatch(self, rank, batch)?;
        Ok(Box::new(OnDevice { pending, device: batch.rows.device().clone() }))
    }

    fn driver(&self) -> Option<Driver> {
        Some(self.driver().clone())
    }
}

/// One request for the compute thread: layer, rows, experts, weights, and where to send the result.
type Job = (usize, Tensor, Vec<u32>, Vec<f32>, Reply);

/// Where the compute thread sends a job's result: a blocked thread, or an async task (woken directly).
enum Reply {
    Blocking(std::sync::mpsc::SyncSender<Result<Tensor>>),
    Async(tokio::sync::oneshot::Sender<Result<Tensor>>),
}

impl Reply {
    fn send(self, result: Result<Tensor>) {
        // A receiver that is gone (the request was cancelled) needs no answer.
        match self {
            Self::Blocking(tx) => drop(tx.send(result)),
            Self::Async(tx) => drop(tx.send(result)),
        }
    }
}

/// Called after each computation with the layer, the rows computed and the seconds it took (queueing included):
/// how an expert-only rank feeds its metrics.
pub type ComputeObserver = std::sync::Arc<dyn Fn(usize, usize, f64) + Send + Sync>;

/// Dispatches of at most this many rows that find the compute thread idle run on the service task that received
/// them: two thread hand-offs fewer per dispatch (measured: ~30 µs of a ~100 µs loopback exchange), and nothing
/// to batch them with anyway. Larger ones, and any that arrive while the thread works, queue for it.
const INLINE_COMPUTE_ROWS: usize = 64;

/// The routed experts a rank serves to the others.
#[derive(Debug)]
pub enum HeldExperts {
    /// An expert-only rank: its shard and nothing else.
    Shard(ExpertShard),
    /// A head under data-parallel attention: the experts its own model holds.
    Model(Box<DeepseekModel>),
}

impl HeldExperts {
    fn compute(&self, batch: Dispatch<'_>) -> Result<Tensor> {
        match self {
            Self::Shard(shard) => shard.compute(batch),
            Self::Model(model) => model.compute_experts(batch),
        }
    }
}

/// A rank's expert service.
///
/// The experts compute on one dedicated thread that is the first worker of its own compute pool (sized by
/// `--threads`), as the head's engine thread does. Requests that arrive together — from several heads under
/// data-parallel attention — are batched: all waiting requests of the same layer run as one expert computation.
/// A small request that finds that thread idle on a CPU rank is computed where it arrived instead.
pub struct ShardCompute {
    held: std::sync::Arc<HeldExperts>,
    /// Jobs queued for or running on the compute thread.
    busy: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    observer: Option<ComputeObserver>,
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<(Job, std::time::Instant)>>,
    placement: ExpertPlacement,
    rank: usize,
    model_fingerprint: String,
    device: Device,
}

impl ShardCompute {
    pub fn new(
        held: HeldExperts,
        placement: ExpertPlacement,
        rank: usize,
        model_fingerprint: String,
        device: Device,
        threads: usize,
        observer: Option<ComputeObserver>,
    ) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<(Job, std::time::Instant)>();
        let held = std::sync::Arc::new(held);
        let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (thread_held, thread_busy, thread_observer) = (held.clone(), busy.clone(), observer.clone());
        std::thread::Builder::new()
            .name("baleen-experts".into())
            .spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).use_current_thread().build();
                let serve = move || {
                    while let Ok(first) = rx.recv() {
                        let mut jobs = vec![first];
                        jobs.extend(rx.try_iter());
                        let count = jobs.len();
                        // (layer, rows, queued at) of each job, only when someone watches.
                        let observed: Vec<(usize, usize, std::time::Instant)> = match &thread_observer {
                            Some(_) => jobs.iter().map(|(j, at)| (j.0, j.2.len(), *at)).collect(),
                            None => Vec::new(),
                        };
                        run_batched(&thread_held, jobs.into_iter().map(|(j, _)| j).collect());
                        thread_busy.fetch_sub(count, std::sync::atomic::Ordering::AcqRel);
                        if let Some(observe) = &thread_observer {
                            for (layer, rows, at) in observed {
                                observe(layer, rows, at.elapsed().as_secs_f64());
                            }
                        }
                    }
                };
                match pool {
                    Ok(pool) => pool.install(serve),
                    Err(e) => tracing::error!(error = %e, "cannot build the expert compute pool"),
                }
            })
            .map_err(|e| Error::Expert(format!("cannot start the expert compute thread: {e}")))?;
        Ok(Self { held, busy, observer, jobs: std::sync::Mutex::new(tx), placement, rank, model_fingerprint, device })
    }
}

impl std::fmt::Debug for ShardCompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardCompute").field("rank", &self.rank).field("device", &self.device).finish()
    }
}

/// Runs waiting jobs, one expert computation per layer over the concatenated rows, and answers each job with its
/// own slice.
fn run_batched(held: &HeldExperts, mut jobs: Vec<Job>) {
    while !jobs.is_empty() {
        let layer = jobs[0].0;
        let (same, rest): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| j.0 == layer);
        jobs = rest;
        if same.len() == 1 {
            if let Some((layer, rows, experts, weights, reply)) = same.into_iter().next() {
                reply.send(held.compute(Dispatch { layer, rows: &rows, experts: &experts, weights: &weights }));
            }
            continue;
        }
        let rows: Vec<&Tensor> = same.iter().map(|j| &j.1).collect();
        let experts: Vec<u32> = same.iter().flat_map(|j| j.2.iter().copied()).collect();
        let weights: Vec<f32> = same.iter().flat_map(|j| j.3.iter().copied()).collect();
        let out = Tensor::cat(&rows, 0)
            .map_err(Into::into)
            .and_then(|r| held.compute(Dispatch { layer, rows: &r, experts: &experts, weights: &weights }));
        let mut offset = 0;
        for (_, rows, _, _, reply) in same {
            let n = rows.dim(0).unwrap_or(0);
            let part = match &out {
                Ok(t) => t.narrow(0, offset, n).map_err(Into::into),
                Err(e) => Err(Error::Expert(format!("batched expert computation failed: {e}"))),
            };
            offset += n;
            reply.send(part);
        }
    }
}

impl ShardCompute {
    fn enqueue(&self, job: Job) -> Result<()> {
        let jobs = self.jobs.lock().map_err(|_| Error::Expert("the expert compute thread is gone".into()))?;
        self.busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        jobs.send((job, std::time::Instant::now())).map_err(|_| {
            self.busy.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            Error::Expert("the expert compute thread is gone".into())
        })
    }

    /// Computes a small request on the calling thread when the compute thread is idle (CPU ranks only).
    fn compute_inline(&self, batch: Dispatch<'_>) -> Option<Result<Tensor>> {
        let idle = self.busy.load(std::sync::atomic::Ordering::Acquire) == 0;
        if !(idle && self.device.is_cpu() && batch.experts.len() <= INLINE_COMPUTE_ROWS) {
            return None;
        }
        let started = std::time::Instant::now();
        let result = self.held.compute(batch);
        if let Some(observe) = &self.observer {
            observe(batch.layer, batch.experts.len(), started.elapsed().as_secs_f64());
        }
        Some(result)
    }
}

impl ExpertCompute for ShardCompute {
    fn compute(&self, batch: Dispatch<'_>) -> Result<Tensor> {
        let (reply, result) = std::sync::mpsc::sync_channel(1);
        let rows = batch.rows.to_device(&self.device)?;
        self.enqueue((batch.layer, rows, batch.experts.to_vec(), batch.weights.to_vec(), Reply::Blocking(reply)))?;
        result.recv().map_err(|_| Error::Expert("the expert compute thread stopped".into()))?
    }

    fn submit(
        self: std::sync::Arc<Self>,
        layer: usize,
        rows: Tensor,
        experts: Vec<u32>,
        weights: Vec<f32>,
    ) -> tokio::sync::oneshot::Receiver<Result<Tensor>> {
        let (reply, result) = tokio::sync::oneshot::channel();
        if let Some(done) = self.compute_inline(Dispatch { layer, rows: &rows, experts: &experts, weights: &weights }) {
            let _ = reply.send(done);
            return result;
        }
        let queued = rows
            .to_device(&self.device)
            .map_err(Into::into)
            .and_then(|rows| self.enqueue((layer, rows, experts, weights, Reply::Async(reply))));
        if let Err(e) = queued {
            // The job (and its reply) was not queued: answer through a fresh channel.
            let (reply, result) = tokio::sync::oneshot::channel();
            let _ = reply.send(Err(e));
            return result;
        }
        result
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin;
    use candle_core::DType;

    /// A small dispatch on an idle rank is computed where it arrives, a large one on the compute thread; both equal
    /// the shard's own computation and both reach the observer.
    #[test]
    fn small_dispatches_on_an_idle_rank_compute_inline_with_the_same_results() {
        let config = builtin::config(builtin::TINY_MOE).unwrap();
        let placement = ExpertPlacement::contiguous(16, 2).unwrap();
        let vb = builtin::var_builder(DType::F32, &Device::Cpu);
        let shard = ExpertShard::load(&config, &placement, 1, vb.clone()).unwrap();
        let reference = ExpertShard::load(&config, &placement, 1, vb).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let observer: ComputeObserver =
            std::sync::Arc::new(move |layer, rows, _| log.lock().unwrap().push((layer, rows)));
        let compute = std::sync::Arc::new(
            ShardCompute::new(HeldExperts::Shard(shard), placement, 1, "m".into(), Device::Cpu, 1, Some(observer))
                .unwrap(),
        );
        for n in [3, INLINE_COMPUTE_ROWS + 5] {
            let rows = Tensor::from_vec(
                (0..n * 64).map(|i| (i as f32 * 0.11).cos()).collect::<Vec<_>>(),
                (n, 64),
                &Device::Cpu,
            )
            .unwrap();
            let experts: Vec<u32> = (0..n).map(|i| 8 + (i % 8) as u32).collect();
            let weights: Vec<f32> = (0..n).map(|i| 0.1 * (i % 5) as f32 + 0.2).collect();
            let got = compute
                .clone()
                .submit(2, rows.clone(), experts.clone(), weights.clone())
                .blocking_recv()
                .unwrap()
                .unwrap();
            let want =
                reference.compute(Dispatch { layer: 2, rows: &rows, experts: &experts, weights: &weights }).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "{n} rows differ by {diff}");
        }
        // The large job's observation comes from the compute thread right after it answers.
        for _ in 0..200 {
            if seen.lock().unwrap().len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(*seen.lock().unwrap(), vec![(2, 3), (2, INLINE_COMPUTE_ROWS + 5)]);
    }

    #[test]
    fn requests_of_one_layer_from_several_heads_run_batched_with_the_same_results() {
        let config = builtin::config(builtin::TINY_MOE).unwrap();
        let placement = ExpertPlacement::contiguous(16, 2).unwrap();
        let vb = builtin::var_builder(DType::F32, &Device::Cpu);
        let held = HeldExperts::Shard(ExpertShard::load(&config, &placement, 1, vb).unwrap());
        let rows = |seed: f32, n: usize| {
            Tensor::from_vec(
                (0..n * 64).map(|i| ((i as f32) * 0.37 + seed).sin()).collect::<Vec<_>>(),
                (n, 64),
                &Device::Cpu,
            )
            .unwrap()
        };
        let jobs_in =
            [(1, rows(0.1, 3), vec![8, 9, 15], vec![0.5, 1.0, 2.0]), (1, rows(0.7, 2), vec![12, 8], vec![1.5, 0.25])];
        let alone: Vec<Tensor> = jobs_in
            .iter()
            .map(|(l, r, e, w)| held.compute(Dispatch { layer: *l, rows: r, experts: e, weights: w }).unwrap())
            .collect();
        let mut replies = Vec::new();
        let jobs: Vec<Job> = jobs_in
            .iter()
            .map(|(l, r, e, w)| {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                replies.push(rx);
                (*l, r.clone(), e.clone(), w.clone(), Reply::Blocking(tx))
            })
            .collect();
        run_batched(&held, jobs);
        for (rx, want) in replies.into_iter().zip(alone) {
            let got = rx.recv().unwrap().unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "batched result differs by {diff}");
        }
    }
}
