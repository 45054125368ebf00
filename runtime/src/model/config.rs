//! The model configuration: the Hugging Face `config.json` of `deepseek_v2` / `deepseek_v3` checkpoints.
//!
//! [`RawConfig`] is the file as serde reads it; [`ModelConfig::from_raw`] validates it into typed choices, so every
//! unsupported value fails at load with an error naming the field. Fields a real checkpoint may omit take the
//! defaults of the transformers configuration class for that `model_type`; fields that fix a tensor shape are
//! required.

use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

use crate::error::{Error, Result};

/// `config.json` as written by transformers (and by DeepSeek's own repositories).
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub n_shared_experts: Option<usize>,
    pub n_routed_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub routed_scaling_factor: Option<f64>,
    pub topk_method: Option<String>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub scoring_func: Option<String>,
    pub norm_topk_prob: Option<bool>,
    pub first_k_dense_replace: Option<usize>,
    pub moe_layer_freq: Option<usize>,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: Option<usize>,
    pub qk_nope_head_dim: Option<usize>,
    pub qk_rope_head_dim: Option<usize>,
    pub v_head_dim: Option<usize>,
    pub hidden_act: Option<String>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_interleave: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub quantization_config: Option<Value>,
}

/// Which DeepSeek generation the checkpoint is; decides the defaults of omitted fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    V2,
    V3,
}

/// How the router picks experts (`topk_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Top-k over all expert scores.
    Greedy,
    /// DeepSeek-V2: keep the `topk_group` groups with the highest max score, then top-k inside them.
    GroupLimitedGreedy,
    /// DeepSeek-V3: add `e_score_correction_bias` for the choice only, rank groups by the sum of their top-2
    /// corrected scores, keep `topk_group` groups, top-k inside them; weights are the uncorrected scores.
    NoauxTc,
}

/// How router logits become scores (`scoring_func`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

/// YaRN context extension (`rope_scaling.type == "yarn"`), as transformers and DeepSeek compute it.
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub attention_factor: Option<f64>,
    pub truncate: bool,
}

/// The routed-expert part of the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
}

/// A validated DeepSeek-V2/V3 configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Yarn>,
    /// Rotary pairs are adjacent elements (DeepSeek's layout) rather than the two halves of the rope dims.
    pub rope_interleave: bool,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// `None` for a model without routed experts (every layer dense).
    pub moe: Option<MoeConfig>,
    /// DeepSeek-V3 FP8 checkpoints: the `[rows, cols]` block of each `weight_scale_inv` entry.
    pub fp8_block: Option<[usize; 2]>,
    /// Keep the FP8 weights in 8 bits on the host kernels (`--quantize fp8`) instead of dequantizing them at load.
    /// A choice of the runtime, not read from `config.json`.
    pub keep_fp8: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn required<T: Copy>(value: Option<T>, field: &str) -> Result<T> {
    value.ok_or_else(|| Error::config(field, "required but missing"))
}

fn positive(value: Option<usize>, field: &str) -> Result<usize> {
    match required(value, field)? {
        0 => Err(Error::config(field, "must be at least 1")),
        v => Ok(v),
    }
}

fn token_ids(value: &Option<Value>, field: &str) -> Result<Vec<u32>> {
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| Error::config(field, format!("expected a token id, found {v}")))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

impl ModelConfig {
    /// The FP8 block size when FP8 weights are kept in 8 bits ([`ModelConfig::keep_fp8`]).
    pub fn kept_fp8(&self) -> Option<[usize; 2]> {
        self.fp8_block.filter(|_| self.keep_fp8)
    }

