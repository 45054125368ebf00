//! Multi-head Latent Attention (DeepSeek-V2 §2.1) in its two equivalent forms.
//!
//! Every token contributes one cached row `[c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)]`: the RMS-normalized
//! compressed KV and the rotated key shared by all heads.
//!
//! - **Naive** (prefill): decompress the context through `kv_b_proj` into per-head keys and values and run ordinary
//!   attention. Cheapest when many query tokens share the decompression.
//! - **Absorbed** (decode): fold `W_UK` into the query (`q_lat = q_nope · W_UK`) and `W_UV` into the output, so
//!   attention runs directly over the cached latent rows: `score = q_lat · c_kv + q_pe · k_pe`,
//!   `out = W_UV · Σ p · c_kv`. Nothing per head is ever cached.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::cache::{LatentPool, SeqSlice};
use super::config::ModelConfig;
use super::host::{
    NaiveHeads, Norm, PackedMatrix, Projection, WeightMut, WeightVisitor, host_dtype, naive_attention, tensor_bytes,
};
use super::latent_attention::{KernelSeq, absorbed_attention};
use super::rope::{Rope, RopeTables};
use super::step::DeviceStep;
use crate::error::{Error, Part, Result};
use crate::kernels;

/// Which MLA form computes attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionMode {
    /// Naive for sequences with more than one new token (prefill), absorbed for single-token decode steps.
    #[default]
    Auto,
    Naive,
    Absorbed,
}

impl AttentionMode {
    /// Whether a sequence with `len` new tokens takes the absorbed form; `fused`: the fused host kernel runs
    /// (a host pool), which makes short prefills absorbed too.
    fn absorbs(self, len: usize, fused: bool) -> bool {
        match self {
            Self::Absorbed => true,
            Self::Naive => false,
            Self::Auto => len == 1 || (fused && len <= ABSORBED_PREFILL_MAX_TOKENS),
        }
    }
}

#[derive(Debug, Clone)]
enum QProj {
    /// `q_proj` (DeepSeek-V2-Lite: `q_lora_rank` null).
    Direct(Projection),
    /// `q_a_proj` → `q_a_layernorm` → `q_b_proj`.
    LowRank { a: Projection, norm: Norm, b: Projection },
}

#[derive(Debug, Clone)]
pub struct Mla {
    q: QProj,
    kv_a: Projection,
    kv_a_norm: Norm,
    kv_b: Projection,
    /// `W_UK` per head, `[heads, qk_nope_head_dim, kv_lora_rank]`.
    w_uk: Tensor,
    /// `W_UV` per head, transposed: `[heads, kv_lora_rank, v_head_dim]`.
    w_uv_t: Tensor,
    o: Projection,
    /// `W_UK` and `W_UV` packed per head for the host path (f32 or bf16 CPU weights only).
    host: Option<HostAbsorb>,
    heads: usize,
    nope: usize,
    rope_dim: usize,
    v_dim: usize,
    rank: usize,
    scale: f64,
}

/// The rotary embedding and its tables for the positions of one forward pass (the host path rotates rows with
/// them; the tensor path takes the same tables as `cos`/`sin` tensors).
#[derive(Debug, Clone, Copy)]
pub struct Rotary<'a> {
    pub rope: &'a Rope,
    pub tables: &'a RopeTables,
}

/// The absorbed-MLA matrices per head for the host path: `w_uk[h]` maps a head's `q_nope` to its latent query
/// (`[rank, nope]` as a projection), `w_uv[h]` a head's attended latent to its values (`[v, rank]`).
#[derive(Debug, Clone)]
struct HostAbsorb {
    w_uk: Vec<PackedMatrix>,
    w_uv: Vec<PackedMatrix>,
}

/// Where one head's values sit in token rows laid out `[heads, stride]`: `len` values from `offset`.
#[derive(Debug, Clone, Copy)]
struct HeadSlice {
    heads: usize,
    stride: usize,
    offset: usize,
    len: usize,
}

