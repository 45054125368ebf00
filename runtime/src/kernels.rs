//! Baleen's own CUDA kernels (`runtime/kernels/baleen.cu`), for the parts of a decode step where candle's op by op
//! execution costs most: routing and dispatch on the device (no copy of the router's logits to the host in every
//! MoE layer), the active experts of a layer in one grouped launch per projection, and absorbed MLA attention
//! straight over the paged latent cache. Every kernel takes its sizes from its launch and its indices from device
//! tensors, so a decode step made of them can be captured in a CUDA graph (`model/deepseek/graph.rs`).
//!
//! The functions exist in every build; without the `cuda` feature, or for tensors not on a CUDA device, they
//! return [`crate::Error::Kernel`]. Callers check [`available`] and the size limits below before choosing them.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::config::{MoeConfig, ScoringFunc, TopkMethod};

#[cfg(feature = "cuda")]
mod cuda;

/// Routed experts the routing and dispatch kernels handle (32 per lane of one warp; one dispatch thread each).
pub const MAX_EXPERTS: usize = 1024;
/// Expert groups the routing kernel ranks (one per lane).
pub const MAX_GROUPS: usize = 32;
/// Experts per token the routing kernel keeps (one per lane).
pub const MAX_TOP_K: usize = 32;
/// Widest latent cache row (`kv_lora_rank + qk_rope_head_dim`) the MLA decode kernel keeps in registers.
pub const MLA_MAX_WIDTH: usize = 768;
/// Largest `kv_lora_rank` the MLA decode kernel accumulates.
pub const MLA_MAX_RANK: usize = 512;

/// Whether this build can run the kernels on `device`.
pub fn available(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda()
}

/// Whether the kernels take tensors of `dtype`.
pub fn supports_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// What the routing kernel needs of the router's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteParams {
    pub n_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    /// 0 softmax, 1 sigmoid.
    pub scoring: i32,
    /// 0 greedy, 1 group-limited greedy, 2 noaux_tc.
    pub method: i32,
    pub norm_topk: bool,
    pub scaling: f32,
}

impl RouteParams {
    /// The routing kernel's settings for a router configuration.
    pub fn from_config(config: &MoeConfig) -> Self {
        Self {
            n_experts: config.n_routed_experts,
            top_k: config.num_experts_per_tok,
            n_group: config.n_group,
            topk_group: config.topk_group,
            scoring: match config.scoring_func {
                ScoringFunc::Softmax => 0,
                ScoringFunc::Sigmoid => 1,
            },
            method: match config.topk_method {
                TopkMethod::Greedy => 0,
                TopkMethod::GroupLimitedGreedy => 1,
                TopkMethod::NoauxTc => 2,
            },
            norm_topk: config.norm_topk_prob,
            scaling: config.routed_scaling_factor as f32,
        }
    }

    /// Whether the routing and dispatch kernels handle this router.
    pub fn fits(&self) -> bool {
        self.n_experts <= MAX_EXPERTS
            && self.n_group <= MAX_GROUPS
            && self.top_k <= MAX_TOP_K
            && self.top_k <= self.n_experts
            && self.n_group > 0
            && self.n_experts.is_multiple_of(self.n_group)
    }
}

/// Where the dispatch kernel counts each expert's routed rows: `counters` (`[n_experts]` i64, added to), only for
/// the first `real_tokens[0]` tokens when given (a padded batch).
#[derive(Debug, Clone, Copy)]
pub struct ExpertCounters<'a> {
    pub counters: &'a Tensor,
    pub real_tokens: Option<&'a Tensor>,
}

/// A dispatch plan, as only [`dispatch`] makes it: `[2 * n_experts + 2 + tokens * top_k]` u32 on the device
/// (offsets, active experts, permutation; the layout is in the kernel's source). The kernels that read it index
/// rows and experts by its contents, so they take it only from here, with the sizes it was made for.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct Plan {
    tensor: Tensor,
    n_experts: usize,
    tokens: usize,
    top_k: usize,
}

impl Plan {
    /// Routed experts the plan spreads rows over.
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }

    /// Tokens routed (rows of the input).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Routed rows: `tokens * top_k`.
    pub fn assignments(&self) -> usize {
        self.tokens * self.top_k
    }
}

#[cfg(not(feature = "cuda"))]
fn unavailable<T>() -> Result<T> {
    Err(crate::Error::Kernel("the CUDA kernels need a build with the `cuda` feature".into()))
}

/// Routes every row of `logits` (`[tokens, n_experts]`, f32; `bias`: `[n_experts]` f32 for noaux_tc). Returns the
/// chosen experts (`[tokens * top_k]` u32, best first) and one f32 tensor `[tokens * top_k + tokens]`: the weights,
/// then each token's selection margin (see [`crate::model::Routing::margins`]).
pub fn route(logits: &Tensor, bias: Option<&Tensor>, params: &RouteParams) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    return cuda::route(logits, bias, params);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (logits, bias, params);
        unavailable()
    }
}

/// Regroups routed rows by expert: `ids` (`[tokens * top_k]` u32; ids past `n_experts` are dropped) → the
/// dispatch plan.
pub fn dispatch(ids: &Tensor, n_experts: usize, top_k: usize, counters: Option<ExpertCounters<'_>>) -> Result<Plan> {
    #[cfg(feature = "cuda")]
    return cuda::dispatch(ids, n_experts, top_k, counters);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (ids, n_experts, top_k, counters);
        unavailable()
    }
}