    /// Reads and validates `config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Json { source, .. } => Error::Json { path: path.clone(), source },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|source| Error::Json { path: "config.json".into(), source })?;
        Self::from_raw(&raw)
    }

    pub fn from_raw(raw: &RawConfig) -> Result<Self> {
        let arch = match raw.model_type.as_deref() {
            Some("deepseek_v3") => Arch::V3,
            Some("deepseek_v2") => Arch::V2,
            Some(other) => {
                return Err(Error::config(
                    "model_type",
                    format!("`{other}` is not supported (expected deepseek_v2 or deepseek_v3)"),
                ));
            }
            None => return Err(Error::config("model_type", "required but missing")),
        };
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(Error::config("hidden_act", format!("`{act}` is not supported (only silu)")));
        }
        if raw.mlp_bias == Some(true) {
            return Err(Error::config("mlp_bias", "true is not supported (DeepSeek MLPs have no bias)"));
        }
        let num_attention_heads = positive(raw.num_attention_heads, "num_attention_heads")?;
        if let Some(kv_heads) = raw.num_key_value_heads
            && kv_heads != num_attention_heads
        {
            return Err(Error::config(
                "num_key_value_heads",
                format!(
                    "{kv_heads} differs from num_attention_heads {num_attention_heads}; MLA has one latent per token"
                ),
            ));
        }
        let q_lora_rank = match raw.q_lora_rank {
            Some(0) => return Err(Error::config("q_lora_rank", "must be null or at least 1")),
            r => r,
        };
        let qk_rope_head_dim = positive(raw.qk_rope_head_dim, "qk_rope_head_dim")?;
        if qk_rope_head_dim % 2 != 0 {
            return Err(Error::config("qk_rope_head_dim", format!("{qk_rope_head_dim} must be even")));
        }
        let max_position_embeddings = positive(raw.max_position_embeddings, "max_position_embeddings")?;
        let rope_scaling = parse_rope_scaling(raw.rope_scaling.as_ref(), max_position_embeddings)?;
        let rope_interleave = match arch {
            // transformers' DeepseekV2 rotates adjacent pairs (complex multiplication); it has no such field.
            Arch::V2 => true,
            Arch::V3 => raw.rope_interleave.unwrap_or(true),
        };
        let num_hidden_layers = positive(raw.num_hidden_layers, "num_hidden_layers")?;
        let moe = parse_moe(raw, arch, num_hidden_layers)?;
        let fp8_block = parse_quantization(raw.quantization_config.as_ref())?;
        let bos = token_ids(&raw.bos_token_id, "bos_token_id")?;
        let config = Self {
            arch,
            vocab_size: positive(raw.vocab_size, "vocab_size")?,
            hidden_size: positive(raw.hidden_size, "hidden_size")?,
            intermediate_size: positive(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            q_lora_rank,
            kv_lora_rank: positive(raw.kv_lora_rank, "kv_lora_rank")?,
            qk_nope_head_dim: positive(raw.qk_nope_head_dim, "qk_nope_head_dim")?,
            qk_rope_head_dim,
            v_head_dim: positive(raw.v_head_dim, "v_head_dim")?,
            max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            rope_scaling,
            rope_interleave,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(false),
            moe,
            fp8_block,
            keep_fp8: false,
            bos_token_id: bos.first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id, "eos_token_id")?,
        };
        if config.rms_norm_eps.is_nan() || config.rms_norm_eps <= 0.0 {
            return Err(Error::config("rms_norm_eps", "must be positive"));
        }
        if config.rope_theta.is_nan() || config.rope_theta <= 0.0 {
            return Err(Error::config("rope_theta", "must be positive"));
        }
        Ok(config)
    }

    /// Width of one query/key head: the non-rotary part plus the rotary part.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values cached per token per layer by the absorbed (latent) form of MLA: the normalized latent plus the
    /// rotated shared key.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Bytes of latent KV cache one token occupies across all layers, for a cache dtype of `dtype_bytes` bytes.
    pub fn kv_cache_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        self.num_hidden_layers * self.latent_dim() * dtype_bytes
    }

    /// Whether decoder layer `layer` uses routed experts (DeepSeek's rule: after the first `first_k_dense_replace`
    /// layers, every `moe_layer_freq`-th layer).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| layer >= m.first_k_dense_replace && layer.is_multiple_of(m.moe_layer_freq))
    }

    /// Parameters of one decoder layer's attention block (norms included).
    fn attention_parameters(&self) -> usize {
        let (h, heads) = (self.hidden_size, self.num_attention_heads);
        let bias = usize::from(self.attention_bias);
        let q = match self.q_lora_rank {
            None => h * heads * self.qk_head_dim(),
            Some(r) => h * r + bias * r + r + r * heads * self.qk_head_dim(),
        };
        let kv_a = (h + bias) * self.latent_dim() + self.kv_lora_rank;
        let kv_b = self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim);
        let o = heads * self.v_head_dim * h + bias * h;
        2 * h + q + kv_a + kv_b + o
    }

    /// Parameters of the whole model, as a checkpoint stores them (routed experts included).
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let heads_out = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        let layers: usize = (0..self.num_hidden_layers)
            .map(|l| {
                let ffn = match (&self.moe, self.is_moe_layer(l)) {
                    (Some(m), true) => {
                        let bias = if m.topk_method == TopkMethod::NoauxTc { m.n_routed_experts } else { 0 };
                        m.n_routed_experts * h
                            + bias
                            + (m.n_routed_experts + m.n_shared_experts) * 3 * h * m.moe_intermediate_size
                    }
                    _ => 3 * h * self.intermediate_size,
                };
                self.attention_parameters() + ffn
            })
            .sum();
        self.vocab_size * h + layers + h + heads_out
    }

    /// Bytes of weights a decode step of `batch` sequences reads, `bytes_per_weight` each (the router in f32):
    /// every dense and attention weight, the output head, the embedding rows of the batch, and each MoE layer's
    /// routed experts that at least one sequence chooses — their expected number under uniform routing,
    /// `E · (1 − (1 − k/E)^batch)`. The HBM bound of a decode step is these bytes over the memory bandwidth.
    pub fn decode_weight_bytes(&self, batch: usize, bytes_per_weight: f64) -> f64 {
        let h = self.hidden_size;
        let mut values = (self.vocab_size * h + batch * h + h) as f64;
        let mut router_bytes = 0f64;
        for l in 0..self.num_hidden_layers {
            values += self.attention_parameters() as f64;
            match (&self.moe, self.is_moe_layer(l)) {
                (Some(m), true) => {
                    let e = m.n_routed_experts as f64;
                    let active = e * (1.0 - (1.0 - m.num_experts_per_tok as f64 / e).powi(batch as i32));
                    let expert = (3 * h * m.moe_intermediate_size) as f64;
                    values += (active + m.n_shared_experts as f64) * expert;
                    router_bytes += (m.n_routed_experts * h * 4) as f64;
                }
                _ => values += (3 * h * self.intermediate_size) as f64,
            }
        }
        values * bytes_per_weight + router_bytes
    }

    /// The softmax scale of attention: `1/sqrt(qk_head_dim)`, times `mscale(factor, mscale_all_dim)^2` under YaRN.
    pub fn softmax_scale(&self) -> f64 {
        let base = 1.0 / (self.qk_head_dim() as f64).sqrt();
        match &self.rope_scaling {
            Some(Yarn { factor, mscale_all_dim: Some(all), .. }) if *all != 0.0 => {
                let m = yarn_get_mscale(*factor, *all);
                base * m * m
            }
            _ => base,
        }
    }
}

