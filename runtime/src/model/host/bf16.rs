//! bf16 weights for the host kernels: a bf16 checkpoint's own bits (half the bytes of f32), multiplied with the
//! input rows rounded to bf16 (as transformers' bf16 matmuls take them) and summed in f32.
//!
//! A panel keeps two consecutive inputs of a column together (`[k / 2][PANEL][2]`), the operand layout of
//! AVX-512 BF16's `vdpbf16ps`, which multiplies 16 bf16 pairs and adds them into 8 f32 sums in one instruction
//! (picked at run time). Without it a fallback kernel (AVX2 + FMA, or the portable baseline) computes the same: both
//! products are exact in f32, added into the sum one after the other (the odd input first), as `vdpbf16ps` does —
//! except that `vdpbf16ps` flushes subnormal inputs and results to zero.

use super::{Columns, PANEL, ROWS, interleaved, madd, store};

/// A bf16 is the top half of an f32: widening is a shift, exact (NaN payloads included).
#[inline(always)]
pub(super) fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `x` rounded to bf16 (to nearest, ties to even; a NaN stays a NaN, made quiet): bit for bit `half::bf16::from_f32`,
/// without its branches, so that a loop over it vectorizes (a product rounds all its input rows first).
#[inline(always)]
pub(super) fn round(x: f32) -> u16 {
    let bits = x.to_bits();
    // Adding just under half an ulp of bf16, plus the kept lowest bit, carries into it exactly when rounding up.
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((bits >> 16) | 0x40) as u16;
    if x.is_nan() { quiet_nan } else { rounded }
}

/// Inputs per 32-bit lane of a `vpdpbf16ps`.
const PAIR: usize = 2;
/// Sets of sums one row keeps apart (pair `g` of inputs adds into set `g % SETS`, the pairs past the last whole
/// round into the first sets), so that as many `vdpbf16ps` chains overlap their latency; added
/// `(s0 + s1) + (s2 + s3)` at the end. A row alone (batch-1 decode) would otherwise wait on one chain per 8 columns.
const SETS: usize = 4;

/// The set pair `g` of `groups` adds into (see [`SETS`]).
#[inline(always)]
fn set_of(g: usize, groups: usize) -> usize {
    let full = groups - groups % SETS;
    if g < full { g % SETS } else { g - full }
}

/// The input length rounded up to whole pairs (padding is a zero weight and a zero input).
fn padded(k: usize) -> usize {
    k.div_ceil(PAIR) * PAIR
}

/// bf16 bit patterns of a matrix's panels: `[panels][kp / 2][PANEL][2]` (`kp` = `k` rounded up to even).
#[derive(Clone)]
pub(super) struct Bf16Panels {
    values: Vec<u16>,
    k: usize,
}

impl Bf16Panels {
    /// Packs a row-major `[out_dim, k]` weight of bf16 bit patterns (`w.len() == out_dim * k`).
    pub(super) fn pack(w: &[u16], out_dim: usize, k: usize) -> Self {
        let kp = padded(k);
        let mut values = vec![0u16; out_dim.div_ceil(PANEL) * kp * PANEL];
        for (o, row) in w.chunks_exact(k.max(1)).enumerate().take(out_dim) {
            let panel = &mut values[(o / PANEL) * kp * PANEL..(o / PANEL + 1) * kp * PANEL];
            for (kk, &v) in row.iter().enumerate() {
                panel[interleaved(kk, o % PANEL, PAIR)] = v;
            }
        }
        Self { values, k }
    }

    pub(super) fn panel(&self, p: usize) -> &[u16] {
        let len = padded(self.k) * PANEL;
        &self.values[p * len..(p + 1) * len]
    }

    /// Weight `[column i of panel p, input kk]`, widened.
    pub(super) fn weight(&self, p: usize, kk: usize, i: usize) -> f32 {
        widen(self.panel(p)[interleaved(kk, i, PAIR)])
    }

    pub(super) fn bytes(&self) -> usize {
        std::mem::size_of_val(self.values.as_slice())
    }
}

/// The input rows of one product rounded to bf16 (to nearest, ties to even), `[m][kp]`, zero-padded.
pub(super) struct Bf16Rows {
    values: Vec<u16>,
    kp: usize,
}

impl Bf16Rows {
    pub(super) fn round(a: &[f32], m: usize, k: usize) -> Self {
        Self::round_padded(a, m, k, padded(k))
    }

