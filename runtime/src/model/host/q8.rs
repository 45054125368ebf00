//! int8 weights for the host kernels: each column of a packed matrix in blocks of [`BLOCK`] values along the
//! input dimension, every block stored as int8 values and one f32 scale (`w ≈ q · scale`, `scale = max|w| / 127`),
//! the scheme of llama.cpp's Q8_0. A product accumulates each block's `x · q` in f32 registers and adds it times
//! the block's scale, so reading int8 costs the kernel what reading bf16 does (one widening per weight) while a
//! memory-bound decode step reads about half the bytes.

use rayon::prelude::*;

use super::{PANEL, Panel, Weight, madd};

/// Values of a column that share one scale.
pub const BLOCK: usize = 32;

/// A packed matrix's panels in int8: `values` in the panel order of the wide panels (`[panels][k][PANEL]`),
/// `scales` `[panels][ceil(k / BLOCK)][PANEL]`.
#[derive(Clone)]
pub(super) struct Q8Panels {
    values: Vec<i8>,
    scales: Vec<f32>,
    k: usize,
}

impl Q8Panels {
    /// Quantizes wide panels of `k` rows each.
    pub(super) fn quantize<T: Weight>(panels: &[T], k: usize) -> Self {
        let blocks = k.div_ceil(BLOCK);
        let n_panels = if k == 0 { 0 } else { panels.len() / (k * PANEL) };
        let mut values = vec![0i8; n_panels * k * PANEL];
        let mut scales = vec![0f32; n_panels * blocks * PANEL];
        if k == 0 {
            return Self { values, scales, k };
        }
        values
            .par_chunks_mut(k * PANEL)
            .zip(scales.par_chunks_mut(blocks * PANEL))
            .zip(panels.par_chunks(k * PANEL))
            .for_each(|((q, s), w)| {
                for (b, s) in s.chunks_exact_mut(PANEL).enumerate() {
                    let rows = b * BLOCK..k.min((b + 1) * BLOCK);
                    for (i, scale) in s.iter_mut().enumerate() {
                        let amax = rows.clone().map(|kk| w[kk * PANEL + i].widen().abs()).fold(0f32, f32::max);
                        *scale = amax / 127.0;
                        let inverse = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                        for kk in rows.clone() {
                            q[kk * PANEL + i] =
                                (w[kk * PANEL + i].widen() * inverse).round().clamp(-127.0, 127.0) as i8;
                        }
                    }
                }
            });
        Self { values, scales, k }
    }

    /// Panel `p`.
    pub(super) fn panel(&self, p: usize) -> Q8Panel<'_> {
        let (len, scales) = (self.k * PANEL, self.k.div_ceil(BLOCK) * PANEL);
        Q8Panel { values: &self.values[p * len..(p + 1) * len], scales: &self.scales[p * scales..(p + 1) * scales] }
    }

    pub(super) fn bytes(&self) -> usize {
        std::mem::size_of_val(self.values.as_slice()) + std::mem::size_of_val(self.scales.as_slice())
    }
}

/// One panel: `values` `[k, PANEL]`, `scales` `[ceil(k / BLOCK), PANEL]`.
#[derive(Clone, Copy)]
pub(super) struct Q8Panel<'a> {
    values: &'a [i8],
    scales: &'a [f32],
}

impl Q8Panel<'_> {
    /// The stored value and scale of row `kk`, column `i` of the panel.
    #[cfg(test)]
    pub(super) fn weight(&self, kk: usize, i: usize) -> (i8, f32) {
        (self.values[kk * PANEL + i], self.scales[kk / BLOCK * PANEL + i])
    }
}

impl Panel for Q8Panel<'_> {
    #[inline(always)]
    fn tile<const R: usize, const FMA: bool>(self, a: &[f32], k: usize) -> [[f32; PANEL]; R] {
        let mut acc = [[0f32; PANEL]; R];
        for (b, (block, scale)) in self.values.chunks(BLOCK * PANEL).zip(self.scales.chunks_exact(PANEL)).enumerate() {
            let (first, len) = (b * BLOCK, block.len() / PANEL);
            let xs: [&[f32]; R] = std::array::from_fn(|r| &a[r * k + first..r * k + first + len]);
            let mut part = [[0f32; PANEL]; R];
            for (j, stored) in block.chunks_exact(PANEL).enumerate() {
                let w: [f32; PANEL] = std::array::from_fn(|i| f32::from(stored[i]));
                for r in 0..R {
                    let x = xs[r][j];
                    for i in 0..PANEL {
                        part[r][i] = madd::<FMA>(x, w[i], part[r][i]);
                    }
                }
            }
            for r in 0..R {
                for i in 0..PANEL {
                    acc[r][i] = madd::<FMA>(part[r][i], scale[i], acc[r][i]);
                }
            }
        }
        acc
    }
}