/// YaRN's magnitude correction `0.1 * mscale * ln(scale) + 1` (1 when not scaling).
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 }
}

fn parse_rope_scaling(value: Option<&Value>, max_position_embeddings: usize) -> Result<Option<Yarn>> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let obj = value.as_object().ok_or_else(|| Error::config("rope_scaling", "expected an object or null"))?;
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| Error::config("rope_scaling.type", "required but missing"))?;
    if kind != "yarn" {
        return Err(Error::config("rope_scaling.type", format!("`{kind}` is not supported (only yarn)")));
    }
    let num = |key: &str| -> Result<Option<f64>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::config(format!("rope_scaling.{key}"), format!("expected a number, found {v}"))),
        }
    };
    let factor = num("factor")?.ok_or_else(|| Error::config("rope_scaling.factor", "required but missing"))?;
    if factor.is_nan() || factor < 1.0 {
        return Err(Error::config("rope_scaling.factor", format!("{factor} must be at least 1")));
    }
    let original = match num("original_max_position_embeddings")? {
        Some(v) if v >= 1.0 && v.fract() == 0.0 => v as usize,
        Some(v) => {
            return Err(Error::config(
                "rope_scaling.original_max_position_embeddings",
                format!("{v} must be a positive integer"),
            ));
        }
        None => max_position_embeddings,
    };
    let truncate = match obj.get("truncate") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(Error::config("rope_scaling.truncate", format!("expected a boolean, found {v}"))),
    };
    // transformers treats 0 like "absent" for these (Python truthiness).
    let nonzero = |v: Option<f64>| v.filter(|x| *x != 0.0);
    Ok(Some(Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast: nonzero(num("beta_fast")?).unwrap_or(32.0),
        beta_slow: nonzero(num("beta_slow")?).unwrap_or(1.0),
        mscale: nonzero(num("mscale")?),
        mscale_all_dim: nonzero(num("mscale_all_dim")?),
        attention_factor: num("attention_factor")?,
        truncate,
    }))
}

