//! Single-token decode steps on Baleen's CUDA kernels: every sequence's token, position, cache slot, attended
//! length and block table go to the device once per step (one upload), and every layer reads them from there —
//! the latent rows are written and attended through the block tables by kernels, the MoE layers route and dispatch
//! on the device. Nothing in the step waits for the host, so [`super::graph`] can capture it in a CUDA graph.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::{DeepseekModel, Ffn, FfnStep, ForwardOptions, ForwardOutput, SeqInput};
use crate::error::{Error, Part, Result};
use crate::kernels;
use crate::model::cache::LatentPool;
use crate::model::mla::AttentionMode;
use crate::model::moe::Routing;
pub(crate) use crate::model::step::{DeviceStep, StepShape};

impl StepShape {
    /// The smallest shape for `seqs`: their number of rows and the longest block table they need.
    pub fn exact(seqs: &[SeqInput<'_>], block_size: usize) -> Self {
        Self { batch: seqs.len(), max_blocks: blocks_needed(seqs, block_size) }
    }

    /// The staging values for `seqs` (each with one new token), padded to `batch` rows: a padding row decodes
    /// token 0 at position 0 into the pool's scratch row, which no sequence uses.
    pub fn stage(&self, seqs: &[SeqInput<'_>], pool: &LatentPool) -> Result<Vec<u32>> {
        let (b, mb) = (self.batch, self.max_blocks);
        if seqs.len() > b || blocks_needed(seqs, pool.block_size()) > mb {
            return Err(Error::internal(
                Part::Batch,
                format!(
                    "{} sequences needing {} cache blocks staged as {b} rows of {mb}",
                    seqs.len(),
                    blocks_needed(seqs, pool.block_size())
                ),
            ));
        }
        let word = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| Error::internal(Part::Batch, format!("{what} {v} exceeds 32 bits")))
        };
        let scratch_block = word(pool.num_blocks(), "cache block")?;
        let scratch_slot = word(pool.scratch_slot(), "cache slot")?;
        let mut v = vec![0u32; self.len()];
        for i in 0..b {
            let table = &mut v[4 * b + 1 + i * mb..4 * b + 1 + (i + 1) * mb];
            match seqs.get(i) {
                Some(seq) => {
                    table
                        .iter_mut()
                        .zip(seq.blocks.iter().chain(std::iter::repeat(&scratch_block)))
                        .for_each(|(t, &blk)| *t = blk);
                    let &[token] = seq.tokens else {
                        return Err(Error::internal(Part::Batch, "a decode step takes one new token per sequence"));
                    };
                    v[i] = token;
                    v[b + i] = word(seq.past, "position")?;
                    v[2 * b + i] = word(pool.slot(seq.blocks, seq.past)?, "cache slot")?;
                    v[3 * b + i] = word(seq.past + 1, "length")?;
                }
                None => {
                    table.fill(scratch_block);
                    v[2 * b + i] = scratch_slot;
                    v[3 * b + i] = 1;
                }
            }
        }
        v[4 * b] = word(seqs.len(), "sequences")?;
        Ok(v)
    }
}