    /// [`Bf16Rows::round`] with each row padded to `kp` (≥ `k`, even) inputs.
    pub(super) fn round_padded(a: &[f32], m: usize, k: usize, kp: usize) -> Self {
        debug_assert!(kp >= k && kp.is_multiple_of(PAIR));
        let mut values = vec![0u16; m * kp];
        for (dst, src) in values.chunks_exact_mut(kp.max(1)).zip(a.chunks_exact(k.max(1))).take(m) {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = round(s);
            }
        }
        Self { values, kp }
    }

    pub(super) fn rows(&self) -> usize {
        self.values.len() / self.kp.max(1)
    }

    /// Row `r`'s `kp` inputs.
    pub(super) fn row(&self, r: usize) -> &[u16] {
        &self.values[r * self.kp..(r + 1) * self.kp]
    }
}

/// Panel `p` of `w` for every row of `rows`, into `dst`.
pub(super) fn product(w: &Bf16Panels, rows: &Bf16Rows, p: usize, mut dst: Columns<'_>) {
    if rows.kp == 0 {
        return;
    }
    let panel = w.panel(p);
    #[cfg(target_arch = "x86_64")]
    if dot::available() {
        #[allow(unsafe_code)]
        // SAFETY: `available` checked every feature `dot::product` is compiled for; that is its only requirement.
        unsafe {
            dot::product(panel, rows, &mut dst)
        };
        return;
    }
    fallback_product(panel, rows, &mut dst);
}

/// [`product`] without `vdpbf16ps`: AVX2 + FMA when the CPU has them, else the portable baseline.
pub(super) fn fallback_product(panel: &[u16], rows: &Bf16Rows, dst: &mut Columns<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2 and FMA, checked just above; that is the only requirement of the call.
        unsafe {
            fallback_product_fma(panel, rows, dst)
        };
        return;
    }
    row_tiles!(rows.rows(), dst, fallback_tile[false](panel, rows));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fallback_product_fma(panel: &[u16], rows: &Bf16Rows, dst: &mut Columns<'_>) {
    row_tiles!(rows.rows(), dst, fallback_tile[true](panel, rows));
}

/// `R` rows from `row` against one panel, with `vdpbf16ps`'s arithmetic: both products of a pair are exact in f32
/// (so a fused and an unfused multiply-add round alike), added into the sum odd input first. Lane `i` of a pair of
/// inputs holds column `i`'s two weights, the even one in its low half: each widens with a shift or a mask.
#[inline(always)]
fn fallback_tile<const R: usize, const FMA: bool>(panel: &[u16], rows: &Bf16Rows, row: usize) -> [[f32; PANEL]; R] {
    if R == 1 {
        let one = fallback_one::<FMA>(panel, &rows.values[row * rows.kp..(row + 1) * rows.kp]);
        return std::array::from_fn(|_| one);
    }
    let mut out = [[0f32; PANEL]; R];
    for (g, lanes) in panel.chunks_exact(PANEL * PAIR).enumerate() {
        let (even, odd) = widen_pairs(lanes);
        for (r, out) in out.iter_mut().enumerate() {
            let x = &rows.values[(row + r) * rows.kp + g * PAIR..][..PAIR];
            let (x0, x1) = (widen(x[0]), widen(x[1]));
            for ((o, &e), &d) in out.iter_mut().zip(&even).zip(&odd) {
                *o = madd::<FMA>(e, x0, madd::<FMA>(d, x1, *o));
            }
        }
    }
    out
}

/// One row (`x`, `kp` inputs) against one panel in [`SETS`] sets of sums, as [`dot::tile`] does for one row.
#[inline(always)]
fn fallback_one<const FMA: bool>(panel: &[u16], x: &[u16]) -> [f32; PANEL] {
    let groups = x.len() / PAIR;
    let mut sums = [[0f32; PANEL]; SETS];
    for (g, lanes) in panel.chunks_exact(PANEL * PAIR).enumerate() {
        let (even, odd) = widen_pairs(lanes);
        let (x0, x1) = (widen(x[g * PAIR]), widen(x[g * PAIR + 1]));
        for ((o, &e), &d) in sums[set_of(g, groups)].iter_mut().zip(&even).zip(&odd) {
            *o = madd::<FMA>(e, x0, madd::<FMA>(d, x1, *o));
        }
    }
    std::array::from_fn(|i| (sums[0][i] + sums[1][i]) + (sums[2][i] + sums[3][i]))
}

