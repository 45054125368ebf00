//! DeepSeekMoE: a router over fine-grained routed experts plus always-on shared experts.
//!
//! The router runs on the host over f32 scores (as transformers does) and yields a [`Routing`]: `top_k` experts
//! and weights per token. A [`DispatchPlan`] regroups that by expert — the rows each expert must process and their
//! weights — so every active expert runs one matmul chain over its gathered rows, and the weighted results are
//! scatter-added back. Expert parallelism sends exactly these per-expert row groups to the ranks that own them.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::{ModelConfig, MoeConfig, ScoringFunc, TopkMethod};
use super::experts::{Dispatch, ExpertParallel, ExpertRows, StackedExperts, load_swiglu};
use super::host::{HostMlp, Projection, WeightMut, WeightVisitor, sigmoid_into, uses_host_kernels};
use crate::error::{Error, Part, Result};
use crate::kernels::ExpertCounters;

mod device;

pub use device::DEVICE_MOE_MAX_TOKENS;
use device::DeviceMoe;

/// A SwiGLU feed-forward block (`down(silu(gate(x)) * up(x))`), used for dense layers and shared experts.
/// `gate_proj` and `up_proj` are fused into one matrix at load; f32 weights on the CPU are packed for the host
/// kernels instead of kept as tensors.
#[derive(Debug, Clone)]
pub struct Mlp {
    weights: MlpWeights,
}

#[derive(Debug, Clone)]
enum MlpWeights {
    Tensors { gate_up: Tensor, down: Tensor, intermediate: usize },
    Host(HostMlp),
}

impl Mlp {
    /// Loads the block at `vb`; `fp8`: the block size when FP8 weights are kept as FP8
    /// ([`ModelConfig::kept_fp8`](super::config::ModelConfig::kept_fp8)).
    pub fn load(hidden: usize, intermediate: usize, fp8: Option<[usize; 2]>, vb: VarBuilder) -> Result<Self> {
        if let Some(mlp) = HostMlp::load_fp8(hidden, intermediate, fp8, &vb)? {
            return Ok(Self { weights: MlpWeights::Host(mlp) });
        }
        let (gate_up, down) = load_swiglu(hidden, intermediate, &vb)?;
        let weights = if uses_host_kernels(&vb) {
            MlpWeights::Host(HostMlp::new(&gate_up, &down)?)
        } else {
            MlpWeights::Tensors { gate_up, down, intermediate }
        };
        Ok(Self { weights })
    }

    pub fn is_host(&self) -> bool {
        matches!(self.weights, MlpWeights::Host(_))
    }

    pub fn visit_weights(&mut self, f: &mut WeightVisitor<'_>) -> Result<()> {
        match &mut self.weights {
            MlpWeights::Tensors { gate_up, down, .. } => {
                f(WeightMut::Tensor(gate_up))?;
                f(WeightMut::Tensor(down))
            }
            MlpWeights::Host(mlp) => mlp.visit_weights(f),
        }
    }

    /// Plain rows `xs` (`[m, hidden]`) through the host weights; `None` when this block runs on candle.
    pub fn forward_rows(&self, xs: &[f32], m: usize) -> Option<Vec<f32>> {
        match &self.weights {
            MlpWeights::Host(mlp) => Some(mlp.forward(xs, m)),
            MlpWeights::Tensors { .. } => None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weights {
            MlpWeights::Tensors { gate_up, down, intermediate } => {
                let gate_up = x.matmul(&gate_up.t()?)?;
                let gate = gate_up.narrow(1, 0, *intermediate)?;
                let up = gate_up.narrow(1, *intermediate, *intermediate)?;
                let act = (candle_nn::ops::silu(&gate)? * up)?;
                Ok(act.matmul(&down.t()?)?)
            }
            MlpWeights::Host(mlp) => {
                let (m, hidden) = x.dims2()?;
                let rows = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(Tensor::from_vec(mlp.forward(&rows, m), (m, hidden), x.device())?.to_dtype(x.dtype())?)
            }
        }
    }
}

/// The experts chosen for each token of a batch: row `t` is `experts[t*k..(t+1)*k]` with matching `weights`.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
    /// Per token, how close the choice was to a different one: the smallest gap, in selection score, between the
    /// last kept and the best dropped candidate (group, when routing is group-limited, or expert). A gap below the
    /// scores' rounding error means another dtype or device may legitimately route the token differently.
    pub margins: Vec<f32>,
}

