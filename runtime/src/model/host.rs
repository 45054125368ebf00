//! Host (CPU) kernels for the small matrix products of a decode step: f32 activations against f32, bf16 or int8 weights.
//!
//! At the sizes a decode step multiplies — a few to a few dozen rows against one projection or one expert's
//! weights — candle's CPU matmul spends more time on dispatch, layout checks, packing and allocation than on
//! arithmetic, and an MoE layer makes one such call per active expert. [`PackedMatrix`] stores a weight once,
//! at load, in the layout a register-tiled kernel reads straight through (panels of [`PANEL`] output columns,
//! each `in_dim` rows deep), so a product is a single pass with no per-call packing. [`HostMlp`] chains two of
//! them around a vectorized SwiGLU: the whole expert runs without a tensor op.
//!
//! Kernels are compiled twice: for AVX2 + FMA (picked at run time when the CPU has both) and for the portable
//! baseline. Results equal candle's within f32 rounding (the sums run in a different order). A bf16 model keeps its
//! weights in bf16 (half the bytes of f32, which is what a memory-bound decode step pays for) and multiplies them
//! with its inputs rounded to bf16 ([`bf16`], AVX-512 BF16 where the CPU has it); `--quantize int8` narrows the
//! packed matrices further, to int8 with a scale per 32 values of a column ([`q8`], AVX-512 VNNI). Norms, sums and
//! everything between the products stay f32. [`naive_attention`] runs MLA's naive form (long prefills) as products of
//! the f32 kernel.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::error::{Error, Part, Result};
use crate::weights::SCALE_INV_SUFFIX;

/// Runs `$tile::<R, $generics..>($args.., row)` over rows `0..$m` in tiles of [`ROWS`] rows (then the 1–3 left),
/// storing each tile's `[[f32; PANEL]; R]` into `$dst` (a `&mut Columns`) at its rows. `$first; …` takes tiles of
/// `$first` rows first (kernels whose multiply-adds have a long latency keep more sums in flight that way).
macro_rules! row_tiles {
    ($m:expr, $dst:expr, $tile:ident [$($g:tt),*] ($($arg:expr),*)) => {
        row_tiles!(ROWS; $m, $dst, $tile [$($g),*] ($($arg),*))
    };
    ($first:expr; $m:expr, $dst:expr, $tile:ident [$($g:tt),*] ($($arg:expr),*)) => {{
        let (m, dst) = ($m, $dst);
        let mut r = 0;
        while r + $first <= m {
            store(&$tile::<{ $first } $(, $g)*>($($arg,)* r), dst, r);
            r += $first;
        }
        while r + ROWS <= m {
            store(&$tile::<ROWS $(, $g)*>($($arg,)* r), dst, r);
            r += ROWS;
        }
        match m - r {
            1 => store(&$tile::<1 $(, $g)*>($($arg,)* r), dst, r),
            2 => store(&$tile::<2 $(, $g)*>($($arg,)* r), dst, r),
            3 => store(&$tile::<3 $(, $g)*>($($arg,)* r), dst, r),
            _ => {}
        }
    }};
}

mod attention;
mod bf16;
mod fp8;
mod q8;
mod weights;

pub use attention::{NaiveHeads, naive_attention};
use bf16::{Bf16Panels, Bf16Rows};
use fp8::Fp8Panels;
use q8::{Q8Panels, Q8Rows};
pub use weights::{Quantize, WeightMut, WeightVisitor, counter, fp8_matrices, tensor_bytes};

/// Output columns per panel: two AVX registers.
const PANEL: usize = 16;
/// Rows multiplied together against one panel (4 rows × 2 registers = 8 accumulators, leaving registers for
/// the weights and the broadcast inputs).
const ROWS: usize = 4;
/// Products at least this large (multiply-adds) are split over the compute pool by panels.
const PARALLEL_MIN_MACS: usize = 1 << 21;

/// A weight `[out_dim, in_dim]` (the checkpoint's `nn.Linear` layout) stored for `x · Wᵀ` on the host in panels of
/// [`PANEL`] output columns: in f32, in bf16 (the checkpoint's own bits, half the bytes a memory-bound decode step
/// reads; inputs rounded to bf16) or in int8 with block scales (`--quantize int8`; inputs quantized alike). Sums
/// are f32 (int8: exact i32 per block, then f32).
#[derive(Clone)]
pub struct PackedMatrix {
    in_dim: usize,
    out_dim: usize,
    /// f32: `[ceil(out_dim / PANEL)][in_dim][PANEL]`, columns past `out_dim` zero; bf16 and int8 group consecutive
    /// inputs of a column ([`bf16`], [`q8`]).
    panels: Panels,
}

/// An FP8 weight as a checkpoint stores it: `rows` rows of `e4m3fn` bytes and their block scales.
#[derive(Debug, Clone)]
pub struct Fp8Weight {
    pub bytes: Vec<u8>,
    pub scales: Vec<f32>,
    pub rows: usize,
}

#[derive(Clone)]
enum Panels {
    F32(Vec<f32>),
    /// bf16 bit patterns, inputs in pairs ([`bf16`]).
    Bf16(Bf16Panels),
    /// int8 values with a scale per [`q8::BLOCK`] values of each column.
    Int8(Q8Panels),
    /// A checkpoint's FP8 (`e4m3fn`) values with its block scales ([`fp8`]).
    Fp8(Fp8Panels),
}

/// How far ahead of its reads a bf16 or 8-bit kernel asks for a panel's bytes ([`prefetch`]). A batch-1 decode
/// step streams every weight once from memory, and the hardware prefetchers start over at each 4 KiB page; asking
/// for the line 4 KiB ahead keeps the stream going across pages. Measured on the V2-Lite-shaped benchmark (bf16,
/// 2 threads, batch 1, medians of 5 alternating runs, two sets): 1 KiB +5 %, 2 KiB +9–11 %, 4 KiB +13 %, 8 KiB +10 %.
const PREFETCH_AHEAD: usize = 4096;

/// Asks the CPU to bring the cache line [`PREFETCH_AHEAD`] bytes past `at` of `values` into its caches: a hint
/// that reads nothing and never faults, whatever the address (past the panel it is the next panel's bytes, or
/// nothing).
#[inline(always)]
fn prefetch<T>(values: &[T], at: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let line = values.as_ptr().wrapping_add(at).cast::<i8>().wrapping_add(PREFETCH_AHEAD);
        #[allow(unsafe_code)]
        // SAFETY: SSE, which `_mm_prefetch` needs, is part of every x86_64 CPU; a prefetch is a hint that reads no
        // memory and never faults, so any address, even one past the allocation, is allowed.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (values, at);
}

