//! The DeepSeek-V2/V3 decoder: embeddings, `num_hidden_layers` blocks of MLA + (dense MLP | DeepSeekMoE), final
//! norm and `lm_head`. Variable names mirror the checkpoint's tensor names (`model.layers.N.self_attn.…`).
//!
//! A forward pass takes a *packed batch*: the new tokens of several sequences concatenated, each sequence with
//! its own latent cache and position offset (the number of tokens it already cached). That one shape serves
//! prefill, decode, chunked prefill and mixed batches alike.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::cache::{LatentPool, SeqCache, SeqSlice};
use super::config::ModelConfig;
use super::experts::{Dispatch, ExpertParallel};
use super::host::{Norm, Projection, Quantize, WeightMut, WeightVisitor, counter, host_dtype, tensor_bytes};
use super::mla::{AttentionMode, Mla, Rotary};
use super::moe::{Mlp, Moe, MoeStep, Routing};
use super::rope::Rope;
use crate::error::{Error, Part, Result};
use crate::kernels::ExpertCounters;

mod decode;
mod graph;

pub use graph::GRAPH_BATCHES;

#[derive(Debug, Clone)]
enum Ffn {
    Dense(Mlp),
    Moe(Box<Moe>),
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: Norm,
    self_attn: Mla,
    post_attention_layernorm: Norm,
    mlp: Ffn,
}

/// How [`DeepseekModel::feed_forward`] runs a layer: with Baleen's kernels or not, traced or not, counting routed
/// rows into the model's device counters (`counts`, `[layers, experts]`) for the first `real[0]` tokens.
#[derive(Debug, Clone, Copy)]
struct FfnStep<'a> {
    kernels: bool,
    trace: bool,
    counts: Option<&'a Tensor>,
    real: Option<&'a Tensor>,
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsFor {
    /// The last new token of every sequence (generation).
    #[default]
    LastToken,
    /// Every new token (the `logits` debugging command, scoring).
    AllTokens,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    pub attention: AttentionMode,
    pub logits: LogitsFor,
    /// Return every MoE layer's routing decisions.
    pub trace_router: bool,
    /// Run attention with candle's tensor ops even where the host path could (f32 or bf16 on the CPU with a host
    /// pool): the ops an accelerator runs, which tests check on the CPU too.
    pub tensor_attention: bool,
}

/// One sequence's part of a forward pass: `tokens` new tokens placed after the `past` tokens its block table
/// already holds; `blocks` must have room for `past + tokens.len()` tokens.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub past: usize,
    pub blocks: &'a [u32],
}

/// Default tokens per cache block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

#[derive(Debug)]
pub struct ForwardOutput {
    /// f32 logits, `[rows, vocab]` (one row per sequence, or per token with [`LogitsFor::AllTokens`]).
    pub logits: Tensor,
    /// `(layer, routing)` for every MoE layer when tracing.
    pub router: Vec<(usize, Routing)>,
}

/// Which of Baleen's CUDA paths a model uses (both on by default; they matter only on a CUDA device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accel {
    /// Baleen's kernels: routing and dispatch on the device, grouped expert projections, and a decode step over
    /// the paged cache ([`crate::kernels`]). Off: candle's ops throughout, with the router on the host.
    pub kernels: bool,
    /// Capture kernel decode steps in CUDA graphs and replay them (needs `kernels`).
    pub graphs: bool,
}

impl Default for Accel {
    fn default() -> Self {
        Self { kernels: true, graphs: true }
    }
}

#[derive(Debug, Clone)]
pub struct DeepseekModel {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Norm,
    lm_head: Projection,
    rope: Rope,
    dtype: DType,
    device: Device,
    accel: Accel,
    /// `cos`/`sin` for every position on the device (the kernels' decode step looks its positions up here).
    rope_device: Option<Arc<(Tensor, Tensor)>>,
    graphs: Arc<graph::DecodeGraphs>,
    /// Routed rows per expert counted on the device, when observed.
    expert_counts: Option<decode::SharedCounts>,
    /// How the host kernels store the large matrices.
    quantize: Quantize,
    /// Bytes of every weight held (counted at load and after quantizing).
    weight_bytes: usize,
}

impl DeepseekModel {
    /// Builds the model from a VarBuilder rooted at the checkpoint (tensor names `model.…` and `lm_head.weight`).
    pub fn load(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::load_parallel(config, None, vb)
    }