impl Routing {
    pub fn tokens(&self) -> usize {
        self.experts.len() / self.top_k.max(1)
    }

    /// Token `t`'s `(expert, weight)` pairs sorted by expert id.
    pub fn token_sorted(&self, t: usize) -> Vec<(u32, f32)> {
        let k = self.top_k;
        let mut pairs: Vec<(u32, f32)> = self.experts[t * k..(t + 1) * k]
            .iter()
            .copied()
            .zip(self.weights[t * k..(t + 1) * k].iter().copied())
            .collect();
        pairs.sort_by_key(|p| p.0);
        pairs
    }
}

/// The router (`mlp.gate`): a linear map to one logit per routed expert, scored and selected per `topk_method`.
#[derive(Debug, Clone)]
pub struct Router {
    weight: Projection,     // [experts, hidden], f32
    bias: Option<Vec<f32>>, // e_score_correction_bias (noaux_tc)
    config: MoeConfig,
}

impl Router {
    pub fn load(config: &MoeConfig, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let e = config.n_routed_experts;
        let weight =
            Projection::new(candle_nn::Linear::new(vb.get((e, hidden), "weight")?.to_dtype(DType::F32)?, None))?;
        let bias = if config.topk_method == TopkMethod::NoauxTc {
            let b = vb.get(e, "e_score_correction_bias")?.to_dtype(DType::F32)?;
            Some(b.to_vec1::<f32>()?)
        } else {
            None
        };
        Ok(Self { weight, bias, config: config.clone() })
    }

    pub fn n_experts(&self) -> usize {
        self.config.n_routed_experts
    }

    pub fn is_host(&self) -> bool {
        self.weight.is_host()
    }

    /// Routes plain rows `xs` (`[tokens, hidden]`, f32); `None` when the router runs on candle.
    pub fn route_rows(&self, xs: &[f32], tokens: usize) -> Option<Routing> {
        let logits = self.weight.host(xs, tokens)?;
        Some(route_logits(&self.config, &logits, self.bias.as_deref()))
    }

    /// The router's f32 logits of every row of `x` (`[tokens, hidden]` → `[tokens, experts]`).
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.forward(&x.to_dtype(DType::F32)?)
    }

    /// Routes every row of `x` (`[tokens, hidden]`).
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits = self.logits(x)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(route_logits(&self.config, &logits, self.bias.as_deref()))
    }
}

/// Expert selection from router logits (`[tokens * experts]`, row-major), for every `topk_method` ×
/// `scoring_func`. Groups left out by group-limited routing are masked with −∞, so a negative bias-corrected score
/// can never pull in an expert from an excluded group.
pub fn route_logits(config: &MoeConfig, logits: &[f32], bias: Option<&[f32]>) -> Routing {
    let e = config.n_routed_experts;
    let k = config.num_experts_per_tok;
    let tokens = logits.len() / e;
    let per_group = e / config.n_group;
    let mut experts = Vec::with_capacity(tokens * k);
    let mut weights = Vec::with_capacity(tokens * k);
    let mut margins = Vec::with_capacity(tokens);
    let mut scores = vec![0f32; e];
    let mut choice = vec![0f32; e];
    let mut order: Vec<usize> = Vec::with_capacity(e);
    for row in logits.chunks_exact(e) {
        match config.scoring_func {
            ScoringFunc::Softmax => {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (s, &l) in scores.iter_mut().zip(row) {
                    *s = (l - max).exp();
                    sum += *s;
                }
                scores.iter_mut().for_each(|s| *s /= sum);
            }
            ScoringFunc::Sigmoid => sigmoid_into(row, &mut scores),
        }
        choice.copy_from_slice(&scores);
        let mut margin = f32::INFINITY;
        if let (TopkMethod::NoauxTc, Some(bias)) = (config.topk_method, bias) {
            choice.iter_mut().zip(bias).for_each(|(c, b)| *c += b);
        }
        if config.topk_method != TopkMethod::Greedy && config.n_group > 1 {
            let group_score = |g: usize| -> f32 {
                let members = &choice[g * per_group..(g + 1) * per_group];
                match config.topk_method {
                    TopkMethod::NoauxTc => {
                        let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                        for &v in members {
                            if v > a {
                                b = a;
                                a = v;
                            } else if v > b {
                                b = v;
                            }
                        }
                        a + b
                    }
                    _ => members.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                }
            };
            let group_scores: Vec<f32> = (0..config.n_group).map(group_score).collect();
            // One more than kept: the best group left out gives the margin.
            let ranked = top_indices(&group_scores, config.topk_group + 1, &mut order);
            margin = margin.min(selection_gap(&group_scores, &ranked, config.topk_group));
            let keep = &ranked[..config.topk_group.min(ranked.len())];
            for g in 0..config.n_group {
                if !keep.contains(&g) {
                    choice[g * per_group..(g + 1) * per_group].fill(f32::NEG_INFINITY);
                }
            }
        }
        let ranked = top_indices(&choice, k + 1, &mut order);
        margins.push(margin.min(selection_gap(&choice, &ranked, k)));
        let chosen = &ranked[..k.min(ranked.len())];
        let mut w: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
        if config.norm_topk_prob {
            let denom = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|x| *x /= denom);
        }
        let scale = config.routed_scaling_factor as f32;
        for (i, wi) in chosen.iter().zip(w) {
            experts.push(*i as u32);
            weights.push(wi * scale);
        }
    }
    Routing { top_k: k, experts, weights, margins }
}

