//! FP8 weights kept as FP8 (`--quantize fp8`): a DeepSeek-V3 checkpoint's `float8_e4m3fn` values, one byte per
//! weight, with the checkpoint's block scales (`weight_scale_inv`, 128×128 blocks) stored per column and block of
//! inputs (each column of a block carries its block's scale).
//!
//! Every e4m3 value is exactly a bf16 value, so a product is the bf16 kernel's arithmetic ([`super::bf16`]) on the
//! decoded weights: inputs rounded to bf16, each block's sums exact products added in f32, then multiplied by the
//! column's scale and added into the column's total (one fused multiply-add per block). With AVX-512 VBMI and BF16
//! the decoding is two `vpermi2b` table lookups per 64 weights (the high and the low byte of each magnitude's bf16,
//! the sign or-ed in) and the products are `vdpbf16ps`; without them a fallback computes the same values — except
//! that `vdpbf16ps` flushes subnormal inputs and results to zero (as in [`super::bf16`]).

use super::bf16::{Bf16Rows, widen};
use super::{Columns, PANEL, ROWS, madd, store};
use crate::error::{Error, Result};
use crate::weights::fp8::{E4M3_TO_F32, e4m3_to_bf16_bits};

/// Each byte's value as the AVX-512 kernel decodes it: the magnitude's bf16 with the sign bit or-ed in (so `0xFF`
/// is a NaN with the sign set, bit for bit what that kernel multiplies).
static DECODED: [f32; 256] = decoded_table();

const fn decoded_table() -> [f32; 256] {
    let mut table = [0f32; 256];
    let mut b = 0;
    while b < 256 {
        let bits = e4m3_to_bf16_bits((b & 0x7F) as u8) | ((b as u16 & 0x80) << 8);
        table[b] = f32::from_bits((bits as u32) << 16);
        b += 1;
    }
    table
}

/// Inputs of a column decoded together: one 64-byte load holds four inputs of the panel's 16 columns.
pub(super) const QUAD: usize = 4;
/// Inputs per 32-bit lane of a `vdpbf16ps`.
const PAIR: usize = 2;
/// Bytes of one quad of a panel.
const QUAD_BYTES: usize = QUAD * PANEL;
/// Sets of sums a row alone keeps apart (pair `g` of a block adds into set `g % SETS`), as in [`super::bf16`].
const SETS: usize = 4;

/// Refuses a checkpoint's `weight_block_size` these panels cannot hold: both sides positive, the input side a
/// multiple of [`QUAD`] (DeepSeek-V3: 128 × 128).
pub(super) fn check_block(block: [usize; 2]) -> Result<()> {
    if block[0] == 0 || block[1] == 0 || !block[1].is_multiple_of(QUAD) {
        return Err(Error::Setting {
            name: "quantize".into(),
            reason: format!(
                "fp8 weights need blocks whose input side is a positive multiple of {QUAD}; this checkpoint's \
                 weight_block_size is {block:?} (use --quantize none to dequantize at load)"
            ),
        });
    }
    Ok(())
}

/// The input length rounded up to whole quads (padding is a zero weight and a zero input).
pub(super) fn padded(k: usize) -> usize {
    k.div_ceil(QUAD) * QUAD
}

/// Where input `kk` of column `i` sits in a panel: quads of 64 bytes, each laid out so that unpacking its low and
/// high bytes (`vpunpcklbw`/`vpunpckhbw`, which interleave within 128-bit lanes) yields the bf16 pairs of its first
/// and its second pair of inputs in the [`super::bf16`] pair layout (column `i`'s even input in 16-bit word `2i`).
#[inline(always)]
fn position(kk: usize, i: usize) -> usize {
    let (quad, t) = (kk / QUAD, kk % QUAD);
    let word = 2 * i + t % PAIR;
    quad * QUAD_BYTES + 16 * (word / 8) + 8 * (t / PAIR) + word % 8
}

/// A packed matrix's panels in FP8: `values` `[panels][kq / 4][64]` e4m3 bytes ([`position`]), `scales`
/// `[panels][ceil(k / block)][PANEL]`.
#[derive(Clone)]
pub(super) struct Fp8Panels {
    values: Vec<u8>,
    scales: Vec<f32>,
    k: usize,
    block: usize,
}

