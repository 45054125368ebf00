//! Built-in **random-weight models** with the built-in byte-level tokenizer. They need no files; their text is
//! meaningless. The weights are drawn from a fixed seed per tensor name, so every run and every process (every
//! expert-parallel rank) builds exactly the same model.
//!
//! - `builtin:tiny-moe`: a demo model with the DeepSeek-V3 architecture (MLA with a low-rank query, sigmoid
//!   `noaux_tc` routing over 4 expert groups, a shared expert, a dense first layer), small enough for `baleen up`,
//!   the tests and benchmarks anywhere.
//! - `builtin:deepseek-v2-lite`: DeepSeek-V2-Lite's shapes, all 27 layers (15.7 B parameters, 31 GB in bf16).
//! - `builtin:deepseek-v3-slice`: DeepSeek-V3's shapes, its first 5 layers (3 dense, 2 MoE layers of 256 experts;
//!   26.6 B parameters, 53 GB in bf16).
//!
//! The two full-size models are for GPU benchmarks: on a CUDA device every model's weights are drawn there by a
//! kernel that reproduces the host generator, so a GPU machine needs no checkpoint upload and loads them in
//! seconds. Their vocabulary is the real model's; the output head only scores the byte tokenizer's readable tokens,
//! and ids past the tokenizer's decode as nothing.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::error::{Error, Result};
use crate::kernels;
use crate::model::ModelConfig;
use crate::model::config::RawConfig;

/// Names of the built-in models, without the `builtin:` scheme.
pub const TINY_MOE: &str = "tiny-moe";
pub const DEEPSEEK_V2_LITE: &str = "deepseek-v2-lite";
pub const DEEPSEEK_V3_SLICE: &str = "deepseek-v3-slice";
/// Every built-in model.
pub const NAMES: [&str; 3] = [TINY_MOE, DEEPSEEK_V2_LITE, DEEPSEEK_V3_SLICE];

/// Seed of the tiny-moe weights.
const SEED: u64 = 0x0BA1_EE4D_EE95_EEC3;

/// Printable ASCII plus newline: the tokens the demo's output head favours, so its random text stays readable.
fn readable(token: usize) -> bool {
    token == b'\n' as usize || (0x20..0x7f).contains(&token)
}

/// The `config.json` of `builtin:tiny-moe`.
pub fn tiny_moe_config_json() -> &'static str {
    r#"{
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 264, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 4, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true, "routed_scaling_factor": 2.5,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_interleave": true, "tie_word_embeddings": false, "attention_bias": false,
        "bos_token_id": 256, "eos_token_id": 257
    }"#
}

/// The `config.json` of `builtin:deepseek-v2-lite` (deepseek-ai/DeepSeek-V2-Lite's).
fn deepseek_v2_lite_config_json() -> &'static str {
    r#"{
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_attention_heads": 16, "num_key_value_heads": 16,
        "q_lora_rank": null, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
        "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": false, "routed_scaling_factor": 1.0,
        "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": false, "attention_bias": false, "bos_token_id": 256, "eos_token_id": 257
    }"#
}

/// The `config.json` of `builtin:deepseek-v3-slice`: deepseek-ai/DeepSeek-V3's, first 5 layers.
fn deepseek_v3_slice_config_json() -> &'static str {
    r#"{
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 5, "first_k_dense_replace": 3, "moe_layer_freq": 1,
        "num_attention_heads": 128, "num_key_value_heads": 128,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true, "routed_scaling_factor": 2.5,
        "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": false, "attention_bias": false, "bos_token_id": 256, "eos_token_id": 257
    }"#
}