/// The active experts' `silu(gate(x)) * up(x)` for every routed row: `x` `[tokens, hidden]`, `gate_up`
/// `[n_experts, 2 * inter, hidden]` (gate rows first) → `[tokens * top_k, inter]` in the plan's order.
pub fn expert_gate_up(x: &Tensor, gate_up: &Tensor, plan: &Plan) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return cuda::expert_gate_up(x, gate_up, plan);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, gate_up, plan);
        unavailable()
    }
}

/// The active experts' down projections of [`expert_gate_up`]'s rows, each scaled by its routing weight
/// (`weights`, `[tokens * top_k]` f32): `down` `[n_experts, hidden, inter]` → `[tokens * top_k, hidden]` f32, row
/// `t * top_k + j` for token `t`'s `j`-th expert.
pub fn expert_down(h: &Tensor, down: &Tensor, plan: &Plan, weights: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return cuda::expert_down(h, down, plan, weights);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (h, down, plan, weights);
        unavailable()
    }
}

/// Each token's `top_k` expert outputs (`y`, `[tokens * top_k, hidden]` f32) summed, plus `shared` (`[tokens,
/// hidden]`), in `dtype`.
pub fn combine(y: &Tensor, shared: Option<&Tensor>, top_k: usize, dtype: DType) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return cuda::combine(y, shared, top_k, dtype);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (y, shared, top_k, dtype);
        unavailable()
    }
}

/// The rotary tables of every position on the device (`cos`, `sin`: `[positions, rope / 2]` in the model's dtype)
/// and the positions of a decode step's sequences (`[seqs]` u32); pairs are adjacent when `interleave`, else the
/// two halves (as [`crate::model::rope::Rope`] rotates).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct DeviceRotary<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub positions: &'a Tensor,
    pub interleave: bool,
}

/// The paged latent cache of one layer as a decode step reads it: `cache` `[rows, rank + rope]`, sequence `s`
/// attending to its first `lens[s]` tokens (`[seqs]` u32) through block table row `tables[s]` (`[seqs,
/// max_blocks]` u32) of `block_size`-token blocks.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct PagedCache<'a> {
    pub cache: &'a Tensor,
    pub tables: &'a Tensor,
    pub lens: &'a Tensor,
    pub block_size: usize,
}

/// Absorbed MLA attention of single-token decode steps. The query of sequence `s`, head `h` is assembled in the
/// kernel: `q_lat[h, s]` (`[heads, seqs, rank]`: q_nope through W_UK) beside the rotary part of `q[s]` (`[seqs,
/// heads * (nope + rope)]`, rotated at the sequence's position), both times `scale`. Returns the attended latents
/// `[heads, seqs, rank]`. Crate-only: the kernel reads the cache rows, positions and block tables it is given, which
/// only a staged decode step (`DeviceStep` in `model/step.rs`, staged by `model/deepseek/decode.rs` and checked
/// against its pool) vouches for.
pub(crate) fn mla_decode(
    q_lat: &Tensor,
    q: &Tensor,
    nope: usize,
    scale: f32,
    rotary: &DeviceRotary<'_>,
    cache: &PagedCache<'_>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return cuda::mla_decode(q_lat, q, nope, scale, rotary, cache);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q_lat, q, nope, scale, rotary, cache);
        unavailable()
    }
}

/// A decode step's new latent rows into the cache, in place: from the kv_a projection `kv` (`[seqs, rank +
/// rope]`), the first `rank` values RMS-normalized (`norm` weight `[rank]`, `eps`) and the rest rotated at each
/// sequence's position, written to rows `slots` (`[seqs]` u32) of `cache`. Crate-only, as [`mla_decode`].
pub(crate) fn kv_write(
    kv: &Tensor,
    norm: &Tensor,
    eps: f32,
    rotary: &DeviceRotary<'_>,
    slots: &Tensor,
    cache: &Tensor,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    return cuda::kv_write(kv, norm, eps, rotary, slots, cache);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (kv, norm, eps, rotary, slots, cache);
        unavailable()
    }
}

/// For batched GEMMs over large decode batches: `[n_experts * rows]` u32, the token of each active expert's `r`-th
/// routed row at `e * rows + r`, or `rows` (the index of an appended zero row) past its count. `rows` must be at
/// least every expert's count, so at least the plan's tokens (a token chooses an expert once).
pub fn pad_rows(plan: &Plan, rows: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return cuda::pad_rows(plan, rows);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (plan, rows);
        unavailable()
    }
}

/// The batched GEMMs' output `out` (`[n_experts, rows, hidden]`) back to routed rows, each scaled by its routing
/// weight: `[tokens * top_k, hidden]` f32 as [`expert_down`] returns.
pub fn unpad_rows(out: &Tensor, plan: &Plan, weights: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return cuda::unpad_rows(out, plan, weights);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (out, plan, weights);
        unavailable()
    }
}

/// `[n]` f32 values `mean + std · zᵢ`, where `zᵢ` is the `i`-th standard normal draw of the built-in models' host
/// generator seeded with `seed` (SplitMix64 and Box–Muller; see [`crate::builtin`]): the host's draws, generated on
/// the device (equal but for the last rounding of the double-precision logarithm and cosine, within 1e-6).
pub fn random_normal(n: usize, seed: u64, mean: f32, std: f32, device: &Device) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return cuda::random_normal(n, seed, mean, std, device);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (n, seed, mean, std, device);
        unavailable()
    }
}