impl Fp8Panels {
    /// Packs `n_panels` panels of `k` inputs: `byte(p, kk, i)` the e4m3 byte of column `i` of panel `p` at input
    /// `kk`, `scale(p, b, i)` that column's scale for inputs `b * block..(b + 1) * block`. `block` is a multiple of
    /// [`QUAD`] ([`check_block`], by the caller).
    pub(super) fn pack(
        n_panels: usize,
        k: usize,
        block: usize,
        byte: impl Fn(usize, usize, usize) -> u8,
        scale: impl Fn(usize, usize, usize) -> f32,
    ) -> Self {
        debug_assert!(block > 0 && block.is_multiple_of(QUAD));
        let (kq, blocks) = (padded(k), k.div_ceil(block));
        let mut values = vec![0u8; n_panels * kq * PANEL];
        let mut scales = vec![0f32; n_panels * blocks * PANEL];
        for p in 0..n_panels {
            let panel = &mut values[p * kq * PANEL..(p + 1) * kq * PANEL];
            for i in 0..PANEL {
                for kk in 0..k {
                    panel[position(kk, i)] = byte(p, kk, i);
                }
                for b in 0..blocks {
                    scales[(p * blocks + b) * PANEL + i] = scale(p, b, i);
                }
            }
        }
        Self { values, scales, k, block }
    }

    /// Panel `p`: its bytes and its scales.
    fn panel(&self, p: usize) -> (&[u8], &[f32]) {
        let (len, scales) = (padded(self.k) * PANEL, self.k.div_ceil(self.block) * PANEL);
        (&self.values[p * len..(p + 1) * len], &self.scales[p * scales..(p + 1) * scales])
    }

    /// Weight `[column i of panel p, input kk]`: its e4m3 value times its scale.
    pub(super) fn weight(&self, p: usize, kk: usize, i: usize) -> f32 {
        let (values, scales) = self.panel(p);
        E4M3_TO_F32[usize::from(values[position(kk, i)])] * scales[kk / self.block * PANEL + i]
    }

    pub(super) fn bytes(&self) -> usize {
        std::mem::size_of_val(self.values.as_slice()) + std::mem::size_of_val(self.scales.as_slice())
    }
}

/// The input rows of a product with `w`: rounded to bf16 and padded to whole quads.
pub(super) fn rows(w: &Fp8Panels, a: &[f32], m: usize) -> Bf16Rows {
    Bf16Rows::round_padded(a, m, w.k, padded(w.k))
}

/// Panel `p` of `w` for every row of `rows` (from [`rows`]), into `dst`.
pub(super) fn product(w: &Fp8Panels, rows: &Bf16Rows, p: usize, mut dst: Columns<'_>) {
    if w.k == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if dot::available() {
        #[allow(unsafe_code)]
        // SAFETY: `available` checked every feature `dot::product` is compiled for; that is its only requirement.
        unsafe {
            dot::product(w, rows, p, &mut dst)
        };
        return;
    }
    fallback_product(w, rows, p, &mut dst);
}

/// [`product`] without AVX-512 VBMI and BF16: a table decode and [`super::bf16`]'s fallback arithmetic, with FMA
/// when the CPU has it (the results are the same either way).
pub(super) fn fallback_product(w: &Fp8Panels, rows: &Bf16Rows, p: usize, dst: &mut Columns<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2 and FMA, checked just above; that is the only requirement of the call.
        unsafe {
            fallback_product_fma(w, rows, p, dst)
        };
        return;
    }
    row_tiles!(rows.rows(), dst, fallback_tile[false](w, p, rows));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fallback_product_fma(w: &Fp8Panels, rows: &Bf16Rows, p: usize, dst: &mut Columns<'_>) {
    row_tiles!(rows.rows(), dst, fallback_tile[true](w, p, rows));
}