/// Where input `kk` of column `i` sits in a panel that keeps `lanes` consecutive inputs of a column together
/// (`[k / lanes][PANEL][lanes]`: bf16 pairs, int8 groups of four).
#[inline(always)]
fn interleaved(kk: usize, i: usize, lanes: usize) -> usize {
    (kk / lanes) * PANEL * lanes + i * lanes + kk % lanes
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtype = match self.panels {
            Panels::F32(_) => "f32",
            Panels::Bf16(_) => "bf16",
            Panels::Int8(_) => "int8",
            Panels::Fp8(_) => "fp8",
        };
        f.debug_struct("PackedMatrix")
            .field("in_dim", &self.in_dim)
            .field("out_dim", &self.out_dim)
            .field("dtype", &dtype)
            .finish()
    }
}

fn check_shape(values: usize, out_dim: usize, in_dim: usize) -> Result<()> {
    if values != out_dim * in_dim {
        return Err(Error::internal(
            Part::HostKernels,
            format!("weight of {values} values is not [{out_dim}, {in_dim}]"),
        ));
    }
    Ok(())
}

/// `w` (row-major `[out_dim, in_dim]`) in panel order.
fn pack(w: &[f32], out_dim: usize, in_dim: usize) -> Result<Vec<f32>> {
    check_shape(w.len(), out_dim, in_dim)?;
    let n_panels = out_dim.div_ceil(PANEL);
    let mut panels = vec![0f32; n_panels * in_dim * PANEL];
    for (o, row) in w.chunks_exact(in_dim.max(1)).enumerate().take(out_dim) {
        let (p, i) = (o / PANEL, o % PANEL);
        let panel = &mut panels[p * in_dim * PANEL..(p + 1) * in_dim * PANEL];
        for (k, &v) in row.iter().enumerate() {
            panel[k * PANEL + i] = v;
        }
    }
    Ok(panels)
}

impl PackedMatrix {
    /// Packs a row-major `[out_dim, in_dim]` f32 weight.
    pub fn from_rows(w: &[f32], out_dim: usize, in_dim: usize) -> Result<Self> {
        Ok(Self { in_dim, out_dim, panels: Panels::F32(pack(w, out_dim, in_dim)?) })
    }

    /// Packs a row-major `[out_dim, in_dim]` weight of bf16 bit patterns, kept in bf16.
    pub fn from_bf16_rows(w: &[u16], out_dim: usize, in_dim: usize) -> Result<Self> {
        check_shape(w.len(), out_dim, in_dim)?;
        Ok(Self { in_dim, out_dim, panels: Panels::Bf16(Bf16Panels::pack(w, out_dim, in_dim)) })
    }

    /// Keeps FP8 weights as they are stored: `parts` stacked along the output dimension (gate and up make one
    /// matrix), each a row-major `[rows, in_dim]` of `e4m3fn` bytes with its block scales
    /// `[ceil(rows / block[0]), ceil(in_dim / block[1])]` (a checkpoint's `weight_scale_inv`). The input side of a
    /// block must be a multiple of 4 (DeepSeek-V3: 128).
    pub fn from_fp8(parts: &[Fp8Weight], in_dim: usize, block: [usize; 2]) -> Result<Self> {
        fp8::check_block(block)?;
        let [block_rows, block_inputs] = block;
        let scale_cols = in_dim.div_ceil(block_inputs);
        // Output column -> (part, row within the part).
        let mut columns = Vec::new();
        for (j, part) in parts.iter().enumerate() {
            check_shape(part.bytes.len(), part.rows, in_dim)?;
            if part.scales.len() != part.rows.div_ceil(block_rows) * scale_cols {
                return Err(Error::internal(
                    Part::HostKernels,
                    format!("{} FP8 block scales for [{}, {in_dim}] in {block:?} blocks", part.scales.len(), part.rows),
                ));
            }
            columns.extend((0..part.rows).map(|r| (j, r)));
        }
        let out_dim = columns.len();
        let column = |p: usize, i: usize| columns.get(p * PANEL + i).map(|&(j, r)| (&parts[j], r));
        let panels = Fp8Panels::pack(
            out_dim.div_ceil(PANEL),
            in_dim,
            block_inputs,
            |p, kk, i| column(p, i).map_or(0, |(part, r)| part.bytes[r * in_dim + kk]),
            |p, b, i| column(p, i).map_or(0.0, |(part, r)| part.scales[r / block_rows * scale_cols + b]),
        );
        Ok(Self { in_dim, out_dim, panels: Panels::Fp8(panels) })
    }

    /// Packs a 2-D weight tensor `[out_dim, in_dim]`: bf16 stays bf16, any other dtype is stored as f32.
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (out_dim, in_dim) = w.dims2()?;
        if w.dtype() == DType::BF16 {
            let bits: Vec<u16> =
                w.flatten_all()?.to_vec1::<half::bf16>()?.into_iter().map(half::bf16::to_bits).collect();
            return Self::from_bf16_rows(&bits, out_dim, in_dim);
        }
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Self::from_rows(&data, out_dim, in_dim)
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Whether the weight is kept as FP8.
    pub fn is_fp8(&self) -> bool {
        matches!(self.panels, Panels::Fp8(_))
    }

    /// Bytes of the packed weight (int8: values and scales).
    pub fn bytes(&self) -> usize {
        match &self.panels {
            Panels::F32(p) => std::mem::size_of_val(p.as_slice()),
            Panels::Bf16(p) => p.bytes(),
            Panels::Int8(q) => q.bytes(),
            Panels::Fp8(w) => w.bytes(),
        }
    }

    /// Stores the weight as int8 with a scale per [`q8::BLOCK`] values of each column (a no-op when it already is).
    pub fn quantize_int8(&mut self) {
        let k = self.in_dim;
        let n_panels = self.out_dim.div_ceil(PANEL);
        let quantized = match &self.panels {
            Panels::F32(p) => Q8Panels::quantize(n_panels, k, |i, kk, c| p[(i * k + kk) * PANEL + c]),
            Panels::Bf16(p) => Q8Panels::quantize(n_panels, k, |i, kk, c| p.weight(i, kk, c)),
            Panels::Fp8(w) => Q8Panels::quantize(n_panels, k, |i, kk, c| w.weight(i, kk, c)),
            Panels::Int8(_) => return,
        };
        self.panels = Panels::Int8(quantized);
    }