/// The gap between the last kept and the best dropped value, from `ranked` (the `kept + 1` best, highest first);
/// ∞ when nothing was left out (or only masked, −∞ values were).
fn selection_gap(values: &[f32], ranked: &[usize], kept: usize) -> f32 {
    match (kept.checked_sub(1).and_then(|i| ranked.get(i)), ranked.get(kept)) {
        (Some(&last), Some(&dropped)) => values[last] - values[dropped],
        _ => f32::INFINITY,
    }
}

/// Indices of the `k` largest values (ties: lower index first), highest first. One pass keeping the best `k`
/// in order (insertion), instead of sorting all of them: `k` is a handful, the values a few hundred at most.
fn top_indices(values: &[f32], k: usize, order: &mut Vec<usize>) -> Vec<usize> {
    order.clear();
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    for (i, v) in values.iter().enumerate() {
        // Most values do not beat the k-th kept one: one comparison.
        if order.len() == k && order.last().is_some_and(|&j| values[j].total_cmp(v).is_ge()) {
            continue;
        }
        // Ranks after every kept value that is at least as large (earlier indices win ties).
        let at = order.partition_point(|&j| values[j].total_cmp(v).is_ge());
        if at < k {
            if order.len() == k {
                order.pop();
            }
            order.insert(at, i);
        }
    }
    order.clone()
}

/// The rows each routed expert must process, with their routing weights: the unit of work that expert
/// parallelism ships to the rank owning the expert.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchPlan {
    pub groups: Vec<ExpertRows>,
}

/// The rows one MoE layer sends to another rank: batch row, global expert and routing weight of each.
#[derive(Debug, Clone, Default, PartialEq)]
struct RemoteRows {
    rank: usize,
    rows: Vec<u32>,
    experts: Vec<u32>,
    weights: Vec<f32>,
}

impl DispatchPlan {
    pub fn new(routing: &Routing, n_experts: usize) -> Self {
        let mut per_expert: Vec<ExpertRows> =
            (0..n_experts).map(|expert| ExpertRows { expert, rows: Vec::new(), weights: Vec::new() }).collect();
        for (slot, (&e, &w)) in routing.experts.iter().zip(&routing.weights).enumerate() {
            let g = &mut per_expert[e as usize];
            g.rows.push((slot / routing.top_k) as u32);
            g.weights.push(w);
        }
        Self { groups: per_expert.into_iter().filter(|g| !g.rows.is_empty()).collect() }
    }
}

/// How one forward pass runs an MoE layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct MoeStep<'a> {
    /// Use Baleen's CUDA kernels where the layer supports them.
    pub kernels: bool,
    /// Return the routing (copied to the host).
    pub trace: bool,
    /// Where the kernels count each expert's routed rows (this layer's row of the model's counters).
    pub counters: Option<ExpertCounters<'a>>,
}