/// `R` rows from `row` against panel `p`, with the arithmetic of [`dot::tile`]: per block, each pair of inputs adds
/// both (exact) products into the row's block sum, the odd input first (a row alone: into [`SETS`] sums, added
/// `(s0 + s1) + (s2 + s3)`); the block sum times the column's scale is added into the total in one rounding.
#[inline(always)]
fn fallback_tile<const R: usize, const FMA: bool>(
    w: &Fp8Panels,
    p: usize,
    rows: &Bf16Rows,
    row: usize,
) -> [[f32; PANEL]; R] {
    let (values, scales) = w.panel(p);
    let x: [&[u16]; R] = std::array::from_fn(|r| rows.row(row + r));
    let kq = padded(w.k);
    let mut total = [[0f32; PANEL]; R];
    for (b, scale) in scales.chunks_exact(PANEL).enumerate() {
        let first = b * w.block;
        let mut sums = [[[0f32; PANEL]; SETS]; R];
        for (g, kk) in (first..kq.min(first + w.block)).step_by(PAIR).enumerate() {
            let decode =
                |kk: usize| -> [f32; PANEL] { std::array::from_fn(|i| DECODED[usize::from(values[position(kk, i)])]) };
            let (even, odd) = (decode(kk), decode(kk + 1));
            let set = if R == 1 { g % SETS } else { 0 };
            for (r, sums) in sums.iter_mut().enumerate() {
                let (x0, x1) = (widen(x[r][kk]), widen(x[r][kk + 1]));
                for ((o, &e), &d) in sums[set].iter_mut().zip(&even).zip(&odd) {
                    *o = madd::<FMA>(e, x0, madd::<FMA>(d, x1, *o));
                }
            }
        }
        for (total, s) in total.iter_mut().zip(&sums) {
            for i in 0..PANEL {
                let sum = if R == 1 { (s[0][i] + s[1][i]) + (s[2][i] + s[3][i]) } else { s[0][i] };
                total[i] = sum.mul_add(scale[i], total[i]);
            }
        }
    }
    total
}

/// The high and the low bytes of the bf16 of each e4m3 magnitude (`0..128`), the tables `vpermi2b` looks up.
const fn bf16_byte_table(high: bool) -> [u8; 128] {
    let mut table = [0u8; 128];
    let mut m = 0;
    while m < 128 {
        let bits = e4m3_to_bf16_bits(m as u8);
        table[m] = if high { (bits >> 8) as u8 } else { bits as u8 };
        m += 1;
    }
    table
}

static HIGH_BYTES: [u8; 128] = bf16_byte_table(true);
static LOW_BYTES: [u8; 128] = bf16_byte_table(false);

#[cfg(target_arch = "x86_64")]
mod dot {
    use std::arch::x86_64::{
        __m512, __m512bh, __m512i, _mm512_dpbf16_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_loadu_si512,
        _mm512_permutex2var_epi8, _mm512_set1_epi8, _mm512_set1_epi32, _mm512_setzero_ps, _mm512_storeu_ps,
        _mm512_ternarylogic_epi32, _mm512_unpackhi_epi8, _mm512_unpacklo_epi8,
    };

    use super::{Bf16Rows, Columns, Fp8Panels, HIGH_BYTES, LOW_BYTES, PAIR, PANEL, QUAD, QUAD_BYTES, ROWS, SETS};
    use super::{padded, store};
    use crate::model::host::prefetch;

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16")]
    pub(super) fn product(w: &Fp8Panels, rows: &Bf16Rows, p: usize, dst: &mut Columns<'_>) {
        row_tiles!(2 * ROWS; rows.rows(), dst, tile[](w, p, rows));
    }

    /// 64 bytes from `at` of `bytes` as a 512-bit register.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16")]
    fn load(bytes: &[u8], at: usize) -> __m512i {
        let chunk = &bytes[at..at + 64];
        #[allow(unsafe_code)]
        // SAFETY: `chunk` holds the 64 bytes read; an unaligned load has no other requirement.
        unsafe {
            _mm512_loadu_si512(chunk.as_ptr().cast())
        }
    }

    /// Reinterprets 32 16-bit lanes as 32 bf16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16")]
    fn as_bf16(v: __m512i) -> __m512bh {
        #[allow(unsafe_code)]
        // SAFETY: same size, and any bits are a valid vector of bf16.
        unsafe {
            std::mem::transmute::<__m512i, __m512bh>(v)
        }
    }

