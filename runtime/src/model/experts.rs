//! Routed experts: the weights a rank holds, how they run over grouped rows, and the seam through which expert
//! parallelism sends rows to the ranks that hold the other experts.

use std::sync::Arc;

use baleen_api::topology::ExpertPlacement;
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::ModelConfig;
use super::moe::{ExpertRows, Mlp};
use crate::error::{Error, Result};

/// Sends rows to another rank's experts without waiting (the expert transport implements it).
pub trait ExpertDispatcher: Send + Sync + std::fmt::Debug {
    /// Rows `[m, hidden]` of MoE layer `layer` go to `rank`; row `i` through global expert `experts[i]`, weighted by
    /// `weights[i]`.
    fn dispatch(
        &self,
        rank: usize,
        layer: usize,
        rows: &Tensor,
        experts: &[u32],
        weights: &[f32],
    ) -> Result<Box<dyn PendingRows>>;
}

/// A dispatch in flight.
pub trait PendingRows: Send {
    /// The weighted expert outputs `[m, hidden]`, one per dispatched row.
    fn wait(self: Box<Self>) -> Result<Tensor>;
}

/// How this process takes part in expert parallelism: the group's placement, its rank, and the transport to the
/// other ranks.
#[derive(Debug, Clone)]
pub struct ExpertParallel {
    pub placement: ExpertPlacement,
    pub rank: usize,
    pub dispatcher: Arc<dyn ExpertDispatcher>,
}

/// The routed experts of one MoE layer held by this rank, weights stacked along a leading axis, so the active
/// experts of a batch run as one batched matmul chain.
#[derive(Debug, Clone)]
pub struct StackedExperts {
    gate_up: Tensor, // [held, 2 * intermediate, hidden]
    down: Tensor,    // [held, hidden, intermediate]
    intermediate: usize,
    /// Global expert id → index into the stacked tensors, for the experts held here.
    local: Vec<Option<usize>>,
}

impl StackedExperts {
    /// Loads the experts `held` (global ids, ascending) of a layer whose VarBuilder is at `…mlp.experts`.
    pub fn load(held: &[usize], n_experts: usize, hidden: usize, intermediate: usize, vb: VarBuilder) -> Result<Self> {
        let mut gate_up = Vec::with_capacity(held.len());
        let mut down = Vec::with_capacity(held.len());
        let mut local = vec![None; n_experts];
        for (i, &e) in held.iter().enumerate() {
            let slot = local
                .get_mut(e)
                .ok_or_else(|| Error::InvalidRequest(format!("expert {e} outside the model's {n_experts}")))?;
            *slot = Some(i);
            let mlp = Mlp::load(hidden, intermediate, vb.pp(e))?;
            gate_up.push(mlp.gate_up);
            down.push(mlp.down);
        }
        if held.is_empty() {
            return Err(Error::InvalidRequest("a rank must hold at least one expert".into()));
        }
        Ok(Self { gate_up: Tensor::stack(&gate_up, 0)?, down: Tensor::stack(&down, 0)?, intermediate, local })
    }

    pub fn holds(&self, expert: usize) -> bool {
        self.local.get(expert).is_some_and(Option::is_some)
    }

    /// Bytes of expert weights held.
    pub fn bytes(&self) -> usize {
        (self.gate_up.elem_count() + self.down.elem_count()) * self.gate_up.dtype().size_in_bytes()
    }

    fn chain(&self, x: &Tensor, gate_up: &Tensor, down: &Tensor) -> Result<Tensor> {
        let h = x.matmul(&gate_up.transpose(1, 2)?)?;
        let i = self.intermediate;
        let act = (candle_nn::ops::silu(&h.narrow(2, 0, i)?)? * h.narrow(2, i, i)?)?;
        Ok(act.matmul(&down.transpose(1, 2)?)?)
    }

    /// Runs `groups` (all held here) over rows of `x` (`[n, hidden]`) and returns, per row of `x`, the sum of its
    /// weighted expert outputs (`[n, hidden]`, f32). The active experts' rows are gathered once into
    /// `[experts, rows, hidden]`, padded to the busiest expert with a zero row (index `n`, weight 0), and go through
    /// one batched gate/up → SiLU → down chain, then one scatter-add. When padding would more than double the work
    /// (skewed routing), each expert runs on its own contiguous slice instead.
    pub fn sum_groups(&self, x: &Tensor, groups: &[ExpertRows]) -> Result<Tensor> {
        let device = x.device();
        let (n, hidden) = x.dims2()?;
        let mut ids = Vec::with_capacity(groups.len());
        for g in groups {
            ids.push(
                self.local
                    .get(g.expert)
                    .copied()
                    .flatten()
                    .ok_or_else(|| Error::InvalidRequest(format!("expert {} is not held by this rank", g.expert)))?
                    as u32,
            );
        }
        let active = groups.len();
        let total: usize = groups.iter().map(|g| g.rows.len()).sum();
        let widest = groups.iter().map(|g| g.rows.len()).max().unwrap_or(0);
        let padded = active > 1 && active * widest <= 2 * total;
        let (mut rows, mut weights) = (Vec::new(), Vec::new());
        for g in groups {
            rows.extend_from_slice(&g.rows);
            weights.extend_from_slice(&g.weights);
            if padded {
                rows.extend(std::iter::repeat_n(n as u32, widest - g.rows.len()));
                weights.extend(std::iter::repeat_n(0f32, widest - g.rows.len()));
            }
        }
        let count = rows.len();
        let row_ids = Tensor::from_vec(rows, count, device)?;
        let out = if padded {
            let x_ext = Tensor::cat(&[x, &Tensor::zeros((1, hidden), x.dtype(), device)?], 0)?;
            let xs = x_ext.index_select(&row_ids, 0)?.reshape((active, widest, hidden))?;
            let held = self.gate_up.dim(0)?;
            let (gate_up, down) = if active == held && ids.iter().enumerate().all(|(i, &id)| id as usize == i) {
                (self.gate_up.clone(), self.down.clone())
            } else {
                let ids = Tensor::from_vec(ids, active, device)?;
                (self.gate_up.index_select(&ids, 0)?, self.down.index_select(&ids, 0)?)
            };
            self.chain(&xs, &gate_up, &down)?.reshape((count, hidden))?
        } else {
            let gathered = x.index_select(&row_ids, 0)?;
            let mut outputs = Vec::with_capacity(active);
            let mut offset = 0;
            for (g, &id) in groups.iter().zip(&ids) {
                let xs = gathered.narrow(0, offset, g.rows.len())?.unsqueeze(0)?;
                let (gu, d) = (self.gate_up.narrow(0, id as usize, 1)?, self.down.narrow(0, id as usize, 1)?);
                outputs.push(self.chain(&xs, &gu, &d)?.squeeze(0)?);
                offset += g.rows.len();
            }
            if outputs.len() == 1 { outputs.remove(0) } else { Tensor::cat(&outputs, 0)? }
        };
        let weights = Tensor::from_vec(weights, (count, 1), device)?;
        let weighted = out.to_dtype(DType::F32)?.broadcast_mul(&weights)?;
        let len = if padded { n + 1 } else { n };
        let summed = Tensor::zeros((len, hidden), DType::F32, device)?.index_add(&row_ids, &weighted, 0)?;
        Ok(summed.narrow(0, 0, n)?)
    }

