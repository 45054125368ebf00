//! The paged latent KV cache. Per layer, a pool of fixed-size blocks of latent rows; each row holds the
//! `kv_lora_rank + qk_rope_head_dim` values MLA caches per token (the normalized compressed KV and the rotated
//! shared key). A sequence owns an ordered list of blocks (its block table); token `t` lives in slot
//! `t % block_size` of block `blocks[t / block_size]`.
//!
//! Storage is chosen at construction: plain f32 host memory on the CPU for the models the host kernels run (f32 and
//! bf16; read directly by the fused attention kernel, no copies), or one candle tensor per layer on any other device
//! or dtype (written with `slice_set`, read with `index_select`).

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Part, Result};

/// Identities of pool allocations (a captured decode graph is tied to the tensors of one).
static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

fn next_pool_id() -> u64 {
    NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed)
}

#[derive(Debug, Clone)]
enum Storage {
    /// `[num_blocks * block_size * latent_dim]` per layer.
    Host(Vec<Vec<f32>>),
    /// `[num_blocks * block_size + 1, latent_dim]` per layer: the last row is scratch space that no sequence
    /// owns, where the padding rows of a captured decode step write and read.
    Device(Vec<Tensor>),
}

#[derive(Debug, Clone)]
pub struct LatentPool {
    storage: Storage,
    num_layers: usize,
    block_size: usize,
    num_blocks: usize,
    latent_dim: usize,
    dtype: DType,
    device: Device,
    /// Next never-used block, for the growable pools of single-process tools ([`LatentPool::extend`]).
    bump: usize,
    /// Changes whenever the storage is reallocated.
    id: u64,
}

/// One sequence's slice of a packed batch: its new tokens are rows `start..start + len` of the batch, placed
/// after the `past` tokens its block table already holds.
#[derive(Debug, Clone, Copy)]
pub struct SeqSlice<'a> {
    pub start: usize,
    pub len: usize,
    pub past: usize,
    pub blocks: &'a [u32],
}

/// A sequence's cache state for tools that manage blocks themselves with [`LatentPool::extend`] (the engine uses
/// its own allocator instead).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqCache {
    pub blocks: Vec<u32>,
    /// Tokens cached.
    pub len: usize,
}

