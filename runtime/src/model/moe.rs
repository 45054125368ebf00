//! DeepSeekMoE: a router over fine-grained routed experts plus always-on shared experts.
//!
//! The router runs on the host over f32 scores (as transformers does) and yields a [`Routing`]: `top_k` experts
//! and weights per token. A [`DispatchPlan`] regroups that by expert — the rows each expert must process and their
//! weights — so every active expert runs one matmul chain over its gathered rows, and the weighted results are
//! scatter-added back. Expert parallelism sends exactly these per-expert row groups to the ranks that own them.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::{ModelConfig, MoeConfig, ScoringFunc, TopkMethod};
use crate::error::{Error, Result};

/// A SwiGLU feed-forward block (`down(silu(gate(x)) * up(x))`), used for dense layers, shared experts and each
/// routed expert. `gate_proj` and `up_proj` are fused into one matrix at load.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: Tensor, // [2 * intermediate, hidden]
    down: Tensor,    // [hidden, intermediate]
    intermediate: usize,
}

impl Mlp {
    pub fn load(hidden: usize, intermediate: usize, vb: VarBuilder) -> Result<Self> {
        let gate = vb.pp("gate_proj").get((intermediate, hidden), "weight")?;
        let up = vb.pp("up_proj").get((intermediate, hidden), "weight")?;
        let down = vb.pp("down_proj").get((hidden, intermediate), "weight")?;
        Ok(Self { gate_up: Tensor::cat(&[&gate, &up], 0)?, down, intermediate })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = x.matmul(&self.gate_up.t()?)?;
        let gate = gate_up.narrow(1, 0, self.intermediate)?;
        let up = gate_up.narrow(1, self.intermediate, self.intermediate)?;
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        Ok(act.matmul(&self.down.t()?)?)
    }
}

/// The experts chosen for each token of a batch: row `t` is `experts[t*k..(t+1)*k]` with matching `weights`.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
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
    weight: Tensor,         // [experts, hidden], f32
    bias: Option<Vec<f32>>, // e_score_correction_bias (noaux_tc)
    config: MoeConfig,
}

impl Router {
    pub fn load(config: &MoeConfig, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let e = config.n_routed_experts;
        let weight = vb.get((e, hidden), "weight")?.to_dtype(DType::F32)?;
        let bias = if config.topk_method == TopkMethod::NoauxTc {
            let b = vb.get(e, "e_score_correction_bias")?.to_dtype(DType::F32)?;
            Some(b.to_vec1::<f32>()?)
        } else {
            None
        };
        Ok(Self { weight, bias, config: config.clone() })
    }

    /// Routes every row of `x` (`[tokens, hidden]`).
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits = x.to_dtype(DType::F32)?.matmul(&self.weight.t()?)?;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
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
            ScoringFunc::Sigmoid => {
                for (s, &l) in scores.iter_mut().zip(row) {
                    *s = 1.0 / (1.0 + (-l).exp());
                }
            }
        }
        choice.copy_from_slice(&scores);
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
            let keep = top_indices(&group_scores, config.topk_group, &mut order);
            for g in 0..config.n_group {
                if !keep.contains(&g) {
                    choice[g * per_group..(g + 1) * per_group].fill(f32::NEG_INFINITY);
                }
            }
        }
        let chosen = top_indices(&choice, k, &mut order);
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
    Routing { top_k: k, experts, weights }
}

/// Indices of the `k` largest values (ties: lower index first), highest first.
fn top_indices(values: &[f32], k: usize, order: &mut Vec<usize>) -> Vec<usize> {
    order.clear();
    order.extend(0..values.len());
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order[..k.min(values.len())].to_vec()
}

