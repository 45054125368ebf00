// Baleen's own CUDA kernels for the decode path of DeepSeek MoE models (built to PTX by build.rs with the `cuda`
// feature; launched from runtime/src/kernels/cuda.rs).
//
// - moe_route:        router scores, group-limited selection and top-k, weights and selection margins, per token.
// - moe_dispatch:     the routing regrouped by expert (offsets, active experts, permutation), on the device.
// - moe_gate_up_*:    the active experts' gate/up projections with SwiGLU, each expert's weights read once for
//                     every 8 of its rows (a grouped matrix-vector product: decode batches give an expert a few).
// - moe_down_*:       the active experts' down projections, scaled by the routing weights.
// - moe_combine_*:    each token's weighted expert outputs summed, plus the shared experts' output.
// - mla_decode_*:     absorbed MLA attention of single-token decode steps straight over the paged latent cache,
//                     the query assembled (rotated, scaled) in registers.
// - kv_write_*:       a step's latent rows (normalized, rotated) written to their cache slots.
// - moe_pad_rows, moe_unpad_rows_*: large decode batches' expert rows to and from fixed slabs for batched GEMMs.
//
// Every kernel reads its sizes and indices from device memory or kernel parameters that stay fixed for a batch
// shape, so a decode step built from them can be captured in a CUDA graph and replayed.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu
#define NO_INDEX 0x7fffffff
#define INF __int_as_float(0x7f800000)

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Whether (va, ia) ranks before (vb, ib): higher value first, lower index first among equals (the host router's
// order).
__device__ __forceinline__ bool ranks_before(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

// The warp's best (value, index) among the lanes' candidates; every lane gets the result. A lane without a
// candidate passes index NO_INDEX and value -inf.
__device__ __forceinline__ void warp_best(float& v, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL_MASK, v, o);
        int oi = __shfl_xor_sync(FULL_MASK, i, o);
        if (ranks_before(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Routing. One warp per token (`bias` is read only when `has_bias`). `method`: 0 greedy, 1 group-limited greedy (DeepSeek-V2), 2 noaux_tc (DeepSeek-V3).
// `scoring`: 0 softmax, 1 sigmoid. Writes `ids[t * k + j]` (the j-th best expert), `out[t * k + j]` its weight
// (the uncorrected score, normalized when `norm_topk`, times `scaling`), and `out[tokens * k + t]` the selection
// margin: the smallest gap between the last kept and the best dropped candidate, at the group and expert stages.
// Needs n_experts <= 1024 (32 per lane), n_group <= 32; shared memory: 2 * n_experts floats.

constexpr int ROUTE_MAX_PER_LANE = 32;

extern "C" __global__ void __launch_bounds__(32) moe_route(
    const float* __restrict__ logits, const float* __restrict__ bias, int has_bias, uint32_t* __restrict__ ids,
    float* __restrict__ out, int tokens, int n_experts, int k, int n_group, int topk_group, int scoring,
    int method, int norm_topk, float scaling) {
    extern __shared__ float route_smem[];
    float* scores = route_smem;               // [n_experts]
    float* choice = route_smem + n_experts;   // [n_experts]
    const int t = blockIdx.x;
    const int lane = threadIdx.x;
    if (t >= tokens) return;
    const float* row = logits + (size_t)t * n_experts;

    if (scoring == 0) {
        float m = -INF;
        for (int i = lane; i < n_experts; i += 32) m = fmaxf(m, row[i]);
        m = warp_max(m);
        float sum = 0.f;
        for (int i = lane; i < n_experts; i += 32) {
            float e = expf(row[i] - m);
            scores[i] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        for (int i = lane; i < n_experts; i += 32) scores[i] = scores[i] / sum;
    } else {
        for (int i = lane; i < n_experts; i += 32) scores[i] = 1.f / (1.f + expf(-row[i]));
    }
    for (int i = lane; i < n_experts; i += 32) {
        float c = scores[i];
        if (method == 2 && has_bias) c += bias[i];
        // A NaN score (from a NaN or infinite logit) ranks last, as -inf: every comparison below then still picks
        // a valid expert, and no index leaves the tables.
        choice[i] = c == c ? c : -INF;
    }
    __syncwarp();

    float margin = INF;
    if (method != 0 && n_group > 1) {
        const int per = n_experts / n_group;
        float gs = -INF;
        if (lane < n_group) {
            const float* g = choice + lane * per;
            if (method == 2) {
                float a = -INF, b = -INF;
                for (int i = 0; i < per; ++i) {
                    float v = g[i];
                    if (v > a) {
                        b = a;
                        a = v;
                    } else if (v > b) {
                        b = v;
                    }
                }
                gs = a + b;
            } else {
                for (int i = 0; i < per; ++i) gs = fmaxf(gs, g[i]);
            }
        }
        // Rank topk_group + 1 groups: the extra one gives the margin.
        bool kept = false, taken = lane >= n_group;
        float last_kept = 0.f;
        const int rounds = min(topk_group + 1, n_group);
        for (int r = 0; r < rounds; ++r) {
            float v = taken ? -INF : gs;
            int i = taken ? NO_INDEX : lane;
            warp_best(v, i);
            if (r < topk_group) {
                if (lane == i) {
                    kept = true;
                    taken = true;
                }
                last_kept = v;
            } else {
                margin = fminf(margin, last_kept - v);
            }
        }
        // Experts of the groups left out are masked.
        const unsigned keep_mask = __ballot_sync(FULL_MASK, kept);
        for (int i = lane; i < n_experts; i += 32) {
            if (!((keep_mask >> (i / per)) & 1u)) choice[i] = -INF;
        }
        __syncwarp();
    }

    // Top k + 1 experts: each lane keeps a bitmask of its candidates already taken.
    unsigned taken = 0;
    float last_kept = 0.f;
    int chosen = -1;  // lane j < k holds the j-th choice
    const int rounds = min(k + 1, n_experts);
    for (int r = 0; r < rounds; ++r) {
        float v = -INF;
        int i = NO_INDEX;
        for (int s = 0, e = lane; s < ROUTE_MAX_PER_LANE && e < n_experts; ++s, e += 32) {
            if (!((taken >> s) & 1u) && ranks_before(choice[e], e, v, i)) {
                v = choice[e];
                i = e;
            }
        }
        warp_best(v, i);
        if (r < k) {
            if ((i & 31) == lane) taken |= 1u << (i >> 5);
            if (lane == r) chosen = i;
            last_kept = v;
        } else {
            margin = fminf(margin, last_kept - v);
        }
    }
    // Weights: the uncorrected scores of the chosen experts, normalized in rank order (as the host router sums).
    float w = (lane < k) ? scores[chosen] : 0.f;
    if (norm_topk) {
        float denom = 0.f;
        for (int j = 0; j < k; ++j) denom += __shfl_sync(FULL_MASK, w, j);
        w = w / (denom + 1e-20f);
    }
    if (lane < k) {
        ids[(size_t)t * k + lane] = (uint32_t)chosen;
        out[(size_t)t * k + lane] = w * scaling;
    }
    if (lane == 0) out[(size_t)tokens * k + t] = margin;
}

// ------------------------------------------------------------------------------------------------------------------
// Dispatch: one block of 1024 threads. `plan` is [offsets: n_experts + 1][active count: 1][active experts:
// n_experts][perm: assignments], where assignment a = t * k + j and perm lists the assignments grouped by expert
// (expert e's at perm[offsets[e] .. offsets[e + 1]]); the active experts are listed in ascending order. When
// `has_counters`, each expert's assignments of tokens below `*real_tokens` (all unless `has_real`) are added to
// counters[e]. Needs n_experts <= 1024.

constexpr int DISPATCH_THREADS = 1024;

// Exclusive prefix sum of `v` over the block (DISPATCH_THREADS threads); `*total` gets the sum of all.
__device__ uint32_t block_exclusive_scan(uint32_t v, uint32_t* warp_sums, uint32_t* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint32_t x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t y = __shfl_up_sync(FULL_MASK, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        uint32_t s = warp_sums[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const uint32_t y = __shfl_up_sync(FULL_MASK, s, o);
            if (lane >= o) s += y;
        }
        warp_sums[lane] = s;
    }
    __syncthreads();
    const uint32_t before = warp == 0 ? 0u : warp_sums[warp - 1];
    *total = warp_sums[31];
    __syncthreads();
    return before + x - v;
}

extern "C" __global__ void __launch_bounds__(DISPATCH_THREADS) moe_dispatch(
    const uint32_t* __restrict__ ids, uint32_t* __restrict__ plan, unsigned long long* __restrict__ counters,
    int has_counters, const uint32_t* __restrict__ real_tokens, int has_real, int assignments, int n_experts, int k) {
    __shared__ uint32_t counts[DISPATCH_THREADS];
    __shared__ uint32_t cursor[DISPATCH_THREADS];
    __shared__ uint32_t warp_sums[32];
    uint32_t* offsets = plan;
    uint32_t* active = plan + n_experts + 2;
    uint32_t* perm = plan + 2 * n_experts + 2;
    const int e = threadIdx.x;
    counts[e] = 0;
    __syncthreads();
    for (int a = threadIdx.x; a < assignments; a += DISPATCH_THREADS) {
        const uint32_t x = ids[a];
        if (x < (uint32_t)n_experts) atomicAdd(&counts[x], 1u);
    }
    __syncthreads();
    const uint32_t count = e < n_experts ? counts[e] : 0u;
    uint32_t routed, n_active;
    const uint32_t offset = block_exclusive_scan(count, warp_sums, &routed);
    const uint32_t slot = block_exclusive_scan(count > 0 ? 1u : 0u, warp_sums, &n_active);
    if (e < n_experts) {
        offsets[e] = offset;
        cursor[e] = offset;
        if (count > 0) active[slot] = (uint32_t)e;
    }
    if (e == 0) {
        offsets[n_experts] = routed;
        plan[n_experts + 1] = n_active;
    }
    __syncthreads();
    const uint32_t limit = has_real ? *real_tokens * (uint32_t)k : (uint32_t)assignments;
    for (int a = threadIdx.x; a < assignments; a += DISPATCH_THREADS) {
        const uint32_t x = ids[a];
        if (x < (uint32_t)n_experts) {
            perm[atomicAdd(&cursor[x], 1u)] = (uint32_t)a;
            if (has_counters && (uint32_t)a < limit) atomicAdd(&counters[x], 1ull);
        }
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Grouped expert projections. Block (row tile, active-expert slot): EXPERT_WARPS warps, each computing
// ROWS_PER_WARP output rows of the expert for all of the expert's assignments, TOK at a time. Lanes stride over
// the input dimension; with VEC they load 16 bytes (4 f32 or 8 bf16/f16) at a time.

constexpr int EXPERT_WARPS = 4;
constexpr int ROWS_PER_WARP = 2;
constexpr int ROWS_PER_BLOCK = EXPERT_WARPS * ROWS_PER_WARP;
constexpr int TOK = 8;

template <typename T> struct Pack { static constexpr int N = 16 / sizeof(T); };

template <typename T, int V>
__device__ __forceinline__ void load_vals(const T* __restrict__ p, float* out) {
    if constexpr (V == 1) {
        out[0] = to_f(*p);
    } else {
        uint4 raw = *reinterpret_cast<const uint4*>(p);
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = to_f(v[i]);
    }
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

// x [tokens, hidden]; w [n_experts, 2 * inter, hidden] (gate rows, then up rows); h [assignments, inter] in the
// plan's sorted order.
template <typename T, bool VEC>
__device__ void gate_up(const T* __restrict__ x, const T* __restrict__ w, const uint32_t* __restrict__ plan,
                        T* __restrict__ h, int n_experts, int inter, int hidden, int k) {
    constexpr int V = VEC ? Pack<T>::N : 1;
    const uint32_t* offsets = plan;
    const uint32_t* perm = plan + 2 * n_experts + 2;
    if (blockIdx.y >= plan[n_experts + 1]) return;
    const int e = (int)plan[n_experts + 2 + blockIdx.y];
    const uint32_t start = offsets[e], end = offsets[e + 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j0 = blockIdx.x * ROWS_PER_BLOCK + warp * ROWS_PER_WARP;
    if (j0 >= inter) return;
    const T* wg[ROWS_PER_WARP];
    const T* wu[ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const int j = min(j0 + r, inter - 1);
        wg[r] = w + ((size_t)e * 2 * inter + j) * hidden;
        wu[r] = w + ((size_t)e * 2 * inter + inter + j) * hidden;
    }
    for (uint32_t c = start; c < end; c += TOK) {
        const int n = min(TOK, (int)(end - c));
        const T* xr[TOK];
#pragma unroll
        for (int i = 0; i < TOK; ++i) xr[i] = x + (size_t)(perm[c + min(i, n - 1)] / k) * hidden;
        float ag[ROWS_PER_WARP][TOK], au[ROWS_PER_WARP][TOK];
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
            for (int i = 0; i < TOK; ++i) ag[r][i] = au[r][i] = 0.f;
        for (int d = lane * V; d < hidden; d += 32 * V) {
            float g[ROWS_PER_WARP][V], u[ROWS_PER_WARP][V];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r) {
                load_vals<T, V>(wg[r] + d, g[r]);
                load_vals<T, V>(wu[r] + d, u[r]);
            }
#pragma unroll
            for (int i = 0; i < TOK; ++i) {
                if (i < n) {
                    float xv[V];
                    load_vals<T, V>(xr[i] + d, xv);
#pragma unroll
                    for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
                        for (int v = 0; v < V; ++v) {
                            ag[r][i] += g[r][v] * xv[v];
                            au[r][i] += u[r][v] * xv[v];
                        }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < TOK; ++i) {
            if (i < n) {
#pragma unroll
                for (int r = 0; r < ROWS_PER_WARP; ++r) {
                    const float gs = warp_sum(ag[r][i]);
                    const float us = warp_sum(au[r][i]);
                    if (lane == 0 && j0 + r < inter) h[(size_t)(c + i) * inter + j0 + r] = from_f<T>(silu(gs) * us);
                }
            }
        }
    }
}

// h [assignments, inter] in sorted order; w [n_experts, hidden, inter]; weights [assignments] (by assignment);
// y [assignments, hidden] f32, by assignment, scaled by the routing weight.
template <typename T, bool VEC>
__device__ void down(const T* __restrict__ h, const T* __restrict__ w, const uint32_t* __restrict__ plan,
                     const float* __restrict__ weights, float* __restrict__ y, int n_experts, int hidden, int inter) {
    constexpr int V = VEC ? Pack<T>::N : 1;
    const uint32_t* offsets = plan;
    const uint32_t* perm = plan + 2 * n_experts + 2;
    if (blockIdx.y >= plan[n_experts + 1]) return;
    const int e = (int)plan[n_experts + 2 + blockIdx.y];
    const uint32_t start = offsets[e], end = offsets[e + 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j0 = blockIdx.x * ROWS_PER_BLOCK + warp * ROWS_PER_WARP;
    if (j0 >= hidden) return;
    const T* wd[ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) wd[r] = w + ((size_t)e * hidden + min(j0 + r, hidden - 1)) * inter;
    for (uint32_t c = start; c < end; c += TOK) {
        const int n = min(TOK, (int)(end - c));
        float acc[ROWS_PER_WARP][TOK];
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
            for (int i = 0; i < TOK; ++i) acc[r][i] = 0.f;
        for (int d = lane * V; d < inter; d += 32 * V) {
            float wv[ROWS_PER_WARP][V];
#pragma unroll
            for (int r = 0; r < ROWS_PER_WARP; ++r) load_vals<T, V>(wd[r] + d, wv[r]);
#pragma unroll
            for (int i = 0; i < TOK; ++i) {
                if (i < n) {
                    float hv[V];
                    load_vals<T, V>(h + (size_t)(c + i) * inter + d, hv);
#pragma unroll
                    for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
                        for (int v = 0; v < V; ++v) acc[r][i] += wv[r][v] * hv[v];
                }
            }
        }
#pragma unroll
        for (int i = 0; i < TOK; ++i) {
            if (i < n) {
                const uint32_t a = perm[c + i];
#pragma unroll
                for (int r = 0; r < ROWS_PER_WARP; ++r) {
                    const float s = warp_sum(acc[r][i]);
                    if (lane == 0 && j0 + r < hidden) y[(size_t)a * hidden + j0 + r] = s * weights[a];
                }
            }
        }
    }
}

// out[t] = sum over j of y[t * k + j] (+ shared[t] when has_shared); y f32 [tokens * k, hidden].
template <typename T>
__device__ void combine(const float* __restrict__ y, const T* __restrict__ shared, int has_shared, T* __restrict__ out,
                        int tokens, int k, int hidden) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)tokens * hidden) return;
    const size_t t = idx / hidden, d = idx % hidden;
    float s = 0.f;
    for (int j = 0; j < k; ++j) s += y[(t * k + j) * hidden + d];
    if (has_shared) s += to_f(shared[idx]);
    out[idx] = from_f<T>(s);
}

// ------------------------------------------------------------------------------------------------------------------
// Absorbed MLA decode attention. Block (head, sequence) of MLA_WARPS warps; each warp takes every MLA_WARPS-th
// cached token of the sequence with an online softmax, two tokens at a time, and the warps' partial results are
// merged at the end. The query is assembled in registers (below); cache [rows, width] with width = rank + rope,
// token p of sequence s at row tables[s * max_blocks + p / block] * block + p % block; lens[s] tokens attended.
// out [heads, seqs, rank]. Needs width <= 32 * MLA_W_PER_LANE and rank <= 32 * MLA_R_PER_LANE.

constexpr int MLA_WARPS = 16;
constexpr int MLA_W_PER_LANE = 24;
constexpr int MLA_R_PER_LANE = 16;

// The rotary part of a query or key, element j of `rope` values at `pe` rotated by row `pos` of cos/sin
// (`[positions, rope / 2]`): pairs (2i, 2i + 1) when `interleave`, else (i, i + rope / 2) — as rope.rs rotates.
template <typename T>
__device__ __forceinline__ float rotated(const T* __restrict__ pe, int j, int rope, const T* __restrict__ cos,
                                         const T* __restrict__ sin, uint32_t pos, int interleave) {
    const int half = rope / 2;
    int p, ia, ib;
    if (interleave) {
        p = j / 2;
        ia = 2 * p;
        ib = 2 * p + 1;
    } else {
        p = j < half ? j : j - half;
        ia = p;
        ib = p + half;
    }
    const float a = to_f(pe[ia]), b = to_f(pe[ib]);
    const float c = to_f(cos[(size_t)pos * half + p]), s = to_f(sin[(size_t)pos * half + p]);
    return (j == ia) ? a * c - b * s : a * s + b * c;
}

// Queries: the latent part `q_lat[head, seq, :rank]` (q_nope through W_UK) and the rotary part, rotated here, from
// `q[seq, head, nope .. nope + rope]` (`q` rows of `heads * (nope + rope)`); both scaled by `scale`.
template <typename T>
__device__ void mla_decode(const T* __restrict__ q_lat, const T* __restrict__ q, const T* __restrict__ cos,
                           const T* __restrict__ sin, const uint32_t* __restrict__ positions, float scale, int nope,
                           int interleave, const T* __restrict__ cache, const uint32_t* __restrict__ tables,
                           const uint32_t* __restrict__ lens, T* __restrict__ out, int seqs, int heads, int width,
                           int rank, int max_blocks, int block) {
    __shared__ float m_sh[MLA_WARPS], l_sh[MLA_WARPS];
    __shared__ float acc_sh[MLA_WARPS][32 * MLA_R_PER_LANE];
    const int hd = blockIdx.x, s = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rope = width - rank;
    const T* lat = q_lat + ((size_t)hd * seqs + s) * rank;
    const T* pe = q + ((size_t)s * heads + hd) * (nope + rope) + nope;
    const uint32_t pos = positions[s];
    float qr[MLA_W_PER_LANE];
#pragma unroll
    for (int i = 0; i < MLA_W_PER_LANE; ++i) {
        const int c = lane + 32 * i;
        float v = 0.f;
        if (c < rank) v = to_f(lat[c]);
        else if (c < width) v = rotated(pe, c - rank, rope, cos, sin, pos, interleave);
        qr[i] = v * scale;
    }
    const int len = (int)lens[s];
    const uint32_t* table = tables + (size_t)s * max_blocks;
    float m = -INF, l = 0.f;
    float acc[MLA_R_PER_LANE];
#pragma unroll
    for (int i = 0; i < MLA_R_PER_LANE; ++i) acc[i] = 0.f;
    for (int p0 = warp; p0 < len; p0 += 2 * MLA_WARPS) {
        const int p1 = p0 + MLA_WARPS;
        const bool two = p1 < len;
        const T* r0 = cache + ((size_t)table[p0 / block] * block + p0 % block) * width;
        const T* r1 = two ? cache + ((size_t)table[p1 / block] * block + p1 % block) * width : r0;
        float v0[MLA_W_PER_LANE], v1[MLA_W_PER_LANE];
        float d0 = 0.f, d1 = 0.f;
#pragma unroll
        for (int i = 0; i < MLA_W_PER_LANE; ++i) {
            const int c = lane + 32 * i;
            v0[i] = c < width ? to_f(r0[c]) : 0.f;
            v1[i] = c < width ? to_f(r1[c]) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < MLA_W_PER_LANE; ++i) {
            d0 += qr[i] * v0[i];
            d1 += qr[i] * v1[i];
        }
        d0 = warp_sum(d0);
        d1 = two ? warp_sum(d1) : -INF;
        const float m_new = fmaxf(m, fmaxf(d0, d1));
        const float scale = expf(m - m_new);
        const float e0 = expf(d0 - m_new);
        const float e1 = two ? expf(d1 - m_new) : 0.f;
        l = l * scale + e0 + e1;
#pragma unroll
        for (int i = 0; i < MLA_R_PER_LANE; ++i) acc[i] = acc[i] * scale + e0 * v0[i] + e1 * v1[i];
        m = m_new;
    }
    if (lane == 0) {
        m_sh[warp] = m;
        l_sh[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < MLA_R_PER_LANE; ++i) {
        const int c = lane + 32 * i;
        if (c < rank) acc_sh[warp][c] = acc[i];
    }
    __syncthreads();
    float big = -INF;
    for (int w = 0; w < MLA_WARPS; ++w) big = fmaxf(big, m_sh[w]);
    float total = 0.f;
    for (int w = 0; w < MLA_WARPS; ++w) total += l_sh[w] * (m_sh[w] == -INF ? 0.f : expf(m_sh[w] - big));
    for (int c = threadIdx.x; c < rank; c += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < MLA_WARPS; ++w) {
            if (m_sh[w] != -INF) o += acc_sh[w][c] * expf(m_sh[w] - big);
        }
        out[((size_t)hd * seqs + s) * rank + c] = from_f<T>(o / total);
    }
}

// A decode step's new cache rows, one block per sequence: from the kv_a projection `kv` [n, rank + rope], the
// compressed part RMS-normalized (weight `norm`, `eps`) and the rotary part rotated by the sequence's position,
// written to row slots[i] of the cache.
constexpr int KV_THREADS = 256;

template <typename T>
__device__ void kv_write(const T* __restrict__ kv, const T* __restrict__ norm, float eps, const T* __restrict__ cos,
                         const T* __restrict__ sin, const uint32_t* __restrict__ positions,
                         const uint32_t* __restrict__ slots, T* __restrict__ cache, int rank, int width,
                         int interleave) {
    __shared__ float warp_sums[KV_THREADS / 32];
    const int i = blockIdx.x;
    const T* row = kv + (size_t)i * width;
    float ss = 0.f;
    for (int c = threadIdx.x; c < rank; c += KV_THREADS) {
        const float v = to_f(row[c]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < KV_THREADS / 32; ++w) total += warp_sums[w];
    const float inv = rsqrtf(total / (float)rank + eps);
    T* dst = cache + (size_t)slots[i] * width;
    const uint32_t pos = positions[i];
    for (int c = threadIdx.x; c < width; c += KV_THREADS) {
        if (c < rank) dst[c] = from_f<T>(to_f(row[c]) * inv * to_f(norm[c]));
        else dst[c] = from_f<T>(rotated(row + rank, c - rank, width - rank, cos, sin, pos, interleave));
    }
}

// Large decode batches: each active expert's rows gathered into a fixed-size slab for batched GEMMs. idx[e * m + r]
// is the token of expert e's r-th routed row, or `pad` (a zero row) past its count; m >= every expert's count.
extern "C" __global__ void moe_pad_rows(const uint32_t* __restrict__ plan, uint32_t* __restrict__ idx, int n_experts,
                                        int k, int m, uint32_t pad) {
    const size_t at = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (at >= (size_t)n_experts * m) return;
    const int e = (int)(at / m), r = (int)(at % m);
    const uint32_t start = plan[e], count = plan[e + 1] - start;
    idx[at] = (uint32_t)r < count ? plan[2 * n_experts + 2 + start + r] / (uint32_t)k : pad;
}

// The slabs' outputs back to rows by assignment: y[a] = out[e * m + r] * weights[a] for expert e's r-th row a.
template <typename T>
__device__ void unpad_rows(const T* __restrict__ out, const uint32_t* __restrict__ plan,
                           const float* __restrict__ weights, float* __restrict__ y, int n_experts, int hidden, int m) {
    const int r = blockIdx.x, e = blockIdx.y;
    const uint32_t start = plan[e], count = plan[e + 1] - start;
    if ((uint32_t)r >= count) return;
    const uint32_t a = plan[2 * n_experts + 2 + start + r];
    const float w = weights[a];
    const T* src = out + ((size_t)e * m + r) * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) y[(size_t)a * hidden + c] = to_f(src[c]) * w;
}

// ------------------------------------------------------------------------------------------------------------------
// Random weights of the built-in models: element i of a tensor is the host generator's i-th normal draw
// (runtime/src/builtin.rs): SplitMix64 outputs 2i+1 and 2i+2 of the tensor's seed, through Box-Muller in double
// precision, then mean + std * z in f32 without fused multiply-adds (as the host computes it).

__device__ __forceinline__ unsigned long long splitmix_at(unsigned long long seed, unsigned long long k) {
    unsigned long long z = seed + k * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

extern "C" __global__ void random_normal_f32(float* __restrict__ out, unsigned long long n, unsigned long long seed,
                                             float mean, float std) {
    const double two_53 = 9007199254740992.0;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const double u1 = ((double)(splitmix_at(seed, 2 * i + 1) >> 11) + 1.0) / two_53;
        const double u2 = (double)(splitmix_at(seed, 2 * i + 2) >> 11) / two_53;
        const float z = (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * 3.141592653589793 * u2));
        out[i] = __fadd_rn(mean, __fmul_rn(std, z));
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Entry points per dtype (f32, bf16, f16).

#define BALEEN_ENTRIES(SUFFIX, T)                                                                                    \
    extern "C" __global__ void __launch_bounds__(EXPERT_WARPS * 32) moe_gate_up_##SUFFIX(                            \
        const T* x, const T* w, const uint32_t* plan, T* h, int n_experts, int inter, int hidden, int k, int vec) {  \
        if (vec) gate_up<T, true>(x, w, plan, h, n_experts, inter, hidden, k);                                        \
        else gate_up<T, false>(x, w, plan, h, n_experts, inter, hidden, k);                                           \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(EXPERT_WARPS * 32) moe_down_##SUFFIX(                               \
        const T* h, const T* w, const uint32_t* plan, const float* weights, float* y, int n_experts, int hidden,     \
        int inter, int vec) {                                                                                        \
        if (vec) down<T, true>(h, w, plan, weights, y, n_experts, hidden, inter);                                     \
        else down<T, false>(h, w, plan, weights, y, n_experts, hidden, inter);                                        \
    }                                                                                                                \
    extern "C" __global__ void moe_combine_##SUFFIX(const float* y, const T* shared, int has_shared, T* out,        \
                                                    int tokens, int k, int hidden) {                                 \
        combine<T>(y, shared, has_shared, out, tokens, k, hidden);                                                   \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(MLA_WARPS * 32) mla_decode_##SUFFIX(                                \
        const T* q_lat, const T* q, const T* cos, const T* sin, const uint32_t* positions, float scale, int nope,    \
        int interleave, const T* cache, const uint32_t* tables, const uint32_t* lens, T* out, int seqs, int heads,   \
        int width, int rank, int max_blocks, int block) {                                                            \
        mla_decode<T>(q_lat, q, cos, sin, positions, scale, nope, interleave, cache, tables, lens, out, seqs, heads,  \
                      width, rank, max_blocks, block);                                                               \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(KV_THREADS) kv_write_##SUFFIX(                                      \
        const T* kv, const T* norm, float eps, const T* cos, const T* sin, const uint32_t* positions,                \
        const uint32_t* slots, T* cache, int rank, int width, int interleave) {                                      \
        kv_write<T>(kv, norm, eps, cos, sin, positions, slots, cache, rank, width, interleave);                       \
    }                                                                                                                \
    extern "C" __global__ void moe_unpad_rows_##SUFFIX(const T* out, const uint32_t* plan, const float* weights,    \
                                                       float* y, int n_experts, int hidden, int m) {                 \
        unpad_rows<T>(out, plan, weights, y, n_experts, hidden, m);                                                  \
    }

BALEEN_ENTRIES(f32, float)
BALEEN_ENTRIES(bf16, __nv_bfloat16)
BALEEN_ENTRIES(f16, __half)