/// The longest block table a decode step of `seqs` reads (at least 1).
fn blocks_needed(seqs: &[SeqInput<'_>], block_size: usize) -> usize {
    seqs.iter().map(|s| (s.past + 1).div_ceil(block_size.max(1))).max().unwrap_or(1).max(1)
}

/// How often routed-row counts kept on the device are added to the Prometheus counters while the engine is busy
/// (it also flushes them whenever it goes idle).
const COUNTS_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Routed rows per expert of every layer, counted on the device by the dispatch kernel, and the Prometheus
/// counters they are flushed to.
#[derive(Debug)]
pub(super) struct DeviceCounts {
    /// `[layers, experts]` i64 on the device.
    tensor: Tensor,
    /// What was last flushed, per layer and expert.
    flushed: Vec<i64>,
    /// Per layer (empty for dense layers), the counter of each expert.
    counters: Vec<Vec<prometheus::IntCounter>>,
    last: Instant,
}

impl DeviceCounts {
    pub(super) fn new(tensor: Tensor, counters: Vec<Vec<prometheus::IntCounter>>) -> Self {
        let flushed = vec![0; tensor.elem_count()];
        Self { tensor, flushed, counters, last: Instant::now() }
    }

    /// `[layers, experts]` i64 on the device.
    pub(super) fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// Adds what the device counted since the last flush to the counters; unless `force`, at most once per
    /// [`COUNTS_FLUSH_INTERVAL`] (a flush waits for the device).
    pub(super) fn flush(&mut self, force: bool) -> Result<()> {
        if !force && self.last.elapsed() < COUNTS_FLUSH_INTERVAL {
            return Ok(());
        }
        self.last = Instant::now();
        let now = self.tensor.flatten_all()?.to_vec1::<i64>()?;
        let experts = self.tensor.dim(1)?;
        for (i, (&n, old)) in now.iter().zip(self.flushed.iter_mut()).enumerate() {
            if n > *old {
                if let Some(c) = self.counters.get(i / experts.max(1)).and_then(|l| l.get(i % experts.max(1))) {
                    c.inc_by((n - *old) as u64);
                }
                *old = n;
            }
        }
        Ok(())
    }
}

impl DeepseekModel {
    /// Whether this batch can take the kernels' decode step: kernels on and built for this device and dtype,
    /// every sequence decoding one token, absorbed attention allowed, a device pool, every layer's MLA within the
    /// kernels' limits.
    pub(super) fn decodes_on_kernels(&self, pool: &LatentPool, seqs: &[SeqInput<'_>], options: ForwardOptions) -> bool {
        self.accel.kernels
            && self.rope_device.is_some()
            && options.attention != AttentionMode::Naive
            && !seqs.is_empty()
            && seqs.iter().all(|s| s.tokens.len() == 1)
            && pool.device_layer(0).is_some()
            && self.layers.iter().all(|l| l.self_attn.runs_on_kernels(self.dtype))
    }

    /// Whether every MoE layer runs on the kernels, so a decode step never waits for the host (a condition of
    /// capturing it).
    pub(super) fn moe_on_kernels(&self) -> bool {
        self.layers.iter().all(|l| match &l.mlp {
            Ffn::Dense(_) => true,
            Ffn::Moe(moe) => moe.runs_on_kernels(),
        })
    }

    /// The routed-row counters on the device, when [`DeepseekModel::observe_experts`] set them up.
    pub(super) fn device_counts(&self) -> Option<Tensor> {
        let counts = self.expert_counts.as_ref()?;
        Some(counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).tensor().clone())
    }

    /// One decode step from its device inputs: `[batch, vocab]` f32 logits, and each MoE layer's routing when
    /// `trace` (copied to the host, so never inside a captured graph).
    pub(super) fn forward_step(
        &self,
        pool: &LatentPool,
        step: &DeviceStep,
        trace: bool,
    ) -> Result<(Tensor, Vec<(usize, Routing)>)> {
        let tables = self.rope_device.as_ref().ok_or_else(|| Error::Kernel("no rotary tables on the device".into()))?;
        let rotary = kernels::DeviceRotary {
            cos: &tables.0,
            sin: &tables.1,
            positions: &step.positions,
            interleave: self.rope.interleaved(),
        };
        let counts = self.device_counts();
        let ffn_step = FfnStep { kernels: true, trace, counts: counts.as_ref(), real: Some(&step.real) };
        let mut x = self.embed_tokens.embedding(&step.ids)?;
        let mut router = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            let attn = layer.self_attn.forward_decode(&h, &rotary, pool, step, i)?;
            x = (x + attn)?;
            let ffn = self.feed_forward(i, &x, ffn_step, &mut router)?;
            x = (x + ffn)?;
        }
        let x = self.norm.forward(&x)?;
        Ok((self.lm_head.forward(&x)?.to_dtype(DType::F32)?, router))
    }

    /// A decode step run as it is issued (no graph): its exact shape staged and uploaded, then
    /// [`DeepseekModel::forward_step`].
    pub(super) fn forward_decode(
        &self,
        pool: &LatentPool,
        seqs: &[SeqInput<'_>],
        trace: bool,
    ) -> Result<ForwardOutput> {
        let shape = StepShape::exact(seqs, pool.block_size());
        let staging = Tensor::from_vec(shape.stage(seqs, pool)?, shape.len(), &self.device)?;
        let (logits, router) = self.forward_step(pool, &DeviceStep::new(&staging, shape)?, trace)?;
        Ok(ForwardOutput { logits, router })
    }

    /// The rotary tables for every position on the device, when the kernels' decode step can run here.
    pub(super) fn device_rope_tables(&self) -> Result<Option<Arc<(Tensor, Tensor)>>> {
        if !kernels::available(&self.device) || !kernels::supports_dtype(self.dtype) {
            return Ok(None);
        }
        let positions: Vec<usize> = (0..self.config.max_position_embeddings).collect();
        let tables = self.rope.tables(&positions);
        Ok(Some(Arc::new(self.rope.cos_sin(&tables, self.dtype, &self.device)?)))
    }

    /// Adds the routed rows counted on the device to the Prometheus counters: at most once a second unless
    /// `force` (the engine forces it when it goes idle). Nothing to do unless [`DeepseekModel::observe_experts`]
    /// set device counters up.
    pub fn flush_expert_counts(&self, force: bool) -> Result<()> {
        match &self.expert_counts {
            Some(counts) => counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).flush(force),
            None => Ok(()),
        }
    }
}

