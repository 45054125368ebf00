//! int8 weights for the host kernels, the scheme of llama.cpp's Q8_0: each column of a packed matrix in blocks of
//! [`BLOCK`] values along the input dimension, each block stored as int8 values `q` and one f32 scale
//! (`w ≈ q · scale`, `scale = max|w| / 127`). A product quantizes its input rows the same way (per row and block,
//! at the start of the product) and multiplies in integers: each block's `Σ q_x · q_w` is exact in i32, then scaled
//! by both blocks' scales and summed in f32.
//!
//! With AVX-512 VNNI one `vpdpbusd` multiplies and sums 32 byte pairs, so a decode step is bound by the bytes it
//! reads (about half bf16's), not by widening weights to f32. Its operands are unsigned × signed: weights are
//! stored offset by 128 (`q + 128`, 1..=255) and the offset's share, `128 · Σ q_x` per row and block, is taken off
//! once per block. Without VNNI the same integer arithmetic runs portably, with the same results.

use rayon::prelude::*;

use super::{Columns, PANEL, ROWS, interleaved, madd, store};

/// Values of a column (and of an input row) that share one scale.
pub const BLOCK: usize = 32;
/// Input values per 32-bit lane of a `vpdpbusd`: a panel keeps four consecutive inputs of a column together.
const GROUP: usize = 4;
/// What weights are stored offset by, so they read as unsigned bytes.
const OFFSET: i32 = 128;

/// The input length rounded up to whole blocks (padding is zero weights and zero inputs).
fn padded(k: usize) -> usize {
    k.div_ceil(BLOCK) * BLOCK
}

/// A block's scale, `max|v| / 127` (NaN when a value is NaN, so that products with the block are NaN, as the wide
/// ones would be), and the factor that maps its values onto ±127 (0 for an all-zero block).
fn block_scale(values: impl Iterator<Item = f32>) -> (f32, f32) {
    let (mut amax, mut nan) = (0f32, false);
    for v in values {
        nan |= v.is_nan();
        amax = amax.max(v.abs());
    }
    match (nan, amax > 0.0) {
        (true, _) => (f32::NAN, 0.0),
        (false, true) => (amax / 127.0, 127.0 / amax),
        (false, false) => (0.0, 0.0),
    }
}

/// `v` (within ±127) rounded to the nearest integer, halves away from zero (as `f32::round`, but `v + 0.5` may round
/// a value just below a half up; both kernels share this), without `round`'s library call (`as` truncates toward
/// zero and saturates).
#[inline(always)]
fn round_to_i8(v: f32) -> i8 {
    (v + 0.5f32.copysign(v)) as i8
}

/// A packed matrix's panels in int8: `values` `[panels][kp / GROUP][PANEL][GROUP]` (`kp` = `k` padded to whole
/// blocks), each `q + 128`; `scales` `[panels][kp / BLOCK][PANEL]`.
#[derive(Clone)]
pub(super) struct Q8Panels {
    values: Vec<u8>,
    scales: Vec<f32>,
    k: usize,
}

impl Q8Panels {
    /// Quantizes `n_panels` panels of `k` inputs, `weight(p, kk, i)` the weight of column `i` of panel `p` at
    /// input `kk`.
    pub(super) fn quantize(n_panels: usize, k: usize, weight: impl Fn(usize, usize, usize) -> f32 + Sync) -> Self {
        let (kp, blocks) = (padded(k), k.div_ceil(BLOCK));
        let mut values = vec![OFFSET as u8; n_panels * kp * PANEL];
        let mut scales = vec![0f32; n_panels * blocks * PANEL];
        if k == 0 {
            return Self { values, scales, k };
        }
        values.par_chunks_mut(kp * PANEL).zip(scales.par_chunks_mut(blocks * PANEL)).enumerate().for_each(
            |(p, (q, s))| {
                for (b, s) in s.chunks_exact_mut(PANEL).enumerate() {
                    let rows = b * BLOCK..k.min((b + 1) * BLOCK);
                    for (i, scale) in s.iter_mut().enumerate() {
                        let inverse;
                        (*scale, inverse) = block_scale(rows.clone().map(|kk| weight(p, kk, i)));
                        for kk in rows.clone() {
                            let v = i32::from(round_to_i8(weight(p, kk, i) * inverse));
                            q[interleaved(kk, i, GROUP)] = (v + OFFSET) as u8;
                        }
                    }
                }
            },
        );
        Self { values, scales, k }
    }

    /// Panel `p`: its values and scales.
    fn panel(&self, p: usize) -> (&[u8], &[f32]) {
        let (len, scales) = (padded(self.k) * PANEL, self.k.div_ceil(BLOCK) * PANEL);
        (&self.values[p * len..(p + 1) * len], &self.scales[p * scales..(p + 1) * scales])
    }

