//! CUDA graphs of decode steps. A decode step on the kernels ([`super::decode`]) issues hundreds of launches for
//! work the GPU finishes in microseconds each, so issuing them costs more than running them. The first step of a
//! padded shape (batch bucket, block-table width, cache pool) is run once to warm everything up, then captured
//! into a graph; later steps of that shape upload their inputs into the graph's staging buffer and replay it with
//! one launch. A failed capture turns graphs off for the model (with a warning) and steps run as issued.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::Tensor;

use super::decode::StepShape;
use super::{DeepseekModel, SeqInput};
use crate::error::Result;
use crate::model::cache::LatentPool;

/// Batch sizes a graph is captured for; a step is padded to the next one. Larger batches run as issued.
pub const GRAPH_BATCHES: [usize; 12] = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128];

/// Block tables are padded to a power of two of at least this many blocks (their upload is tiny either way; fewer
/// widths mean fewer graphs as sequences grow).
const MIN_TABLE_BLOCKS: usize = 64;

/// The padded shape of a step, for `seqs`: `None` when the batch is larger than the largest bucket.
pub(crate) fn padded_shape(seqs: &[SeqInput<'_>], block_size: usize) -> Option<StepShape> {
    let exact = StepShape::exact(seqs, block_size);
    let batch = GRAPH_BATCHES.iter().copied().find(|&b| b >= exact.batch)?;
    Some(StepShape { batch, max_blocks: exact.max_blocks.next_power_of_two().max(MIN_TABLE_BLOCKS) })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GraphKey {
    shape: StepShape,
    pool: u64,
}

/// The decode graphs of one model.
#[derive(Default)]
pub(crate) struct DecodeGraphs {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    graphs: HashMap<GraphKey, Captured>,
    /// Why graphs were turned off, after a failed capture.
    failed: Option<String>,
}

impl std::fmt::Debug for DecodeGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (count, failed) = match self.state.lock() {
            Ok(s) => (s.graphs.len(), s.failed.clone()),
            Err(_) => (0, Some("poisoned".into())),
        };
        f.debug_struct("DecodeGraphs").field("captured", &count).field("failed", &failed).finish()
    }
}

impl DecodeGraphs {
    /// Drops every captured graph (their shapes or counters changed) and forgets a failed capture, so graphs are
    /// tried again.
    pub fn clear(&self) {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.graphs.clear();
        s.failed = None;
    }

    /// The number of graphs captured so far, and why graphs were turned off if they were.
    pub fn status(&self) -> (usize, Option<String>) {
        match self.state.lock() {
            Ok(s) => (s.graphs.len(), s.failed.clone()),
            Err(_) => (0, Some("poisoned".into())),
        }
    }

    /// Runs the decode step of `seqs` through the graph of its padded shape, capturing it first. `Ok(None)` when
    /// no graph can run it (graphs are off after a failed capture, the batch is too large, or this build has no
    /// CUDA); the caller then runs the step as issued.
    pub fn run(&self, model: &DeepseekModel, pool: &LatentPool, seqs: &[SeqInput<'_>]) -> Result<Option<Tensor>> {
        let Some(shape) = padded_shape(seqs, pool.block_size()) else { return Ok(None) };
        let key = GraphKey { shape, pool: pool.id() };
        // A panic while the lock was held leaves the graphs in an unknown state: run steps as issued.
        let Ok(mut state) = self.state.lock() else { return Ok(None) };
        if state.failed.is_some() {
            return Ok(None);
        }
        // Graphs of another pool are dead weight (a pool that grew or was replaced): each holds its logits buffer.
        state.graphs.retain(|k, _| k.pool == key.pool);
        let captured = match state.graphs.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => match Captured::capture(model, pool, shape) {
                Ok(Some(captured)) => {
                    tracing::info!(batch = shape.batch, blocks = shape.max_blocks, "captured a decode-step CUDA graph");
                    entry.insert(captured)
                }
                Ok(None) => return Ok(None),
                Err(e) => {
                    tracing::warn!(error = %e, "capturing a decode step in a CUDA graph failed; running steps as issued");
                    state.failed = Some(e.to_string());
                    return Ok(None);
                }
            },
        };
        captured.replay(model, pool, seqs, shape).map(Some)
    }
}