    /// A pair of bf16 inputs broadcast to every lane.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16")]
    fn broadcast(pair: &[u16]) -> __m512bh {
        as_bf16(_mm512_set1_epi32((u32::from(pair[0]) | u32::from(pair[1]) << 16) as i32))
    }

    /// `R` rows from `row` against panel `p`: per quad, 64 bytes decode to the bf16 pairs of two pairs of inputs,
    /// each one `vdpbf16ps` per row into the row's block sum; per block, the sum times the columns' scales is added
    /// into the total.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16")]
    pub(super) fn tile<const R: usize>(w: &Fp8Panels, p: usize, rows: &Bf16Rows, row: usize) -> [[f32; PANEL]; R] {
        let (values, scales) = w.panel(p);
        let x: [&[u16]; R] = std::array::from_fn(|r| rows.row(row + r));
        // The tables in two halves: `vpermi2b` picks from the first with index bit 6 clear, else the second.
        let (high_0, high_1) = (load(&HIGH_BYTES, 0), load(&HIGH_BYTES, 64));
        let (low_0, low_1) = (load(&LOW_BYTES, 0), load(&LOW_BYTES, 64));
        let sign = _mm512_set1_epi8(0x80u8 as i8);
        let kq = padded(w.k);
        let mut total = [_mm512_setzero_ps(); R];
        for (b, scale) in scales.chunks_exact(PANEL).enumerate() {
            let first = b * w.block / QUAD;
            let mut sums = [[_mm512_setzero_ps(); SETS]; R];
            for q in first..(kq.min((b + 1) * w.block) / QUAD) {
                prefetch(values, q * QUAD_BYTES);
                let bytes = load(values, q * QUAD_BYTES);
                // Bit 7 of an index is ignored: the magnitude picks its bytes; the sign goes into the high byte.
                let hi = _mm512_permutex2var_epi8(high_0, bytes, high_1);
                let lo = _mm512_permutex2var_epi8(low_0, bytes, low_1);
                let hi = _mm512_ternarylogic_epi32::<0xF8>(hi, bytes, sign);
                let (first_pair, second_pair) =
                    (as_bf16(_mm512_unpacklo_epi8(lo, hi)), as_bf16(_mm512_unpackhi_epi8(lo, hi)));
                // Pair `g` of the block adds into set `g % SETS` for a row alone, else into the row's one sum.
                let set = if R == 1 { (2 * (q - first)) % SETS } else { 0 };
                for r in 0..R {
                    let at = q * QUAD;
                    let (x0, x1) = (broadcast(&x[r][at..at + PAIR]), broadcast(&x[r][at + PAIR..at + QUAD]));
                    if R == 1 {
                        sums[r][set] = _mm512_dpbf16_ps(sums[r][set], first_pair, x0);
                        sums[r][set + 1] = _mm512_dpbf16_ps(sums[r][set + 1], second_pair, x1);
                    } else {
                        sums[r][0] = _mm512_dpbf16_ps(sums[r][0], first_pair, x0);
                        sums[r][0] = _mm512_dpbf16_ps(sums[r][0], second_pair, x1);
                    }
                }
            }
            let scale = {
                #[allow(unsafe_code)]
                // SAFETY: `scale` holds the 16 floats read; an unaligned load has no other requirement.
                unsafe {
                    _mm512_loadu_ps(scale.as_ptr())
                }
            };
            for r in 0..R {
                let sum = if R == 1 { add_sets(&sums[r]) } else { sums[r][0] };
                total[r] = _mm512_fmadd_ps(sum, scale, total[r]);
            }
        }
        let mut result = [[0f32; PANEL]; R];
        for (cols, acc) in result.iter_mut().zip(&total) {
            #[allow(unsafe_code)]
            // SAFETY: `cols` holds 16 floats, what an unaligned 512-bit store writes.
            unsafe {
                _mm512_storeu_ps(cols.as_mut_ptr(), *acc)
            };
        }
        result
    }

    /// `(s0 + s1) + (s2 + s3)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16")]
    fn add_sets(s: &[__m512; SETS]) -> __m512 {
        use std::arch::x86_64::_mm512_add_ps;
        _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]))
    }
}