    pub(super) fn bytes(&self) -> usize {
        std::mem::size_of_val(self.values.as_slice()) + std::mem::size_of_val(self.scales.as_slice())
    }

    /// The stored weight `[column o, input kk]` of a matrix with `PANEL`-column panels: (q, scale).
    #[cfg(test)]
    pub(super) fn weight(&self, o: usize, kk: usize) -> (i8, f32) {
        let (values, scales) = self.panel(o / PANEL);
        let i = o % PANEL;
        let q = i32::from(values[interleaved(kk, i, GROUP)]) - OFFSET;
        (q as i8, scales[kk / BLOCK * PANEL + i])
    }
}

/// The input rows of one product, quantized like the weights: `values` `[m][kp]` (zero-padded), and per row and
/// block its `scale` and `128 · Σ q` (the share of the weights' offset to take off).
pub(super) struct Q8Rows {
    values: Vec<i8>,
    scales: Vec<f32>,
    offsets: Vec<i32>,
    kp: usize,
    blocks: usize,
}

impl Q8Rows {
    /// `a` `[m, k]`.
    pub(super) fn quantize(a: &[f32], m: usize, k: usize) -> Self {
        let (kp, blocks) = (padded(k), k.div_ceil(BLOCK));
        let mut rows =
            Self { values: vec![0; m * kp], scales: vec![0.0; m * blocks], offsets: vec![0; m * blocks], kp, blocks };
        for r in 0..m {
            for b in 0..blocks {
                let x = &a[r * k + b * BLOCK..r * k + k.min((b + 1) * BLOCK)];
                let (scale, inverse) = block_scale(x.iter().copied());
                let q = &mut rows.values[r * kp + b * BLOCK..r * kp + b * BLOCK + x.len()];
                let mut sum = 0i32;
                for (q, &v) in q.iter_mut().zip(x) {
                    *q = round_to_i8(v * inverse);
                    sum += i32::from(*q);
                }
                rows.scales[r * blocks + b] = scale;
                rows.offsets[r * blocks + b] = OFFSET * sum;
            }
        }
        rows
    }

    fn rows(&self) -> usize {
        self.values.len() / self.kp.max(1)
    }

    /// Row `r`'s input `kk` as quantized: (q, scale).
    #[cfg(test)]
    pub(super) fn value(&self, r: usize, kk: usize) -> (i8, f32) {
        (self.values[r * self.kp + kk], self.scales[r * self.blocks + kk / BLOCK])
    }
}

/// Panel `p` of `q` for every row of `rows`, into `dst`.
pub(super) fn product(q: &Q8Panels, rows: &Q8Rows, p: usize, mut dst: Columns<'_>) {
    if q.k == 0 || rows.kp == 0 {
        return;
    }
    let (values, scales) = q.panel(p);
    #[cfg(target_arch = "x86_64")]
    if vnni::available() {
        #[allow(unsafe_code)]
        // SAFETY: `available` checked every feature `vnni::product` is compiled for; that is its only requirement.
        unsafe {
            vnni::product(values, scales, rows, &mut dst)
        };
        return;
    }
    fallback_product(values, scales, rows, &mut dst);
}

/// [`product`] without VNNI: AVX2 + FMA when the CPU has them, else the portable baseline.
pub(super) fn fallback_product(values: &[u8], scales: &[f32], rows: &Q8Rows, dst: &mut Columns<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2 and FMA, checked just above; that is the only requirement of the call.
        unsafe {
            fallback_product_fma(values, scales, rows, dst)
        };
        return;
    }
    row_tiles!(rows.rows(), dst, fallback_tile[false](values, scales, rows));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fallback_product_fma(values: &[u8], scales: &[f32], rows: &Q8Rows, dst: &mut Columns<'_>) {
    row_tiles!(rows.rows(), dst, fallback_tile[true](values, scales, rows));
}

