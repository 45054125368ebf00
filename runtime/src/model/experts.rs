//! Routed experts: the weights a rank holds, how they run over grouped rows, and the seam through which expert
//! parallelism sends rows to the ranks that hold the other experts.

use std::sync::Arc;

use baleen_api::topology::ExpertPlacement;
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::config::ModelConfig;
use super::host::{HostMlp, WeightMut, WeightVisitor, uses_host_kernels};
use crate::error::{Error, Part, Result};

/// Rows of one MoE layer for the routed experts: row `i` of `rows` (`[m, hidden]`) goes through global expert
/// `experts[i]`, weighted by `weights[i]`. What a layer sends to the rank that owns the experts, and what that
/// rank computes.
#[derive(Debug, Clone, Copy)]
pub struct Dispatch<'a> {
    pub layer: usize,
    pub rows: &'a Tensor,
    pub experts: &'a [u32],
    pub weights: &'a [f32],
}

/// The rows one routed expert must process (batch rows) and their routing weights: the unit of work a MoE layer
/// gives an expert, here or on the rank that owns it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertRows {
    pub expert: usize,
    pub rows: Vec<u32>,
    pub weights: Vec<f32>,
}

/// `gate_proj` and `up_proj` stacked (`[2 * intermediate, hidden]`, gate rows first) and `down_proj`
/// (`[hidden, intermediate]`) of the SwiGLU block at `vb`.
pub(crate) fn load_swiglu(hidden: usize, intermediate: usize, vb: &VarBuilder) -> Result<(Tensor, Tensor)> {
    let gate = vb.pp("gate_proj").get((intermediate, hidden), "weight")?;
    let up = vb.pp("up_proj").get((intermediate, hidden), "weight")?;
    let down = vb.pp("down_proj").get((hidden, intermediate), "weight")?;
    Ok((Tensor::cat(&[&gate, &up], 0)?, down))
}