    /// `out[m, out_dim] = a[m, in_dim] · Wᵀ` (`out` is overwritten). int8 weights quantize `a` too, per row and
    /// block ([`q8`]).
    pub fn matmul_into(&self, a: &[f32], m: usize, out: &mut [f32]) {
        let (k, n) = (self.in_dim, self.out_dim);
        let len = k * PANEL;
        match &self.panels {
            Panels::F32(p) => {
                split_panels(k, n, m, out, |i, dst| panel_product(a, m, k, &p[i * len..(i + 1) * len], dst))
            }
            Panels::Bf16(w) => {
                let rows = Bf16Rows::round(a, m, k);
                split_panels(k, n, m, out, |i, dst| bf16::product(w, &rows, i, dst));
            }
            Panels::Int8(q) => {
                let rows = Q8Rows::quantize(a, m, k);
                split_panels(k, n, m, out, |i, dst| q8::product(q, &rows, i, dst));
            }
            Panels::Fp8(w) => {
                let rows = fp8::rows(w, a, m);
                split_panels(k, n, m, out, |i, dst| fp8::product(w, &rows, i, dst));
            }
        }
    }

    /// `a[m, in_dim] · Wᵀ` as a new vector.
    pub fn matmul(&self, a: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * self.out_dim];
        self.matmul_into(a, m, &mut out);
        out
    }
}

/// `x · y + z`, fused when `FMA`.
#[inline(always)]
fn madd<const FMA: bool>(x: f32, y: f32, z: f32) -> f32 {
    if FMA { x.mul_add(y, z) } else { x * y + z }
}

/// `out[m, n]` of a product `[m, k] · [k, n]` whose `ceil(n / PANEL)` panels `product(p, columns)` computes: over
/// the compute pool by panels when the product is large, else in one pass.
fn split_panels(k: usize, n: usize, m: usize, out: &mut [f32], product: impl Fn(usize, Columns<'_>) + Sync) {
    debug_assert!(out.len() >= m * n);
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    let n_panels = n.div_ceil(PANEL);
    if m * k * n >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1 {
        // Each task computes whole panels into its own columns buffer, then they are copied into place.
        let cols: Vec<Vec<f32>> = (0..n_panels)
            .into_par_iter()
            .map(|p| {
                let mut block = vec![0f32; m * PANEL];
                product(p, Columns { out: &mut block, stride: PANEL, first: 0, width: PANEL });
                block
            })
            .collect();
        for (p, block) in cols.into_iter().enumerate() {
            let (first, width) = (p * PANEL, PANEL.min(n - p * PANEL));
            for r in 0..m {
                out[r * n + first..r * n + first + width].copy_from_slice(&block[r * PANEL..r * PANEL + width]);
            }
        }
        return;
    }
    for p in 0..n_panels {
        let first = p * PANEL;
        product(p, Columns { out: &mut *out, stride: n, first, width: PANEL.min(n - first) });
    }
}

/// Where one panel's product goes: columns `first..first + width` of an output whose rows are `stride` apart.
struct Columns<'a> {
    out: &'a mut [f32],
    stride: usize,
    first: usize,
    width: usize,
}

/// One panel's columns for all `m` rows of `a` (`[m, k]`).
fn panel_product(a: &[f32], m: usize, k: usize, panel: &[f32], dst: Columns<'_>) {
    strided_panel_product(Strided { a, stride: k, m, k }, panel, dst);
}

/// `m` rows of `k` inputs, row `r` at `a[r * stride..]` (`stride >= k`): the first `k` columns of a wider matrix.
#[derive(Clone, Copy)]
struct Strided<'a> {
    a: &'a [f32],
    stride: usize,
    m: usize,
    k: usize,
}

/// One panel's columns (its first `rows.k` inputs) for every row of `rows`.
fn strided_panel_product(rows: Strided<'_>, panel: &[f32], mut dst: Columns<'_>) {
    #[cfg(target_arch = "x86_64")]
    if wide::available() {
        #[allow(unsafe_code)]
        // SAFETY: `available` checked every feature `wide::product` is compiled for; that is its only requirement.
        unsafe {
            wide::product(rows, panel, &mut dst)
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2 and FMA, checked just above; that is the only requirement of the call.
        unsafe {
            panel_product_fma(rows, panel, dst)
        };
        return;
    }
    panel_product_generic::<false>(rows, panel, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn panel_product_fma(rows: Strided<'_>, panel: &[f32], dst: Columns<'_>) {
    panel_product_generic::<true>(rows, panel, dst);
}

#[inline(always)]
fn panel_product_generic<const FMA: bool>(rows: Strided<'_>, panel: &[f32], mut dst: Columns<'_>) {
    row_tiles!(rows.m, &mut dst, tile[FMA](rows, panel));
}

/// `R` rows of `a` from `row` against one panel (`[k, PANEL]`), accumulated in registers.
#[inline(always)]
fn tile<const R: usize, const FMA: bool>(a: Strided<'_>, panel: &[f32], row: usize) -> [[f32; PANEL]; R] {
    let mut acc = [[0f32; PANEL]; R];
    let Strided { a, stride, k, .. } = a;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &a[(row + r) * stride..(row + r) * stride + k]);
    for (kk, w) in panel.chunks_exact(PANEL).take(k).enumerate() {
        for r in 0..R {
            let x = rows[r][kk];
            for i in 0..PANEL {
                acc[r][i] = madd::<FMA>(x, w[i], acc[r][i]);
            }
        }
    }
    acc
}

/// The f32 kernel on AVX-512: a panel's 16 columns are one register, and a tile of 8 rows keeps 8 sums in flight
/// per input. Each column's sum takes the same fused multiply-adds in the same order as [`tile`]'s, so the values
/// are the same; per instruction it does twice the AVX2 kernel's work, which decides a long prefill's products.
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::{
        __m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };

    use super::{Columns, PANEL, ROWS, Strided, store};

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn product(rows: Strided<'_>, panel: &[f32], dst: &mut Columns<'_>) {
        row_tiles!(2 * ROWS; rows.m, dst, tile[](rows, panel));
    }

    /// `R` rows from `row` against one panel (`[k, PANEL]`).
    #[target_feature(enable = "avx512f")]
    fn tile<const R: usize>(a: Strided<'_>, panel: &[f32], row: usize) -> [[f32; PANEL]; R] {
        let Strided { a, stride, k, .. } = a;
        // Read through pointers checked once here: every row's first `k` inputs, and `k` rows of the panel.
        assert!(panel.len() >= k * PANEL && (row + R) * stride <= a.len() + stride - k);
        let x: [*const f32; R] = std::array::from_fn(|r| a[(row + r) * stride..].as_ptr());
        let w = panel.as_ptr();
        let mut acc: [__m512; R] = [_mm512_setzero_ps(); R];
        for kk in 0..k {
            #[allow(unsafe_code)]
            // SAFETY: `kk < k`, so the panel's row `kk` (16 floats from `kk * PANEL`) and input `kk` of each row are
            // inside the slices asserted above; unaligned loads have no other requirement.
            let (weights, inputs) = unsafe {
                (_mm512_loadu_ps(w.add(kk * PANEL)), std::array::from_fn::<f32, R, _>(|r| x[r].add(kk).read()))
            };
            for r in 0..R {
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(inputs[r]), weights, acc[r]);
            }
        }
        std::array::from_fn(|r| {
            let mut cols = [0f32; PANEL];
            #[allow(unsafe_code)]
            // SAFETY: `cols` holds the 16 floats an unaligned 512-bit store writes.
            unsafe {
                _mm512_storeu_ps(cols.as_mut_ptr(), acc[r])
            };
            cols
        })
    }
}

