//! Walking a model's weights: to narrow the packed matrices (`--quantize`) and to count the bytes it holds.

use candle_core::Tensor;

use super::PackedMatrix;
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;

/// How the host kernels store the model's large matrices, chosen with `--quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// As loaded: f32 or bf16, the `--dtype`.
    #[default]
    None,
    /// int8 with a scale per 32 values of a column (llama.cpp's Q8_0 scheme), quantized at load.
    Int8,
    /// An FP8 checkpoint's weights kept in 8 bits with their block scales (DeepSeek-V3/R1), not dequantized.
    Fp8,
}

impl Quantize {
    /// The flag's values.
    pub const CHOICES: &'static str = "none, int8, fp8";

    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "none" => Ok(Self::None),
            "int8" => Ok(Self::Int8),
            "fp8" => Ok(Self::Fp8),
            other => Err(Error::Setting {
                name: "quantize".into(),
                reason: format!("`{other}` is not one of {}", Self::CHOICES),
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Int8 => "int8",
            Self::Fp8 => "fp8",
        }
    }

    /// How the large matrices are stored, as the load log and `baleen_runtime_model_weight_bytes` name it: the
    /// choice, or the dtype (`f32`, `bf16`, `f16`) when nothing narrows them.
    pub fn weight_format(self, dtype: candle_core::DType) -> String {
        match self {
            Self::None => format!("{dtype:?}").to_lowercase(),
            narrowed => narrowed.as_str().to_string(),
        }
    }

    /// Bytes a quantized matrix stores per weight (scales included), for weights loaded in `dtype`.
    pub fn bytes_per_weight(self, dtype: candle_core::DType) -> f64 {
        match self {
            Self::None => dtype.size_in_bytes() as f64,
            Self::Int8 => 1.0 + std::mem::size_of::<f32>() as f64 / super::q8::BLOCK as f64,
            // One f32 scale per column and block, DeepSeek-V3's blocks of 128 inputs (an estimate for bandwidth
            // figures: matrices the checkpoint keeps wide, such as lm_head, are counted at this rate too).
            Self::Fp8 => 1.0 + std::mem::size_of::<f32>() as f64 / 128.0,
        }
    }

    /// Sets up `config` for loading: `fp8` needs an FP8 checkpoint (blocks whose input side is a multiple of 4)
    /// and keeps its weights in 8 bits.
    pub fn configure(self, config: &mut ModelConfig) -> Result<()> {
        if self == Self::Fp8 {
            let block = config.fp8_block.ok_or_else(|| Error::Setting {
                name: "quantize".into(),
                reason: "fp8 keeps an FP8 checkpoint's weights in 8 bits; this model's weights are not FP8 (its \
                         config.json has no fp8 quantization_config)"
                    .into(),
            })?;
            super::fp8::check_block(block)?;
        }
        config.keep_fp8 = self == Self::Fp8;
        Ok(())
    }

    /// Narrows every packed matrix `walk` yields. A first walk checks that none is a matrix candle multiplies
    /// (those cannot be narrowed: the host kernels run only on the CPU, in f32 or bf16), so a refused model is left
    /// as it was.
    pub fn apply(self, mut walk: impl FnMut(&mut WeightVisitor<'_>) -> Result<()>) -> Result<()> {
        if self == Self::None {
            return Ok(());
        }
        walk(&mut |weight| match weight {
            WeightMut::Tensor(t) => Err(Error::Setting {
                name: "quantize".into(),
                reason: format!(
                    "{} weights run on the CPU's host kernels (--device cpu, --dtype f32 or bf16); this model has \
                     {:?} weights on {:?}",
                    self.as_str(),
                    t.dtype(),
                    t.device().location()
                ),
            }),
            WeightMut::Packed(_) | WeightMut::Kept(_) => Ok(()),
        })?;
        if self == Self::Fp8 {
            // Kept as FP8 at load (the matrices the checkpoint stores in FP8): nothing to narrow, but a checkpoint
            // that only says it is FP8 (a bf16 conversion that kept quantization_config) is refused.
            if fp8_matrices(walk)? == 0 {
                return Err(Error::Setting {
                    name: "quantize".into(),
                    reason: "fp8: no weight of this checkpoint is stored in FP8 with block scales (no \
                             `*.weight_scale_inv` tensors); use --quantize none"
                        .into(),
                });
            }
            return Ok(());
        }
        walk(&mut |weight| {
            if let WeightMut::Packed(m) = weight {
                m.quantize_int8();
            }
            Ok(())
        })
    }
}

/// How many of the packed matrices `walk` yields are kept as FP8.
pub fn fp8_matrices(mut walk: impl FnMut(&mut WeightVisitor<'_>) -> Result<()>) -> Result<usize> {
    let mut kept = 0;
    walk(&mut |weight| {
        if let WeightMut::Packed(m) = weight {
            kept += usize::from(m.is_fp8());
        }
        Ok(())
    })?;
    Ok(kept)
}

/// One of a model's weights, as a walk over them yields it.
#[derive(Debug)]
pub enum WeightMut<'a> {
    /// A matrix packed for the host kernels; `--quantize` narrows it.
    Packed(&'a mut PackedMatrix),
    /// A matrix candle multiplies (on an accelerator, or in f16); `--quantize` cannot narrow it.
    Tensor(&'a Tensor),
    /// Bytes kept as loaded whatever `--quantize` says: norms, the router, embeddings, biases, MLA's
    /// up-projection `kv_b` (its per-head halves are used by several paths, so they stay as loaded).
    Kept(usize),
}

/// What a walk calls for each weight.
pub type WeightVisitor<'v> = dyn FnMut(WeightMut<'_>) -> Result<()> + 'v;

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Adds up the bytes of every weight a walk yields.
pub fn counter(total: &mut usize) -> impl FnMut(WeightMut<'_>) -> Result<()> + '_ {
    move |weight| {
        *total += match weight {
            WeightMut::Packed(m) => m.bytes(),
            WeightMut::Tensor(t) => tensor_bytes(t),
            WeightMut::Kept(bytes) => bytes,
        };
        Ok(())
    }
}