impl HeadSlice {
    /// Head `h`'s values of the token rows `rows` of `src`, gathered into `scratch`, through `w`:
    /// `[rows.len(), w.out_dim()]`.
    fn through(
        self,
        w: &PackedMatrix,
        src: &[f32],
        rows: impl ExactSizeIterator<Item = usize>,
        h: usize,
        scratch: &mut Vec<f32>,
    ) -> Vec<f32> {
        let m = rows.len();
        scratch.clear();
        for t in rows {
            let at = (t * self.heads + h) * self.stride + self.offset;
            scratch.extend_from_slice(&src[at..at + self.len]);
        }
        w.matmul(scratch, m)
    }
}

/// Prefills of at most this many new tokens use the absorbed form too when the fused host kernel runs: it has no
/// per-sequence tensor ops, and at these lengths the decompression the naive form saves costs more than the wider
/// latent dot products. (For DeepSeek-V3's shapes the two forms cost the same at about 340 tokens.)
pub const ABSORBED_PREFILL_MAX_TOKENS: usize = 64;

impl Mla {
    pub fn load(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let h = config.hidden_size;
        let heads = config.num_attention_heads;
        let (nope, rope_dim, v_dim, rank) =
            (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank);
        let qk = nope + rope_dim;
        let bias = config.attention_bias;
        let eps = config.rms_norm_eps;
        let fp8 = config.kept_fp8();
        let linear = |in_dim, out_dim, bias, vb| Projection::load(in_dim, out_dim, bias, fp8, vb);
        let q = match config.q_lora_rank {
            None => QProj::Direct(linear(h, heads * qk, false, vb.pp("q_proj"))?),
            Some(r) => QProj::LowRank {
                a: linear(h, r, bias, vb.pp("q_a_proj"))?,
                norm: Norm::load(r, eps, vb.pp("q_a_layernorm"))?,
                b: linear(r, heads * qk, false, vb.pp("q_b_proj"))?,
            },
        };
        let kv_b = candle_nn::linear_b(rank, heads * (nope + v_dim), false, vb.pp("kv_b_proj"))?;
        let per_head = kv_b.weight().reshape((heads, nope + v_dim, rank))?;
        let w_uk = per_head.narrow(1, 0, nope)?.contiguous()?;
        let w_uv_t = per_head.narrow(1, nope, v_dim)?.transpose(1, 2)?.contiguous()?;
        let kv_b = Projection::new(kv_b)?;
        let host = if kv_b.is_host() {
            let mut absorb = HostAbsorb { w_uk: Vec::with_capacity(heads), w_uv: Vec::with_capacity(heads) };
            for h in 0..heads {
                absorb.w_uk.push(PackedMatrix::from_tensor(&w_uk.get(h)?.t()?.contiguous()?)?);
                absorb.w_uv.push(PackedMatrix::from_tensor(&per_head.get(h)?.narrow(0, nope, v_dim)?.contiguous()?)?);
            }
            Some(absorb)
        } else {
            None
        };
        Ok(Self {
            q,
            kv_a: linear(h, rank + rope_dim, bias, vb.pp("kv_a_proj_with_mqa"))?,
            kv_a_norm: Norm::load(rank, eps, vb.pp("kv_a_layernorm"))?,
            kv_b,
            w_uk,
            w_uv_t,
            o: linear(heads * v_dim, h, bias, vb.pp("o_proj"))?,
            host,
            heads,
            nope,
            rope_dim,
            v_dim,
            rank,
            scale: config.softmax_scale(),
        })
    }

    /// The query, `kv_a` and output projections; `kv_b` and its per-head halves are kept as loaded (they serve
    /// the naive, absorbed and host forms alike).
    pub fn visit_weights(&mut self, f: &mut WeightVisitor<'_>) -> Result<()> {
        match &mut self.q {
            QProj::Direct(q) => q.visit_weights(f)?,
            QProj::LowRank { a, norm, b } => {
                a.visit_weights(f)?;
                f(WeightMut::Kept(norm.bytes()))?;
                b.visit_weights(f)?;
            }
        }
        self.kv_a.visit_weights(f)?;
        f(WeightMut::Kept(self.kv_a_norm.bytes()))?;
        self.kv_b.visit_kept(f)?;
        f(WeightMut::Kept(tensor_bytes(&self.w_uk) + tensor_bytes(&self.w_uv_t)))?;
        if let Some(host) = &self.host {
            f(WeightMut::Kept(host.w_uk.iter().chain(&host.w_uv).map(PackedMatrix::bytes).sum()))?;
        }
        self.o.visit_weights(f)
    }

