//! Fused absorbed-MLA attention for f32 pools in host memory: one pass per sequence straight over its cache
//! blocks — no gathers, no per-sequence tensor ops. At tiny-model sizes the candle path spends more time
//! dispatching its per-sequence ops than computing; this kernel makes a decode step's attention cost grow with the
//! work, not with the number of sequences.

use rayon::prelude::*;

use super::host::{dot, exp_nonpositive, sum8};

/// What every sequence of one call shares: the queries `[tokens, heads, width]`, a layer's pool rows (`width`
/// values per slot) and the pool's block size; the first `rank` values of a row are the compressed KV.
#[derive(Debug, Clone, Copy)]
struct Batch<'a> {
    q: &'a [f32],
    heads: usize,
    width: usize,
    rank: usize,
    pool: &'a [f32],
    block_size: usize,
}

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
    let per_row = heads * rank;
    let mut out = vec![0f32; seqs.iter().map(|s| s.len).sum::<usize>() * per_row];
    // Each sequence writes its own rows of the output.
    let mut parts: Vec<(&KernelSeq<'_>, &mut [f32])> = Vec::with_capacity(seqs.len());
    let mut rest = out.as_mut_slice();
    for s in seqs {
        let (mine, tail) = rest.split_at_mut(s.len * per_row);
        parts.push((s, mine));
        rest = tail;
    }
    let batch = Batch { q, heads, width, rank, pool, block_size };
    let run = |(s, o): &mut (&KernelSeq<'_>, &mut [f32])| attend_sequence(&batch, s, o);
    if parts.len() > 1 && rayon::current_num_threads() > 1 {
        parts.par_iter_mut().for_each(run);
    } else {
        parts.iter_mut().for_each(run);
    }
    out
}

/// Picks the kernel for the CPU and the shapes: AVX2 + FMA over groups of four heads when the rows are whole
/// registers (every DeepSeek configuration), else the portable loops (compiled for AVX2 when the CPU has it; the
/// x86-64 baseline is SSE2, half the width).
fn attend_sequence(b: &Batch<'_>, s: &KernelSeq<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx::fits(b.heads, b.width, b.rank)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            #[allow(unsafe_code)]
            // SAFETY: the CPU supports AVX2 and FMA, checked just above; that is the only requirement of the call.
            unsafe {
                avx::attend_sequence(b, s, out)
            };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            #[allow(unsafe_code)]
            // SAFETY: the CPU supports AVX2, checked just above; that is the only requirement of the call.
            unsafe {
                attend_sequence_avx2(b, s, out)
            };
            return;
        }
    }
    attend_sequence_portable(b, s, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn attend_sequence_avx2(b: &Batch<'_>, s: &KernelSeq<'_>, out: &mut [f32]) {
    attend_sequence_portable(b, s, out)
}

/// Rows of the first `n` keys of a sequence, block by block (no division per key): slices of whole blocks, the
/// last cut short.
#[inline(always)]
fn spans<'a>(
    pool: &'a [f32],
    blocks: &'a [u32],
    block_size: usize,
    width: usize,
    n: usize,
) -> impl Iterator<Item = &'a [f32]> + 'a {
    blocks.iter().enumerate().map_while(move |(i, &b)| {
        let first = i * block_size;
        (first < n).then(|| {
            let base = b as usize * block_size * width;
            &pool[base..base + (n - first).min(block_size) * width]
        })
    })
}

#[inline(always)]
fn attend_sequence_portable(b: &Batch<'_>, s: &KernelSeq<'_>, out: &mut [f32]) {
    let Batch { q, heads, width, rank, pool, block_size } = *b;
    let total = s.past + s.len;
    let spans = |n: usize| spans(pool, s.blocks, block_size, width, n);
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
}

/// Floats of the output accumulated in registers at a time (four AVX registers).
const TILE: usize = 32;

