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
use super::host::{Norm, Projection};
use super::latent_attention::{KernelSeq, absorbed_attention};
use super::rope::Rope;
use crate::error::{Error, Result};

/// Which MLA form computes attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionMode {
    /// Naive for sequences with more than one new token (prefill), absorbed for single-token decode steps.
    #[default]
    Auto,
    Naive,
    Absorbed,
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
    heads: usize,
    nope: usize,
    rope_dim: usize,
    v_dim: usize,
    rank: usize,
    scale: f64,
}

/// Prefills of at most this many new tokens use the absorbed form too when the fused host kernel runs: it has no
/// per-sequence tensor ops, and at these lengths the decompression the naive form saves costs more than the wider
/// latent dot products. (For DeepSeek-V3's shapes the two forms cost the same at about 340 tokens.)
pub const ABSORBED_PREFILL_MAX_TOKENS: usize = 64;

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Projection> {
    Projection::new(candle_nn::linear_b(in_dim, out_dim, bias, vb)?)
}

impl Mla {
    pub fn load(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let h = config.hidden_size;
        let heads = config.num_attention_heads;
        let (nope, rope_dim, v_dim, rank) =
            (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank);
        let qk = nope + rope_dim;
        let bias = config.attention_bias;
        let eps = config.rms_norm_eps;
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
        Ok(Self {
            q,
            kv_a: linear(h, rank + rope_dim, bias, vb.pp("kv_a_proj_with_mqa"))?,
            kv_a_norm: Norm::load(rank, eps, vb.pp("kv_a_layernorm"))?,
            kv_b: Projection::new(kv_b)?,
            w_uk,
            w_uv_t,
            o: linear(heads * v_dim, h, bias, vb.pp("o_proj"))?,
            heads,
            nope,
            rope_dim,
            v_dim,
            rank,
            scale: config.softmax_scale(),
        })
    }

    /// Attention over a packed batch `x` (`[tokens, hidden]`). Writes each sequence's new latent rows into the
    /// pool for `layer` and returns `[tokens, hidden]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        cos_sin: &(Tensor, Tensor),
        pool: &mut LatentPool,
        seqs: &[SeqSlice<'_>],
        layer: usize,
        mode: AttentionMode,
    ) -> Result<Tensor> {
        let (n_tokens, _) = x.dims2()?;
        let (heads, nope, rope_dim) = (self.heads, self.nope, self.rope_dim);
        let q = match &self.q {
            QProj::Direct(q) => q.forward(x)?,
            QProj::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
        }
        .reshape((n_tokens, heads, nope + rope_dim))?;
        let q_nope = q.narrow(2, 0, nope)?;
        // [1, heads, tokens, rope] as the rotary kernels want; token t uses row t of cos/sin.
        let q_pe = rope.apply(&q.narrow(2, nope, rope_dim)?.transpose(0, 1)?.unsqueeze(0)?, &cos_sin.0, &cos_sin.1)?;
        let q_pe = q_pe.squeeze(0)?; // [heads, tokens, rope]

        let kv = self.kv_a.forward(x)?;
        let c_kv = self.kv_a_norm.forward(&kv.narrow(1, 0, self.rank)?.contiguous()?)?;
        let k_pe = kv.narrow(1, self.rank, rope_dim)?.reshape((1, 1, n_tokens, rope_dim))?;
        let k_pe = rope.apply(&k_pe, &cos_sin.0, &cos_sin.1)?.reshape((n_tokens, rope_dim))?;
        let rows = Tensor::cat(&[&c_kv, &k_pe.to_dtype(c_kv.dtype())?], 1)?;
        pool.write_seqs(layer, &rows, seqs)?;

        let fused = pool.host_layer(layer).is_some() && q.dtype() == DType::F32;
        let absorbed: Vec<bool> = seqs
            .iter()
            .map(|s| match mode {
                AttentionMode::Absorbed => true,
                AttentionMode::Naive => false,
                AttentionMode::Auto => s.len == 1 || (fused && s.len <= ABSORBED_PREFILL_MAX_TOKENS),
            })
            .collect();
        // Absorbed sequences: [tokens, heads, rank + rope] queries, scale folded in, attended in one pass.
        let mut latent_values = None;
        if absorbed.iter().any(|&a| a) {
            // [heads, tokens, nope] · [heads, nope, rank] → [heads, tokens, rank]
            let q_lat = q_nope.transpose(0, 1)?.contiguous()?.matmul(&self.w_uk)?;
            let q_full = (Tensor::cat(&[&q_lat, &q_pe], 2)? * self.scale)?.transpose(0, 1)?.contiguous()?;
            let chosen: Vec<&SeqSlice<'_>> = seqs.iter().zip(&absorbed).filter(|p| *p.1).map(|p| p.0).collect();
            let latent = match pool.host_layer(layer) {
                Some(host) if fused => {
                    let q_host = q_full.flatten_all()?.to_vec1::<f32>()?;
                    let kseqs: Vec<KernelSeq<'_>> = chosen
                        .iter()
                        .map(|s| KernelSeq { start: s.start, len: s.len, past: s.past, blocks: s.blocks })
                        .collect();
                    let width = self.rank + rope_dim;
                    let out = absorbed_attention(&q_host, heads, width, self.rank, host, pool.block_size(), &kseqs);
                    let rows: usize = chosen.iter().map(|s| s.len).sum();
                    Tensor::from_vec(out, (rows * heads, self.rank), x.device())?
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
                let lv = latent_values.as_ref().ok_or_else(|| Error::InvalidRequest("latent values missing".into()))?;
                parts.push(lv.narrow(0, next_latent_row, seq.len)?);
                next_latent_row += seq.len;
            } else {
                let q = naive_q.as_ref().ok_or_else(|| Error::InvalidRequest("naive query missing".into()))?;
                let ctx = pool.gather(layer, seq.blocks, seq.past + seq.len)?;
                parts.push(self.naive(&q.narrow(0, seq.start, seq.len)?, &ctx, seq.past)?);
            }
        }
        let attn = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 0)? };
        self.o.forward(&attn)
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
        Ok(probs.matmul(&ctx.narrow(1, 0, self.rank)?)?)
    }

    /// `[tokens * heads, rank]` attended latents → `[tokens, heads * v]` through `W_UV`.
    fn expand_latent(&self, latent: &Tensor) -> Result<Tensor> {
        let tokens = latent.dim(0)? / self.heads;
        let per_head = latent.reshape((tokens, self.heads, self.rank))?.transpose(0, 1)?.contiguous()?;
        let values = per_head.matmul(&self.w_uv_t)?; // [heads, tokens, v]
        Ok(values.transpose(0, 1)?.reshape((tokens, self.heads * self.v_dim))?)
    }

    /// Naive attention of one sequence: `q` `[len, heads, qk]` over the decompressed context. Returns `[len, heads * v]`.
    fn naive(&self, q: &Tensor, ctx: &Tensor, past: usize) -> Result<Tensor> {
        let (len, heads, _) = q.dims3()?;
        let total = ctx.dim(0)?;
        let kv = self.kv_b.forward(&ctx.narrow(1, 0, self.rank)?)?.reshape((total, heads, self.nope + self.v_dim))?;
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