    /// The expert service's unit of work: row `i` of `rows` through `experts[i]`, weighted by `weights[i]`;
    /// returns `[m, hidden]` in the rows' dtype.
    pub fn compute_rows(&self, rows: &Tensor, experts: &[u32], weights: &[f32]) -> Result<Tensor> {
        let (m, _) = rows.dims2()?;
        if experts.len() != m || weights.len() != m {
            return Err(Error::InvalidRequest(format!(
                "{m} rows but {} experts and {} weights",
                experts.len(),
                weights.len()
            )));
        }
        let mut by_expert: Vec<ExpertRows> = Vec::new();
        let mut order: Vec<usize> = (0..m).collect();
        order.sort_by_key(|&i| experts[i]);
        for i in order {
            let e = experts[i] as usize;
            match by_expert.last_mut() {
                Some(g) if g.expert == e => {
                    g.rows.push(i as u32);
                    g.weights.push(weights[i]);
                }
                _ => by_expert.push(ExpertRows { expert: e, rows: vec![i as u32], weights: vec![weights[i]] }),
            }
        }
        Ok(self.sum_groups(rows, &by_expert)?.to_dtype(rows.dtype())?)
    }
}

/// The routed experts a rank without attention holds, for every MoE layer (an expert-only rank of a group).
#[derive(Debug, Clone)]
pub struct ExpertShard {
    layers: Vec<Option<StackedExperts>>,
    held: Vec<usize>,
}

impl ExpertShard {
    /// Loads `placement.experts_on(rank)` of every MoE layer from a VarBuilder rooted at the checkpoint.
    pub fn load(config: &ModelConfig, placement: &ExpertPlacement, rank: usize, vb: VarBuilder) -> Result<Self> {
        let moe = config.moe.as_ref().ok_or_else(|| Error::config("n_routed_experts", "the model has no experts"))?;
        let held = placement.experts_on(rank);
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                if !config.is_moe_layer(l) {
                    return Ok(None);
                }
                let vb = vb.pp("model").pp("layers").pp(l).pp("mlp").pp("experts");
                StackedExperts::load(&held, moe.n_routed_experts, config.hidden_size, moe.moe_intermediate_size, vb)
                    .map(Some)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, held })
    }

    pub fn held(&self) -> &[usize] {
        &self.held
    }

    /// Bytes of expert weights held across all layers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(StackedExperts::bytes).sum()
    }

    pub fn compute(&self, layer: usize, rows: &Tensor, experts: &[u32], weights: &[f32]) -> Result<Tensor> {
        let stack = self
            .layers
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::InvalidRequest(format!("layer {layer} has no routed experts")))?;
        stack.compute_rows(rows, experts, weights)
    }
}

/// The in-process transport: other ranks' shards live in this process and compute at dispatch time. Used to check
/// a placement's arithmetic without a network (and by tests); the gRPC transport is the one that crosses ranks.
#[derive(Debug, Default)]
pub struct InProcessExperts {
    shards: Vec<Option<ExpertShard>>,
}

impl InProcessExperts {
    /// `shards[r]` holds rank `r`'s experts (`None` for the ranks that never receive dispatches here).
    pub fn new(shards: Vec<Option<ExpertShard>>) -> Self {
        Self { shards }
    }
}

struct Ready(Tensor);

impl PendingRows for Ready {
    fn wait(self: Box<Self>) -> Result<Tensor> {
        Ok(self.0)
    }
}

impl ExpertDispatcher for InProcessExperts {
    fn dispatch(
        &self,
        rank: usize,
        layer: usize,
        rows: &Tensor,
        experts: &[u32],
        weights: &[f32],
    ) -> Result<Box<dyn PendingRows>> {
        let shard = self
            .shards
            .get(rank)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::InvalidRequest(format!("no in-process shard for rank {rank}")))?;
        Ok(Box::new(Ready(shard.compute(layer, rows, experts, weights)?)))
    }
}