/// `R` rows from `row` against one panel, in integers per block; the same arithmetic as [`vnni::tile`] (with FMA;
/// without it the scaling rounds twice).
#[inline(always)]
fn fallback_tile<const R: usize, const FMA: bool>(
    values: &[u8],
    scales: &[f32],
    rows: &Q8Rows,
    row: usize,
) -> [[f32; PANEL]; R] {
    let mut out = [[0f32; PANEL]; R];
    for b in 0..rows.blocks {
        let mut acc = [[0i32; PANEL]; R];
        let block = &values[b * BLOCK * PANEL..(b + 1) * BLOCK * PANEL];
        for (g, lanes) in block.chunks_exact(PANEL * GROUP).enumerate() {
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = &rows.values[(row + r) * rows.kp + b * BLOCK + g * GROUP..][..GROUP];
                for (a, lane) in acc.iter_mut().zip(lanes.chunks_exact(GROUP)) {
                    *a += lane.iter().zip(x).map(|(&w, &x)| i32::from(w) * i32::from(x)).sum::<i32>();
                }
            }
        }
        for (r, (out, acc)) in out.iter_mut().zip(&acc).enumerate() {
            let at = (row + r) * rows.blocks + b;
            let (offset, sx) = (rows.offsets[at], rows.scales[at]);
            for ((o, &a), &s) in out.iter_mut().zip(acc).zip(&scales[b * PANEL..(b + 1) * PANEL]) {
                *o = madd::<FMA>((a - offset) as f32, s * sx, *o);
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::{
        __m256, __m256i, _mm256_cvtepi32_ps, _mm256_dpbusd_epi32, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_loadu_si256,
        _mm256_mul_ps, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_ps, _mm256_setzero_si256, _mm256_storeu_ps,
        _mm256_sub_epi32,
    };

    use super::{BLOCK, Columns, GROUP, PANEL, Q8Rows, ROWS, store};
    use crate::model::host::prefetch;

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub(super) fn product(values: &[u8], scales: &[f32], rows: &Q8Rows, dst: &mut Columns<'_>) {
        row_tiles!(2 * ROWS; rows.rows(), dst, tile[](values, scales, rows));
    }

    /// 32 bytes from `at` of `bytes` (eight columns' [`GROUP`] of inputs) as a 256-bit register.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    fn load_bytes(bytes: &[u8], at: usize) -> __m256i {
        let chunk = &bytes[at..at + 32];
        #[allow(unsafe_code)]
        // SAFETY: `chunk` holds the 32 bytes read; an unaligned load has no other requirement.
        unsafe {
            _mm256_loadu_si256(chunk.as_ptr().cast())
        }
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    fn load_f32(values: &[f32], at: usize) -> __m256 {
        let chunk = &values[at..at + 8];
        #[allow(unsafe_code)]
        // SAFETY: `chunk` holds the 8 floats read; an unaligned load has no other requirement.
        unsafe {
            _mm256_loadu_ps(chunk.as_ptr())
        }
    }

    /// `R` rows from `row` against one panel: per block, `vpdpbusd` sums `(q_w + 128) · q_x` for 8 columns at a
    /// time, the offset's share is taken off, and the i32 sum, scaled by both scales, is added in f32.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub(super) fn tile<const R: usize>(values: &[u8], scales: &[f32], rows: &Q8Rows, row: usize) -> [[f32; PANEL]; R] {
        let mut out = [[_mm256_setzero_ps(); 2]; R];
        let x: [&[i8]; R] = std::array::from_fn(|r| &rows.values[(row + r) * rows.kp..(row + r + 1) * rows.kp]);
        for b in 0..rows.blocks {
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for g in 0..BLOCK / GROUP {
                let at = (b * BLOCK / GROUP + g) * PANEL * GROUP;
                prefetch(values, at);
                let (w0, w1) = (load_bytes(values, at), load_bytes(values, at + 32));
                let k = b * BLOCK + g * GROUP;
                for r in 0..R {
                    let xs = &x[r][k..k + GROUP];
                    let lane = i32::from_le_bytes([xs[0] as u8, xs[1] as u8, xs[2] as u8, xs[3] as u8]);
                    let xb = _mm256_set1_epi32(lane);
                    acc[r][0] = _mm256_dpbusd_epi32(acc[r][0], w0, xb);
                    acc[r][1] = _mm256_dpbusd_epi32(acc[r][1], w1, xb);
                }
            }
            let (s0, s1) = (load_f32(scales, b * PANEL), load_f32(scales, b * PANEL + 8));
            for r in 0..R {
                let at = (row + r) * rows.blocks + b;
                let offset = _mm256_set1_epi32(rows.offsets[at]);
                let sx = _mm256_set1_ps(rows.scales[at]);
                let d0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][0], offset));
                let d1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][1], offset));
                out[r][0] = _mm256_fmadd_ps(d0, _mm256_mul_ps(s0, sx), out[r][0]);
                out[r][1] = _mm256_fmadd_ps(d1, _mm256_mul_ps(s1, sx), out[r][1]);
            }
        }
        let mut result = [[0f32; PANEL]; R];
        for (r, cols) in result.iter_mut().enumerate() {
            let (lo, hi) = cols.split_at_mut(8);
            #[allow(unsafe_code)]
            // SAFETY: `lo` and `hi` hold 8 floats each, what an unaligned 256-bit store writes.
            unsafe {
                _mm256_storeu_ps(lo.as_mut_ptr(), out[r][0]);
                _mm256_storeu_ps(hi.as_mut_ptr(), out[r][1]);
            }
        }
        result
    }
}

/// [`fallback_product`] of panel `p`.
#[cfg(test)]
pub(super) fn fallback_matmul(q: &Q8Panels, rows: &Q8Rows, p: usize, mut dst: Columns<'_>) {
    let (values, scales) = q.panel(p);
    fallback_product(values, scales, rows, &mut dst);
}