/// The rows each routed expert must process, with their routing weights: the unit of work that expert
/// parallelism ships to the rank owning the expert.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchPlan {
    pub groups: Vec<ExpertRows>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExpertRows {
    pub expert: usize,
    pub rows: Vec<u32>,
    pub weights: Vec<f32>,
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

/// The routed experts' weights stacked along a leading expert axis, so the experts of a batch can run as one
/// batched matmul chain.
#[derive(Debug, Clone)]
struct StackedExperts {
    gate_up: Tensor, // [experts, 2 * intermediate, hidden]
    down: Tensor,    // [experts, hidden, intermediate]
    intermediate: usize,
}

impl StackedExperts {
    fn load(n: usize, hidden: usize, intermediate: usize, vb: VarBuilder) -> Result<Self> {
        let mut gate_up = Vec::with_capacity(n);
        let mut down = Vec::with_capacity(n);
        for e in 0..n {
            let mlp = Mlp::load(hidden, intermediate, vb.pp(e))?;
            gate_up.push(mlp.gate_up);
            down.push(mlp.down);
        }
        Ok(Self { gate_up: Tensor::stack(&gate_up, 0)?, down: Tensor::stack(&down, 0)?, intermediate })
    }

    fn len(&self) -> usize {
        self.gate_up.dim(0).unwrap_or(0)
    }

    /// `x` `[experts, rows, hidden]` through the experts `[experts, ...]` of `gate_up`/`down`.
    fn forward(&self, x: &Tensor, gate_up: &Tensor, down: &Tensor) -> Result<Tensor> {
        let h = x.matmul(&gate_up.transpose(1, 2)?)?;
        let i = self.intermediate;
        let act = (candle_nn::ops::silu(&h.narrow(2, 0, i)?)? * h.narrow(2, i, i)?)?;
        Ok(act.matmul(&down.transpose(1, 2)?)?)
    }
}

/// A DeepSeekMoE block: router, routed experts and shared experts.
#[derive(Debug, Clone)]
pub struct Moe {
    router: Router,
    experts: StackedExperts,
    shared: Option<Mlp>,
}

impl Moe {
    pub fn load(config: &ModelConfig, moe: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        let h = config.hidden_size;
        let experts = StackedExperts::load(moe.n_routed_experts, h, moe.moe_intermediate_size, vb.pp("experts"))?;
        let shared = match moe.n_shared_experts {
            0 => None,
            n => Some(Mlp::load(h, moe.moe_intermediate_size * n, vb.pp("shared_experts"))?),
        };
        Ok(Self { router: Router::load(moe, h, vb.pp("gate"))?, experts, shared })
    }

    /// `x` `[tokens, hidden]` → `[tokens, hidden]`; also returns the routing, for tracing.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Routing)> {
        let routing = self.router.route(x)?;
        let plan = DispatchPlan::new(&routing, self.experts.len());
        let routed = self.run_plan(x, &plan)?;
        let out = match &self.shared {
            Some(shared) => (routed + shared.forward(x)?)?,
            None => routed,
        };
        Ok((out, routing))
    }

    /// Runs every expert group of the plan and scatter-adds the weighted results.
    ///
    /// The active experts' rows are gathered once into `[experts, rows, hidden]`, padded to the busiest expert
    /// with a zero row of weight 0, and go through one batched gate/up → SiLU → down chain; then one weighting and
    /// one scatter-add for the batch. When padding would more than double the work (skewed routing), each expert
    /// runs on its own contiguous slice instead.
    fn run_plan(&self, x: &Tensor, plan: &DispatchPlan) -> Result<Tensor> {
        let device = x.device();
        let (n, hidden) = x.dims2()?;
        if plan.groups.is_empty() {
            return Ok(x.zeros_like()?);
        }
        for g in &plan.groups {
            if g.expert >= self.experts.len() {
                return Err(Error::InvalidRequest(format!("routed to unknown expert {}", g.expert)));
            }
        }
        let active = plan.groups.len();
        let total: usize = plan.groups.iter().map(|g| g.rows.len()).sum();
        let widest = plan.groups.iter().map(|g| g.rows.len()).max().unwrap_or(0);
        let padded = active > 1 && active * widest <= 2 * total;
        let (mut rows, mut weights) = (Vec::new(), Vec::new());
        for g in &plan.groups {
            rows.extend_from_slice(&g.rows);
            weights.extend_from_slice(&g.weights);
            if padded {
                // Padding rows read the zero row appended after the batch and carry weight 0.
                rows.extend(std::iter::repeat_n(n as u32, widest - g.rows.len()));
                weights.extend(std::iter::repeat_n(0f32, widest - g.rows.len()));
            }
        }
        let count = rows.len();
        let rows = Tensor::from_vec(rows, count, device)?;
        let out = if padded {
            let x_ext = Tensor::cat(&[x, &Tensor::zeros((1, hidden), x.dtype(), device)?], 0)?;
            let xs = x_ext.index_select(&rows, 0)?.reshape((active, widest, hidden))?;
            let (gate_up, down) = if active == self.experts.len() {
                (self.experts.gate_up.clone(), self.experts.down.clone())
            } else {
                let ids: Vec<u32> = plan.groups.iter().map(|g| g.expert as u32).collect();
                let ids = Tensor::from_vec(ids, active, device)?;
                (self.experts.gate_up.index_select(&ids, 0)?, self.experts.down.index_select(&ids, 0)?)
            };
            self.experts.forward(&xs, &gate_up, &down)?.reshape((count, hidden))?
        } else {
            let gathered = x.index_select(&rows, 0)?;
            let mut outputs = Vec::with_capacity(active);
            let mut offset = 0;
            for g in &plan.groups {
                let e = g.expert;
                let xs = gathered.narrow(0, offset, g.rows.len())?.unsqueeze(0)?;
                let (gu, d) = (self.experts.gate_up.narrow(0, e, 1)?, self.experts.down.narrow(0, e, 1)?);
                outputs.push(self.experts.forward(&xs, &gu, &d)?.squeeze(0)?);
                offset += g.rows.len();
            }
            if outputs.len() == 1 { outputs.remove(0) } else { Tensor::cat(&outputs, 0)? }
        };
        let weights = Tensor::from_vec(weights, (count, 1), device)?;
        let weighted = out.to_dtype(DType::F32)?.broadcast_mul(&weights)?;
        let scatter_rows = if padded { n + 1 } else { n };
        let summed = Tensor::zeros((scatter_rows, hidden), DType::F32, device)?.index_add(&rows, &weighted, 0)?;
        Ok(summed.narrow(0, 0, n)?.to_dtype(x.dtype())?)
    }
}