/// Looks up a built-in model by name (the part after `builtin:`).
pub fn config(name: &str) -> Result<ModelConfig> {
    let json = match name {
        TINY_MOE => tiny_moe_config_json(),
        DEEPSEEK_V2_LITE => deepseek_v2_lite_config_json(),
        DEEPSEEK_V3_SLICE => deepseek_v3_slice_config_json(),
        other => {
            let known: Vec<String> = NAMES.iter().map(|n| format!("builtin:{n}")).collect();
            return Err(Error::Checkpoint(format!(
                "unknown built-in model `builtin:{other}` (available: {})",
                known.join(", ")
            )));
        }
    };
    let raw: RawConfig = serde_json::from_str(json)
        .map_err(|source| Error::Json { path: format!("builtin:{name}/config.json").into(), source })?;
    ModelConfig::from_raw(&raw)
}

/// A VarBuilder whose tensors are generated on demand from [`SEED`] and the tensor name: every built-in model
/// uses the same recipe ([`RandomWeights`]), on the device that loads it.
pub fn var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    let backend: Box<dyn SimpleBackend> = Box::new(RandomWeights);
    VarBuilder::from_backend(backend, dtype, device.clone())
}

/// Deterministic weights: N(0, 1/fan_in) matrices (router ×3 so routing is decisive), norms near 1, N(0, 1)
/// embeddings, small correction biases, and an output head that only scores readable bytes and EOS. Each tensor is
/// its own SplitMix64 stream seeded with [`SEED`] and its name; element `i` is the stream's `i`-th normal draw, so
/// a CUDA device draws the same values in parallel ([`kernels::random_normal`]) — which is how the full-size
/// models load in seconds on a GPU.
#[derive(Debug, Clone, Copy)]
struct RandomWeights;

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Draw {
    /// `mean + std · z`, `z` standard normal.
    Normal { mean: f32, std: f32 },
    /// Uniform in [-0.05, 0.05) (`e_score_correction_bias`).
    Bias,
}

/// The end-of-sequence id of the byte tokenizer, the one non-readable token the output head scores.
const EOS: usize = 257;

impl RandomWeights {
    fn seed(name: &str) -> u64 {
        SEED ^ fnv1a(name.as_bytes())
    }

    fn draw(name: &str, dims: &[usize]) -> Draw {
        let fan_in = dims.last().copied().unwrap_or(1).max(1) as f32;
        if name.ends_with("norm.weight") {
            Draw::Normal { mean: 1.0, std: 0.1 }
        } else if name.ends_with("e_score_correction_bias") {
            Draw::Bias
        } else if name.contains("embed_tokens") {
            Draw::Normal { mean: 0.0, std: 1.0 }
        } else {
            let std = if name.ends_with("mlp.gate.weight") { 3.0 } else { 1.0 } / fan_in.sqrt();
            Draw::Normal { mean: 0.0, std }
        }
    }

    /// Per output row, 1 for the tokens the output head scores (readable bytes and EOS), else 0.
    fn head_mask(vocab: usize) -> Vec<f32> {
        (0..vocab).map(|t| if readable(t) || t == EOS { 1.0 } else { 0.0 }).collect()
    }

    fn generate(name: &str, shape: &Shape) -> Vec<f32> {
        let mut rng = SplitMix64::new(Self::seed(name));
        let dims = shape.dims();
        let count = shape.elem_count();
        let mut values: Vec<f32> = match Self::draw(name, dims) {
            Draw::Bias => (0..count).map(|_| 0.05 * (2.0 * rng.uniform() - 1.0)).collect(),
            Draw::Normal { mean, std } => (0..count).map(|_| mean + std * rng.normal()).collect(),
        };
        if name == "lm_head.weight" {
            let mask = Self::head_mask(dims.first().copied().unwrap_or(0));
            for (row, keep) in values.chunks_mut(dims.last().copied().unwrap_or(1).max(1)).zip(mask) {
                if keep == 0.0 {
                    row.fill(0.0);
                }
            }
        }
        values
    }

