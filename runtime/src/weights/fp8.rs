//! FP8 (OCP `e4m3fn`) decoding and DeepSeek-V3 block-wise dequantization.
//!
//! `e4m3fn`: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no infinities; `0x7F`/`0xFF` are NaN;
//! exponent 0 encodes subnormals `mantissa / 8 * 2^-6`. Largest finite value: `0x7E` = 448.

/// All 256 `e4m3fn` values as f32, indexed by the raw byte.
pub static E4M3_TO_F32: [f32; 256] = e4m3_table();

const fn e4m3_table() -> [f32; 256] {
    let mut table = [0f32; 256];
    let mut b = 0usize;
    while b < 256 {
        table[b] = e4m3_decode(b as u8);
        b += 1;
    }
    table
}

/// The bf16 bit pattern of an `e4m3fn` byte's value: exact, since every e4m3 value has at most four significant
/// bits (subnormals become normal bf16 values; NaN stays NaN).
pub const fn e4m3_to_bf16_bits(b: u8) -> u16 {
    (e4m3_decode(b).to_bits() >> 16) as u16
}

/// Decodes one `e4m3fn` byte (exact: every value is representable in f32).
const fn e4m3_decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
    let exp = ((b >> 3) & 0x0F) as i32;
    let mant = (b & 0x07) as f32;
    if exp == 0x0F && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    let (significand, exp2) = if exp == 0 { (mant / 8.0, -6) } else { (1.0 + mant / 8.0, exp - 7) };
    // 2^exp2 by repeated doubling/halving: exact and usable in a const fn.
    let mut scale = 1.0f32;
    let mut e = exp2;
    while e > 0 {
        scale *= 2.0;
        e -= 1;
    }
    while e < 0 {
        scale *= 0.5;
        e += 1;
    }
    sign * significand * scale
}

/// Decodes `e4m3fn` bytes to f32 without scaling (FP8 tensors that have no `_scale_inv` companion).
pub fn decode(q: &[u8]) -> Vec<f32> {
    q.iter().map(|&b| E4M3_TO_F32[b as usize]).collect()
}

