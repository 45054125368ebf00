//! DeepSeekMoE on Baleen's CUDA kernels ([`crate::kernels`]): the router's logits stay on the device, routing,
//! dispatch, the grouped expert projections and the combine are one launch each, and nothing waits for the host —
//! so a decode step can be captured in a CUDA graph. Chosen at load for CUDA models that hold every routed expert
//! (no expert parallelism) and whose router the kernels take; other layers keep [`super::Moe`]'s tensor path.

use candle_core::{DType, Tensor};

use super::{Mlp, Routing};
use crate::error::Result;
use crate::kernels::{self, ExpertCounters, RouteParams};
use crate::model::config::MoeConfig;

/// Batches of at most this many tokens take the kernels; longer prefills keep the batched matmul chains, whose
/// tensor-core GEMMs win once every expert has many rows.
pub const DEVICE_MOE_MAX_TOKENS: usize = 256;

/// Batches of at least this many tokens run the experts as two batched GEMMs over slabs of `tokens` rows per expert
/// (tensor cores): at that size nearly every expert is active and its rows are many, where the grouped kernels'
/// row-by-row products fall behind. Only where a slab's padding stays a bounded multiple of the useful work: at
/// most [`SLAB_MAX_EXPERTS_PER_CHOICE`] experts per routed choice (DeepSeek-V2-Lite: 64 / 6; V3's 256 / 8 is not).
pub const SLAB_MIN_TOKENS: usize = 96;
const SLAB_MAX_EXPERTS_PER_CHOICE: usize = 16;

/// The kernels' view of one MoE layer: the router's weight and correction bias (f32), and the stacked experts.
#[derive(Debug, Clone)]
pub(super) struct DeviceMoe {
    bias: Option<Tensor>,
    gate_up: Tensor,
    down: Tensor,
    params: RouteParams,
}

impl DeviceMoe {
    /// `None` unless the kernels take this layer: a CUDA device, a supported dtype, a router within the kernels'
    /// limits, and every routed expert stacked here (`gate_up` `[experts, 2 * inter, hidden]`, `down`
    /// `[experts, hidden, inter]`).
    pub(super) fn new(
        config: &MoeConfig,
        bias: Option<&[f32]>,
        gate_up: &Tensor,
        down: &Tensor,
    ) -> Result<Option<Self>> {
        let params = RouteParams::from_config(config);
        let device = gate_up.device();
        let held = gate_up.dim(0)?;
        if !kernels::available(device)
            || !kernels::supports_dtype(gate_up.dtype())
            || !params.fits()
            || held != config.n_routed_experts
        {
            return Ok(None);
        }
        let bias = bias.map(|b| Tensor::from_slice(b, b.len(), device)).transpose()?;
        Ok(Some(Self { bias, gate_up: gate_up.clone(), down: down.clone(), params }))
    }

    /// `x` `[tokens, hidden]` through the router (`logits`: the router's f32 logits of `x`), the routed experts and
    /// `shared`; the routing is copied to the host only when `trace` asks for it.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        logits: &Tensor,
        shared: Option<&Mlp>,
        counters: Option<ExpertCounters<'_>>,
        trace: bool,
    ) -> Result<(Tensor, Option<Routing>)> {
        let x = x.contiguous()?;
        let tokens = x.dim(0)?;
        let k = self.params.top_k;
        let (ids, weights) = kernels::route(logits, self.bias.as_ref(), &self.params)?;
        let plan = kernels::dispatch(&ids, self.params.n_experts, k, counters)?;
        let routed = weights.narrow(0, 0, tokens * k)?;
        let y = if tokens >= SLAB_MIN_TOKENS && self.params.n_experts <= SLAB_MAX_EXPERTS_PER_CHOICE * k {
            self.slabs(&x, &plan, &routed)?
        } else {
            let h = kernels::expert_gate_up(&x, &self.gate_up, &plan)?;
            kernels::expert_down(&h, &self.down, &plan, &routed)?
        };
        let shared = shared.map(|s| s.forward(&x)).transpose()?;
        let out = kernels::combine(&y, shared.as_ref(), k, x.dtype())?;
        let routing = if trace {
            Some(Routing {
                top_k: k,
                experts: ids.to_vec1::<u32>()?,
                weights: routed.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                margins: weights.narrow(0, tokens * k, tokens)?.to_vec1::<f32>()?,
            })
        } else {
            None
        };
        Ok((out, routing))
    }

    /// Every expert's routed rows of `x` gathered into a slab of `tokens` rows (zero rows past its count; no expert
    /// has more, as a token chooses an expert once), two batched GEMMs with SwiGLU between, and the rows back in
    /// the routing's order, weighted: what [`kernels::expert_down`] returns.
    fn slabs(&self, x: &Tensor, plan: &kernels::Plan, routed: &Tensor) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        let (n_experts, _, inter) = self.down.dims3()?;
        let idx = kernels::pad_rows(plan, tokens)?;
        let padded = Tensor::cat(&[x, &Tensor::zeros((1, hidden), x.dtype(), x.device())?], 0)?;
        let xs = padded.index_select(&idx, 0)?.reshape((n_experts, tokens, hidden))?;
        let h = xs.matmul(&self.gate_up.transpose(1, 2)?)?;
        let act = (candle_nn::ops::silu(&h.narrow(2, 0, inter)?)? * h.narrow(2, inter, inter)?)?;
        let out = act.matmul(&self.down.transpose(1, 2)?)?;
        kernels::unpad_rows(&out, plan, routed)
    }
}