/// The AVX2 + FMA kernel: four heads at a time share every key load. Scores of the four heads against a key are
/// reduced together (three horizontal adds instead of four full reductions) and kept key-major (`[key][4]`), so
/// the softmax runs eight lanes at a time over two keys, and the weighted sum walks each key's latent once per
/// 16-value tile for all four heads.
#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{Batch, KernelSeq, spans};

    /// Whether the shapes suit this kernel: heads in fours, rows in whole registers, the latent in 16-value tiles.
    pub(super) fn fits(heads: usize, width: usize, rank: usize) -> bool {
        heads > 0 && heads.is_multiple_of(4) && width.is_multiple_of(8) && rank.is_multiple_of(16) && rank <= width
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn load(v: &[f32; 8]) -> __m256 {
        #[allow(unsafe_code)]
        // SAFETY: `v` is eight readable floats, and unaligned loads have no alignment requirement.
        unsafe {
            _mm256_loadu_ps(v.as_ptr())
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn store(v: __m256, out: &mut [f32; 8]) {
        #[allow(unsafe_code)]
        // SAFETY: `out` is eight writable floats, and unaligned stores have no alignment requirement.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), v)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn store4(v: __m128, out: &mut [f32; 4]) {
        #[allow(unsafe_code)]
        // SAFETY: `out` is four writable floats, and unaligned stores have no alignment requirement.
        unsafe {
            _mm_storeu_ps(out.as_mut_ptr(), v)
        }
    }

    /// The first eight (four) values of a slice as an array; the slice must be that long.
    fn first8(v: &mut [f32]) -> &mut [f32; 8] {
        v[..8].as_chunks_mut::<8>().0.first_mut().unwrap_or_else(|| unreachable!("a slice of eight values"))
    }

    fn first4(v: &mut [f32]) -> &mut [f32; 4] {
        v[..4].as_chunks_mut::<4>().0.first_mut().unwrap_or_else(|| unreachable!("a slice of four values"))
    }

    /// `[h0 h1 h2 h3]` partial sums of lanes 0-3 in the low half, 4-7 in the high half, of four accumulators.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn reduce4(a0: __m256, a1: __m256, a2: __m256, a3: __m256) -> __m256 {
        _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3))
    }

    /// The four heads' scores against one key.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn scores_of_key(qh: &[&[[f32; 8]]; 4], key: &[[f32; 8]]) -> __m128 {
        let (mut a0, mut a1, mut a2, mut a3) =
            (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        for (c, kc) in key.iter().enumerate() {
            let kv = load(kc);
            a0 = _mm256_fmadd_ps(load(&qh[0][c]), kv, a0);
            a1 = _mm256_fmadd_ps(load(&qh[1][c]), kv, a1);
            a2 = _mm256_fmadd_ps(load(&qh[2][c]), kv, a2);
            a3 = _mm256_fmadd_ps(load(&qh[3][c]), kv, a3);
        }
        let t = reduce4(a0, a1, a2, a3);
        _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t))
    }

    /// The four heads' scores against two keys, `[a·h0..h3, b·h0..h3]`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn scores_of_two_keys(qh: &[&[[f32; 8]]; 4], ka: &[[f32; 8]], kb: &[[f32; 8]]) -> __m256 {
        let z = _mm256_setzero_ps();
        let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
        let (mut b0, mut b1, mut b2, mut b3) = (z, z, z, z);
        for (c, (xa, xb)) in ka.iter().zip(kb).enumerate() {
            let (va, vb) = (load(xa), load(xb));
            let q0 = load(&qh[0][c]);
            a0 = _mm256_fmadd_ps(q0, va, a0);
            b0 = _mm256_fmadd_ps(q0, vb, b0);
            let q1 = load(&qh[1][c]);
            a1 = _mm256_fmadd_ps(q1, va, a1);
            b1 = _mm256_fmadd_ps(q1, vb, b1);
            let q2 = load(&qh[2][c]);
            a2 = _mm256_fmadd_ps(q2, va, a2);
            b2 = _mm256_fmadd_ps(q2, vb, b2);
            let q3 = load(&qh[3][c]);
            a3 = _mm256_fmadd_ps(q3, va, a3);
            b3 = _mm256_fmadd_ps(q3, vb, b3);
        }
        let (ta, tb) = (reduce4(a0, a1, a2, a3), reduce4(b0, b1, b2, b3));
        // Low halves of both plus high halves of both: [a scores | b scores].
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(ta, tb), _mm256_permute2f128_ps::<0x31>(ta, tb))
    }

    /// Eight lanes of `exp(x)` for `x <= 0`: the polynomial of [`super::exp_nonpositive`] with fused steps.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp_nonpositive(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0));
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(e, _mm256_castsi256_ps(bits))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn attend_sequence(b: &Batch<'_>, s: &KernelSeq<'_>, out: &mut [f32]) {
        let Batch { q, heads, width, rank, pool, block_size } = *b;
        let total = s.past + s.len;
        let spans = |n: usize| spans(pool, s.blocks, block_size, width, n);
        // Four scores per key, padded to whole registers (two keys each).
        let mut scores = vec![0f32; total.div_ceil(2) * 8];
        for j in 0..s.len {
            let visible = s.past + j + 1;
            let q_tok = &q[(s.start + j) * heads * width..(s.start + j + 1) * heads * width];
            for g in (0..heads).step_by(4) {
                let qh: [&[[f32; 8]]; 4] =
                    std::array::from_fn(|i| q_tok[(g + i) * width..(g + i + 1) * width].as_chunks::<8>().0);
                let mut max8 = _mm256_set1_ps(f32::NEG_INFINITY);
                let mut k = 0;
                for span in spans(visible) {
                    // Two keys at a time: eight independent accumulator chains instead of four.
                    let mut pairs = span.chunks_exact(2 * width);
                    for pair in &mut pairs {
                        let (ka, kb) = pair.split_at(width);
                        let r = scores_of_two_keys(&qh, ka.as_chunks::<8>().0, kb.as_chunks::<8>().0);
                        max8 = _mm256_max_ps(max8, r);
                        store(r, first8(&mut scores[k * 4..]));
                        k += 2;
                    }
                    for key in pairs.remainder().chunks_exact(width) {
                        let r = scores_of_key(&qh, key.as_chunks::<8>().0);
                        max8 = _mm256_max_ps(max8, _mm256_set_m128(r, r));
                        store4(r, first4(&mut scores[k * 4..]));
                        k += 1;
                    }
                }
                let maxv = _mm_max_ps(_mm256_castps256_ps128(max8), _mm256_extractf128_ps::<1>(max8));
                // Softmax numerators in place, two keys per register; lanes past the last key are zeroed.
                let max8 = _mm256_set_m128(maxv, maxv);
                let (sc8, _) = scores.as_chunks_mut::<8>();
                let pairs = visible.div_ceil(2);
                let mut sum = _mm256_setzero_ps();
                for (p, chunk) in sc8[..pairs].iter_mut().enumerate() {
                    let mut e = exp_nonpositive(_mm256_sub_ps(load(chunk), max8));
                    if 2 * p + 1 == visible {
                        e = _mm256_blend_ps::<0b1111_0000>(e, _mm256_setzero_ps());
                    }
                    sum = _mm256_add_ps(sum, e);
                    store(e, chunk);
                }
                let inv = _mm_div_ps(
                    _mm_set1_ps(1.0),
                    _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum)),
                );
                let mut inv4 = [0f32; 4];
                store4(inv, &mut inv4);
                let (sc4, _) = scores.as_chunks::<4>();
                // Weighted sums of the latent part, sixteen values (two registers) per head at a time.
                for tile in (0..rank).step_by(16) {
                    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                    let mut k = 0;
                    for span in spans(visible) {
                        for key in span.chunks_exact(width) {
                            let kv = key[tile..tile + 16].as_chunks::<8>().0;
                            let (k0, k1) = (load(&kv[0]), load(&kv[1]));
                            for (h, acc_h) in acc.iter_mut().enumerate() {
                                let p = _mm256_broadcast_ss(&sc4[k][h]);
                                acc_h[0] = _mm256_fmadd_ps(p, k0, acc_h[0]);
                                acc_h[1] = _mm256_fmadd_ps(p, k1, acc_h[1]);
                            }
                            k += 1;
                        }
                    }
                    for (h, acc_h) in acc.iter().enumerate() {
                        let at = (j * heads + g + h) * rank + tile;
                        let scale = _mm256_set1_ps(inv4[h]);
                        let o = out[at..at + 16].as_chunks_mut::<8>().0;
                        store(_mm256_mul_ps(acc_h[0], scale), &mut o[0]);
                        store(_mm256_mul_ps(acc_h[1], scale), &mut o[1]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eight_lane_sum_covers_the_tail() {
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
    /// Shapes for both kernels: the head-group kernel (heads in fours, whole registers) and the portable one.
    #[test]
    fn the_kernel_equals_a_plain_reference_over_scattered_blocks() {
        for (heads, width, rank) in [(3, 12, 8), (4, 40, 32), (8, 24, 16), (4, 20, 16)] {
            equals_reference(heads, width, rank);
        }
    }

    fn equals_reference(heads: usize, width: usize, rank: usize) {
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
                                "{heads}x{width}x{rank}: block {block_size}, past {past}, len {len}, row {j}, head {h}, \
                                 col {c}: {have} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