/// Sends rows to another rank's experts without waiting (the expert transport implements it).
pub trait ExpertDispatcher: Send + Sync + std::fmt::Debug {
    /// `batch`'s rows go to `rank`'s experts.
    fn dispatch(&self, rank: usize, batch: Dispatch<'_>) -> Result<Box<dyn PendingRows>>;

    /// The runtime the transport lives on, when the waiting thread drives it itself: an idle engine thread
    /// drives it too, so reconnects and handshakes progress without a thread of their own.
    fn driver(&self) -> Option<crate::driver::Driver> {
        None
    }
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

/// The routed experts of one MoE layer held by this rank. On accelerators and in half precision their weights
/// are stacked along a leading axis, so the active experts of a batch run as one batched matmul chain; f32
/// weights on the CPU are packed per expert for the host kernels, which run each active expert over its rows
/// without a tensor op.
#[derive(Debug, Clone)]
pub struct StackedExperts {
    weights: ExpertWeights,
    intermediate: usize,
    /// Global expert id → index into the held experts.
    local: Vec<Option<usize>>,
}

#[derive(Debug, Clone)]
enum ExpertWeights {
    Stacked {
        gate_up: Tensor, // [held, 2 * intermediate, hidden]
        down: Tensor,    // [held, hidden, intermediate]
    },
    Host(Vec<HostMlp>),
}

impl StackedExperts {
    /// Loads the experts `held` (global ids, ascending) of a layer whose VarBuilder is at `…mlp.experts`.
    /// `fp8`: the block size when FP8 weights are kept as FP8
    /// ([`ModelConfig::kept_fp8`](super::config::ModelConfig::kept_fp8)).
    pub fn load(
        held: &[usize],
        n_experts: usize,
        hidden: usize,
        intermediate: usize,
        fp8: Option<[usize; 2]>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let host = uses_host_kernels(&vb);
        Self::load_as(held, n_experts, hidden, intermediate, vb, host.then_some(fp8))
    }

    /// [`StackedExperts::load`] with the weight layout chosen by the caller (`host`: packed for the host kernels,
    /// which needs f32 or bf16 on the CPU, with the FP8 block size when FP8 weights are kept; `None`: stacked).
    pub(crate) fn load_as(
        held: &[usize],
        n_experts: usize,
        hidden: usize,
        intermediate: usize,
        vb: VarBuilder,
        host: Option<Option<[usize; 2]>>,
    ) -> Result<Self> {
        if held.is_empty() {
            return Err(Error::internal(Part::Experts, "a rank must hold at least one expert"));
        }
        let mut gate_up = Vec::with_capacity(held.len());
        let mut down = Vec::with_capacity(held.len());
        let mut packed = Vec::with_capacity(held.len());
        let mut local = vec![None; n_experts];
        for (i, &e) in held.iter().enumerate() {
            let slot = local
                .get_mut(e)
                .ok_or_else(|| Error::internal(Part::Experts, format!("expert {e} outside the model's {n_experts}")))?;
            *slot = Some(i);
            if let Some(fp8) = host {
                match HostMlp::load_fp8(hidden, intermediate, fp8, &vb.pp(e))? {
                    Some(mlp) => packed.push(mlp),
                    None => {
                        let (gu, d) = load_swiglu(hidden, intermediate, &vb.pp(e))?;
                        packed.push(HostMlp::new(&gu, &d)?);
                    }
                }
            } else {
                let (gu, d) = load_swiglu(hidden, intermediate, &vb.pp(e))?;
                gate_up.push(gu);
                down.push(d);
            }
        }
        let weights = if host.is_some() {
            ExpertWeights::Host(packed)
        } else {
            ExpertWeights::Stacked { gate_up: Tensor::stack(&gate_up, 0)?, down: Tensor::stack(&down, 0)? }
        };
        Ok(Self { weights, intermediate, local })
    }

    /// The stacked weights (`gate_up` `[held, 2 * inter, hidden]`, `down` `[held, hidden, inter]`); `None` when
    /// packed for the host kernels.
    pub fn stacked(&self) -> Option<(&Tensor, &Tensor)> {
        match &self.weights {
            ExpertWeights::Stacked { gate_up, down } => Some((gate_up, down)),
            ExpertWeights::Host(_) => None,
        }
    }

    /// Whether the experts are packed for the host kernels.
    pub fn is_host(&self) -> bool {
        matches!(self.weights, ExpertWeights::Host(_))
    }

    pub fn holds(&self, expert: usize) -> bool {
        self.local.get(expert).is_some_and(Option::is_some)
    }

    /// Bytes of expert weights held.
    pub fn bytes(&self) -> usize {
        match &self.weights {
            ExpertWeights::Stacked { gate_up, down } => {
                (gate_up.elem_count() + down.elem_count()) * gate_up.dtype().size_in_bytes()
            }
            ExpertWeights::Host(experts) => experts.iter().map(HostMlp::bytes).sum(),
        }
    }

    pub fn visit_weights(&mut self, f: &mut WeightVisitor<'_>) -> Result<()> {
        match &mut self.weights {
            ExpertWeights::Stacked { gate_up, down } => {
                f(WeightMut::Tensor(gate_up))?;
                f(WeightMut::Tensor(down))
            }
            ExpertWeights::Host(experts) => experts.iter_mut().try_for_each(|e| e.visit_weights(f)),
        }
    }

    fn chain(&self, x: &Tensor, gate_up: &Tensor, down: &Tensor) -> Result<Tensor> {
        let h = x.matmul(&gate_up.transpose(1, 2)?)?;
        let i = self.intermediate;
        let act = (candle_nn::ops::silu(&h.narrow(2, 0, i)?)? * h.narrow(2, i, i)?)?;
        Ok(act.matmul(&down.transpose(1, 2)?)?)
    }

    /// Runs `groups` (all held here) over rows of `x` (`[n, hidden]`) and returns, per row of `x`, the sum of its
    /// weighted expert outputs (`[n, hidden]`, f32).
    pub fn sum_groups(&self, x: &Tensor, groups: &[ExpertRows]) -> Result<Tensor> {
        let ids = self.local_ids(groups)?;
        match &self.weights {
            ExpertWeights::Stacked { gate_up, down } => self.sum_stacked(gate_up, down, x, groups, ids),
            ExpertWeights::Host(experts) => sum_host(experts, x, groups, &ids),
        }
    }

    /// [`StackedExperts::sum_groups`] over plain f32 rows (`[n, hidden]`) for host experts; `None` for stacked
    /// tensors.
    pub fn sum_groups_rows(&self, xs: &[f32], n: usize, groups: &[ExpertRows]) -> Result<Option<Vec<f32>>> {
        let ExpertWeights::Host(experts) = &self.weights else { return Ok(None) };
        let hidden = xs.len() / n.max(1);
        let ids = self.local_ids(groups)?;
        sum_host_rows(experts, xs, n, hidden, groups, &ids, side_by_side(groups)).map(Some)
    }

    /// Each group's index into the held experts.
    fn local_ids(&self, groups: &[ExpertRows]) -> Result<Vec<usize>> {
        groups
            .iter()
            .map(|g| {
                self.local.get(g.expert).copied().flatten().ok_or_else(|| {
                    Error::internal(Part::Experts, format!("expert {} is not held by this rank", g.expert))
                })
            })
            .collect()
    }

    /// The stacked path: the active experts' rows are gathered once into `[experts, rows, hidden]`, padded to the
    /// busiest expert with a zero row (index `n`, weight 0), and go through one batched gate/up → SiLU → down
    /// chain, then one scatter-add. When padding would more than double the work (skewed routing), each expert
    /// runs on its own contiguous slice instead. (Padding more on accelerators was tried: with a limit of 8, the
    /// DeepSeek-V3-slice benchmark at batch 32 — 4,096-token prefills — did not finish in 100 s on the H200; with
    /// this one a prefill takes 0.23 s.)
    fn sum_stacked(
        &self,
        stacked_gate_up: &Tensor,
        stacked_down: &Tensor,
        x: &Tensor,
        groups: &[ExpertRows],
        ids: Vec<usize>,
    ) -> Result<Tensor> {
        let device = x.device();
        let (n, hidden) = x.dims2()?;
        let ids: Vec<u32> = ids.into_iter().map(|i| i as u32).collect();
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
            let held = stacked_gate_up.dim(0)?;
            let (gate_up, down) = if active == held && ids.iter().enumerate().all(|(i, &id)| id as usize == i) {
                (stacked_gate_up.clone(), stacked_down.clone())
            } else {
                let ids = Tensor::from_vec(ids, active, device)?;
                (stacked_gate_up.index_select(&ids, 0)?, stacked_down.index_select(&ids, 0)?)
            };
            self.chain(&xs, &gate_up, &down)?.reshape((count, hidden))?
        } else {
            let gathered = x.index_select(&row_ids, 0)?;
            let mut outputs = Vec::with_capacity(active);
            let mut offset = 0;
            for (g, &id) in groups.iter().zip(&ids) {
                let xs = gathered.narrow(0, offset, g.rows.len())?.unsqueeze(0)?;
                let (gu, d) = (stacked_gate_up.narrow(0, id as usize, 1)?, stacked_down.narrow(0, id as usize, 1)?);
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
            return Err(Error::internal(
                Part::Experts,
                format!("{m} rows but {} experts and {} weights", experts.len(), weights.len()),
            ));
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

/// The host path of [`StackedExperts::sum_groups`]: each group's rows gathered into one buffer, through its
/// expert's packed SwiGLU, and added back weighted (`ids[i]` is group `i`'s index into `experts`).
fn sum_host(experts: &[HostMlp], x: &Tensor, groups: &[ExpertRows], ids: &[usize]) -> Result<Tensor> {
    let (n, hidden) = x.dims2()?;
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let out = sum_host_rows(experts, &xs, n, hidden, groups, ids, side_by_side(groups))?;
    Ok(Tensor::from_vec(out, (n, hidden), x.device())?)
}

/// Whether `groups`' experts run side by side on the compute pool (see [`SIDE_BY_SIDE_MIN_ROWS`]).
fn side_by_side(groups: &[ExpertRows]) -> bool {
    groups.len() > 1
        && groups.iter().map(|g| g.rows.len()).sum::<usize>() >= SIDE_BY_SIDE_MIN_ROWS
        && rayon::current_num_threads() > 1
}

/// [`sum_host`] over plain rows `xs` (`[n, hidden]`); the experts side by side on the compute pool or one after
/// another (the same values either way: each expert's products are the same, added back in the same order).
#[allow(clippy::too_many_arguments)]
fn sum_host_rows(
    experts: &[HostMlp],
    xs: &[f32],
    n: usize,
    hidden: usize,
    groups: &[ExpertRows],
    ids: &[usize],
    side_by_side: bool,
) -> Result<Vec<f32>> {
    // Each expert's rows are gathered into a buffer the thread keeps from one expert to its next.
    let run = |gathered: &mut Vec<f32>, (g, &id): (&ExpertRows, &usize)| -> Result<Vec<f32>> {
        let expert = experts.get(id).ok_or_else(|| Error::internal(Part::Experts, format!("no held expert {id}")))?;
        if expert.hidden() != hidden {
            return Err(Error::internal(
                Part::Experts,
                format!("rows of width {hidden} for experts of width {}", expert.hidden()),
            ));
        }
        gathered.clear();
        for &r in &g.rows {
            let r = r as usize;
            let row = xs.get(r * hidden..(r + 1) * hidden).ok_or_else(|| {
                Error::internal(Part::Experts, format!("expert {} was given row {r} of {n}", g.expert))
            })?;
            gathered.extend_from_slice(row);
        }
        Ok(expert.forward(gathered, g.rows.len()))
    };
    let outputs: Vec<Vec<f32>> = if side_by_side {
        groups.par_iter().zip(ids).map_init(Vec::new, run).collect::<Result<_>>()?
    } else {
        let mut gathered = Vec::new();
        groups.iter().zip(ids).map(|group| run(&mut gathered, group)).collect::<Result<_>>()?
    };
    let mut out = vec![0f32; n * hidden];
    for (g, y) in groups.iter().zip(&outputs) {
        for ((&r, &w), y_row) in g.rows.iter().zip(&g.weights).zip(y.chunks_exact(hidden.max(1))) {
            let r = r as usize;
            for (o, &v) in out[r * hidden..(r + 1) * hidden].iter_mut().zip(y_row) {
                *o += w * v;
            }
        }
    }
    Ok(out)
}

/// Routed rows of one MoE layer from which its experts run side by side on the compute pool (each one's products
/// still split by panels), rather than one after another: what each does between its products (gathering and
/// rounding its rows, the SiLU) then overlaps too. A 512-token bf16 prefill of the V2-Lite-shaped benchmark
/// (3,072 routed rows per layer), 2 threads: 1.02–1.09× (6 alternating pairs); at decode batch sizes it made no
/// difference (1.00–1.01×).
const SIDE_BY_SIDE_MIN_ROWS: usize = 256;

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
                StackedExperts::load(
                    &held,
                    moe.n_routed_experts,
                    config.hidden_size,
                    moe.moe_intermediate_size,
                    config.kept_fp8(),
                    vb,
                )
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

    pub fn visit_weights(&mut self, f: &mut WeightVisitor<'_>) -> Result<()> {
        self.layers.iter_mut().flatten().try_for_each(|l| l.visit_weights(f))
    }

    pub fn compute(&self, batch: Dispatch<'_>) -> Result<Tensor> {
        let Dispatch { layer, rows, experts, weights } = batch;
        let stack = self
            .layers
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::internal(Part::Experts, format!("layer {layer} has no routed experts")))?;
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
    fn dispatch(&self, rank: usize, batch: Dispatch<'_>) -> Result<Box<dyn PendingRows>> {
        let shard = self
            .shards
            .get(rank)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::internal(Part::Experts, format!("no in-process shard for rank {rank}")))?;
        Ok(Box::new(Ready(shard.compute(batch)?)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The packed host experts and the stacked tensors compute the same weighted sums: balanced groups (the
    /// padded batched chain), one skewed group (the per-expert chain), and a subset of the held experts.
    #[test]
    fn host_and_stacked_experts_agree() {
        let dev = Device::Cpu;
        let (hidden, inter, n_experts) = (64, 32, 16);
        let vb = || crate::builtin::var_builder(DType::F32, &dev).pp("model.layers.1.mlp.experts");
        let held: Vec<usize> = (4..12).collect();
        let host = StackedExperts::load_as(&held, n_experts, hidden, inter, vb(), Some(None)).unwrap();
        let stacked = StackedExperts::load_as(&held, n_experts, hidden, inter, vb(), None).unwrap();
        assert!(matches!(host.weights, ExpertWeights::Host(_)));
        assert!(matches!(stacked.weights, ExpertWeights::Stacked { .. }));
        assert_eq!(host.bytes(), stacked.bytes());
        let n = 9;
        let x: Vec<f32> = (0..n * hidden).map(|i| ((i as f32) * 0.37).sin()).collect();
        let x = Tensor::from_vec(x, (n, hidden), &dev).unwrap();
        let group = |expert: usize, rows: &[u32]| ExpertRows {
            expert,
            rows: rows.to_vec(),
            weights: rows.iter().map(|&r| 0.1 + r as f32 * 0.05).collect(),
        };
        let cases = [
            vec![group(4, &[0, 1, 2]), group(5, &[2, 3, 4]), group(9, &[5, 6, 8])],
            vec![group(6, &[0, 1, 2, 3, 4, 5, 6, 7, 8]), group(11, &[3])],
            vec![group(7, &[8])],
        ];
        let ExpertWeights::Host(experts) = &host.weights else { unreachable!() };
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for groups in &cases {
            let ids = host.local_ids(groups).unwrap();
            let apart = sum_host_rows(experts, &xs, n, hidden, groups, &ids, true).unwrap();
            let in_turn = sum_host_rows(experts, &xs, n, hidden, groups, &ids, false).unwrap();
            assert_eq!(apart, in_turn, "side by side and one after another");
            let a = host.sum_groups(&x, groups).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = stacked.sum_groups(&x, groups).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(a.iter().any(|v| v.abs() > 1e-3), "the experts produced nothing");
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                assert!((p - q).abs() < 1e-5, "value {i}: host {p} vs stacked {q}");
            }
        }
        let not_held = [group(2, &[0])];
        assert!(host.sum_groups(&x, &not_held).is_err());
        let out_of_range = [group(4, &[n as u32])];
        assert!(host.sum_groups(&x, &out_of_range).unwrap_err().to_string().contains("row 9"));
    }
}