/// A pair group's 16 lanes (column `i`: its even and odd input's weight, the even one in the low half) widened:
/// (even weights, odd weights).
#[inline(always)]
fn widen_pairs(lanes: &[u16]) -> ([f32; PANEL], [f32; PANEL]) {
    let lane: [u32; PANEL] = std::array::from_fn(|i| u32::from(lanes[2 * i]) | u32::from(lanes[2 * i + 1]) << 16);
    (
        std::array::from_fn(|i| f32::from_bits(lane[i] << 16)),
        std::array::from_fn(|i| f32::from_bits(lane[i] & 0xffff_0000)),
    )
}

#[cfg(target_arch = "x86_64")]
mod dot {
    use std::arch::x86_64::{
        __m256, __m256bh, __m256i, _mm256_add_ps, _mm256_dpbf16_ps, _mm256_loadu_si256, _mm256_set1_epi32,
        _mm256_setzero_ps, _mm256_storeu_ps,
    };

    use super::{Bf16Rows, Columns, PAIR, PANEL, ROWS, SETS, set_of, store};
    use crate::model::host::prefetch;

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bf16")]
    pub(super) fn product(panel: &[u16], rows: &Bf16Rows, dst: &mut Columns<'_>) {
        row_tiles!(2 * ROWS; rows.rows(), dst, tile[](panel, rows));
    }

    /// 16 bf16 values from `at` of `values` (eight columns' pair of inputs) as a 256-bit register.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bf16")]
    fn load(values: &[u16], at: usize) -> __m256bh {
        let chunk = &values[at..at + 16];
        #[allow(unsafe_code)]
        // SAFETY: `chunk` holds the 32 bytes read (an unaligned load has no other requirement), and a 256-bit
        // integer vector and a vector of 16 bf16 have the same size and any bits are valid for both.
        unsafe {
            std::mem::transmute::<__m256i, __m256bh>(_mm256_loadu_si256(chunk.as_ptr().cast()))
        }
    }

    /// A pair of bf16 inputs broadcast to every lane.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bf16")]
    fn broadcast(pair: &[u16]) -> __m256bh {
        let lane = (u32::from(pair[0]) | u32::from(pair[1]) << 16) as i32;
        #[allow(unsafe_code)]
        // SAFETY: same size, and any bits are a valid vector of bf16.
        unsafe {
            std::mem::transmute::<__m256i, __m256bh>(_mm256_set1_epi32(lane))
        }
    }

    /// `R` rows from `row` against one panel: per pair of inputs, `vdpbf16ps` adds both products into 8 columns'
    /// f32 sums, twice for the panel's 16.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bf16")]
    pub(super) fn tile<const R: usize>(panel: &[u16], rows: &Bf16Rows, row: usize) -> [[f32; PANEL]; R] {
        if R == 1 {
            let one = tile_one(panel, &rows.values[row * rows.kp..(row + 1) * rows.kp]);
            return std::array::from_fn(|_| one);
        }
        let mut out: [[__m256; 2]; R] = [[_mm256_setzero_ps(); 2]; R];
        // The loop reads through pointers: with a bounds check per row and load it spent about as many
        // instructions on checks and reloaded row addresses as on `vdpbf16ps`. What makes every read in bounds:
        let groups = rows.kp / PAIR;
        assert!(panel.len() >= groups * PANEL * PAIR);
        let x: [*const u16; R] = std::array::from_fn(|r| rows.row(row + r).as_ptr());
        let w = panel.as_ptr();
        for g in 0..groups {
            let at = g * PANEL * PAIR;
            prefetch(panel, at);
            #[allow(unsafe_code)]
            // SAFETY: `at + 32 <= groups * 32 <= panel.len()` (asserted above), and `x[r]` starts row `r`'s slice of
            // `kp = 2 * groups` inputs, so pair `g` (inputs `2g`, `2g + 1`) is in it; unaligned loads have no other
            // requirement, and any bits are valid bf16.
            let (w0, w1, pairs) = unsafe {
                let w0 = _mm256_loadu_si256(w.add(at).cast::<__m256i>());
                let w1 = _mm256_loadu_si256(w.add(at + 16).cast::<__m256i>());
                let pairs: [i32; R] = std::array::from_fn(|r| x[r].add(g * PAIR).cast::<i32>().read_unaligned());
                (std::mem::transmute::<__m256i, __m256bh>(w0), std::mem::transmute::<__m256i, __m256bh>(w1), pairs)
            };
            for r in 0..R {
                #[allow(unsafe_code)]
                // SAFETY: same size, and any bits are a valid vector of bf16.
                let xb = unsafe { std::mem::transmute::<__m256i, __m256bh>(_mm256_set1_epi32(pairs[r])) };
                out[r][0] = _mm256_dpbf16_ps(out[r][0], w0, xb);
                out[r][1] = _mm256_dpbf16_ps(out[r][1], w1, xb);
            }
        }
        let mut result = [[0f32; PANEL]; R];
        for (cols, acc) in result.iter_mut().zip(&out) {
            *cols = spill(acc);
        }
        result
    }