fn parse_moe(raw: &RawConfig, arch: Arch, num_hidden_layers: usize) -> Result<Option<MoeConfig>> {
    let Some(n_routed_experts) = raw.n_routed_experts else {
        return Ok(None);
    };
    if n_routed_experts == 0 {
        return Err(Error::config("n_routed_experts", "must be at least 1 (or null for a dense model)"));
    }
    let topk_method = match raw.topk_method.as_deref() {
        Some("greedy") => TopkMethod::Greedy,
        Some("group_limited_greedy") => TopkMethod::GroupLimitedGreedy,
        Some("noaux_tc") => TopkMethod::NoauxTc,
        None => match arch {
            Arch::V2 => TopkMethod::Greedy,
            Arch::V3 => TopkMethod::NoauxTc,
        },
        Some(other) => {
            return Err(Error::config(
                "topk_method",
                format!("`{other}` is not supported (greedy, group_limited_greedy, noaux_tc)"),
            ));
        }
    };
    let scoring_func = match raw.scoring_func.as_deref() {
        Some("softmax") => ScoringFunc::Softmax,
        Some("sigmoid") => ScoringFunc::Sigmoid,
        None => match arch {
            Arch::V2 => ScoringFunc::Softmax,
            Arch::V3 => ScoringFunc::Sigmoid,
        },
        Some(other) => {
            return Err(Error::config("scoring_func", format!("`{other}` is not supported (softmax, sigmoid)")));
        }
    };
    let num_experts_per_tok = positive(raw.num_experts_per_tok, "num_experts_per_tok")?;
    let (n_group, topk_group) = match topk_method {
        TopkMethod::Greedy => (1, 1),
        _ => (positive(raw.n_group, "n_group")?, positive(raw.topk_group, "topk_group")?),
    };
    if n_routed_experts % n_group != 0 {
        return Err(Error::config(
            "n_group",
            format!("n_routed_experts {n_routed_experts} is not divisible into {n_group} groups"),
        ));
    }
    if topk_group > n_group {
        return Err(Error::config("topk_group", format!("{topk_group} exceeds n_group {n_group}")));
    }
    let per_group = n_routed_experts / n_group;
    if topk_method == TopkMethod::NoauxTc && n_group > 1 && per_group < 2 {
        return Err(Error::config(
            "n_group",
            "noaux_tc ranks groups by their top-2 experts: need ≥ 2 experts per group",
        ));
    }
    if num_experts_per_tok > topk_group * per_group {
        return Err(Error::config(
            "num_experts_per_tok",
            format!(
                "{num_experts_per_tok} exceeds the {} experts in the {topk_group} selected groups",
                topk_group * per_group
            ),
        ));
    }
    let moe_layer_freq = positive(Some(raw.moe_layer_freq.unwrap_or(1)), "moe_layer_freq")?;
    let first_k_dense_replace = raw.first_k_dense_replace.unwrap_or(0);
    if first_k_dense_replace > num_hidden_layers {
        return Err(Error::config(
            "first_k_dense_replace",
            format!("{first_k_dense_replace} exceeds num_hidden_layers {num_hidden_layers}"),
        ));
    }
    let routed_scaling_factor = raw.routed_scaling_factor.unwrap_or(1.0);
    if !routed_scaling_factor.is_finite() || routed_scaling_factor <= 0.0 {
        return Err(Error::config("routed_scaling_factor", "must be a positive number"));
    }
    Ok(Some(MoeConfig {
        n_routed_experts,
        n_shared_experts: raw.n_shared_experts.unwrap_or(0),
        num_experts_per_tok,
        moe_intermediate_size: positive(raw.moe_intermediate_size, "moe_intermediate_size")?,
        topk_method,
        scoring_func,
        n_group,
        topk_group,
        norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
        routed_scaling_factor,
        first_k_dense_replace,
        moe_layer_freq,
    }))
}