/// A DeepSeekMoE block: router, the routed experts this rank holds, shared experts, and — under expert
/// parallelism — the way to the other ranks' experts.
#[derive(Debug, Clone)]
pub struct Moe {
    layer: usize,
    router: Router,
    experts: StackedExperts,
    shared: Option<Mlp>,
    parallel: Option<ExpertParallel>,
    /// The same router and experts on Baleen's CUDA kernels, when they take this layer.
    device: Option<DeviceMoe>,
    /// Per routed expert, a counter of the token rows routed to it (empty when not observed).
    token_counts: Vec<prometheus::IntCounter>,
    /// The model's dtype: rows go to other ranks in it from either path, so a rank or a batching bridge never
    /// meets f32 rows from the host path next to the tensor path's.
    dtype: DType,
}

impl Moe {
    pub fn load(
        config: &ModelConfig,
        moe: &MoeConfig,
        layer: usize,
        parallel: Option<&ExpertParallel>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (h, fp8) = (config.hidden_size, config.kept_fp8());
        let held: Vec<usize> = match parallel {
            Some(p) => p.placement.experts_on(p.rank),
            None => (0..moe.n_routed_experts).collect(),
        };
        let experts =
            StackedExperts::load(&held, moe.n_routed_experts, h, moe.moe_intermediate_size, fp8, vb.pp("experts"))?;
        let shared = match moe.n_shared_experts {
            0 => None,
            n => Some(Mlp::load(h, moe.moe_intermediate_size * n, fp8, vb.pp("shared_experts"))?),
        };
        let router = Router::load(moe, h, vb.pp("gate"))?;
        let device = match (parallel, experts.stacked()) {
            (None, Some((gate_up, down))) => DeviceMoe::new(moe, router.bias.as_deref(), gate_up, down)?,
            _ => None,
        };
        let dtype = vb.dtype();
        Ok(Self {
            layer,
            router,
            experts,
            shared,
            parallel: parallel.cloned(),
            device,
            token_counts: Vec::new(),
            dtype,
        })
    }

    /// The routed and shared experts; the router is kept as loaded (f32: routing decides which experts run).
    /// The CUDA kernels' copy (`device`) shares the stacked experts' storage and is not counted again.
    pub fn visit_weights(&mut self, f: &mut WeightVisitor<'_>) -> Result<()> {
        self.router.weight.visit_kept(f)?;
        f(WeightMut::Kept(self.router.bias.as_ref().map_or(0, |b| std::mem::size_of_val(b.as_slice()))))?;
        self.experts.visit_weights(f)?;
        self.shared.as_mut().map_or(Ok(()), |s| s.visit_weights(f))
    }

    /// Whether this layer can run on Baleen's CUDA kernels (see [`Moe::forward`]).
    pub fn runs_on_kernels(&self) -> bool {
        self.device.is_some()
    }

    /// Counts the token rows routed to each expert into `counter{layer, expert}`.
    pub fn observe(&mut self, counter: &prometheus::IntCounterVec) {
        let layer = self.layer.to_string();
        self.token_counts = (0..self.router.n_experts())
            .map(|e| counter.with_label_values(&[layer.as_str(), &e.to_string()]))
            .collect();
    }

    /// The per-expert counters [`Moe::observe`] set up (empty until then).
    pub fn token_counters(&self) -> &[prometheus::IntCounter] {
        &self.token_counts
    }

    /// The expert transport's runtime, when the waiting thread drives it (see [`super::experts::ExpertDispatcher::driver`]).
    pub fn expert_driver(&self) -> Option<crate::driver::Driver> {
        self.parallel.as_ref().and_then(|p| p.dispatcher.driver())
    }

    /// The routed experts held here (the expert service computes with them).
    pub fn experts(&self) -> &StackedExperts {
        &self.experts
    }