#[inline(always)]
fn store<const R: usize>(acc: &[[f32; PANEL]; R], dst: &mut Columns<'_>, row: usize) {
    for (r, cols) in acc.iter().enumerate() {
        let at = (row + r) * dst.stride + dst.first;
        if dst.width == PANEL {
            // A constant length: register stores instead of a memcpy call.
            dst.out[at..at + PANEL].copy_from_slice(cols);
        } else {
            dst.out[at..at + dst.width].copy_from_slice(&cols[..dst.width]);
        }
    }
}

/// A 1-D tensor's values as f32.
fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// A linear map `x · Wᵀ (+ b)` over the last dimension: packed for the host kernels when the weight is f32 or bf16 on
/// the CPU, else candle's `Linear`.
#[derive(Debug, Clone)]
pub enum Projection {
    Candle(candle_nn::Linear),
    Host { weight: PackedMatrix, bias: Option<Vec<f32>> },
}

impl Projection {
    /// Takes over a loaded `Linear`, packing it when it is f32 or bf16 on the CPU.
    pub fn new(linear: candle_nn::Linear) -> Result<Self> {
        let w = linear.weight();
        if !(w.device().is_cpu() && host_dtype(w.dtype())) {
            return Ok(Self::Candle(linear));
        }
        Ok(Self::Host { weight: PackedMatrix::from_tensor(w)?, bias: linear.bias().map(f32_values).transpose()? })
    }

    /// Loads `weight` `[out_dim, in_dim]` (and `bias`) at `vb`: kept as FP8 when [`kept_fp8`] says so, else as
    /// [`Projection::new`] takes it.
    pub fn load(in_dim: usize, out_dim: usize, bias: bool, fp8: Option<[usize; 2]>, vb: VarBuilder) -> Result<Self> {
        let Some(block) = kept_fp8(&vb, fp8) else {
            return Self::new(candle_nn::linear_b(in_dim, out_dim, bias, vb)?);
        };
        let weight = PackedMatrix::from_fp8(&[Fp8Weight::load(&vb, out_dim, in_dim, block)?], in_dim, block)?;
        let bias = bias.then(|| f32_values(&vb.get(out_dim, "bias")?)).transpose()?;
        Ok(Self::Host { weight, bias })
    }

    pub fn is_host(&self) -> bool {
        matches!(self, Self::Host { .. })
    }

    /// The weight (packed or candle's) and the bias.
    pub fn visit_weights(&mut self, f: &mut WeightVisitor<'_>) -> Result<()> {
        match self {
            Self::Host { weight, bias } => {
                f(WeightMut::Packed(weight))?;
                f(WeightMut::Kept(bias.as_ref().map_or(0, |b| std::mem::size_of_val(b.as_slice()))))
            }
            Self::Candle(linear) => {
                f(WeightMut::Tensor(linear.weight()))?;
                f(WeightMut::Kept(linear.bias().map_or(0, tensor_bytes)))
            }
        }
    }

    /// The weight and bias as bytes kept as loaded (a projection `--quantize` leaves wide).
    pub fn visit_kept(&mut self, f: &mut WeightVisitor<'_>) -> Result<()> {
        let mut bytes = 0;
        self.visit_weights(&mut counter(&mut bytes))?;
        f(WeightMut::Kept(bytes))
    }

    /// `rows` (`[m, in_dim]`) through the packed weight, or `None` when this projection runs on candle.
    pub fn host(&self, rows: &[f32], m: usize) -> Option<Vec<f32>> {
        let Self::Host { weight, bias } = self else { return None };
        let mut out = weight.matmul(rows, m);
        if let Some(b) = bias {
            for row in out.chunks_exact_mut(weight.out_dim().max(1)) {
                row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
            }
        }
        Some(out)
    }

    /// `[.., in_dim]` → `[.., out_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = match self {
            Self::Candle(linear) => return Ok(candle_nn::Module::forward(linear, x)?),
            Self::Host { weight, .. } => weight,
        };
        let mut dims = x.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(0);
        if in_dim != weight.in_dim() {
            return Err(Error::internal(
                Part::HostKernels,
                format!("input width {in_dim} for a projection from {}", weight.in_dim()),
            ));
        }
        let m = dims.iter().product::<usize>();
        let rows = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let out = self.host(&rows, m).unwrap_or_default();
        dims.push(weight.out_dim());
        Ok(Tensor::from_vec(out, dims, x.device())?.to_dtype(x.dtype())?)
    }
}

/// RMS normalization over the last dimension (`x / sqrt(mean(x²) + eps) · w`): on the host for f32 or bf16 CPU weights,
/// else candle's `RmsNorm`.
#[derive(Debug, Clone)]
pub enum Norm {
    Candle(candle_nn::RmsNorm),
    Host { weight: Vec<f32>, eps: f32 },
}

/// The block size of the weight at `vb` when it is kept as FP8: `fp8` (the model's [`kept_fp8`]) is given, the
/// host kernels run, and the checkpoint stores `weight` with block scales.
///
/// [`kept_fp8`]: crate::model::config::ModelConfig::kept_fp8
pub(crate) fn kept_fp8(vb: &candle_nn::VarBuilder, fp8: Option<[usize; 2]>) -> Option<[usize; 2]> {
    fp8.filter(|_| uses_host_kernels(vb) && vb.contains_tensor(&format!("weight{SCALE_INV_SUFFIX}")))
}

impl Fp8Weight {
    /// `weight` (`[rows, cols]`) at `vb` as its raw `e4m3fn` bytes, and its block scales.
    pub(crate) fn load(vb: &candle_nn::VarBuilder, rows: usize, cols: usize, block: [usize; 2]) -> Result<Self> {
        let bytes = vb.get_with_hints_dtype((rows, cols), "weight", candle_nn::Init::Const(0.0), DType::U8)?;
        let scales = vb.get_with_hints_dtype(
            (rows.div_ceil(block[0]), cols.div_ceil(block[1])),
            &format!("weight{SCALE_INV_SUFFIX}"),
            candle_nn::Init::Const(0.0),
            DType::F32,
        )?;
        Ok(Self { bytes: bytes.flatten_all()?.to_vec1::<u8>()?, scales: scales.flatten_all()?.to_vec1::<f32>()?, rows })
    }
}

/// Whether weights loaded through `vb` run on the host kernels (f32 or bf16 on the CPU).
pub(crate) fn uses_host_kernels(vb: &candle_nn::VarBuilder) -> bool {
    vb.device().is_cpu() && host_dtype(vb.dtype())
}

