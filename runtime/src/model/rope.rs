//! Rotary position embedding over the `qk_rope_head_dim` part of queries and the shared rotary key, with YaRN.
//!
//! Frequencies follow transformers' `_compute_yarn_parameters` (and DeepSeek's reference code): a linear ramp
//! between interpolated and extrapolated frequencies, and `cos`/`sin` multiplied by the attention factor
//! `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`.

use candle_core::{DType, Device, Tensor};

use super::config::{ModelConfig, Yarn, yarn_get_mscale};
use crate::error::Result;

/// `cos` and `sin` (attention factor included) for the positions of one forward pass, row-major
/// `[positions, dim / 2]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    attention_factor: f32,
    interleave: bool,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.qk_rope_head_dim;
        let base = config.rope_theta as f32;
        // transformers computes `base ** (arange(0, dim, 2) / dim)` in float32.
        let pos_freqs: Vec<f32> = (0..dim / 2).map(|i| base.powf((2 * i) as f32 / dim as f32)).collect();
        let (inv_freq, attention_factor) = match &config.rope_scaling {
            None => (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0),
            Some(yarn) => yarn_frequencies(yarn, &pos_freqs, dim, config.rope_theta),
        };
        Self { inv_freq, attention_factor: attention_factor as f32, interleave: config.rope_interleave }
    }

    /// Whether rotary pairs are adjacent elements (else the two halves of the rotary dims).
    pub fn interleaved(&self) -> bool {
        self.interleave
    }

    /// `cos` and `sin` tables `[positions.len(), dim / 2]` for the given absolute positions.
    pub fn tables(&self, positions: &[usize]) -> RopeTables {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.attention_factor);
                sin.push(angle.sin() * self.attention_factor);
            }
        }
        RopeTables { cos, sin, half }
    }

    /// [`Rope::tables`] as tensors, for the rotary kernels.
    pub fn cos_sin(&self, tables: &RopeTables, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let shape = (tables.cos.len() / tables.half.max(1), tables.half);
        let cos = Tensor::from_slice(&tables.cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_slice(&tables.sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Rotates one token's rotary part `x` (`dim` values) in place with row `row` of `tables`, as
    /// [`Rope::apply`] does: pairs `(2i, 2i + 1)` when interleaved, else `(i, i + dim / 2)`.
    pub fn rotate(&self, x: &mut [f32], tables: &RopeTables, row: usize) {
        let half = tables.half;
        let (cos, sin) = (&tables.cos[row * half..(row + 1) * half], &tables.sin[row * half..(row + 1) * half]);
        for i in 0..half.min(x.len() / 2) {
            let (ia, ib) = if self.interleave { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (a, b) = (x[ia], x[ib]);
            x[ia] = a * cos[i] - b * sin[i];
            x[ib] = a * sin[i] + b * cos[i];
        }
    }

    /// Rotates `x` of shape `[1, heads, tokens, dim]` where token `t` uses row `t` of `cos`/`sin`.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(if self.interleave {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        })
    }
}

fn yarn_frequencies(yarn: &Yarn, pos_freqs: &[f32], dim: usize, base: f64) -> (Vec<f32>, f64) {
    let attention_factor = yarn.attention_factor.unwrap_or_else(|| match (yarn.mscale, yarn.mscale_all_dim) {
        (Some(m), Some(all)) => yarn_get_mscale(yarn.factor, m) / yarn_get_mscale(yarn.factor, all),
        _ => yarn_get_mscale(yarn.factor, 1.0),
    });
    let correction_dim = |rotations: f64| {
        (dim as f64 * (yarn.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln())
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow));
    if yarn.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let high = high.min((dim - 1) as f64);
    let span = if low == high { 0.001 } else { high - low };
    let factor = yarn.factor as f32;
    let inv_freq = pos_freqs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ramp = (((i as f64 - low) / span).clamp(0.0, 1.0)) as f32;
            let extrapolation = 1.0 - ramp;
            let interpolated = 1.0 / (factor * p);
            let extrapolated = 1.0 / p;
            interpolated * (1.0 - extrapolation) + extrapolated * extrapolation
        })
        .collect();
    (inv_freq, attention_factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host rotation equals candle's rotary kernels, interleaved and split-half, row by row.
    #[test]
    fn host_rotation_equals_the_rotary_kernels() {
        let config = crate::builtin::config("tiny-moe").unwrap();
        let dev = Device::Cpu;
        for interleave in [true, false] {
            let rope = Rope { interleave, ..Rope::new(&config) };
            let dim = config.qk_rope_head_dim;
            let positions = [0usize, 3, 17, 400];
            let tables = rope.tables(&positions);
            let (cos, sin) = rope.cos_sin(&tables, DType::F32, &dev).unwrap();
            let x: Vec<f32> = (0..positions.len() * dim).map(|i| ((i as f32) * 0.41).sin()).collect();
            let t = Tensor::from_vec(x.clone(), (1, 1, positions.len(), dim), &dev).unwrap();
            let want = rope.apply(&t, &cos, &sin).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (row, chunk) in x.chunks_exact(dim).enumerate() {
                let mut got = chunk.to_vec();
                rope.rotate(&mut got, &tables, row);
                for (g, w) in got.iter().zip(&want[row * dim..(row + 1) * dim]) {
                    assert!((g - w).abs() < 1e-6, "interleave {interleave}, row {row}: {g} vs {w}");
                }
            }
        }
    }
}