impl LatentPool {
    pub fn new(
        num_layers: usize,
        latent_dim: usize,
        block_size: usize,
        num_blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::Setting { name: "block-size".into(), reason: "must be at least 1".into() });
        }
        let rows = num_blocks * block_size;
        let storage = if Self::host_storage(device, dtype) {
            // One zeroed allocation per layer (lazily mapped by the OS), not clones of one.
            Storage::Host((0..num_layers).map(|_| vec![0f32; rows * latent_dim]).collect())
        } else {
            Storage::Device(
                (0..num_layers)
                    .map(|_| Tensor::zeros((rows + 1, latent_dim), dtype, device))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            )
        };
        let device = device.clone();
        Ok(Self { storage, num_layers, block_size, num_blocks, latent_dim, dtype, device, bump: 0, id: next_pool_id() })
    }

    /// The identity of the current storage: equal ids mean the same device tensors.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The rows of `layer` as one device tensor (`[num_blocks * block_size + 1, latent_dim]`, the last row
    /// scratch); `None` for host pools.
    pub fn device_layer(&self, layer: usize) -> Option<&Tensor> {
        match &self.storage {
            Storage::Device(layers) => layers.get(layer),
            Storage::Host(_) => None,
        }
    }

    /// The scratch row of a device pool (block `num_blocks`, slot 0): owned by no sequence.
    pub fn scratch_slot(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Forgets which blocks [`LatentPool::extend`] handed out, so a tool can reuse the pool's storage for new
    /// sequences (their rows are overwritten before they are read).
    pub fn reset(&mut self) {
        self.bump = 0;
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn latent_dim(&self) -> usize {
        self.latent_dim
    }

    /// The dtype a pool for a `dtype` model on `device` stores its rows in: f32 host rows on the CPU for the
    /// models the host kernels run (f32, and bf16, whose attention computes in f32), else `dtype` itself.
    pub fn storage_dtype(device: &Device, dtype: DType) -> DType {
        if Self::host_storage(device, dtype) { DType::F32 } else { dtype }
    }

    /// Whether a pool for a `dtype` model on `device` keeps its rows in host memory (the models the host kernels run).
    fn host_storage(device: &Device, dtype: DType) -> bool {
        device.is_cpu() && super::host::host_dtype(dtype)
    }

    /// Bytes one block takes across all layers.
    pub fn bytes_per_block(&self) -> usize {
        let element = Self::storage_dtype(&self.device, self.dtype).size_in_bytes();
        self.num_layers * self.block_size * self.latent_dim * element
    }

    /// The host rows of `layer` (host pools only): `[num_blocks * block_size * latent_dim]`.
    pub(crate) fn host_layer(&self, layer: usize) -> Option<&[f32]> {
        match &self.storage {
            Storage::Host(layers) => layers.get(layer).map(Vec::as_slice),
            Storage::Device(_) => None,
        }
    }

    /// The cache row of position `pos` of the sequence with block table `blocks`.
    pub(crate) fn slot(&self, blocks: &[u32], pos: usize) -> Result<usize> {
        let block = blocks
            .get(pos / self.block_size)
            .ok_or_else(|| Error::internal(Part::KvCache, format!("no cache block for position {pos}")))?;
        if *block as usize >= self.num_blocks {
            return Err(Error::internal(Part::KvCache, format!("cache block {block} out of range")));
        }
        Ok(*block as usize * self.block_size + pos % self.block_size)
    }

    /// Writes `rows` (`[n, latent_dim]`) for `layer` at positions `start..start + n` of the sequence whose block
    /// table is `blocks`.
    pub fn write(&mut self, layer: usize, blocks: &[u32], start: usize, rows: &Tensor) -> Result<()> {
        let (n, dim) = rows.dims2()?;
        if dim != self.latent_dim {
            return Err(Error::internal(
                Part::KvCache,
                format!("latent row width {dim} != cache width {}", self.latent_dim),
            ));
        }
        let slots = (start..start + n).map(|p| self.slot(blocks, p)).collect::<Result<Vec<_>>>()?;
        match &mut self.storage {
            Storage::Host(layers) => {
                let data = rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let dst =
                    layers.get_mut(layer).ok_or_else(|| Error::internal(Part::KvCache, format!("no layer {layer}")))?;
                for (row, slot) in data.chunks_exact(dim).zip(slots) {
                    dst[slot * dim..(slot + 1) * dim].copy_from_slice(row);
                }
            }
            Storage::Device(layers) => {
                let dst =
                    layers.get(layer).ok_or_else(|| Error::internal(Part::KvCache, format!("no layer {layer}")))?;
                let rows = rows.to_dtype(self.dtype)?;
                // Runs of consecutive slots (within a block) are written with one slice_set each.
                let mut i = 0;
                while i < n {
                    let mut j = i + 1;
                    while j < n && slots[j] == slots[j - 1] + 1 {
                        j += 1;
                    }
                    dst.slice_set(&rows.narrow(0, i, j - i)?.contiguous()?, 0, slots[i])?;
                    i = j;
                }
            }
        }
        Ok(())
    }

    /// Writes every sequence's new rows of a packed batch (`rows`, `[tokens, latent_dim]`) for `layer`: one host
    /// copy of the batch, then row copies, for host pools; otherwise [`LatentPool::write`] for a single sequence
    /// (runs of consecutive slots) and one scatter for several.
    pub fn write_seqs(&mut self, layer: usize, rows: &Tensor, seqs: &[SeqSlice<'_>]) -> Result<()> {
        let (_, dim) = rows.dims2()?;
        if dim != self.latent_dim {
            return Err(Error::internal(
                Part::KvCache,
                format!("latent row width {dim} != cache width {}", self.latent_dim),
            ));
        }
        if let Storage::Device(layers) = &self.storage {
            if seqs.len() == 1 {
                let seq = &seqs[0];
                return self.write(layer, seq.blocks, seq.past, &rows.narrow(0, seq.start, seq.len)?);
            }
            // Several sequences: one scatter of every new row to its slot (one kernel on an accelerator, instead of
            // a copy per sequence).
            let mut src = Vec::with_capacity(seqs.iter().map(|s| s.len).sum());
            let mut slots = Vec::with_capacity(src.capacity() * dim);
            for seq in seqs {
                for j in 0..seq.len {
                    src.push((seq.start + j) as u32);
                    let slot = self.slot(seq.blocks, seq.past + j)? as u32;
                    slots.extend(std::iter::repeat_n(slot, dim));
                }
            }
            let dst = layers.get(layer).ok_or_else(|| Error::internal(Part::KvCache, format!("no layer {layer}")))?;
            let n = src.len();
            let picked = rows.index_select(&Tensor::from_vec(src, n, &self.device)?, 0)?.to_dtype(self.dtype)?;
            dst.scatter_set(&Tensor::from_vec(slots, (n, dim), &self.device)?, &picked, 0)?;
            return Ok(());
        }
        let data = rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.write_host_rows(layer, &data, seqs)
    }

    /// [`LatentPool::write_seqs`] from host rows (`[tokens * latent_dim]`) into a host pool.
    pub fn write_host_rows(&mut self, layer: usize, data: &[f32], seqs: &[SeqSlice<'_>]) -> Result<()> {
        let dim = self.latent_dim;
        let n = data.len() / dim.max(1);
        let mut slots = Vec::with_capacity(n);
        for seq in seqs {
            if seq.start + seq.len > n {
                return Err(Error::internal(
                    Part::KvCache,
                    format!("rows {}..{} of a batch of {n}", seq.start, seq.start + seq.len),
                ));
            }
            for j in 0..seq.len {
                slots.push((seq.start + j, self.slot(seq.blocks, seq.past + j)?));
            }
        }
        let Storage::Host(layers) = &mut self.storage else {
            return Err(Error::internal(Part::KvCache, "host rows written to a device pool"));
        };
        let dst = layers.get_mut(layer).ok_or_else(|| Error::internal(Part::KvCache, format!("no layer {layer}")))?;
        for (row, slot) in slots {
            dst[slot * dim..(slot + 1) * dim].copy_from_slice(&data[row * dim..(row + 1) * dim]);
        }
        Ok(())
    }

    /// The first `len` rows of `layer` for the sequence with block table `blocks`, as `[len, latent_dim]`.
    pub fn gather(&self, layer: usize, blocks: &[u32], len: usize) -> Result<Tensor> {
        let slots = (0..len).map(|p| self.slot(blocks, p)).collect::<Result<Vec<_>>>()?;
        self.gather_slots(layer, &slots)
    }

    /// The first `totals[i]` rows of `layer` for each sequence `i` (block tables `blocks[i]`), padded to the longest:
    /// `[seqs, max(totals), latent_dim]`, one gather for the batch. Padding repeats a valid row; callers mask it.
    pub fn gather_padded(&self, layer: usize, blocks: &[&[u32]], totals: &[usize]) -> Result<Tensor> {
        let longest = totals.iter().copied().max().unwrap_or(0);
        let mut slots = Vec::with_capacity(blocks.len() * longest);
        for (b, &total) in blocks.iter().zip(totals) {
            let first = slots.len();
            for p in 0..total {
                slots.push(self.slot(b, p)?);
            }
            let pad = slots.get(first).copied().unwrap_or(0);
            slots.resize(first + longest, pad);
        }
        Ok(self.gather_slots(layer, &slots)?.reshape((blocks.len(), longest, self.latent_dim))?)
    }

    /// The rows at `slots` of `layer`, as `[slots.len(), latent_dim]`.
    fn gather_slots(&self, layer: usize, slots: &[usize]) -> Result<Tensor> {
        let dim = self.latent_dim;
        match &self.storage {
            Storage::Host(layers) => {
                let src =
                    layers.get(layer).ok_or_else(|| Error::internal(Part::KvCache, format!("no layer {layer}")))?;
                let mut out = Vec::with_capacity(slots.len() * dim);
                for slot in slots {
                    out.extend_from_slice(&src[slot * dim..(slot + 1) * dim]);
                }
                Ok(Tensor::from_vec(out, (slots.len(), dim), &self.device)?.to_dtype(self.dtype)?)
            }
            Storage::Device(layers) => {
                let src =
                    layers.get(layer).ok_or_else(|| Error::internal(Part::KvCache, format!("no layer {layer}")))?;
                let idx: Vec<u32> = slots.iter().map(|&s| s as u32).collect();
                Ok(src.index_select(&Tensor::from_vec(idx, slots.len(), &self.device)?, 0)?)
            }
        }
    }

    /// Copies block `from` into block `to` in every layer (copy-on-write of a shared partial block).
    pub fn copy_block(&mut self, from: u32, to: u32) -> Result<()> {
        let (bs, dim) = (self.block_size, self.latent_dim);
        let (from, to) = (from as usize, to as usize);
        if from >= self.num_blocks || to >= self.num_blocks {
            return Err(Error::internal(Part::KvCache, format!("cache block copy {from}→{to} out of range")));
        }
        match &mut self.storage {
            Storage::Host(layers) => {
                for l in layers.iter_mut() {
                    l.copy_within(from * bs * dim..(from + 1) * bs * dim, to * bs * dim);
                }
            }
            Storage::Device(layers) => {
                for l in layers.iter() {
                    l.slice_set(&l.narrow(0, from * bs, bs)?.contiguous()?, 0, to * bs)?;
                }
            }
        }
        Ok(())
    }

    /// Grows `seq`'s block table so it can hold `new_tokens` more tokens, taking never-used blocks and growing
    /// the pool when it runs out. For single-process tools (CLI, tests); the engine allocates blocks itself.
    pub fn extend(&mut self, seq: &mut SeqCache, new_tokens: usize) -> Result<()> {
        let needed = (seq.len + new_tokens).div_ceil(self.block_size);
        while seq.blocks.len() < needed {
            if self.bump == self.num_blocks {
                self.grow((self.num_blocks * 2).max(4))?;
            }
            seq.blocks.push(self.bump as u32);
            self.bump += 1;
        }
        Ok(())
    }

    fn grow(&mut self, num_blocks: usize) -> Result<()> {
        let rows = num_blocks * self.block_size;
        match &mut self.storage {
            Storage::Host(layers) => {
                for l in layers.iter_mut() {
                    l.resize(rows * self.latent_dim, 0.0);
                }
            }
            Storage::Device(layers) => {
                for l in layers.iter_mut() {
                    let grown = Tensor::zeros((rows + 1, self.latent_dim), self.dtype, &self.device)?;
                    let old_rows = self.num_blocks * self.block_size;
                    if old_rows > 0 {
                        grown.slice_set(&l.narrow(0, 0, old_rows)?, 0, 0)?;
                    }
                    *l = grown;
                }
            }
        }
        self.num_blocks = num_blocks;
        self.id = next_pool_id();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch written at once lands where per-sequence writes put it, in host and tensor pools alike; a slice
    /// past the batch is an error.
    #[test]
    fn batch_writes_equal_per_sequence_writes() {
        let dev = Device::Cpu;
        let (dim, block) = (3, 2);
        let rows = Tensor::from_vec((0..5 * dim).map(|i| i as f32).collect::<Vec<_>>(), (5, dim), &dev).unwrap();
        let (a_blocks, b_blocks) = (vec![4u32, 1], vec![2u32, 0, 3]);
        let seqs = [
            SeqSlice { start: 0, len: 2, past: 1, blocks: &a_blocks },
            SeqSlice { start: 2, len: 3, past: 2, blocks: &b_blocks },
        ];
        for dtype in [DType::F32, DType::F64] {
            let mut batch = LatentPool::new(2, dim, block, 5, dtype, &dev).unwrap();
            let mut single = batch.clone();
            batch.write_seqs(1, &rows, &seqs).unwrap();
            for s in &seqs {
                single.write(1, s.blocks, s.past, &rows.narrow(0, s.start, s.len).unwrap()).unwrap();
            }
            for s in &seqs {
                let (x, y) = (
                    batch.gather(1, s.blocks, s.past + s.len).unwrap(),
                    single.gather(1, s.blocks, s.past + s.len).unwrap(),
                );
                let (x, y) = (x.to_dtype(DType::F32).unwrap(), y.to_dtype(DType::F32).unwrap());
                assert_eq!(x.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
            }
            let past_end = [SeqSlice { start: 4, len: 2, past: 0, blocks: &a_blocks }];
            assert!(batch.write_seqs(1, &rows, &past_end).is_err());
        }
    }
}