    /// Attention over a packed batch `x` (`[tokens, hidden]`). Writes each sequence's new latent rows into the
    /// pool for `layer` and returns `[tokens, hidden]`. Runs on the host path ([`Mla::forward_rows`]) where it can,
    /// unless `tensor_ops`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary<'_>,
        cos_sin: &(Tensor, Tensor),
        pool: &mut LatentPool,
        seqs: &[SeqSlice<'_>],
        layer: usize,
        mode: AttentionMode,
        tensor_ops: bool,
    ) -> Result<Tensor> {
        if host_dtype(x.dtype()) && !tensor_ops && self.runs_on_host(pool, seqs, layer, mode) {
            let (n, _) = x.dims2()?;
            let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(out) = self.forward_rows(&xs, n, rotary, pool, seqs, layer, mode)? {
                let hidden = out.len() / n.max(1);
                return Ok(Tensor::from_vec(out, (n, hidden), x.device())?.to_dtype(x.dtype())?);
            }
        }
        let (q_nope, q_pe, rows) = self.project(x, rotary.rope, &cos_sin.0, &cos_sin.1)?;
        pool.write_seqs(layer, &rows, seqs)?;
        let rope_dim = self.rope_dim;
        let heads = self.heads;

        let fused = pool.host_layer(layer).is_some() && host_dtype(x.dtype());
        let absorbed: Vec<bool> = seqs.iter().map(|s| mode.absorbs(s.len, fused)).collect();
        // Absorbed sequences: [tokens, heads, rank + rope] queries, scale folded in, attended in one pass.
        let mut latent_values = None;
        if absorbed.iter().any(|&a| a) {
            let q_full = self.absorbed_queries(&q_nope, &q_pe)?;
            let chosen: Vec<&SeqSlice<'_>> = seqs.iter().zip(&absorbed).filter(|p| *p.1).map(|p| p.0).collect();
            let latent = match pool.host_layer(layer) {
                Some(host) if fused => {
                    let q_host = q_full.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let kseqs: Vec<KernelSeq<'_>> = chosen
                        .iter()
                        .map(|s| KernelSeq { start: s.start, len: s.len, past: s.past, blocks: s.blocks })
                        .collect();
                    let width = self.rank + rope_dim;
                    let out = absorbed_attention(&q_host, heads, width, self.rank, host, pool.block_size(), &kseqs);
                    let rows: usize = chosen.iter().map(|s| s.len).sum();
                    Tensor::from_vec(out, (rows * heads, self.rank), x.device())?.to_dtype(x.dtype())?
                }
                _ if chosen.len() > 1 && chosen.iter().all(|s| s.len == 1) => {
                    // A decode step: every sequence attends at once, over its cache rows padded to the longest.
                    let blocks: Vec<&[u32]> = chosen.iter().map(|s| s.blocks).collect();
                    let totals: Vec<usize> = chosen.iter().map(|s| s.past + 1).collect();
                    let ctx = pool.gather_padded(layer, &blocks, &totals)?;
                    let rows: Vec<u32> = chosen.iter().map(|s| s.start as u32).collect();
                    let q = q_full.index_select(&Tensor::from_vec(rows, chosen.len(), x.device())?, 0)?;
                    absorbed_decode(&q, &ctx, &totals, self.rank)?
                }
                _ => {
                    let mut parts = Vec::with_capacity(chosen.len());
                    for s in &chosen {
                        let ctx = pool.gather(layer, s.blocks, s.past + s.len)?;
                        parts.push(self.absorbed(&q_full.narrow(0, s.start, s.len)?, &ctx, s.past)?);
                    }
                    Tensor::cat(&parts, 0)?
                }
            };
            latent_values = Some(self.expand_latent(&latent)?);
        }
        let naive_q = if absorbed.iter().all(|&a| a) {
            None
        } else {
            Some(Tensor::cat(&[&q_nope, &q_pe.transpose(0, 1)?], 2)?.contiguous()?) // [tokens, heads, qk]
        };
        // Reassemble in sequence order: [tokens, heads * v].
        let mut parts = Vec::with_capacity(seqs.len());
        let mut next_latent_row = 0;
        for (seq, &is_absorbed) in seqs.iter().zip(&absorbed) {
            if is_absorbed {
                let lv =
                    latent_values.as_ref().ok_or_else(|| Error::internal(Part::Attention, "latent values missing"))?;
                parts.push(lv.narrow(0, next_latent_row, seq.len)?);
                next_latent_row += seq.len;
            } else {
                let q = naive_q.as_ref().ok_or_else(|| Error::internal(Part::Attention, "naive query missing"))?;
                let ctx = pool.gather(layer, seq.blocks, seq.past + seq.len)?;
                parts.push(self.naive(&q.narrow(0, seq.start, seq.len)?, &ctx, seq.past)?);
            }
        }
        let attn = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 0)? };
        self.o.forward(&attn)
    }

    /// The queries and new cache rows of `x` (`[tokens, hidden]`): `q_nope` `[tokens, heads, nope]`, the rotated
    /// `q_pe` `[heads, tokens, rope]`, and the rows `[tokens, rank + rope]` (normalized compressed KV, rotated
    /// shared key). Token `t` uses row `t` of `cos`/`sin`.
    fn project(&self, x: &Tensor, rope: &Rope, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (n_tokens, _) = x.dims2()?;
        let (heads, nope, rope_dim) = (self.heads, self.nope, self.rope_dim);
        let q = match &self.q {
            QProj::Direct(q) => q.forward(x)?,
            QProj::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
        }
        .reshape((n_tokens, heads, nope + rope_dim))?;
        let q_nope = q.narrow(2, 0, nope)?;
        // [1, heads, tokens, rope] as the rotary kernels want; token t uses row t of cos/sin.
        let q_pe = rope.apply(&q.narrow(2, nope, rope_dim)?.transpose(0, 1)?.unsqueeze(0)?, cos, sin)?;
        let q_pe = q_pe.squeeze(0)?; // [heads, tokens, rope]

        let kv = self.kv_a.forward(x)?;
        let c_kv = self.kv_a_norm.forward(&kv.narrow(1, 0, self.rank)?.contiguous()?)?;
        let k_pe = kv.narrow(1, self.rank, rope_dim)?.reshape((1, 1, n_tokens, rope_dim))?;
        let k_pe = rope.apply(&k_pe, cos, sin)?.reshape((n_tokens, rope_dim))?;
        let rows = Tensor::cat(&[&c_kv, &k_pe.to_dtype(c_kv.dtype())?], 1)?;
        Ok((q_nope, q_pe, rows))
    }

    /// Absorbed queries `[tokens, heads, rank + rope]`, scale folded in: `q_nope` through `W_UK` beside `q_pe`.
    fn absorbed_queries(&self, q_nope: &Tensor, q_pe: &Tensor) -> Result<Tensor> {
        // [heads, tokens, nope] · [heads, nope, rank] → [heads, tokens, rank]
        let q_lat = q_nope.transpose(0, 1)?.contiguous()?.matmul(&self.w_uk)?;
        Ok((Tensor::cat(&[&q_lat, q_pe], 2)? * self.scale)?.transpose(0, 1)?.contiguous()?)
    }

    /// A single-token decode step of every sequence on Baleen's CUDA kernels: one kernel normalizes, rotates and
    /// writes the new cache rows; attention runs over the paged cache through the step's block tables, with the
    /// queries assembled (rotary part rotated, scale applied) inside the attention kernel — no host data and none
    /// of the small copies of the tensor path in between.
    pub(crate) fn forward_decode(
        &self,
        x: &Tensor,
        rotary: &kernels::DeviceRotary<'_>,
        pool: &LatentPool,
        step: &DeviceStep,
        layer: usize,
    ) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        let q = match &self.q {
            QProj::Direct(q) => q.forward(x)?,
            QProj::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
        };
        let kv = self.kv_a.forward(x)?;
        let cache = pool
            .device_layer(layer)
            .ok_or_else(|| Error::Kernel(format!("layer {layer} of the latent cache is not a device tensor")))?;
        let (norm, eps) =
            self.kv_a_norm.weight_eps().ok_or_else(|| Error::Kernel("the kv norm is packed for the host".into()))?;
        kernels::kv_write(&kv, &norm, eps as f32, rotary, &step.slots, cache)?;
        // [heads, tokens, nope] · [heads, nope, rank] → [heads, tokens, rank]
        let q_nope = q.reshape((n, self.heads, self.nope + self.rope_dim))?.narrow(2, 0, self.nope)?;
        let q_lat = q_nope.transpose(0, 1)?.contiguous()?.matmul(&self.w_uk)?;
        let paged =
            kernels::PagedCache { cache, tables: &step.tables, lens: &step.lens, block_size: pool.block_size() };
        let latent = kernels::mla_decode(&q_lat, &q, self.nope, self.scale as f32, rotary, &paged)?;
        self.o.forward(&self.values(&latent)?)
    }

    /// Whether [`Mla::forward_decode`] takes this layer's shapes and `dtype`.
    pub fn runs_on_kernels(&self, dtype: DType) -> bool {
        kernels::supports_dtype(dtype)
            && self.rank + self.rope_dim <= kernels::MLA_MAX_WIDTH
            && self.rank <= kernels::MLA_MAX_RANK
    }

    /// Whether [`Mla::forward_rows`] can run this batch: host weights and a host pool, and `kv_b_proj` on the host
    /// too unless every sequence takes the absorbed form.
    pub fn runs_on_host(&self, pool: &LatentPool, seqs: &[SeqSlice<'_>], layer: usize, mode: AttentionMode) -> bool {
        self.host.is_some()
            && pool.host_layer(layer).is_some()
            && (self.kv_b.is_host() || seqs.iter().all(|s| mode.absorbs(s.len, true)))
    }

    /// The whole layer on the host over plain rows `xs` (`[n, hidden]`), for f32 or bf16 CPU weights and a host
    /// pool: projections, norms, rotary embedding and cache write, then each sequence in the form `mode` picks for
    /// it — absorbed (the fused kernel and the per-head absorbed matrices) or naive (the context decompressed
    /// through `kv_b_proj`, [`naive_attention`]) — with no tensor op. `None` when [`Mla::runs_on_host`] does not
    /// hold.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_rows(
        &self,
        xs: &[f32],
        n: usize,
        rotary: &Rotary<'_>,
        pool: &mut LatentPool,
        seqs: &[SeqSlice<'_>],
        layer: usize,
        mode: AttentionMode,
    ) -> Result<Option<Vec<f32>>> {
        let Some(host) = &self.host else { return Ok(None) };
        let (rank, rope_dim) = (self.rank, self.rope_dim);
        if seqs.iter().map(|s| s.len).sum::<usize>() != n || rotary.tables.cos.len() < n * rotary.tables.half {
            return Err(Error::internal(Part::Attention, "the batch's sequences do not cover its rows"));
        }
        let q = match &self.q {
            QProj::Direct(p) => p.host(xs, n),
            QProj::LowRank { a, norm, b } => {
                a.host(xs, n).and_then(|mut t| norm.host(&mut t).then_some(t)).and_then(|t| b.host(&t, n))
            }
        };
        let (Some(q), Some(mut kv)) = (q, self.kv_a.host(xs, n)) else { return Ok(None) };
        // Cached rows: normalized compressed KV, rotated shared key.
        for (t, row) in kv.chunks_exact_mut(rank + rope_dim).enumerate() {
            let (c_kv, k_pe) = row.split_at_mut(rank);
            if !self.kv_a_norm.host(c_kv) {
                return Ok(None);
            }
            rotary.rope.rotate(k_pe, rotary.tables, t);
        }
        pool.write_host_rows(layer, &kv, seqs)?;
        let mut attn = vec![0f32; n * self.heads * self.v_dim];
        let (absorbed, naive): (Vec<&SeqSlice<'_>>, Vec<&SeqSlice<'_>>) =
            seqs.iter().partition(|s| mode.absorbs(s.len, true));
        if !absorbed.is_empty() && !self.absorbed_rows(host, &q, &absorbed, rotary, pool, layer, &mut attn) {
            return Ok(None);
        }
        for s in naive {
            if !self.naive_rows(&q, s, rotary, pool, layer, &mut attn)? {
                return Ok(None);
            }
        }
        Ok(self.o.host(&attn, n))
    }

    /// The absorbed form for `seqs` (rows of the batch's queries `q`, `[n, heads, nope + rope]`) on the host: their
    /// attention into their rows of `attn` (`[n, heads * v]`). `false` when the pool is not in host memory.
    #[allow(clippy::too_many_arguments)]
    fn absorbed_rows(
        &self,
        host: &HostAbsorb,
        q: &[f32],
        seqs: &[&SeqSlice<'_>],
        rotary: &Rotary<'_>,
        pool: &LatentPool,
        layer: usize,
        attn: &mut [f32],
    ) -> bool {
        let (heads, nope, rope_dim, rank, v_dim) = (self.heads, self.nope, self.rope_dim, self.rank, self.v_dim);
        let Some(cache) = pool.host_layer(layer) else { return false };
        // The sequences' rows of the batch; the kernel takes the same sequences packed together.
        let rows: Vec<usize> = seqs.iter().flat_map(|s| s.start..s.start + s.len).collect();
        let mut kseqs = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for s in seqs {
            kseqs.push(KernelSeq { start, len: s.len, past: s.past, blocks: s.blocks });
            start += s.len;
        }
        // Queries [rows, heads, rank + rope]: q_nope through W_UK, q_pe rotated, both scaled.
        let (qk, width) = (nope + rope_dim, rank + rope_dim);
        let scale = self.scale as f32;
        let mut q_full = vec![0f32; rows.len() * heads * width];
        let mut scratch = Vec::with_capacity(rows.len() * nope.max(rank));
        for (h, w_uk) in host.w_uk.iter().enumerate() {
            let q_nope = HeadSlice { heads, stride: qk, offset: 0, len: nope };
            let q_lat = q_nope.through(w_uk, q, rows.iter().copied(), h, &mut scratch);
            for (i, &t) in rows.iter().enumerate() {
                let dst = &mut q_full[(i * heads + h) * width..(i * heads + h + 1) * width];
                let (lat, pe) = dst.split_at_mut(rank);
                for (d, s) in lat.iter_mut().zip(&q_lat[i * rank..(i + 1) * rank]) {
                    *d = s * scale;
                }
                let at = (t * heads + h) * qk + nope;
                pe.copy_from_slice(&q[at..at + rope_dim]);
                rotary.rope.rotate(pe, rotary.tables, t);
                pe.iter_mut().for_each(|v| *v *= scale);
            }
        }
        let latent = absorbed_attention(&q_full, heads, width, rank, cache, pool.block_size(), &kseqs);
        // Values per head through W_UV, into the rows' [heads * v].
        for (h, w_uv) in host.w_uv.iter().enumerate() {
            let latent_h = HeadSlice { heads, stride: rank, offset: 0, len: rank };
            let values = latent_h.through(w_uv, &latent, 0..rows.len(), h, &mut scratch);
            for (i, &t) in rows.iter().enumerate() {
                let at = (t * heads + h) * v_dim;
                attn[at..at + v_dim].copy_from_slice(&values[i * v_dim..(i + 1) * v_dim]);
            }
        }
        true
    }

    /// The naive form for one sequence `s` on the host: its context rows (already written) decompressed through
    /// `kv_b_proj`, then [`naive_attention`] into its rows of `attn`. `false` when `kv_b_proj` runs on candle.
    fn naive_rows(
        &self,
        q: &[f32],
        s: &SeqSlice<'_>,
        rotary: &Rotary<'_>,
        pool: &LatentPool,
        layer: usize,
        attn: &mut [f32],
    ) -> Result<bool> {
        let (heads, nope, rope_dim, rank, v_dim) = (self.heads, self.nope, self.rope_dim, self.rank, self.v_dim);
        let Some(cache) = pool.host_layer(layer) else { return Ok(false) };
        let (width, total) = (rank + rope_dim, s.past + s.len);
        let mut latent = Vec::with_capacity(total * rank);
        let mut k_pe = Vec::with_capacity(total * rope_dim);
        for p in 0..total {
            let slot = pool.slot(s.blocks, p)?;
            let (c_kv, pe) = cache[slot * width..(slot + 1) * width].split_at(rank);
            latent.extend_from_slice(c_kv);
            k_pe.extend_from_slice(pe);
        }
        let Some(kv) = self.kv_b.host(&latent, total) else { return Ok(false) };
        let qk = nope + rope_dim;
        let mut queries = q[s.start * heads * qk..(s.start + s.len) * heads * qk].to_vec();
        for (j, token) in queries.chunks_exact_mut(heads * qk).enumerate() {
            for head in token.chunks_exact_mut(qk) {
                rotary.rope.rotate(&mut head[nope..], rotary.tables, s.start + j);
            }
        }
        let shape = NaiveHeads { heads, nope, rope: rope_dim, v: v_dim, scale: self.scale as f32 };
        let out = &mut attn[s.start * heads * v_dim..(s.start + s.len) * heads * v_dim];
        naive_attention(&queries, &kv, &k_pe, s.len, total, shape, out);
        Ok(true)
    }

    /// Absorbed attention of one sequence: `q` `[len, heads, rank + rope]` (scaled) over `ctx` `[past + len, rank + rope]`.
    /// Returns the attended latents `[len * heads, rank]`.
    fn absorbed(&self, q: &Tensor, ctx: &Tensor, past: usize) -> Result<Tensor> {
        let (len, heads, width) = q.dims3()?;
        let total = ctx.dim(0)?;
        let scores = q.reshape((len * heads, width))?.matmul(&ctx.t()?)?;
        let scores = if len > 1 {
            let mask = causal_mask(len, past, total, scores.dtype(), scores.device())?;
            scores.reshape((len, heads, total))?.broadcast_add(&mask.unsqueeze(1)?)?.reshape((len * heads, total))?
        } else {
            scores
        };
        let probs = softmax_f32(&scores)?;
        // The latent columns of the cache rows: a strided view, which CUDA's matmul does not take.
        Ok(probs.matmul(&ctx.narrow(1, 0, self.rank)?.contiguous()?)?)
    }

    /// `[tokens * heads, rank]` attended latents → `[tokens, heads * v]` through `W_UV`.
    fn expand_latent(&self, latent: &Tensor) -> Result<Tensor> {
        let tokens = latent.dim(0)? / self.heads;
        self.values(&latent.reshape((tokens, self.heads, self.rank))?.transpose(0, 1)?.contiguous()?)
    }

    /// `[heads, tokens, rank]` attended latents → `[tokens, heads * v]` through `W_UV`.
    fn values(&self, per_head: &Tensor) -> Result<Tensor> {
        let tokens = per_head.dim(1)?;
        let values = per_head.matmul(&self.w_uv_t)?; // [heads, tokens, v]
        Ok(values.transpose(0, 1)?.reshape((tokens, self.heads * self.v_dim))?)
    }

    /// Naive attention of one sequence: `q` `[len, heads, qk]` over the decompressed context. Returns `[len, heads * v]`.
    fn naive(&self, q: &Tensor, ctx: &Tensor, past: usize) -> Result<Tensor> {
        let (len, heads, _) = q.dims3()?;
        let total = ctx.dim(0)?;
        let latent = ctx.narrow(1, 0, self.rank)?.contiguous()?;
        let kv = self.kv_b.forward(&latent)?.reshape((total, heads, self.nope + self.v_dim))?;
        let k_nope = kv.narrow(2, 0, self.nope)?;
        let v = kv.narrow(2, self.nope, self.v_dim)?.transpose(0, 1)?.contiguous()?; // [heads, total, v]
        let k_pe =
            ctx.narrow(1, self.rank, self.rope_dim)?.unsqueeze(1)?.broadcast_as((total, heads, self.rope_dim))?;
        let k = Tensor::cat(&[&k_nope, &k_pe], 2)?.transpose(0, 1)?.contiguous()?; // [heads, total, qk]
        let q = q.transpose(0, 1)?.contiguous()?; // [heads, len, qk]
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let scores = if len > 1 {
            scores.broadcast_add(&causal_mask(len, past, total, scores.dtype(), scores.device())?)?
        } else {
            scores
        };
        let probs = softmax_f32(&scores)?;
        let out = probs.matmul(&v)?; // [heads, len, v]
        Ok(out.transpose(0, 1)?.reshape((len, heads * self.v_dim))?)
    }
}

/// Absorbed attention of a decode step, every sequence at once: `q` `[seqs, heads, rank + rope]` (scaled) over
/// `ctx` `[seqs, longest, rank + rope]`, of which sequence `i` uses its first `totals[i]` rows (the rest is masked).
/// Returns the attended latents `[seqs * heads, rank]`, in the order of [`Mla::absorbed`] per sequence.
fn absorbed_decode(q: &Tensor, ctx: &Tensor, totals: &[usize], rank: usize) -> Result<Tensor> {
    let (seqs, heads, _) = q.dims3()?;
    let longest = ctx.dim(1)?;
    let mask: Vec<f32> =
        totals.iter().flat_map(|&t| (0..longest).map(move |k| if k < t { 0.0 } else { f32::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (seqs, 1, longest), q.device())?.to_dtype(q.dtype())?;
    let scores = q.matmul(&ctx.transpose(1, 2)?)?.broadcast_add(&mask)?; // [seqs, heads, longest]
    let probs = softmax_f32(&scores)?;
    let latent = probs.matmul(&ctx.narrow(2, 0, rank)?.contiguous()?)?; // [seqs, heads, rank]
    Ok(latent.reshape((seqs * heads, rank))?)
}

/// Softmax over the last dimension computed in f32, returned in the input dtype (as transformers' eager attention).
fn softmax_f32(scores: &Tensor) -> Result<Tensor> {
    let dtype = scores.dtype();
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
    Ok(probs.to_dtype(dtype)?)
}

/// `[len, total]` additive mask: query `j` (at position `past + j`) sees keys `0..=past + j`.
fn causal_mask(len: usize, past: usize, total: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..len).flat_map(|j| (0..total).map(move |k| if k > past + j { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(mask, (len, total), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batched decode step equals attending each sequence alone over exactly its own rows.
    #[test]
    fn batched_decode_attention_equals_one_sequence_at_a_time() {
        let (heads, rank, rope, dev) = (4, 16, 8, Device::Cpu);
        let totals = [5usize, 1, 12, 7];
        let longest = 12;
        let q = Tensor::randn(0f32, 1.0, (totals.len(), heads, rank + rope), &dev).unwrap();
        let ctx = Tensor::randn(0f32, 1.0, (totals.len(), longest, rank + rope), &dev).unwrap();
        let got = absorbed_decode(&q, &ctx, &totals, rank).unwrap().reshape((totals.len(), heads, rank)).unwrap();
        for (i, &t) in totals.iter().enumerate() {
            let own = ctx.get(i).unwrap().narrow(0, 0, t).unwrap(); // [t, width]
            let probs = softmax_f32(&q.get(i).unwrap().matmul(&own.t().unwrap()).unwrap()).unwrap();
            let want = probs.matmul(&own.narrow(1, 0, rank).unwrap()).unwrap(); // [heads, rank]
            let diff =
                (got.get(i).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "sequence {i}: {diff}");
        }
    }
}