    /// [`RandomWeights::generate`] on a CUDA device: the normal draws by the device kernel, the output head masked
    /// there; `None` where the kernels are unavailable or the tensor is drawn otherwise.
    fn generate_on_device(name: &str, shape: &Shape, device: &Device) -> candle_core::Result<Option<Tensor>> {
        let dims = shape.dims();
        let Draw::Normal { mean, std } = Self::draw(name, dims) else { return Ok(None) };
        if !kernels::available(device) {
            return Ok(None);
        }
        let values = kernels::random_normal(shape.elem_count(), Self::seed(name), mean, std, device)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .reshape(shape.clone())?;
        if name == "lm_head.weight" {
            let vocab = dims.first().copied().unwrap_or(0);
            let mask = Tensor::from_vec(Self::head_mask(vocab), (vocab, 1), device)?;
            return Ok(Some(values.broadcast_mul(&mask)?));
        }
        Ok(Some(values))
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(values) = Self::generate_on_device(name, &shape, device)? {
            return values.to_dtype(dtype);
        }
        let values = Self::generate(name, &shape);
        Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("built-in model tensor `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// SplitMix64: tiny, fast and stable across crate versions (the weights must never change under us).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_a_pure_function_of_the_name() {
        let shape = Shape::from((4, 8));
        let a = RandomWeights::generate("model.layers.1.mlp.experts.3.up_proj.weight", &shape);
        let b = RandomWeights::generate("model.layers.1.mlp.experts.3.up_proj.weight", &shape);
        let c = RandomWeights::generate("model.layers.1.mlp.experts.4.up_proj.weight", &shape);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn tiny_moe_is_a_v3_architecture() {
        let c = config(TINY_MOE).unwrap();
        assert_eq!(c.arch, crate::model::config::Arch::V3);
        assert_eq!(c.vocab_size, 264);
        // The operator and the CRD's CEL rule check `parallelism.expert` against this shared constant.
        let experts = c.moe.as_ref().map(|m| m.n_routed_experts);
        assert_eq!(experts, Some(baleen_api::names::BUILTIN_TINY_MOE_ROUTED_EXPERTS as usize));
        let kv_values = (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers;
        assert_eq!(kv_values as u64, baleen_api::names::BUILTIN_TINY_MOE_KV_VALUES_PER_TOKEN);
        let json: serde_json::Value = serde_json::from_str(tiny_moe_config_json()).unwrap();
        assert_eq!(json["architectures"][0], baleen_api::names::BUILTIN_TINY_MOE_ARCHITECTURE);
        assert!(config("nope").unwrap_err().to_string().contains("builtin:tiny-moe"));
    }

    /// The full-size built-ins are the real models' shapes: DeepSeek-V2-Lite's 15.7 B parameters in 27 layers, and
    /// DeepSeek-V3's per-layer shapes in a 5-layer slice with two 256-expert MoE layers.
    #[test]
    fn full_size_builtins_have_the_real_shapes() {
        let lite = config(DEEPSEEK_V2_LITE).unwrap();
        assert_eq!((lite.arch, lite.num_hidden_layers, lite.hidden_size), (crate::model::config::Arch::V2, 27, 2048));
        let params = lite.parameter_count() as f64 / 1e9;
        assert!((15.6..15.8).contains(&params), "DeepSeek-V2-Lite has 15.7 B parameters, not {params}");
        let v3 = config(DEEPSEEK_V3_SLICE).unwrap();
        let moe = v3.moe.as_ref().unwrap();
        assert_eq!((moe.n_routed_experts, moe.num_experts_per_tok, moe.n_group, moe.topk_group), (256, 8, 8, 4));
        assert_eq!((0..5).filter(|&l| v3.is_moe_layer(l)).count(), 2);
        let params = v3.parameter_count() as f64 / 1e9;
        assert!((26.0..27.0).contains(&params), "{params}");
        // Both decode with the byte tokenizer: its ids are inside their vocabularies.
        for c in [&lite, &v3] {
            assert!(c.vocab_size >= crate::tokenizer::bytes::VOCAB_SIZE);
        }
    }
}