#[cfg(feature = "cuda")]
use capture::Captured;

#[cfg(not(feature = "cuda"))]
struct Captured;

#[cfg(not(feature = "cuda"))]
impl Captured {
    fn capture(_: &DeepseekModel, _: &LatentPool, _: StepShape) -> Result<Option<Self>> {
        Ok(None)
    }

    fn replay(&self, _: &DeepseekModel, _: &LatentPool, _: &[SeqInput<'_>], _: StepShape) -> Result<Tensor> {
        Err(crate::Error::Kernel("CUDA graphs need a build with the `cuda` feature".into()))
    }
}

#[cfg(feature = "cuda")]
mod capture {
    #![allow(unsafe_code)]

    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, sys};
    use candle_core::{DType, Tensor};

    use super::super::decode::{DeviceStep, StepShape};
    use super::super::{DeepseekModel, SeqInput};
    use crate::error::{Error, Result};
    use crate::model::cache::LatentPool;

    fn graph_error(what: &str, e: impl std::fmt::Display) -> Error {
        Error::Kernel(format!("{what}: {e}"))
    }

    /// A captured decode step: the graph, the staging buffer its kernels read their inputs from, and the logits
    /// buffer it writes.
    pub(super) struct Captured {
        graph: CudaGraph,
        staging: Tensor,
        logits: Tensor,
    }

    // SAFETY: a `CudaGraph` is not internally synchronized, so it must never be used from two threads at once;
    // every use goes through the `Mutex` of `DecodeGraphs`, which serializes them.
    unsafe impl Send for Captured {}

    impl Captured {
        /// Warms the step of `shape` up (kernels loaded, candle's launch parameters cached, cuBLAS's choices
        /// made) on padding rows, then captures it. `None` on a device that is not CUDA.
        pub(super) fn capture(model: &DeepseekModel, pool: &LatentPool, shape: StepShape) -> Result<Option<Self>> {
            let candle_core::Device::Cuda(dev) = &model.device else { return Ok(None) };
            let stream = dev.cuda_stream();
            let staging = Tensor::from_vec(shape.stage(&[], pool)?, shape.len(), &model.device)?;
            let logits = Tensor::zeros((shape.batch, model.config.vocab_size), DType::F32, &model.device)?;
            let step = DeviceStep::new(&staging, shape)?;
            let run = || -> Result<()> {
                let (out, _) = model.forward_step(pool, &step, false)?;
                logits.slice_set(&out, 0, 0)?;
                Ok(())
            };
            // candle uploads the shapes and strides of strided ops per launch; while this guard lives it serves
            // them from a cache that the warm-up fills, so the captured graph holds no host copies.
            let _cached = dev.enable_cuda_graph_htod_cache();
            run()?;
            stream.synchronize().map_err(|e| graph_error("warm-up", e))?;
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| graph_error("begin capture", e))?;
            let captured = run();
            // The capture is ended whatever happened, so the stream leaves capture mode; an error recorded where
            // none could be returned (a buffer freed during the capture) is taken here too, so it fails this
            // capture instead of a later, unrelated call.
            let ended =
                stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
            let recorded = stream.context().check_err();
            captured?;
            recorded.map_err(|e| graph_error("during capture", e))?;
            let graph = ended
                .map_err(|e| graph_error("end capture", e))?
                .ok_or_else(|| Error::Kernel("an empty graph".into()))?;
            graph.upload().map_err(|e| graph_error("upload", e))?;
            Ok(Some(Self { graph, staging, logits }))
        }

        /// Uploads the inputs of `seqs` into the staging buffer, replays the graph and returns a copy of the real
        /// rows' logits (the buffer is overwritten by the next replay).
        pub(super) fn replay(
            &self,
            model: &DeepseekModel,
            pool: &LatentPool,
            seqs: &[SeqInput<'_>],
            shape: StepShape,
        ) -> Result<Tensor> {
            let inputs = Tensor::from_vec(shape.stage(seqs, pool)?, shape.len(), &model.device)?;
            self.staging.slice_set(&inputs, 0, 0)?;
            self.graph.launch().map_err(|e| graph_error("graph launch", e))?;
            Ok(self.logits.narrow(0, 0, seqs.len())?.copy()?)
        }
    }
}
