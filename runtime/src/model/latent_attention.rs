//! Fused absorbed-MLA attention for f32 pools in host memory: one pass per sequence straight over its cache
//! blocks — no gathers, no per-sequence tensor ops. At tiny-model sizes the candle path spends more time
//! dispatching its per-sequence ops than computing; this kernel makes a decode step's attention cost grow with the
//! work, not with the number of sequences.

use rayon::prelude::*;

/// One sequence's query rows in the packed batch and where its context lives.
#[derive(Debug, Clone, Copy)]
pub struct KernelSeq<'a> {
    /// First row of this sequence's new tokens in the packed batch.
    pub start: usize,
    /// New tokens.
    pub len: usize,
    /// Tokens cached before the new ones.
    pub past: usize,
    pub blocks: &'a [u32],
}

/// Absorbed attention. `q` is `[tokens, heads, width]` (scaled `[q_lat | q_pe]`), `pool` a layer's rows
/// (`width` values per slot), `block_size` tokens per block. Returns, for the given sequences in order, the
/// attended latents `[Σ len, heads, rank]` (the first `rank` values of each row are the compressed KV).
pub fn absorbed_attention(
    q: &[f32],
    heads: usize,
    width: usize,
    rank: usize,
    pool: &[f32],
    block_size: usize,
    seqs: &[KernelSeq<'_>],
) -> Vec<f32> {
    let per_seq: Vec<Vec<f32>> =
        seqs.par_iter().map(|s| attend_sequence(q, heads, width, rank, pool, block_size, s)).collect();
    per_seq.concat()
}

/// Runs the kernel compiled for AVX2 when the CPU has it (the portable x86-64 baseline is SSE2, half the width).
fn attend_sequence(
    q: &[f32],
    heads: usize,
    width: usize,
    rank: usize,
    pool: &[f32],
    block_size: usize,
    s: &KernelSeq<'_>,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2, checked just above; that is the only requirement of the call.
        return unsafe { attend_sequence_avx2(q, heads, width, rank, pool, block_size, s) };
    }
    attend_sequence_portable(q, heads, width, rank, pool, block_size, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn attend_sequence_avx2(
    q: &[f32],
    heads: usize,
    width: usize,
    rank: usize,
    pool: &[f32],
    block_size: usize,
    s: &KernelSeq<'_>,
) -> Vec<f32> {
    attend_sequence_portable(q, heads, width, rank, pool, block_size, s)
}

#[inline(always)]
fn attend_sequence_portable(
    q: &[f32],
    heads: usize,
    width: usize,
    rank: usize,
    pool: &[f32],
    block_size: usize,
    s: &KernelSeq<'_>,
) -> Vec<f32> {
    let total = s.past + s.len;
    // Rows of the first `n` keys, block by block (no division per key): slices of whole blocks, the last cut
    // short.
    let spans = |n: usize| {
        s.blocks.iter().enumerate().map_while(move |(i, &b)| {
            let first = i * block_size;
            (first < n).then(|| {
                let base = b as usize * block_size * width;
                &pool[base..base + (n - first).min(block_size) * width]
            })
        })
    };
    let mut out = vec![0f32; s.len * heads * rank];
    let mut scores = vec![0f32; total];
    for j in 0..s.len {
        let visible = s.past + j + 1; // causal: query at position past + j sees keys 0..=past + j
        let q_tok = &q[(s.start + j) * heads * width..(s.start + j + 1) * heads * width];
        for h in 0..heads {
            // Scores of this head against every visible key, then a numerically stable softmax.
            let q_h = &q_tok[h * width..(h + 1) * width];
            let sc = &mut scores[..visible];
            let mut max = f32::NEG_INFINITY;
            let mut k = 0;
            for span in spans(visible) {
                for key in span.chunks_exact(width) {
                    let v = dot(q_h, key);
                    sc[k] = v;
                    max = max.max(v);
                    k += 1;
                }
            }
            // Two loops the compiler vectorizes: exponentials eight at a time, then a sum in eight lanes.
            for v in sc.iter_mut() {
                *v = exp_nonpositive(*v - max);
            }
            let inv = 1.0 / sum8(sc);
            // Weighted sum of the latent part of the rows, in register-sized tiles kept across all keys.
            let o_h = &mut out[(j * heads + h) * rank..(j * heads + h + 1) * rank];
            let mut tile = 0;
            while tile + TILE <= rank {
                let mut acc = [0f32; TILE];
                let mut k = 0;
                for span in spans(visible) {
                    for key in span.chunks_exact(width) {
                        let (w, r) = (sc[k], &key[tile..tile + TILE]);
                        for i in 0..TILE {
                            acc[i] += w * r[i];
                        }
                        k += 1;
                    }
                }
                for i in 0..TILE {
                    o_h[tile + i] = acc[i] * inv;
                }
                tile += TILE;
            }
            let mut k = 0;
            for span in spans(visible) {
                for key in span.chunks_exact(width) {
                    let w = sc[k];
                    for (o, &x) in o_h[tile..].iter_mut().zip(&key[tile..rank]) {
                        *o += w * x;
                    }
                    k += 1;
                }
            }
            o_h[tile..].iter_mut().for_each(|o| *o *= inv);
        }
    }
    out
}

/// `exp(x)` for `x <= 0` (softmax scores minus their maximum), within about 2 ulp of `f32::exp`: `2^n · exp(r)`
/// with `n = round(x / ln 2)` and a degree-6 polynomial for `exp(r)` on `|r| <= ln 2 / 2` (Cephes' `expf`
/// coefficients). Branch-free and inlined, so a loop over it vectorizes, unlike the libm call. Below -87.3 the
/// result is ~1e-38 instead of a denormal or 0, which changes no softmax (its largest term is 1).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.3);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n as a float: n is in [-126, 0] here, so the biased exponent n + 127 is in [1, 127].
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Sum in eight independent lanes (vectorizable, unlike a sequential float sum).
#[inline(always)]
fn sum8(values: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Floats of the output accumulated in registers at a time (four AVX registers).
const TILE: usize = 32;

/// Dot product with eight independent accumulators, so the compiler vectorizes it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_for_every_tail_length() {
        for n in 0..20 {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 2.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-4);
        }
    }

    #[test]
    fn the_fast_exponential_matches_std_within_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = 0f32;
        while x > -87.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x -= 0.000_37;
        }
        assert!(worst < 4.0 * f32::EPSILON, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        assert!((sum8(&[1.0; 19]) - 19.0).abs() < 1e-6);
    }

    #[test]
    fn single_key_attends_fully_to_it() {
        // One head, width 3, rank 2: one cached token in block 5 of size 2.
        let mut pool = vec![0f32; 6 * 2 * 3];
        pool[5 * 2 * 3..5 * 2 * 3 + 3].copy_from_slice(&[1.0, 2.0, 3.0]);
        let q = [0.3, -0.1, 0.7];
        let out = absorbed_attention(&q, 1, 3, 2, &pool, 2, &[KernelSeq { start: 0, len: 1, past: 0, blocks: &[5] }]);
        assert_eq!(out, vec![1.0, 2.0]);
    }

    /// The kernel against a plain reference (f64, slot = block * size + offset for every key) on scattered
    /// blocks, several block sizes, prefill and decode rows, and contexts ending inside and at block borders.
    #[test]
    fn the_kernel_equals_a_plain_reference_over_scattered_blocks() {
        let (heads, width, rank) = (3, 12, 8);
        let value = |i: usize| ((i as f32) * 0.731).sin();
        for block_size in [1usize, 4, 16] {
            let blocks_total = 64;
            let pool: Vec<f32> = (0..blocks_total * block_size * width).map(value).collect();
            for (past, len) in [(0usize, 1usize), (0, 9), (15, 1), (16, 1), (5, 12), (47, 3)] {
                let total = past + len;
                let n_blocks = total.div_ceil(block_size);
                let blocks: Vec<u32> = (0..n_blocks).map(|i| ((i * 37 + 11) % blocks_total) as u32).collect();
                let q: Vec<f32> = (0..(2 + len) * heads * width).map(|i| value(i + 5) * 0.5).collect();
                let seq = KernelSeq { start: 2, len, past, blocks: &blocks };
                let got = absorbed_attention(&q, heads, width, rank, &pool, block_size, &[seq]);
                let key = |k: usize| {
                    let slot = blocks[k / block_size] as usize * block_size + k % block_size;
                    &pool[slot * width..(slot + 1) * width]
                };
                for j in 0..len {
                    for h in 0..heads {
                        let q_h = &q[((2 + j) * heads + h) * width..((2 + j) * heads + h + 1) * width];
                        let visible = past + j + 1;
                        let scores: Vec<f64> = (0..visible)
                            .map(|k| q_h.iter().zip(key(k)).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum())
                            .collect();
                        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                        let sum: f64 = weights.iter().sum();
                        for c in 0..rank {
                            let want: f64 = (0..visible).map(|k| weights[k] * f64::from(key(k)[c])).sum::<f64>() / sum;
                            let have = f64::from(got[(j * heads + h) * rank + c]);
                            assert!(
                                (have - want).abs() < 1e-5,
                                "block {block_size}, past {past}, len {len}, row {j}, head {h}, col {c}: {have} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