    /// `x` `[tokens, hidden]` → `[tokens, hidden]`; also returns the routing when `step.trace` asks for it.
    ///
    /// With `step.kernels`, a layer the CUDA kernels take runs batches of up to [`DEVICE_MOE_MAX_TOKENS`] tokens on
    /// them, counting routed rows into `step.counters` (the host counters of [`Moe::observe`] are not touched).
    /// Otherwise the router runs on the host: rows for experts on other ranks are sent first; the local experts
    /// and the shared experts run while those are in flight; then everything is combined with one scatter-add.
    pub fn forward(&self, x: &Tensor, step: MoeStep<'_>) -> Result<(Tensor, Option<Routing>)> {
        if step.kernels
            && let Some(device) = &self.device
            && x.dim(0)? <= DEVICE_MOE_MAX_TOKENS
        {
            let logits = self.router.logits(x)?;
            return device.forward(x, &logits, self.shared.as_ref(), step.counters, step.trace);
        }
        let routing = self.router.route(x)?;
        let plan = DispatchPlan::new(&routing, self.router.n_experts());
        self.count_tokens(&plan);
        let (n, hidden) = x.dims2()?;
        let (local, remote) = self.split(plan);
        let mut pending = Vec::with_capacity(remote.len());
        if let Some(p) = &self.parallel {
            for RemoteRows { rank, rows, experts, weights } in remote {
                let count = rows.len();
                let idx = Tensor::from_vec(rows, count, x.device())?;
                let sent = x.index_select(&idx, 0)?;
                pending.push((
                    idx,
                    p.dispatcher.dispatch(
                        rank,
                        Dispatch { layer: self.layer, rows: &sent, experts: &experts, weights: &weights },
                    )?,
                ));
            }
        }
        let mut summed = if local.is_empty() {
            Tensor::zeros((n, hidden), DType::F32, x.device())?
        } else {
            self.experts.sum_groups(x, &local)?
        };
        let shared = self.shared.as_ref().map(|s| s.forward(x)).transpose()?;
        for (idx, p) in pending {
            let out = p.wait()?;
            summed = summed.index_add(&idx, &out.to_dtype(DType::F32)?, 0)?;
        }
        let routed = summed.to_dtype(x.dtype())?;
        let out = match shared {
            Some(s) => (routed + s)?,
            None => routed,
        };
        Ok((out, step.trace.then_some(routing)))
    }

    /// Whether [`Moe::forward_rows`] can run: host router, experts and shared experts.
    pub fn runs_on_host(&self) -> bool {
        self.router.is_host() && self.experts.is_host() && self.shared.as_ref().is_none_or(Mlp::is_host)
    }

    /// [`Moe::forward`] over plain rows `xs` (`[n, hidden]`) when the router and experts run on the host; `None`
    /// otherwise. Rows for other ranks' experts still travel as tensors through the expert transport.
    pub fn forward_rows(&self, xs: &[f32], n: usize) -> Result<Option<(Vec<f32>, Routing)>> {
        if !self.runs_on_host() {
            return Ok(None);
        }
        let Some(routing) = self.router.route_rows(xs, n) else { return Ok(None) };
        let hidden = xs.len() / n.max(1);
        let plan = DispatchPlan::new(&routing, self.router.n_experts());
        self.count_tokens(&plan);
        let (local, remote) = self.split(plan);
        let mut pending = Vec::with_capacity(remote.len());
        if let Some(p) = &self.parallel {
            for RemoteRows { rank, rows, experts, weights } in remote {
                let mut sent = Vec::with_capacity(rows.len() * hidden);
                for &r in &rows {
                    let r = r as usize;
                    sent.extend_from_slice(&xs[r * hidden..(r + 1) * hidden]);
                }
                let sent =
                    Tensor::from_vec(sent, (rows.len(), hidden), &candle_core::Device::Cpu)?.to_dtype(self.dtype)?;
                pending.push((
                    rows,
                    p.dispatcher.dispatch(
                        rank,
                        Dispatch { layer: self.layer, rows: &sent, experts: &experts, weights: &weights },
                    )?,
                ));
            }
        }
        let mut out = if local.is_empty() {
            vec![0f32; n * hidden]
        } else {
            match self.experts.sum_groups_rows(xs, n, &local)? {
                Some(out) => out,
                None => return Err(Error::internal(Part::Experts, "the routed experts are not packed for the host")),
            }
        };
        if let Some(shared) = &self.shared {
            let s = shared
                .forward_rows(xs, n)
                .ok_or_else(|| Error::internal(Part::Experts, "the shared experts are not packed for the host"))?;
            out.iter_mut().zip(&s).for_each(|(o, s)| *o += s);
        }
        for (rows, p) in pending {
            let back = p.wait()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for (&r, row) in rows.iter().zip(back.chunks_exact(hidden.max(1))) {
                let r = r as usize;
                out[r * hidden..(r + 1) * hidden].iter_mut().zip(row).for_each(|(o, v)| *o += v);
            }
        }
        Ok(Some((out, routing)))
    }

