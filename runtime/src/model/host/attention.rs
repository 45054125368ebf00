//! MLA's naive form (decompressed keys and values, DeepSeek-V2 §2.1) for a long prefill on the host kernels, in
//! f32: per head, the scores are a product of the queries with the keys packed as a [`PANEL`]-column matrix, and the
//! output a product of the softmax with the values packed alike — the register-tiled f32 kernel of
//! [`PackedMatrix`](super::PackedMatrix) for both. Queries go in blocks of [`QUERY_BLOCK`]: a block multiplies only
//! the keys its last query sees, so the causal mask wastes at most a block's width of each row. Heads run on the
//! compute pool side by side.

use rayon::prelude::*;

use super::{Columns, PANEL, Strided, exp_nonpositive, panel_product, strided_panel_product, sum8};

/// Queries whose scores are computed together (their rows stay in the L1 cache while a key panel streams past).
const QUERY_BLOCK: usize = 32;

/// The shapes of one MLA layer's naive attention.
#[derive(Debug, Clone, Copy)]
pub struct NaiveHeads {
    pub heads: usize,
    /// `qk_nope_head_dim`: the part of a query and key without rotary embedding.
    pub nope: usize,
    /// `qk_rope_head_dim`: the rotated part, one key shared by every head.
    pub rope: usize,
    /// `v_head_dim`.
    pub v: usize,
    /// The softmax scale (`1/√(nope + rope)`, times YaRN's mscale²).
    pub scale: f32,
}

/// Causal attention of one sequence's `len` new tokens over its `total` tokens (the `total - len` cached ones
/// first). `q` is `[len, heads, nope + rope]` (rotary part rotated), `kv` the decompressed context
/// `[total, heads, nope + v]` (`kv_b_proj` of its latents), `k_pe` the rotated shared keys `[total, rope]`; `out`
/// (`[len, heads * v]`) is overwritten. Query `j` sees keys `0..=total - len + j`.
pub fn naive_attention(
    q: &[f32],
    kv: &[f32],
    k_pe: &[f32],
    len: usize,
    total: usize,
    shape: NaiveHeads,
    out: &mut [f32],
) {
    let NaiveHeads { heads, nope, rope, v, .. } = shape;
    assert!(
        len <= total
            && q.len() >= len * heads * (nope + rope)
            && kv.len() >= total * heads * (nope + v)
            && k_pe.len() >= total * rope
            && out.len() >= len * heads * v,
        "naive attention: inputs shorter than their shapes"
    );
    let one = |h: usize| head(q, kv, k_pe, len, total, shape, h);
    let per_head: Vec<Vec<f32>> = if heads > 1 && rayon::current_num_threads() > 1 {
        (0..heads).into_par_iter().map(one).collect()
    } else {
        (0..heads).map(one).collect()
    };
    for (h, values) in per_head.iter().enumerate() {
        for (j, row) in values.chunks_exact(v.max(1)).enumerate() {
            out[(j * heads + h) * v..(j * heads + h + 1) * v].copy_from_slice(row);
        }
    }
}