    /// One row (`x`, `kp` inputs) against one panel, in [`SETS`] sets of sums.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bf16")]
    fn tile_one(panel: &[u16], x: &[u16]) -> [f32; PANEL] {
        let groups = x.len() / PAIR;
        let mut sums = [[_mm256_setzero_ps(); 2]; SETS];
        let full = groups - groups % SETS;
        for first in (0..full).step_by(SETS) {
            for (s, sum) in sums.iter_mut().enumerate() {
                let g = first + s;
                prefetch(panel, g * PANEL * PAIR);
                let (w0, w1) = (load(panel, g * PANEL * PAIR), load(panel, g * PANEL * PAIR + 16));
                let xb = broadcast(&x[g * PAIR..g * PAIR + PAIR]);
                sum[0] = _mm256_dpbf16_ps(sum[0], w0, xb);
                sum[1] = _mm256_dpbf16_ps(sum[1], w1, xb);
            }
        }
        for g in full..groups {
            let sum = &mut sums[set_of(g, groups)];
            let (w0, w1) = (load(panel, g * PANEL * PAIR), load(panel, g * PANEL * PAIR + 16));
            let xb = broadcast(&x[g * PAIR..g * PAIR + PAIR]);
            sum[0] = _mm256_dpbf16_ps(sum[0], w0, xb);
            sum[1] = _mm256_dpbf16_ps(sum[1], w1, xb);
        }
        let half =
            |h: usize| _mm256_add_ps(_mm256_add_ps(sums[0][h], sums[1][h]), _mm256_add_ps(sums[2][h], sums[3][h]));
        spill(&[half(0), half(1)])
    }

    /// A panel's 16 sums out of their two registers.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bf16")]
    fn spill(acc: &[__m256; 2]) -> [f32; PANEL] {
        let mut cols = [0f32; PANEL];
        let (lo, hi) = cols.split_at_mut(8);
        #[allow(unsafe_code)]
        // SAFETY: `lo` and `hi` hold 8 floats each, what an unaligned 256-bit store writes.
        unsafe {
            _mm256_storeu_ps(lo.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(hi.as_mut_ptr(), acc[1]);
        }
        cols
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`round`] against `half` over every rounding case: exact halves with an even and an odd kept bit, just
    /// above and below them, the largest finite values (rounding up to infinity), subnormals, infinities, NaNs
    /// (signalling and quiet, both signs), and a sweep of bit patterns across the whole range.
    #[test]
    fn round_equals_half_for_every_kind_of_value() {
        let edges = [
            0x3f80_8000u32,
            0x3f81_8000,
            0x3f80_8001,
            0x3f80_7fff,
            0x7f7f_ffff,
            0x7f7f_8000,
            0x0000_0001,
            0x0000_8000,
            0x0001_8000,
            0x007f_ffff,
            0x7f80_0000,
            0x7f80_0001,
            0x7fc0_0000,
            0x7fff_ffff,
            0x0000_0000,
        ];
        let sweep = (0..1u32 << 20).map(|i| i.wrapping_mul(4093).wrapping_mul(0x9e37_79b9));
        for bits in edges.into_iter().flat_map(|b| [b, b | 0x8000_0000]).chain(sweep) {
            let x = f32::from_bits(bits);
            assert_eq!(round(x), half::bf16::from_f32(x).to_bits(), "{bits:#010x}");
        }
    }
}