/// Shared, lockable device counters (the model is cloned into the engine).
pub(super) type SharedCounts = Arc<Mutex<DeviceCounts>>;

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::deepseek::graph::padded_shape;

    /// The staging buffer holds each sequence's token, position, slot, length and block table; padding rows decode
    /// token 0 at position 0 into the scratch row, through a table of scratch blocks.
    #[test]
    fn staging_lays_out_real_and_padding_rows() {
        let pool = LatentPool::new(1, 4, 4, 10, DType::F32, &Device::Cpu).unwrap();
        let (a, b) = (vec![7u32, 2], vec![5u32]);
        let seqs = [SeqInput { tokens: &[11], past: 5, blocks: &a }, SeqInput { tokens: &[12], past: 0, blocks: &b }];
        let shape = StepShape { batch: 3, max_blocks: 2 };
        let v = shape.stage(&seqs, &pool).unwrap();
        assert_eq!(v.len(), shape.len());
        assert_eq!(&v[0..3], &[11, 12, 0], "tokens");
        assert_eq!(&v[3..6], &[5, 0, 0], "positions");
        // Position 5 is slot 1 of block 2 (the table's second block); position 0 slot 0 of block 5; padding: the
        // scratch row after the 10 blocks of 4.
        assert_eq!(&v[6..9], &[2 * 4 + 1, 5 * 4, 40], "slots");
        assert_eq!(&v[9..12], &[6, 1, 1], "lengths");
        assert_eq!(v[12], 2, "real sequences");
        assert_eq!(&v[13..], &[7, 2, 5, 10, 10, 10], "block tables, padded with the scratch block");
        assert_eq!(StepShape::exact(&seqs, 4), StepShape { batch: 2, max_blocks: 2 });
        // A table too narrow or too few rows is an error, not a truncation.
        assert!(StepShape { batch: 1, max_blocks: 2 }.stage(&seqs, &pool).is_err());
        assert!(StepShape { batch: 2, max_blocks: 1 }.stage(&seqs, &pool).is_err());
        let prefill = [SeqInput { tokens: &[1, 2], past: 0, blocks: &b }];
        assert!(StepShape { batch: 1, max_blocks: 1 }.stage(&prefill, &pool).is_err());
    }

    /// Steps are padded to the next graph batch and a power-of-two table width; batches past the largest bucket
    /// get no graph.
    #[test]
    fn graph_shapes_pad_batches_and_tables() {
        let blocks: Vec<u32> = (0..100).collect();
        let seq = |past| SeqInput { tokens: &[1], past, blocks: &blocks };
        let three = [seq(3), seq(17), seq(2)];
        let shape = padded_shape(&three, 16).unwrap();
        assert_eq!((shape.batch, shape.max_blocks), (4, 64));
        let long = [seq(16 * 70)];
        assert_eq!(padded_shape(&long, 16).unwrap().max_blocks, 128);
        let many: Vec<SeqInput<'_>> = (0..129).map(|_| seq(1)).collect();
        assert!(padded_shape(&many, 16).is_none());
        assert_eq!(padded_shape(&many[..128], 16).unwrap().batch, 128);
    }
}