    /// Like [`DeepseekModel::load`], as the head of an expert-parallel group: only this rank's routed experts are
    /// loaded; rows for the others go through `parallel`'s transport.
    pub fn load_parallel(config: &ModelConfig, parallel: Option<&ExpertParallel>, vb: VarBuilder) -> Result<Self> {
        let h = config.hidden_size;
        let m = vb.pp("model");
        let embed_tokens = m.pp("embed_tokens").get((config.vocab_size, h), "weight")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            let mlp = match (&config.moe, config.is_moe_layer(i)) {
                (Some(moe), true) => Ffn::Moe(Box::new(Moe::load(config, moe, i, parallel, l.pp("mlp"))?)),
                _ => Ffn::Dense(Mlp::load(h, config.intermediate_size, config.kept_fp8(), l.pp("mlp"))?),
            };
            layers.push(DecoderLayer {
                input_layernorm: Norm::load(h, config.rms_norm_eps, l.pp("input_layernorm"))?,
                self_attn: Mla::load(config, l.pp("self_attn"))?,
                post_attention_layernorm: Norm::load(h, config.rms_norm_eps, l.pp("post_attention_layernorm"))?,
                mlp,
            });
        }
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.pp("lm_head").get((config.vocab_size, h), "weight")?
        };
        let mut model = Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm: Norm::load(h, config.rms_norm_eps, m.pp("norm"))?,
            lm_head: Projection::new(candle_nn::Linear::new(lm_head, None))?,
            rope: Rope::new(config),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            accel: Accel::default(),
            rope_device: None,
            graphs: Arc::default(),
            expert_counts: None,
            quantize: Quantize::None,
            weight_bytes: 0,
        };
        model.rope_device = model.device_rope_tables()?;
        model.weight_bytes = model.count_weight_bytes()?;
        Ok(model)
    }

    /// Every weight the model holds: embeddings, each layer's norms, attention and feed-forward, the final norm
    /// and `lm_head`.
    fn visit_weights(&mut self, f: &mut WeightVisitor<'_>) -> Result<()> {
        // A tied lm_head that candle multiplies is the embedding tensor itself: its bytes are counted there.
        if !self.config.tie_word_embeddings || self.lm_head.is_host() {
            f(WeightMut::Kept(tensor_bytes(&self.embed_tokens)))?;
        }
        for layer in &mut self.layers {
            f(WeightMut::Kept(layer.input_layernorm.bytes() + layer.post_attention_layernorm.bytes()))?;
            layer.self_attn.visit_weights(f)?;
            match &mut layer.mlp {
                Ffn::Dense(mlp) => mlp.visit_weights(f)?,
                Ffn::Moe(moe) => moe.visit_weights(f)?,
            }
        }
        f(WeightMut::Kept(self.norm.bytes()))?;
        self.lm_head.visit_weights(f)
    }

    fn count_weight_bytes(&mut self) -> Result<usize> {
        let mut bytes = 0;
        self.visit_weights(&mut counter(&mut bytes))?;
        Ok(bytes)
    }

    /// Narrows the packed matrices (projections, experts, dense and shared MLPs, `lm_head`) as `quantize` says;
    /// norms, the router, embeddings and MLA's `kv_b` stay as loaded. Needs the host kernels (CPU, f32 or bf16).
    /// `fp8` narrows nothing here: it records that FP8 weights were kept as the model loaded
    /// ([`ModelConfig::keep_fp8`], set by [`Quantize::configure`]), and is refused unless they were.
    pub fn quantize(&mut self, quantize: Quantize) -> Result<()> {
        if (quantize == Quantize::Fp8) != self.config.keep_fp8 {
            return Err(Error::Setting {
                name: "quantize".into(),
                reason: format!(
                    "FP8 weights are kept (or not) as the model loads: load it with a configuration set up by \
                     `Quantize::configure` for {} (keep_fp8 is {})",
                    quantize.as_str(),
                    self.config.keep_fp8
                ),
            });
        }
        quantize.apply(|f| self.visit_weights(f))?;
        self.quantize = quantize;
        self.weight_bytes = self.count_weight_bytes()?;
        Ok(())
    }

    /// How many of the packed matrices are kept as FP8 (`--quantize fp8`; gate and up of one MLP are one matrix).
    pub fn fp8_matrices(&mut self) -> Result<usize> {
        super::host::fp8_matrices(|f| self.visit_weights(f))
    }

    /// How the host kernels store the large matrices.
    pub fn quantization(&self) -> Quantize {
        self.quantize
    }

    /// Bytes of every weight the model holds, as stored (after quantizing).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// How the large matrices are stored: `int8` or `fp8` when `--quantize` says so, else the dtype (`f32`, `bf16`,
    /// `f16`).
    pub fn weight_format(&self) -> String {
        self.quantize.weight_format(self.dtype)
    }

    /// Flushes the device's routed-row counts when due; a failure is logged, not passed on (the step it follows
    /// succeeded).
    fn flush_counts_or_log(&self) {
        if let Err(e) = self.flush_expert_counts(false) {
            tracing::warn!(error = %e, "flushing the expert token counters failed");
        }
    }

    /// Chooses Baleen's CUDA paths (see [`Accel`]); captured graphs are dropped.
    pub fn set_accel(&mut self, accel: Accel) {
        self.accel = accel;
        self.graphs.clear();
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Decode-step graphs captured so far, and why graphs were turned off if a capture failed.
    pub fn graph_status(&self) -> (usize, Option<String>) {
        self.graphs.status()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The expert transport's runtime when this model is a head that drives it itself (an idle engine thread
    /// then drives it); `None` without expert parallelism.
    pub fn expert_driver(&self) -> Option<crate::driver::Driver> {
        self.layers.iter().find_map(|layer| match &layer.mlp {
            Ffn::Moe(moe) => moe.expert_driver(),
            Ffn::Dense(_) => None,
        })
    }

    /// Counts the token rows routed to each expert of every MoE layer into `counter{layer, expert}`. Layers on
    /// the CUDA kernels count on the device; [`DeepseekModel::flush_expert_counts`] adds those counts. Call it after
    /// [`DeepseekModel::set_accel`]: with the kernels off nothing counts on the device.
    pub fn observe_experts(&mut self, counter: &prometheus::IntCounterVec) -> Result<()> {
        let mut per_layer = Vec::with_capacity(self.layers.len());
        let mut on_kernels = false;
        for layer in &mut self.layers {
            match &mut layer.mlp {
                Ffn::Moe(moe) => {
                    moe.observe(counter);
                    on_kernels |= moe.runs_on_kernels();
                    per_layer.push(moe.token_counters().to_vec());
                }
                Ffn::Dense(_) => per_layer.push(Vec::new()),
            }
        }
        // Counts of counters being replaced reach the old metrics first.
        if let Err(e) = self.flush_expert_counts(true) {
            tracing::warn!(error = %e, "flushing the expert token counters failed");
        }
        self.expert_counts = None;
        if on_kernels && self.accel.kernels {
            let experts = self.config.moe.as_ref().map_or(0, |m| m.n_routed_experts);
            let tensor = Tensor::zeros((self.layers.len(), experts), DType::I64, &self.device)?;
            self.expert_counts = Some(Arc::new(Mutex::new(decode::DeviceCounts::new(tensor, per_layer))));
            self.graphs.clear();
        }
        Ok(())
    }

    /// The expert service's work on a head rank: `batch`'s rows through the routed experts held here.
    pub fn compute_experts(&self, batch: Dispatch<'_>) -> Result<Tensor> {
        match self.layers.get(batch.layer).map(|l| &l.mlp) {
            Some(Ffn::Moe(moe)) => moe.experts().compute_rows(batch.rows, batch.experts, batch.weights),
            _ => Err(Error::internal(Part::Batch, format!("layer {} has no routed experts", batch.layer))),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype the latent KV cache stores (f32 for the host kernels' bf16 models, see
    /// [`LatentPool::storage_dtype`]): what its bytes per token are counted in.
    pub fn kv_cache_dtype(&self) -> DType {
        LatentPool::storage_dtype(&self.device, self.dtype)
    }

    /// Bytes one token takes in this model's latent KV cache, all layers (in [`DeepseekModel::kv_cache_dtype`]).
    pub fn kv_cache_bytes_per_token(&self) -> usize {
        self.config.kv_cache_bytes_per_token(self.kv_cache_dtype().size_in_bytes())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A latent KV pool of `num_blocks` blocks of `block_size` tokens, in the model's dtype and device.
    pub fn new_pool(&self, num_blocks: usize, block_size: usize) -> Result<LatentPool> {
        LatentPool::new(
            self.config.num_hidden_layers,
            self.config.latent_dim(),
            block_size,
            num_blocks,
            self.dtype,
            &self.device,
        )
    }

    /// For single-process tools: grows each sequence's blocks in a growable pool, runs the batch, and records the
    /// new tokens as cached.
    pub fn forward_cached(
        &self,
        pool: &mut LatentPool,
        seqs: &mut [(&[u32], &mut SeqCache)],
        options: ForwardOptions,
    ) -> Result<ForwardOutput> {
        for (tokens, cache) in seqs.iter_mut() {
            pool.extend(cache, tokens.len())?;
        }
        let inputs: Vec<SeqInput<'_>> =
            seqs.iter().map(|(tokens, cache)| SeqInput { tokens, past: cache.len, blocks: &cache.blocks }).collect();
        let out = self.forward(pool, &inputs, options)?;
        for (tokens, cache) in seqs.iter_mut() {
            cache.len += tokens.len();
        }
        Ok(out)
    }

    /// Runs one packed batch, writing each sequence's new latent rows into `pool`.
    pub fn forward(
        &self,
        pool: &mut LatentPool,
        seqs: &[SeqInput<'_>],
        options: ForwardOptions,
    ) -> Result<ForwardOutput> {
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        for seq in seqs.iter() {
            if seq.tokens.is_empty() {
                return Err(Error::internal(Part::Batch, "a sequence in the batch has no new tokens"));
            }
            let past = seq.past;
            if seq.blocks.len() * pool.block_size() < past + seq.tokens.len() {
                return Err(Error::internal(Part::Batch, "a sequence's block table is too short for its tokens"));
            }
            if past + seq.tokens.len() > self.config.max_position_embeddings {
                return Err(Error::internal(
                    Part::Batch,
                    format!(
                        "sequence length {} exceeds max_position_embeddings {}",
                        past + seq.tokens.len(),
                        self.config.max_position_embeddings
                    ),
                ));
            }
            if let Some(&bad) = seq.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                return Err(Error::internal(
                    Part::Batch,
                    format!("token id {bad} is outside the vocabulary (size {})", self.config.vocab_size),
                ));
            }
            spans.push((tokens.len(), seq.tokens.len(), past));
            tokens.extend_from_slice(seq.tokens);
            positions.extend(past..past + seq.tokens.len());
        }
        if self.decodes_on_kernels(pool, seqs, options) {
            let out = match (self.accel.graphs && !options.trace_router && self.moe_on_kernels())
                .then(|| self.graphs.run(self, pool, seqs))
                .transpose()?
                .flatten()
            {
                Some(logits) => ForwardOutput { logits, router: Vec::new() },
                None => self.forward_decode(pool, seqs, options.trace_router)?,
            };
            self.flush_counts_or_log();
            return Ok(out);
        }
        let n = tokens.len();
        let ids = Tensor::from_vec(tokens, n, &self.device)?;
        let mut x = self.embed_tokens.embedding(&ids)?;
        let tables = self.rope.tables(&positions);
        let slices: Vec<SeqSlice<'_>> = seqs
            .iter()
            .zip(&spans)
            .map(|(s, &(start, len, past))| SeqSlice { start, len, past, blocks: s.blocks })
            .collect();
        let last: Vec<usize> = spans.iter().map(|&(start, len, _)| start + len - 1).collect();
        if !options.tensor_attention && self.runs_on_host(pool, &slices, options.attention) {
            let rows = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(out) = self.forward_rows(rows, n, &tables, pool, &slices, &last, options)? {
                return Ok(out);
            }
        }
        let cos_sin = self.rope.cos_sin(&tables, self.dtype, &self.device)?;
        let rotary = Rotary { rope: &self.rope, tables: &tables };
        let mut router = Vec::new();
        let counts = self.device_counts();
        let ffn_step =
            FfnStep { kernels: self.accel.kernels, trace: options.trace_router, counts: counts.as_ref(), real: None };
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            let attn = layer.self_attn.forward(
                &h,
                &rotary,
                &cos_sin,
                pool,
                &slices,
                i,
                options.attention,
                options.tensor_attention,
            )?;
            x = (x + attn)?;
            let ffn = self.feed_forward(i, &x, ffn_step, &mut router)?;
            x = (x + ffn)?;
        }
        let x = match options.logits {
            LogitsFor::AllTokens => x,
            LogitsFor::LastToken => {
                let last: Vec<u32> = last.iter().map(|&r| r as u32).collect();
                let k = last.len();
                x.index_select(&Tensor::from_vec(last, k, &self.device)?, 0)?
            }
        };
        let x = self.norm.forward(&x)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        self.flush_counts_or_log();
        Ok(ForwardOutput { logits, router })
    }

    /// The feed-forward half of layer `i` (post-attention norm, then dense MLP or MoE) on the residual stream `x`;
    /// an MoE layer's routing goes to `router` when traced.
    fn feed_forward(
        &self,
        i: usize,
        x: &Tensor,
        step: FfnStep<'_>,
        router: &mut Vec<(usize, Routing)>,
    ) -> Result<Tensor> {
        let layer = self.layers.get(i).ok_or_else(|| Error::internal(Part::Batch, format!("no layer {i}")))?;
        let h = layer.post_attention_layernorm.forward(x)?;
        match &layer.mlp {
            Ffn::Dense(mlp) => mlp.forward(&h),
            Ffn::Moe(moe) => {
                let row = step.counts.map(|c| c.get(i)).transpose()?;
                let counters = row.as_ref().map(|counters| ExpertCounters { counters, real_tokens: step.real });
                let (out, routing) = moe.forward(&h, MoeStep { kernels: step.kernels, trace: step.trace, counters })?;
                if let Some(routing) = routing {
                    router.push((i, routing));
                }
                Ok(out)
            }
        }
    }

    /// Whether the whole pass can run over plain rows: f32 or bf16 weights on the CPU, a host pool, every layer's attention able
    /// to take the host path for this batch.
    fn runs_on_host(&self, pool: &LatentPool, seqs: &[SeqSlice<'_>], mode: AttentionMode) -> bool {
        host_dtype(self.dtype)
            && self.device.is_cpu()
            && self.norm.is_host()
            && self.lm_head.is_host()
            && self.layers.iter().enumerate().all(|(i, l)| {
                l.input_layernorm.is_host()
                    && l.post_attention_layernorm.is_host()
                    && l.self_attn.runs_on_host(pool, seqs, i, mode)
                    && match &l.mlp {
                        Ffn::Dense(mlp) => mlp.is_host(),
                        Ffn::Moe(moe) => moe.runs_on_host(),
                    }
            })
    }

    /// The forward pass with the residual stream kept as plain rows (`[n, hidden]`) between the host layers: no
    /// tensor op from the embedding to the logits. `None` when some piece turns out to run on candle after all
    /// ([`DeepseekModel::runs_on_host`] checks first): the caller then runs the tensor path, which rewrites the
    /// same cache rows.
    #[allow(clippy::too_many_arguments)]
    fn forward_rows(
        &self,
        mut x: Vec<f32>,
        n: usize,
        tables: &super::rope::RopeTables,
        pool: &mut LatentPool,
        slices: &[SeqSlice<'_>],
        last: &[usize],
        options: ForwardOptions,
    ) -> Result<Option<ForwardOutput>> {
        let hidden = self.config.hidden_size;
        let rotary = Rotary { rope: &self.rope, tables };
        let mut router = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let mut h = x.clone();
            if !layer.input_layernorm.host(&mut h) {
                return Ok(None);
            }
            let Some(attn) = layer.self_attn.forward_rows(&h, n, &rotary, pool, slices, i, options.attention)? else {
                return Ok(None);
            };
            x.iter_mut().zip(&attn).for_each(|(x, a)| *x += a);
            let mut h = x.clone();
            if !layer.post_attention_layernorm.host(&mut h) {
                return Ok(None);
            }
            let ffn = match &layer.mlp {
                Ffn::Dense(mlp) => mlp.forward_rows(&h, n),
                Ffn::Moe(moe) => match moe.forward_rows(&h, n)? {
                    Some((out, routing)) => {
                        if options.trace_router {
                            router.push((i, routing));
                        }
                        Some(out)
                    }
                    None => None,
                },
            };
            let Some(ffn) = ffn else { return Ok(None) };
            x.iter_mut().zip(&ffn).for_each(|(x, f)| *x += f);
        }
        let mut rows = match options.logits {
            LogitsFor::AllTokens => x,
            LogitsFor::LastToken => {
                last.iter().flat_map(|&r| x[r * hidden..(r + 1) * hidden].iter().copied()).collect()
            }
        };
        let m = rows.len() / hidden.max(1);
        if !self.norm.host(&mut rows) {
            return Ok(None);
        }
        let Some(logits) = self.lm_head.host(&rows, m) else { return Ok(None) };
        let logits = Tensor::from_vec(logits, (m, self.config.vocab_size), &self.device)?;
        Ok(Some(ForwardOutput { logits, router }))
    }
}