    fn count_tokens(&self, plan: &DispatchPlan) {
        for g in &plan.groups {
            if let Some(c) = self.token_counts.get(g.expert) {
                c.inc_by(g.rows.len() as u64);
            }
        }
    }

    /// Splits the plan into the groups computed here and, per other rank, the rows sent there.
    fn split(&self, plan: DispatchPlan) -> (Vec<ExpertRows>, Vec<RemoteRows>) {
        let Some(p) = &self.parallel else {
            return (plan.groups, Vec::new());
        };
        let mut local = Vec::new();
        let mut remote: Vec<RemoteRows> = Vec::new();
        for g in plan.groups {
            let rank = p.placement.route(g.expert, p.rank);
            if rank == p.rank {
                local.push(g);
                continue;
            }
            let at = match remote.iter().position(|r| r.rank == rank) {
                Some(at) => at,
                None => {
                    remote.push(RemoteRows { rank, ..RemoteRows::default() });
                    remote.len() - 1
                }
            };
            let r = &mut remote[at];
            r.experts.extend(std::iter::repeat_n(g.expert as u32, g.rows.len()));
            r.rows.extend(g.rows);
            r.weights.extend(g.weights);
        }
        (local, remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass selection equals a full sort (value descending, index ascending) for every k, with ties,
    /// −∞ (masked groups) and duplicates.
    #[test]
    fn top_indices_equals_a_full_sort() {
        let mut order = Vec::new();
        let mut seed = 7u64;
        for case in 0..200 {
            let n = 1 + case % 40;
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    match seed >> 60 {
                        0 => f32::NEG_INFINITY,
                        1 => 0.5,
                        _ => ((seed >> 33) % 1000) as f32 / 100.0 - 5.0,
                    }
                })
                .collect();
            let mut sorted: Vec<usize> = (0..n).collect();
            sorted.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
            for k in 0..=n + 1 {
                assert_eq!(top_indices(&values, k, &mut order), sorted[..k.min(n)].to_vec(), "{values:?} k={k}");
            }
        }
    }

    fn moe_config(topk_method: TopkMethod, n_group: usize, topk_group: usize) -> MoeConfig {
        MoeConfig {
            n_routed_experts: 8,
            n_shared_experts: 0,
            num_experts_per_tok: 2,
            moe_intermediate_size: 4,
            topk_method,
            scoring_func: ScoringFunc::Sigmoid,
            n_group,
            topk_group,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
        }
    }

    /// The margin is the gap between the last kept and the best dropped candidate, at the expert stage and, for
    /// group-limited routing, at the group stage, whichever is smaller.
    #[test]
    fn routing_margins_are_the_closest_selection_gap() {
        let sig = |p: f32| (p / (1.0 - p)).ln(); // logit whose sigmoid is p
        let logits: Vec<f32> = [0.6, 0.1, 0.8, 0.7, 0.2, 0.3, 0.75, 0.1].into_iter().map(sig).collect();
        let greedy = route_logits(&moe_config(TopkMethod::Greedy, 1, 1), &logits, None);
        assert_eq!(greedy.token_sorted(0).iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 6]);
        assert!((greedy.margins[0] - 0.05).abs() < 1e-6, "0.75 kept vs 0.7 dropped: {}", greedy.margins[0]);
        // Groups of two, best two by their top-2 sums (0.7, 1.5, 0.5, 0.85): groups 1 and 3, 0.15 ahead of group 0;
        // then experts 2 (0.8) and 6 (0.75), 0.05 ahead of expert 3 (0.7).
        let grouped = route_logits(&moe_config(TopkMethod::NoauxTc, 4, 2), &logits, Some(&[0.0; 8]));
        assert_eq!(grouped.token_sorted(0).iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 6]);
        assert!((grouped.margins[0] - 0.05).abs() < 1e-6, "{}", grouped.margins[0]);
        // A bias that brings group 0 within 0.01 of group 3 (0.84) makes the group stage decide the margin.
        let bias = [0.07, 0.07, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let close = route_logits(&moe_config(TopkMethod::NoauxTc, 4, 2), &logits, Some(&bias));
        assert!((close.margins[0] - 0.01).abs() < 1e-5, "{}", close.margins[0]);
    }
}