/// Block-wise dequantization of a row-major `[rows, cols]` FP8 matrix:
/// `w[i, j] = e4m3(q[i, j]) * scale_inv[i / br, j / bc]`, with `scale_inv` row-major
/// `[ceil(rows / br), ceil(cols / bc)]` (edge blocks may be partial). Callers check the lengths; this returns
/// `None` when they disagree.
pub fn dequant_blocks(q: &[u8], rows: usize, cols: usize, scale_inv: &[f32], block: [usize; 2]) -> Option<Vec<f32>> {
    let [br, bc] = block;
    if br == 0 || bc == 0 || q.len() != rows.checked_mul(cols)? {
        return None;
    }
    let scale_cols = cols.div_ceil(bc);
    if scale_inv.len() != rows.div_ceil(br) * scale_cols {
        return None;
    }
    let mut out = vec![0f32; q.len()];
    if cols == 0 {
        return Some(out);
    }
    for (i, (q_row, out_row)) in q.chunks_exact(cols).zip(out.chunks_exact_mut(cols)).enumerate() {
        let scales = &scale_inv[(i / br) * scale_cols..(i / br + 1) * scale_cols];
        for ((q_blk, out_blk), &s) in q_row.chunks(bc).zip(out_row.chunks_mut(bc)).zip(scales) {
            for (o, &b) in out_blk.iter_mut().zip(q_blk) {
                *o = E4M3_TO_F32[b as usize] * s;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values_decode_exactly() {
        assert_eq!(E4M3_TO_F32[0x00], 0.0);
        assert_eq!(E4M3_TO_F32[0x80].to_bits(), (-0.0f32).to_bits());
        assert_eq!(E4M3_TO_F32[0x38], 1.0);
        assert_eq!(E4M3_TO_F32[0xB8], -1.0);
        assert_eq!(E4M3_TO_F32[0x40], 2.0);
        assert_eq!(E4M3_TO_F32[0x7E], 448.0);
        assert_eq!(E4M3_TO_F32[0xFE], -448.0);
        assert_eq!(E4M3_TO_F32[0x01], 2f32.powi(-9));
        assert_eq!(E4M3_TO_F32[0x07], 7.0 * 2f32.powi(-9));
        assert_eq!(E4M3_TO_F32[0x08], 2f32.powi(-6));
        assert_eq!(E4M3_TO_F32[0x3C], 1.5);
        assert!(E4M3_TO_F32[0x7F].is_nan());
        assert!(E4M3_TO_F32[0xFF].is_nan());
        // No infinities, and exactly two NaN encodings.
        assert!(E4M3_TO_F32.iter().all(|v| !v.is_infinite()));
        assert_eq!(E4M3_TO_F32.iter().filter(|v| v.is_nan()).count(), 2);
    }

    /// Every byte's bf16 pattern widens back to the byte's f32 value (NaN to NaN).
    #[test]
    fn e4m3_bf16_bits_are_exact() {
        for b in 0..=255u8 {
            let widened = f32::from_bits(u32::from(e4m3_to_bf16_bits(b)) << 16);
            let want = E4M3_TO_F32[b as usize];
            assert!(widened.to_bits() == want.to_bits() || (widened.is_nan() && want.is_nan()), "{b:#04x}");
        }
    }

    #[test]
    fn e4m3_table_matches_candle_f8e4m3_conversion() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let t =
            candle_core::Tensor::from_raw_buffer(&bytes, candle_core::DType::F8E4M3, &[256], &candle_core::Device::Cpu)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        for (b, (ours, theirs)) in E4M3_TO_F32.iter().zip(&t).enumerate() {
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "{b:#x}: {ours} vs {theirs}"
            );
        }
    }

    #[test]
    fn e4m3_codes_are_sign_magnitude_and_monotonic() {
        // Every finite positive code is monotonically increasing (the format is sign-magnitude).
        for b in 1..0x7Fusize {
            assert!(E4M3_TO_F32[b] > E4M3_TO_F32[b - 1], "code {b:#x}");
            assert_eq!(E4M3_TO_F32[b | 0x80], -E4M3_TO_F32[b]);
        }
    }

    #[test]
    fn block_dequant_handles_partial_edge_blocks() {
        // 3x5 matrix, block [2, 2] → scales 2x3; the last block row and column are partial.
        let q: Vec<u8> = vec![
            0x38, 0x40, 0x38, 0x40, 0x38, //
            0xB8, 0x00, 0x3C, 0x38, 0x40, //
            0x38, 0x38, 0x40, 0x40, 0xB8,
        ];
        let scales = [1.0, 10.0, 100.0, 0.5, 0.25, -2.0];
        let w = dequant_blocks(&q, 3, 5, &scales, [2, 2]).unwrap();
        let expect = [
            1.0, 2.0, 10.0, 20.0, 100.0, //
            -1.0, 0.0, 15.0, 10.0, 200.0, //
            0.5, 0.5, 0.5, 0.5, 2.0,
        ];
        assert_eq!(w, expect);
    }

    #[test]
    fn block_dequant_rejects_mismatched_lengths() {
        assert!(dequant_blocks(&[0x38; 6], 2, 3, &[1.0], [2, 2]).is_none());
        assert!(dequant_blocks(&[0x38; 5], 2, 3, &[1.0, 1.0], [2, 2]).is_none());
        assert!(dequant_blocks(&[0x38; 6], 2, 3, &[1.0, 1.0], [0, 2]).is_none());
        assert_eq!(dequant_blocks(&[0x38; 6], 2, 3, &[1.0, 3.0], [2, 2]).unwrap(), [1.0, 1.0, 3.0, 1.0, 1.0, 3.0]);
    }
}