/// The weight dtypes the host kernels read: f32, and bf16 widened in registers (f16 runs on candle).
pub(crate) fn host_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
}

impl Norm {
    /// Loads `weight` (`[dim]`) at `vb`.
    pub fn load(dim: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        if uses_host_kernels(&vb) {
            let weight = vb.get(dim, "weight")?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            return Ok(Self::Host { weight, eps: eps as f32 });
        }
        Ok(Self::Candle(candle_nn::rms_norm(dim, eps, vb)?))
    }

    pub fn is_host(&self) -> bool {
        matches!(self, Self::Host { .. })
    }

    /// Bytes of the weight.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Candle(norm) => tensor_bytes(norm.weight()),
            Self::Host { weight, .. } => std::mem::size_of_val(weight.as_slice()),
        }
    }

    /// The weight tensor and epsilon of a norm that runs on candle (the device kernels apply it themselves);
    /// `None` when packed for the host.
    pub fn weight_eps(&self) -> Option<(Tensor, f64)> {
        match self {
            Self::Candle(norm) => Some((norm.weight().clone(), norm.clone().into_inner().eps())),
            Self::Host { .. } => None,
        }
    }

    /// Normalizes every `dim`-wide row of `data` in place; `false` (nothing done) when this norm runs on candle.
    pub fn host(&self, data: &mut [f32]) -> bool {
        let Self::Host { weight, eps } = self else { return false };
        for row in data.chunks_exact_mut(weight.len().max(1)) {
            rms_norm_row(row, weight, *eps);
        }
        true
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dim = match self {
            Self::Candle(norm) => return Ok(candle_nn::Module::forward(norm, x)?),
            Self::Host { weight, .. } => weight.len(),
        };
        if x.dims().last() != Some(&dim) || dim == 0 {
            return Err(Error::internal(
                Part::HostKernels,
                format!("rows of shape {:?} for a norm over {dim}", x.dims()),
            ));
        }
        let mut data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.host(&mut data);
        Ok(Tensor::from_vec(data, x.dims(), x.device())?.to_dtype(x.dtype())?)
    }
}

/// Dot product with eight independent accumulators, so the compiler vectorizes it.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// Sum in eight independent lanes (vectorizable, unlike a sequential float sum).
#[inline(always)]
pub(crate) fn sum8(values: &[f32]) -> f32 {
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

/// One row in place.
fn rms_norm_row(row: &mut [f32], weight: &[f32], eps: f32) {
    let mean = dot(row, row) / row.len() as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, w) in row.iter_mut().zip(weight) {
        *v = *v * scale * w;
    }
}

/// A SwiGLU block `down(silu(gate(x)) * up(x))` on the host: `gate_up` is `[2 * intermediate, hidden]` (gate
/// rows first), `down` `[hidden, intermediate]`.
#[derive(Debug, Clone)]
pub struct HostMlp {
    gate_up: PackedMatrix,
    down: PackedMatrix,
}

impl HostMlp {
    pub fn new(gate_up: &Tensor, down: &Tensor) -> Result<Self> {
        Self::chain(PackedMatrix::from_tensor(gate_up)?, PackedMatrix::from_tensor(down)?)
    }

    /// The SwiGLU at `vb` (`gate_proj`, `up_proj`, `down_proj`) kept as FP8, when [`kept_fp8`] says so for all
    /// three; else `None` (it loads wide).
    pub(crate) fn load_fp8(
        hidden: usize,
        intermediate: usize,
        fp8: Option<[usize; 2]>,
        vb: &VarBuilder,
    ) -> Result<Option<Self>> {
        let [gate, up, down] = ["gate_proj", "up_proj", "down_proj"].map(|name| vb.pp(name));
        let [Some(block), Some(_), Some(_)] = [&gate, &up, &down].map(|vb| kept_fp8(vb, fp8)) else {
            return Ok(None);
        };
        let gate = Fp8Weight::load(&gate, intermediate, hidden, block)?;
        let up = Fp8Weight::load(&up, intermediate, hidden, block)?;
        let down = Fp8Weight::load(&down, hidden, intermediate, block)?;
        let gate_up = PackedMatrix::from_fp8(&[gate, up], hidden, block)?;
        Ok(Some(Self::chain(gate_up, PackedMatrix::from_fp8(&[down], intermediate, block)?)?))
    }

    fn chain(gate_up: PackedMatrix, down: PackedMatrix) -> Result<Self> {
        if gate_up.out_dim() != 2 * down.in_dim() || gate_up.in_dim() != down.out_dim() {
            return Err(Error::internal(
                Part::HostKernels,
                format!(
                    "expert shapes do not chain: gate_up [{}, {}], down [{}, {}]",
                    gate_up.out_dim(),
                    gate_up.in_dim(),
                    down.out_dim(),
                    down.in_dim()
                ),
            ));
        }
        Ok(Self { gate_up, down })
    }

    pub fn hidden(&self) -> usize {
        self.down.out_dim()
    }

    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }

    pub fn visit_weights(&mut self, f: &mut WeightVisitor<'_>) -> Result<()> {
        f(WeightMut::Packed(&mut self.gate_up))?;
        f(WeightMut::Packed(&mut self.down))
    }

    /// `x` `[m, hidden]` → `[m, hidden]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let i = self.down.in_dim();
        let h = self.gate_up.matmul(x, m);
        let mut act = vec![0f32; m * i];
        for (a, row) in act.chunks_exact_mut(i.max(1)).zip(h.chunks_exact((2 * i).max(1))) {
            silu_mul(&row[..i], &row[i..], a);
        }
        self.down.matmul(&act, m)
    }
}

/// `out = silu(gate) * up`, element-wise.
fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2, checked just above; that is the only requirement of the call.
        unsafe {
            silu_mul_avx2(gate, up, out)
        };
        return;
    }
    silu_mul_portable(gate, up, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_portable(gate, up, out);
}

#[inline(always)]
fn silu_mul_portable(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// `out[i] = sigmoid(x[i])` (router scores), vectorized like [`silu`].
pub(crate) fn sigmoid_into(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[allow(unsafe_code)]
        // SAFETY: the CPU supports AVX2, checked just above; that is the only requirement of the call.
        unsafe {
            sigmoid_avx2(x, out)
        };
        return;
    }
    sigmoid_portable(x, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sigmoid_avx2(x: &[f32], out: &mut [f32]) {
    sigmoid_portable(x, out);
}

#[inline(always)]
fn sigmoid_portable(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = sigmoid(v);
    }
}

/// `sigmoid(x) = 1 / (1 + exp(-x))` from `e = exp(-|x|)` only (no overflow, branch-free).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    (if x >= 0.0 { 1.0 } else { e }) / (1.0 + e)
}