fn parse_quantization(value: Option<&Value>) -> Result<Option<[usize; 2]>> {
    let Some(obj) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let method = obj.get("quant_method").and_then(Value::as_str);
    if method != Some("fp8") {
        return Err(Error::config(
            "quantization_config.quant_method",
            format!("{} is not supported (only DeepSeek's block-wise fp8)", method.unwrap_or("missing")),
        ));
    }
    if let Some(fmt) = obj.get("fmt").and_then(Value::as_str)
        && fmt != "e4m3"
    {
        return Err(Error::config("quantization_config.fmt", format!("`{fmt}` is not supported (only e4m3)")));
    }
    match obj.get("weight_block_size") {
        None | Some(Value::Null) => Ok(Some([128, 128])),
        Some(Value::Array(dims)) => match dims.as_slice() {
            [r, c] => match (r.as_u64(), c.as_u64()) {
                (Some(r), Some(c)) if r > 0 && c > 0 => Ok(Some([r as usize, c as usize])),
                _ => Err(Error::config("quantization_config.weight_block_size", "expected two positive integers")),
            },
            _ => Err(Error::config("quantization_config.weight_block_size", "expected [rows, cols]")),
        },
        Some(_) => Err(Error::config("quantization_config.weight_block_size", "expected [rows, cols]")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepSeek-V3's published config.json, abridged to the fields that matter.
    pub(crate) const DEEPSEEK_V3: &str = r#"{
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": true,
        "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
        "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
        "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "weight_block_size": [128, 128]}
    }"#;

    #[test]
    fn deepseek_v3_kv_cache_is_70272_bytes_per_token_in_bf16() {
        let c = ModelConfig::from_json(DEEPSEEK_V3).unwrap();
        assert_eq!(c.latent_dim(), 576);
        assert_eq!(c.kv_cache_bytes_per_token(2), 70_272);
        assert_eq!(c.fp8_block, Some([128, 128]));
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3) && c.is_moe_layer(60));
    }

    #[test]
    fn unsupported_values_name_the_field() {
        for (patch, field) in [
            (r#""topk_method": "noaux_tc""#, r#""topk_method": "bogus""#),
            (r#""scoring_func": "sigmoid""#, r#""scoring_func": "tanh""#),
            (r#""hidden_act": "silu""#, r#""hidden_act": "gelu""#),
            (r#""n_group": 8"#, r#""n_group": 7"#),
            (r#""type": "yarn""#, r#""type": "linear""#),
            (r#""model_type": "deepseek_v3""#, r#""model_type": "llama""#),
        ] {
            let text = DEEPSEEK_V3.replace(patch, field);
            let err = ModelConfig::from_json(&text).unwrap_err().to_string();
            let name = field.split('"').nth(1).unwrap();
            assert!(err.contains(name), "{err} should name {name}");
        }
        let missing = DEEPSEEK_V3.replace(r#""kv_lora_rank": 512,"#, "");
        let err = ModelConfig::from_json(&missing).unwrap_err().to_string();
        assert!(err.contains("kv_lora_rank") && err.contains("missing"), "{err}");
    }

    #[test]
    fn yarn_scales_the_softmax_by_mscale_all_dim_squared() {
        let c = ModelConfig::from_json(DEEPSEEK_V3).unwrap();
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((c.softmax_scale() - m * m / 192f64.sqrt()).abs() < 1e-12);
    }
}
