//! `builtin:tiny-moe` — a **random-weight demo model** with the DeepSeek-V3 architecture (MLA with a low-rank
//! query, sigmoid `noaux_tc` routing over 4 expert groups, a shared expert, a dense first layer) and the built-in
//! byte-level tokenizer. It needs no files, so `baleen up`, the tests and benchmarks run anywhere. Its text is
//! meaningless: the weights are drawn from a fixed seed, per tensor name, so every run and every process (every
//! expert-parallel rank) builds exactly the same model.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::model::config::RawConfig;

/// Names of the built-in models, without the `builtin:` scheme.
pub const TINY_MOE: &str = "tiny-moe";

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

/// Looks up a built-in model by name (the part after `builtin:`).
pub fn config(name: &str) -> Result<ModelConfig> {
    match name {
        TINY_MOE => {
            let raw: RawConfig = serde_json::from_str(tiny_moe_config_json())
                .map_err(|source| Error::Json { path: "builtin:tiny-moe/config.json".into(), source })?;
            ModelConfig::from_raw(&raw)
        }
        other => {
            Err(Error::Checkpoint(format!("unknown built-in model `builtin:{other}` (available: builtin:{TINY_MOE})")))
        }
    }
}

/// A VarBuilder whose tensors are generated on demand from [`SEED`] and the tensor name.
pub fn var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    let backend: Box<dyn SimpleBackend> = Box::new(RandomWeights);
    VarBuilder::from_backend(backend, dtype, device.clone())
}

/// Deterministic weights: N(0, 1/fan_in) matrices (router ×3 so routing is decisive), norms near 1, N(0, 1)
/// embeddings, small correction biases, and an output head that only scores readable bytes and EOS.
#[derive(Debug, Clone, Copy)]
struct RandomWeights;

impl RandomWeights {
    fn generate(name: &str, shape: &Shape) -> Vec<f32> {
        let mut rng = SplitMix64::new(SEED ^ fnv1a(name.as_bytes()));
        let dims = shape.dims();
        let count = shape.elem_count();
        let fan_in = dims.last().copied().unwrap_or(1).max(1) as f32;
        if name.ends_with("norm.weight") {
            return (0..count).map(|_| 1.0 + 0.1 * rng.normal()).collect();
        }
        if name.ends_with("e_score_correction_bias") {
            return (0..count).map(|_| 0.05 * (2.0 * rng.uniform() - 1.0)).collect();
        }
        if name.contains("embed_tokens") {
            return (0..count).map(|_| rng.normal()).collect();
        }
        let std = if name.ends_with("mlp.gate.weight") { 3.0 } else { 1.0 } / fan_in.sqrt();
        let mut values: Vec<f32> = (0..count).map(|_| std * rng.normal()).collect();
        if name == "lm_head.weight" {
            let eos = 257;
            for (token, row) in values.chunks_mut(dims.last().copied().unwrap_or(1)).enumerate() {
                if !readable(token) && token != eos {
                    row.fill(0.0);
                }
            }
        }
        values
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
        let values = Self::generate(name, &shape);
        Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("builtin:tiny-moe tensor `{name}` requested without a shape")
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
}