/// `x · sigmoid(x)`, with the exponential of a non-positive argument only (`e = exp(-|x|)`), branch-free so a
/// loop over it vectorizes.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// `exp(x)` for `x <= 0` (softmax scores minus their maximum), within about 2 ulp of `f32::exp`: `2^n · exp(r)`
/// with `n = round(x / ln 2)` and a degree-6 polynomial for `exp(r)` on `|r| <= ln 2 / 2` (Cephes' `expf`
/// coefficients). Branch-free and inlined, so a loop over it vectorizes, unlike the libm call. Below -87.3 the
/// result is ~1e-38 instead of a denormal or 0, which changes no softmax (its largest term is 1).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
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
    // 2^n as a float: n is in [-126, 0] here, so the biased exponent n + 127 is in [1, 127]. Added to 2^23 it
    // lands in the low mantissa bits, and the shift moves it into the exponent field (the rest shifts out); unlike
    // an `as` conversion, which saturates lane by lane, this stays in vector registers.
    e * f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.618).sin()).collect()
    }

    /// Every row and column remainder, against candle's matmul.
    #[test]
    fn packed_products_equal_candle_for_every_shape_remainder() {
        for (m, k, n) in [(1, 1, 1), (1, 64, 64), (3, 7, 5), (4, 64, 40), (5, 32, 17), (9, 40, 264), (32, 64, 96)] {
            let (a, w) = (values(m * k, 1.0), values(n * k, 2.0));
            let packed = PackedMatrix::from_rows(&w, n, k).unwrap();
            let got = packed.matmul(&a, m);
            // The AVX-512 kernel, where this CPU has it, gives exactly the AVX2 kernel's values.
            #[cfg(target_arch = "x86_64")]
            if wide::available() && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                let Panels::F32(p) = &packed.panels else { unreachable!() };
                let (mut x, mut y) = (vec![0f32; m * n], vec![0f32; m * n]);
                for (i, panel) in p.chunks_exact(k * PANEL).enumerate() {
                    let rows = Strided { a: &a, stride: k, m, k };
                    let (first, width) = (i * PANEL, PANEL.min(n - i * PANEL));
                    #[allow(unsafe_code)]
                    // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked above), all the two kernels need.
                    unsafe {
                        wide::product(rows, panel, &mut Columns { out: &mut x, stride: n, first, width });
                        panel_product_fma(rows, panel, Columns { out: &mut y, stride: n, first, width });
                    }
                }
                assert_eq!(x, y, "m {m} k {k} n {n}");
                assert_eq!(x, got, "m {m} k {k} n {n}");
            }
            let ta = Tensor::from_vec(a, (m, k), &Device::Cpu).unwrap();
            let tw = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
            let want = ta.matmul(&tw.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-5, "m {m} k {k} n {n} at {i}: {g} vs {w}");
            }
        }
    }

    /// bf16 weights multiply the inputs rounded to bf16: the product equals, to f32 rounding, the f32 product of the
    /// same weights and the rounded inputs, on the single pass and the pool-split path; the fallback kernel gives
    /// exactly the values of the one this CPU runs (`vdpbf16ps` where it has it; on a CPU without it, the fallback is
    /// compared with itself); it stores half the bytes (inputs padded to pairs).
    #[test]
    fn bf16_products_equal_the_f32_product_of_the_rounded_values() {
        for (m, k, n) in [(1, 7, 5), (1, 70, 40), (2, 64, 40), (3, 64, 40), (5, 32, 17), (6, 33, 20), (33, 256, 300)] {
            let (a, w) = (values(m * k, 5.0), values(n * k, 6.0));
            let w16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let widened: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let rounded: Vec<f32> = a.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
            let t16 = Tensor::from_vec(w16, (n, k), &Device::Cpu).unwrap();
            let packed16 = PackedMatrix::from_tensor(&t16).unwrap();
            let packed32 = PackedMatrix::from_rows(&widened, n, k).unwrap();
            assert_eq!(2 * packed16.bytes(), n.div_ceil(PANEL) * PANEL * k.next_multiple_of(2) * 4);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let (got, want) = pool.install(|| (packed16.matmul(&a, m), packed32.matmul(&rounded, m)));
            let single =
                rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| packed16.matmul(&a, m));
            assert_eq!(got, single, "m {m} k {k} n {n}: the pool split changed the result");
            let Panels::Bf16(b) = &packed16.panels else { panic!("not bf16") };
            let rows = Bf16Rows::round(&a, m, k);
            let mut portable = vec![0f32; m * n];
            for p in 0..n.div_ceil(PANEL) {
                let mut dst =
                    Columns { out: &mut portable, stride: n, first: p * PANEL, width: PANEL.min(n - p * PANEL) };
                bf16::fallback_product(b.panel(p), &rows, &mut dst);
            }
            assert_eq!(got, portable, "m {m} k {k} n {n}: the fallback kernel differs");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "m {m} k {k} n {n} at {i}: {g} vs {w}");
            }
        }
    }

    /// int8 panels: each weight and each input is within half a step (`scale / 2`) of its original; the product
    /// equals, to f32 rounding, the f32 product of the dequantized inputs and weights, on the single pass and the
    /// pool-split path, for every row/column remainder and a partial last block, and the fallback integer kernel
    /// gives the same values as the one this CPU runs (VNNI where it has it; on a CPU without it, the fallback is
    /// compared with itself); the storage is one byte per weight (inputs padded to whole blocks) and an f32 scale
    /// per 32.
    #[test]
    fn int8_products_equal_the_product_of_the_dequantized_values() {
        for (m, k, n) in [(1, 7, 5), (2, 64, 40), (3, 64, 40), (5, 40, 17), (6, 33, 20), (4, 96, 16), (33, 256, 300)] {
            let (a, w) = (values(m * k, 7.0), values(n * k, 8.0));
            let mut packed = PackedMatrix::from_rows(&w, n, k).unwrap();
            packed.quantize_int8();
            let Panels::Int8(q) = &packed.panels else { panic!("not int8") };
            let mut dequantized = vec![0f32; n * k];
            for o in 0..n {
                for kk in 0..k {
                    let (value, scale) = q.weight(o, kk);
                    let d = f32::from(value) * scale;
                    assert!((d - w[o * k + kk]).abs() <= scale / 2.0 + 1e-7, "weight [{o}, {kk}]");
                    dequantized[o * k + kk] = d;
                }
            }
            let rows = Q8Rows::quantize(&a, m, k);
            let mut inputs = vec![0f32; m * k];
            for r in 0..m {
                for kk in 0..k {
                    let (value, scale) = rows.value(r, kk);
                    let d = f32::from(value) * scale;
                    assert!((d - a[r * k + kk]).abs() <= scale / 2.0 + 1e-7, "input [{r}, {kk}]");
                    inputs[r * k + kk] = d;
                }
            }
            let reference = PackedMatrix::from_rows(&dequantized, n, k).unwrap().matmul(&inputs, m);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let got = pool.install(|| packed.matmul(&a, m));
            let single =
                rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| packed.matmul(&a, m));
            assert_eq!(got, single, "m {m} k {k} n {n}: the pool split changed the result");
            let mut portable = vec![0f32; m * n];
            for p in 0..n.div_ceil(PANEL) {
                let dst = Columns { out: &mut portable, stride: n, first: p * PANEL, width: PANEL.min(n - p * PANEL) };
                q8::fallback_matmul(q, &rows, p, dst);
            }
            assert_eq!(got, portable, "m {m} k {k} n {n}: the fallback kernel differs");
            for (i, (g, w)) in got.iter().zip(&reference).enumerate() {
                assert!((g - w).abs() <= 2e-5 * (1.0 + w.abs()), "m {m} k {k} n {n} at {i}: {g} vs {w}");
            }
            let (panels, blocks) = (n.div_ceil(PANEL), k.div_ceil(q8::BLOCK));
            assert_eq!(packed.bytes(), panels * PANEL * (blocks * q8::BLOCK + 4 * blocks));
        }
    }

    /// e4m3 bytes (no NaN) and positive scales, a pattern of every magnitude and sign.
    fn fp8_part(rows: usize, k: usize, block: [usize; 2], seed: usize) -> Fp8Weight {
        let bytes = (0..rows * k)
            .map(|i| match ((i * 37 + seed * 11) % 256) as u8 {
                0x7F | 0xFF => 0x3C,
                b => b,
            })
            .collect();
        let n = rows.div_ceil(block[0]) * k.div_ceil(block[1]);
        let scales = (0..n).map(|i| 1e-3 * (1.0 + ((i + seed) % 7) as f32)).collect();
        Fp8Weight { bytes, scales, rows }
    }

    /// FP8 panels (two parts stacked, as gate and up): each stored weight is the part's e4m3 value times its
    /// block's scale; the product equals, to f32 rounding, the f32 product of those weights and the inputs rounded
    /// to bf16, on the single pass and the pool-split path, for row and column remainders, inputs not a multiple
    /// of 4 and a partial last block; the fallback gives exactly the values of the kernel this CPU runs (AVX-512
    /// VBMI + BF16 where it has them; on a CPU without them the fallback is compared with itself); one byte per weight (inputs padded to quads) and an f32 scale per column
    /// and block. A block whose input side is not a multiple of 4 is refused.
    #[test]
    fn fp8_products_equal_the_f32_product_of_the_scaled_values() {
        for (m, k, rows, block) in [
            (1, 7, [3, 2], [2, 4]),
            (1, 256, [20, 20], [8, 128]),
            (2, 64, [16, 24], [16, 16]),
            (3, 70, [9, 8], [5, 12]),
            (5, 130, [17, 17], [128, 128]),
            (9, 40, [40, 8], [128, 32]),
            (33, 256, [150, 150], [128, 128]),
        ] {
            let parts = [fp8_part(rows[0], k, block, 1), fp8_part(rows[1], k, block, 2)];
            let n = rows[0] + rows[1];
            let packed = PackedMatrix::from_fp8(&parts, k, block).unwrap();
            assert_eq!((packed.in_dim(), packed.out_dim()), (k, n));
            let scale_cols = k.div_ceil(block[1]);
            let mut dequantized = Vec::with_capacity(n * k);
            for part in &parts {
                for r in 0..part.rows {
                    for kk in 0..k {
                        let scale = part.scales[r / block[0] * scale_cols + kk / block[1]];
                        let want = crate::weights::fp8::E4M3_TO_F32[usize::from(part.bytes[r * k + kk])] * scale;
                        let Panels::Fp8(w) = &packed.panels else { panic!("not fp8") };
                        let o = dequantized.len() / k;
                        assert_eq!(w.weight(o / PANEL, kk, o % PANEL), want, "weight [{o}, {kk}]");
                        dequantized.push(want);
                    }
                }
            }
            let a = values(m * k, 14.0);
            let rounded: Vec<f32> = a.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
            let want = PackedMatrix::from_rows(&dequantized, n, k).unwrap().matmul(&rounded, m);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let got = pool.install(|| packed.matmul(&a, m));
            let single =
                rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| packed.matmul(&a, m));
            assert_eq!(got, single, "m {m} k {k} n {n}: the pool split changed the result");
            let Panels::Fp8(w) = &packed.panels else { panic!("not fp8") };
            let rows = fp8::rows(w, &a, m);
            let mut portable = vec![0f32; m * n];
            for p in 0..n.div_ceil(PANEL) {
                let mut dst =
                    Columns { out: &mut portable, stride: n, first: p * PANEL, width: PANEL.min(n - p * PANEL) };
                fp8::fallback_product(w, &rows, p, &mut dst);
            }
            assert_eq!(got, portable, "m {m} k {k} n {n}: the fallback kernel differs");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "m {m} k {k} n {n} at {i}: {g} vs {w}");
            }
            let (panels, blocks) = (n.div_ceil(PANEL), k.div_ceil(block[1]));
            assert_eq!(packed.bytes(), panels * PANEL * (k.next_multiple_of(4) + 4 * blocks));
            assert!(format!("{packed:?}").contains("fp8"));
        }
        let part = fp8_part(4, 12, [4, 6], 3);
        let err = PackedMatrix::from_fp8(&[part], 12, [4, 6]).unwrap_err();
        assert!(err.to_string().contains("multiple of 4"), "{err}");
    }

    /// A NaN weight (e4m3 `0x7F` or `0xFF`) makes its column's outputs NaN, as the dequantized product would, the
    /// fallback's bits equal to the kernel's.
    #[test]
    fn fp8_products_keep_nan() {
        for nan in [0x7F, 0xFF] {
            let mut part = fp8_part(20, 64, [128, 128], 4);
            part.bytes[7 * 64 + 40] = nan;
            let packed = PackedMatrix::from_fp8(&[part], 64, [128, 128]).unwrap();
            let a = values(2 * 64, 15.0);
            let out = packed.matmul(&a, 2);
            for row in out.chunks_exact(20) {
                assert!(row[7].is_nan() && row.iter().filter(|v| v.is_nan()).count() == 1, "{row:?}");
            }
            let Panels::Fp8(w) = &packed.panels else { panic!("not fp8") };
            let mut portable = vec![0f32; 2 * 20];
            for p in 0..2 {
                let mut dst =
                    Columns { out: &mut portable, stride: 20, first: p * PANEL, width: PANEL.min(20 - p * PANEL) };
                fp8::fallback_product(w, &fp8::rows(w, &a, 2), p, &mut dst);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&portable), "{nan:#04x}");
        }
    }

    /// A NaN in an input row (or a weight) makes that row's outputs NaN, as the f32 product would; the other rows
    /// are untouched.
    #[test]
    fn int8_products_keep_nan() {
        let (m, k, n) = (3, 64, 20);
        let (mut a, mut w) = (values(m * k, 11.0), values(n * k, 12.0));
        a[k + 5] = f32::NAN;
        let mut packed = PackedMatrix::from_rows(&w, n, k).unwrap();
        packed.quantize_int8();
        let out = packed.matmul(&a, m);
        assert!(out[n..2 * n].iter().all(|v| v.is_nan()), "{:?}", &out[n..2 * n]);
        assert!(out[..n].iter().chain(&out[2 * n..]).all(|v| v.is_finite()));
        w[7 * k + 40] = f32::NAN;
        let mut packed = PackedMatrix::from_rows(&w, n, k).unwrap();
        packed.quantize_int8();
        let out = packed.matmul(&values(k, 13.0), 1);
        assert!(out[7].is_nan() && out.iter().filter(|v| v.is_nan()).count() == 1, "{out:?}");
    }

    /// Quantizing bf16 panels gives the same int8 matrix as quantizing their f32 widening, and a column of zeros
    /// stays zero (its scale is 0, not a division by zero).
    #[test]
    fn int8_from_bf16_equals_int8_from_the_widened_f32() {
        let (n, k) = (20, 70);
        let mut w = values(n * k, 9.0);
        w[3 * k..4 * k].fill(0.0);
        let w16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let widened: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        let mut from16 = PackedMatrix::from_tensor(&Tensor::from_vec(w16, (n, k), &Device::Cpu).unwrap()).unwrap();
        let mut from32 = PackedMatrix::from_rows(&widened, n, k).unwrap();
        from16.quantize_int8();
        from32.quantize_int8();
        let a = values(2 * k, 10.0);
        assert_eq!(from16.matmul(&a, 2), from32.matmul(&a, 2));
        let out = from16.matmul(&a, 2);
        assert_eq!((out[3], out[n + 3]), (0.0, 0.0));
        assert!(format!("{from16:?}").contains("int8"));
    }

    /// The pool-split path (large products) writes the same values as the single-thread path.
    #[test]
    fn large_products_split_over_the_pool_equal_the_single_pass() {
        let (m, k, n) = (33, 256, 300);
        let (a, w) = (values(m * k, 3.0), values(n * k, 4.0));
        let packed = PackedMatrix::from_rows(&w, n, k).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let split = pool.install(|| packed.matmul(&a, m));
        let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| packed.matmul(&a, m));
        assert_eq!(split, single);
        let naive: f32 = (0..k).map(|kk| a[5 * k + kk] * w[77 * k + kk]).sum();
        assert!((split[5 * n + 77] - naive).abs() < 1e-4);
    }

    #[test]
    fn host_mlp_equals_the_candle_chain() {
        let (m, hidden, inter) = (6, 24, 10);
        let dev = Device::Cpu;
        // Weights of the magnitude a trained layer has (|w| ≤ 0.25), so outputs are of order one.
        let small = |n: usize, seed: f32| values(n, seed).into_iter().map(|v| v * 0.25).collect::<Vec<_>>();
        let x = Tensor::from_vec(values(m * hidden, 5.0), (m, hidden), &dev).unwrap();
        let gate_up = Tensor::from_vec(small(2 * inter * hidden, 6.0), (2 * inter, hidden), &dev).unwrap();
        let down = Tensor::from_vec(small(hidden * inter, 7.0), (hidden, inter), &dev).unwrap();
        let h = x.matmul(&gate_up.t().unwrap()).unwrap();
        let act = (candle_nn::ops::silu(&h.narrow(1, 0, inter).unwrap()).unwrap() * h.narrow(1, inter, inter).unwrap())
            .unwrap();
        let want = act.matmul(&down.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mlp = HostMlp::new(&gate_up, &down).unwrap();
        let got = mlp.forward(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), m);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        assert!(HostMlp::new(&gate_up, &gate_up).is_err());
        assert!(PackedMatrix::from_rows(&[1.0; 5], 2, 3).is_err());
    }

    #[test]
    fn packed_projections_equal_candle_linear_with_and_without_bias() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(values(40 * 24, 8.0), (40, 24), &dev).unwrap();
        let b = Tensor::from_vec(values(40, 9.0), 40, &dev).unwrap();
        let x = Tensor::from_vec(values(2 * 3 * 24, 10.0), (2, 3, 24), &dev).unwrap();
        for bias in [None, Some(b)] {
            let linear = candle_nn::Linear::new(w.clone(), bias);
            let want = candle_nn::Module::forward(&linear, &x).unwrap();
            let projection = Projection::new(linear).unwrap();
            assert!(matches!(projection, Projection::Host { .. }));
            let got = projection.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "max difference {diff}");
        }
        let projection = Projection::new(candle_nn::Linear::new(w, None)).unwrap();
        assert!(projection.forward(&Tensor::zeros((2, 5), DType::F32, &dev).unwrap()).is_err());
    }

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
    fn host_norm_equals_candle_rms_norm() {
        let dev = Device::Cpu;
        let (rows, dim) = (5, 36);
        let w = Tensor::from_vec(values(dim, 11.0), dim, &dev).unwrap();
        let x = Tensor::from_vec(values(rows * dim, 12.0), (rows, dim), &dev).unwrap();
        let want = candle_nn::Module::forward(&candle_nn::RmsNorm::new(w.clone(), 1e-6), &x).unwrap();
        let norm = Norm::Host { weight: w.to_vec1::<f32>().unwrap(), eps: 1e-6 };
        let got = norm.forward(&x).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "max difference {diff}");
        assert!(norm.forward(&Tensor::zeros((2, 5), DType::F32, &dev).unwrap()).is_err());
    }

    #[test]
    fn the_vectorized_sigmoid_matches_the_definition() {
        let x: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.04).collect();
        let mut got = vec![0f32; x.len()];
        sigmoid_into(&x, &mut got);
        for (&v, &g) in x.iter().zip(&got) {
            let want = 1.0 / (1.0 + (-v).exp());
            assert!((g - want).abs() <= 8.0 * f32::EPSILON * want, "sigmoid({v}): {g} vs {want}");
        }
    }

    #[test]
    fn the_branch_free_silu_matches_the_definition() {
        let mut x = -80f32;
        while x < 80.0 {
            let want = x / (1.0 + (-x).exp());
            let got = silu(x);
            assert!((got - want).abs() <= 8.0 * f32::EPSILON * want.abs(), "silu({x}): {got} vs {want}");
            x += 0.0137;
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
    }
}