/// Head `h`'s attention: `[len, v]`.
fn head(q: &[f32], kv: &[f32], k_pe: &[f32], len: usize, total: usize, shape: NaiveHeads, h: usize) -> Vec<f32> {
    let NaiveHeads { heads, nope, rope, v, scale } = shape;
    let (qk, row) = (nope + rope, nope + v);
    let past = total - len;
    // Keys as panels of PANEL keys, `[total / PANEL][qk][PANEL]` (keys past `total` zero).
    let key_panels = total.div_ceil(PANEL);
    let mut keys = vec![0f32; key_panels * qk * PANEL];
    for t in 0..total {
        let panel = &mut keys[(t / PANEL) * qk * PANEL..(t / PANEL + 1) * qk * PANEL];
        let nope_part = &kv[(t * heads + h) * row..(t * heads + h) * row + nope];
        for (d, &x) in nope_part.iter().chain(&k_pe[t * rope..(t + 1) * rope]).enumerate() {
            panel[d * PANEL + t % PANEL] = x;
        }
    }
    // Values as panels of PANEL value columns, `[v / PANEL][total][PANEL]` (columns past `v` zero).
    let value_panels = v.div_ceil(PANEL);
    let mut values = vec![0f32; value_panels * total * PANEL];
    for t in 0..total {
        let at = (t * heads + h) * row + nope;
        for (p, part) in kv[at..at + v].chunks(PANEL).enumerate() {
            values[(p * total + t) * PANEL..(p * total + t) * PANEL + part.len()].copy_from_slice(part);
        }
    }
    let queries: Vec<f32> =
        (0..len).flat_map(|j| &q[(j * heads + h) * qk..(j * heads + h + 1) * qk]).copied().collect();
    let mut out = vec![0f32; len * v];
    let stride = key_panels * PANEL;
    let mut scores = vec![0f32; QUERY_BLOCK.min(len) * stride];
    for first in (0..len).step_by(QUERY_BLOCK) {
        let m = QUERY_BLOCK.min(len - first);
        // Keys the block's last query sees; the block's products stop at the panel holding the last of them.
        let visible = past + first + m;
        let block = &queries[first * qk..(first + m) * qk];
        for p in 0..visible.div_ceil(PANEL) {
            let dst = Columns { out: &mut scores, stride, first: p * PANEL, width: PANEL };
            panel_product(block, m, qk, &keys[p * qk * PANEL..(p + 1) * qk * PANEL], dst);
        }
        for (j, sc) in scores.chunks_exact_mut(stride).take(m).enumerate() {
            let (seen, hidden) = sc[..visible].split_at_mut(past + first + j + 1);
            softmax(seen, scale);
            hidden.fill(0.0);
        }
        let probs = Strided { a: &scores, stride, m, k: visible };
        for p in 0..value_panels {
            let dst =
                Columns { out: &mut out[first * v..], stride: v, first: p * PANEL, width: PANEL.min(v - p * PANEL) };
            strided_panel_product(probs, &values[p * total * PANEL..(p * total + visible) * PANEL], dst);
        }
    }
    out
}

/// `scores · scale` → their softmax, in place (f32, as transformers' eager attention computes it).
fn softmax(scores: &mut [f32], scale: f32) {
    let mut max = f32::NEG_INFINITY;
    for s in scores.iter_mut() {
        *s *= scale;
        max = max.max(*s);
    }
    for s in scores.iter_mut() {
        *s = exp_nonpositive(*s - max);
    }
    let inv = 1.0 / sum8(scores);
    scores.iter_mut().for_each(|s| *s *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one query, head and key at a time, in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(q: &[f32], kv: &[f32], k_pe: &[f32], len: usize, total: usize, s: NaiveHeads) -> Vec<f32> {
        let (qk, row) = (s.nope + s.rope, s.nope + s.v);
        let mut out = vec![0f32; len * s.heads * s.v];
        for j in 0..len {
            for h in 0..s.heads {
                let qh = &q[(j * s.heads + h) * qk..(j * s.heads + h + 1) * qk];
                let seen = total - len + j + 1;
                let scores: Vec<f64> = (0..seen)
                    .map(|t| {
                        let key = kv[(t * s.heads + h) * row..(t * s.heads + h) * row + s.nope]
                            .iter()
                            .chain(&k_pe[t * s.rope..(t + 1) * s.rope]);
                        qh.iter().zip(key).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() * f64::from(s.scale)
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for c in 0..s.v {
                    let value = |t: usize| f64::from(kv[(t * s.heads + h) * row + s.nope + c]);
                    let o: f64 = exps.iter().enumerate().map(|(t, e)| e / sum * value(t)).sum();
                    out[(j * s.heads + h) * s.v + c] = o as f32;
                }
            }
        }
        out
    }

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.731).sin()).collect()
    }

    /// Every shape remainder: value and key counts off the panel width, blocks of queries cut short, a cached past,
    /// one head and several.
    #[test]
    fn naive_attention_equals_the_definition() {
        for (heads, nope, rope, v, len, past) in [
            (1, 8, 4, 16, 1, 0),
            (2, 16, 8, 16, 5, 3),
            (3, 12, 4, 20, 33, 0),
            (4, 32, 16, 32, 70, 17),
            (2, 16, 8, 8, 64, 64),
        ] {
            let total = past + len;
            let shape = NaiveHeads { heads, nope, rope, v, scale: 0.3 };
            let q = values(len * heads * (nope + rope), 1.0);
            let kv = values(total * heads * (nope + v), 2.0);
            let k_pe = values(total * rope, 3.0);
            let mut got = vec![f32::NAN; len * heads * v];
            naive_attention(&q, &kv, &k_pe, len, total, shape, &mut got);
            let want = reference(&q, &kv, &k_pe, len, total, shape);
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{shape:?} len {len} past {past}: off by {worst}");
        }
    }
}
