//! Launches of the kernels in `runtime/kernels/baleen.cu` (compiled to PTX by build.rs) on the CUDA device's stream.
//!
//! Inputs are made contiguous and passed to the kernels as device addresses; outputs are fresh device buffers
//! wrapped as candle tensors. Every launch is ordered on the stream candle's device launches on (for
//! `Device::new_cuda`, the per-thread default stream), after the work that produced its inputs and before any later
//! free of them (candle frees buffers stream-ordered) — so, as with candle's own ops, a model's tensors are used from
//! one host thread at a time (the engine's).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Shape, Storage, Tensor};

use super::{DeviceRotary, ExpertCounters, MLA_MAX_RANK, MLA_MAX_WIDTH, PagedCache, Plan, RouteParams};
use crate::error::{Error, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/baleen.ptx"));
const MODULE: &str = "baleen";

/// Threads of the grouped expert kernels (EXPERT_WARPS warps) and the output rows each block computes.
const EXPERT_THREADS: u32 = 128;
const EXPERT_ROWS_PER_BLOCK: usize = 8;
/// Threads of the MLA decode kernel (MLA_WARPS warps).
const MLA_THREADS: u32 = 512;
/// Threads of the cache-row kernel (KV_THREADS).
const KV_THREADS: u32 = 256;
/// Threads of the dispatch kernel.
const DISPATCH_THREADS: u32 = 1024;
/// Threads per block of the element-wise kernels.
const ELEMENTWISE_THREADS: u32 = 256;

fn kernel_error(what: impl Into<String>) -> Error {
    Error::Kernel(what.into())
}

/// The kernel `name`, loaded once per device.
fn function(dev: &CudaDevice, name: &'static str) -> Result<CudaFunction> {
    static LOADED: OnceLock<Mutex<HashMap<(DeviceId, &'static str), CudaFunction>>> = OnceLock::new();
    let loaded = LOADED.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (dev.id(), name);
    if let Some(f) = loaded.lock().map_err(|_| kernel_error("kernel cache poisoned"))?.get(&key) {
        return Ok(f.clone());
    }
    let f = dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function();
    loaded.lock().map_err(|_| kernel_error("kernel cache poisoned"))?.insert(key, f.clone());
    Ok(f)
}

/// The CUDA device of `t`.
fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) => Ok(dev.clone()),
        other => Err(kernel_error(format!("a tensor on {other:?} given to a CUDA kernel"))),
    }
}

/// A contiguous input kept alive until the launch is queued (its buffer is freed stream-ordered after that).
struct Held {
    tensor: Tensor,
}

impl Held {
    fn new(t: &Tensor) -> Result<Self> {
        Ok(Self { tensor: t.contiguous()? })
    }

    /// The same storage, which must already be contiguous (an output written in place).
    fn in_place(t: &Tensor) -> Result<Self> {
        if !t.is_contiguous() {
            return Err(kernel_error("a kernel writes in place into a non-contiguous tensor"));
        }
        Ok(Self { tensor: t.clone() })
    }

    fn dtype(&self) -> DType {
        self.tensor.dtype()
    }

    /// The device address of the first element.
    fn ptr(&self, stream: &CudaStream) -> Result<u64> {
        let (storage, layout) = self.tensor.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else { return Err(kernel_error("a CPU tensor given to a CUDA kernel")) };
        let base = match &cuda.slice {
            CudaStorageSlice::U8(s) => s.device_ptr(stream).0,
            CudaStorageSlice::U32(s) => s.device_ptr(stream).0,
            CudaStorageSlice::I64(s) => s.device_ptr(stream).0,
            CudaStorageSlice::BF16(s) => s.device_ptr(stream).0,
            CudaStorageSlice::F16(s) => s.device_ptr(stream).0,
            CudaStorageSlice::F32(s) => s.device_ptr(stream).0,
            _ => return Err(kernel_error(format!("no kernel takes {:?}", self.dtype()))),
        };
        Ok(base + (layout.start_offset() * self.dtype().size_in_bytes()) as u64)
    }

    /// Whether the first element sits on a 16-byte boundary.
    fn aligned16(&self, stream: &CudaStream) -> Result<bool> {
        Ok(self.ptr(stream)?.is_multiple_of(16))
    }
}

fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| kernel_error(format!("{what} {v} exceeds the kernels' 32-bit sizes")))
}

fn grid(blocks: usize) -> Result<u32> {
    u32::try_from(blocks.max(1)).map_err(|_| kernel_error(format!("{blocks} blocks in one launch")))
}

/// The entry point `{root}_{f32|bf16|f16}`.
fn typed(root: &'static str, dtype: DType) -> Result<&'static str> {
    let name = match (root, dtype) {
        ("moe_gate_up", DType::F32) => "moe_gate_up_f32",
        ("moe_gate_up", DType::BF16) => "moe_gate_up_bf16",
        ("moe_gate_up", DType::F16) => "moe_gate_up_f16",
        ("moe_down", DType::F32) => "moe_down_f32",
        ("moe_down", DType::BF16) => "moe_down_bf16",
        ("moe_down", DType::F16) => "moe_down_f16",
        ("moe_combine", DType::F32) => "moe_combine_f32",
        ("moe_combine", DType::BF16) => "moe_combine_bf16",
        ("moe_combine", DType::F16) => "moe_combine_f16",
        ("mla_decode", DType::F32) => "mla_decode_f32",
        ("mla_decode", DType::BF16) => "mla_decode_bf16",
        ("mla_decode", DType::F16) => "mla_decode_f16",
        ("kv_write", DType::F32) => "kv_write_f32",
        ("kv_write", DType::BF16) => "kv_write_bf16",
        ("kv_write", DType::F16) => "kv_write_f16",
        ("moe_unpad_rows", DType::F32) => "moe_unpad_rows_f32",
        ("moe_unpad_rows", DType::BF16) => "moe_unpad_rows_bf16",
        ("moe_unpad_rows", DType::F16) => "moe_unpad_rows_f16",
        (root, dtype) => return Err(kernel_error(format!("no {root} kernel for {dtype:?}"))),
    };
    Ok(name)
}

/// A fresh, uninitialized `[len]` buffer of `dtype`: every kernel writes each element its callers read (a dispatch
/// plan's unused active-expert slots excepted, which nothing reads).
fn output(dev: &CudaDevice, dtype: DType, len: usize, shape: impl Into<Shape>) -> Result<(Tensor, Held)> {
    let len = len.max(1);
    // SAFETY: the buffers are written by the kernel launched next before anything reads them (see above).
    let t = unsafe {
        match dtype {
            DType::F32 => wrap(dev.alloc::<f32>(len)?, dev, len),
            DType::BF16 => wrap(dev.alloc::<half::bf16>(len)?, dev, len),
            DType::F16 => wrap(dev.alloc::<half::f16>(len)?, dev, len),
            DType::U32 => wrap(dev.alloc::<u32>(len)?, dev, len),
            other => return Err(kernel_error(format!("no kernel writes {other:?}"))),
        }
    };
    let shape: Shape = shape.into();
    let t = if shape.elem_count() == len {
        t.reshape(shape)?
    } else {
        t.narrow(0, 0, shape.elem_count())?.reshape(shape)?
    };
    let held = Held::in_place(&t)?;
    Ok((t, held))
}

/// A launch of `blocks` (x, y) blocks of `threads` threads.
fn config(blocks: (usize, usize), threads: u32) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid(blocks.0)?, grid(blocks.1)?, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Queues `name` with `args` (device addresses and 32-bit scalars, in the kernel's parameter order).
fn launch(dev: &CudaDevice, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    let f = function(dev, name)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    for arg in args {
        match arg {
            Arg::Ptr(p) => b.arg(p),
            Arg::Int(v) => b.arg(v),
            Arg::Float(v) => b.arg(v),
            Arg::Long(v) => b.arg(v),
        };
    }
    // SAFETY: every caller passes the kernel's parameters in order and with its types (64-bit device addresses of
    // buffers of at least the sizes the kernel indexes, 32-bit ints and floats), checked against the shapes first.
    unsafe { b.launch(cfg) }.map_err(|e| kernel_error(format!("{name}: {e}")))?;
    Ok(())
}

/// A kernel parameter.
#[derive(Debug, Clone, Copy)]
enum Arg {
    Ptr(u64),
    Int(i32),
    Float(f32),
    Long(u64),
}

pub fn route(logits: &Tensor, bias: Option<&Tensor>, p: &RouteParams) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(logits)?;
    let stream = dev.cuda_stream();
    let (tokens, e) = logits.dims2()?;
    if e != p.n_experts || logits.dtype() != DType::F32 || !p.fits() {
        return Err(kernel_error(format!("routing {e} f32 logits per token with {p:?}")));
    }
    let logits = Held::new(logits)?;
    let bias = bias.map(|b| Held::new(&b.to_dtype(DType::F32)?)).transpose()?;
    if bias.as_ref().is_some_and(|b| b.tensor.elem_count() != e) {
        return Err(kernel_error("a correction bias of the wrong length"));
    }
    let (ids, ids_out) = output(&dev, DType::U32, tokens * p.top_k, tokens * p.top_k)?;
    let (out, out_w) = output(&dev, DType::F32, tokens * (p.top_k + 1), tokens * (p.top_k + 1))?;
    if tokens > 0 {
        let logits_ptr = logits.ptr(&stream)?;
        // One warp per token; its scores and choices in shared memory.
        let cfg = LaunchConfig { shared_mem_bytes: (2 * e * 4) as u32, ..config((tokens, 1), 32)? };
        launch(
            &dev,
            "moe_route",
            cfg,
            &[
                Arg::Ptr(logits_ptr),
                Arg::Ptr(bias.as_ref().map_or(Ok(logits_ptr), |b| b.ptr(&stream))?),
                Arg::Int(i32::from(bias.is_some())),
                Arg::Ptr(ids_out.ptr(&stream)?),
                Arg::Ptr(out_w.ptr(&stream)?),
                Arg::Int(int(tokens, "tokens")?),
                Arg::Int(int(e, "experts")?),
                Arg::Int(int(p.top_k, "top_k")?),
                Arg::Int(int(p.n_group, "n_group")?),
                Arg::Int(int(p.topk_group, "topk_group")?),
                Arg::Int(p.scoring),
                Arg::Int(p.method),
                Arg::Int(i32::from(p.norm_topk)),
                Arg::Float(p.scaling),
            ],
        )?;
    }
    Ok((ids, out))
}

pub fn dispatch(ids: &Tensor, n_experts: usize, top_k: usize, counters: Option<ExpertCounters<'_>>) -> Result<Plan> {
    let dev = cuda_device(ids)?;
    let stream = dev.cuda_stream();
    let assignments = ids.elem_count();
    if ids.dtype() != DType::U32
        || n_experts > super::MAX_EXPERTS
        || n_experts == 0
        || top_k == 0
        || !assignments.is_multiple_of(top_k)
    {
        return Err(kernel_error(format!(
            "dispatching {assignments} {:?} ids over {n_experts} experts, {top_k} per token",
            ids.dtype()
        )));
    }
    let ids = Held::new(ids)?;
    let plan_len = 2 * n_experts + 2 + assignments;
    let (plan, plan_w) = output(&dev, DType::U32, plan_len, plan_len)?;
    let counter = counters.map(|c| Held::in_place(c.counters)).transpose()?;
    if counter.as_ref().is_some_and(|c| c.dtype() != DType::I64 || c.tensor.elem_count() < n_experts) {
        return Err(kernel_error("expert counters must be i64, one per expert"));
    }
    let real = counters.and_then(|c| c.real_tokens).map(Held::new).transpose()?;
    if real.as_ref().is_some_and(|r| r.dtype() != DType::U32 || r.tensor.elem_count() != 1) {
        return Err(kernel_error("the real token count must be one u32"));
    }
    let ids_ptr = ids.ptr(&stream)?;
    let cfg = config((1, 1), DISPATCH_THREADS)?;
    launch(
        &dev,
        "moe_dispatch",
        cfg,
        &[
            Arg::Ptr(ids_ptr),
            Arg::Ptr(plan_w.ptr(&stream)?),
            Arg::Ptr(counter.as_ref().map_or(Ok(ids_ptr), |c| c.ptr(&stream))?),
            Arg::Int(i32::from(counter.is_some())),
            Arg::Ptr(real.as_ref().map_or(Ok(ids_ptr), |r| r.ptr(&stream))?),
            Arg::Int(i32::from(real.is_some())),
            Arg::Int(int(assignments, "assignments")?),
            Arg::Int(int(n_experts, "experts")?),
            Arg::Int(int(top_k, "top_k")?),
        ],
    )?;
    Ok(Plan { tensor: plan, n_experts, tokens: assignments / top_k, top_k })
}

/// Checks that `experts` stacked weights and `rows` input rows are what `plan` was made for.
fn check_plan(plan: &Plan, experts: usize, rows: usize, what: &str) -> Result<()> {
    if experts != plan.n_experts || rows != plan.tokens {
        return Err(kernel_error(format!(
            "{what}: {experts} experts over {rows} rows with a plan for {} over {}",
            plan.n_experts, plan.tokens
        )));
    }
    Ok(())
}

/// Launch shape of the grouped expert kernels: row tiles × active-expert slots.
fn expert_grid(rows: usize, n_experts: usize, assignments: usize) -> Result<LaunchConfig> {
    config((rows.div_ceil(EXPERT_ROWS_PER_BLOCK), n_experts.min(assignments)), EXPERT_THREADS)
}

pub fn expert_gate_up(x: &Tensor, gate_up: &Tensor, plan: &Plan) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let stream = dev.cuda_stream();
    let (tokens, hidden) = x.dims2()?;
    let (n_experts, two_inter, w_hidden) = gate_up.dims3()?;
    let inter = two_inter / 2;
    if w_hidden != hidden || x.dtype() != gate_up.dtype() || two_inter % 2 != 0 {
        return Err(kernel_error(format!("experts {:?} for rows of width {hidden}", gate_up.dims())));
    }
    check_plan(plan, n_experts, tokens, "gate/up projections")?;
    let (assignments, top_k) = (plan.assignments(), plan.top_k);
    let (x, w, plan) = (Held::new(x)?, Held::new(gate_up)?, Held::new(&plan.tensor)?);
    let name = typed("moe_gate_up", x.dtype())?;
    let pack = 16 / x.dtype().size_in_bytes();
    let vec = hidden.is_multiple_of(pack) && x.aligned16(&stream)? && w.aligned16(&stream)?;
    let (h, h_w) = output(&dev, x.dtype(), assignments * inter, (assignments, inter))?;
    if assignments > 0 {
        launch(
            &dev,
            name,
            expert_grid(inter, n_experts, assignments)?,
            &[
                Arg::Ptr(x.ptr(&stream)?),
                Arg::Ptr(w.ptr(&stream)?),
                Arg::Ptr(plan.ptr(&stream)?),
                Arg::Ptr(h_w.ptr(&stream)?),
                Arg::Int(int(n_experts, "experts")?),
                Arg::Int(int(inter, "inter")?),
                Arg::Int(int(hidden, "hidden")?),
                Arg::Int(int(top_k, "top_k")?),
                Arg::Int(i32::from(vec)),
            ],
        )?;
    }
    Ok(h)
}

pub fn expert_down(h: &Tensor, down: &Tensor, plan: &Plan, weights: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(h)?;
    let stream = dev.cuda_stream();
    let (assignments, inter) = h.dims2()?;
    let (n_experts, hidden, w_inter) = down.dims3()?;
    if w_inter != inter || h.dtype() != down.dtype() || weights.elem_count() != assignments {
        return Err(kernel_error(format!(
            "down projections {:?} for {assignments} rows of width {inter}",
            down.dims()
        )));
    }
    if assignments != plan.assignments() {
        return Err(kernel_error("a dispatch plan for a different number of rows"));
    }
    check_plan(plan, n_experts, plan.tokens, "down projections")?;
    let (h, w, plan) = (Held::new(h)?, Held::new(down)?, Held::new(&plan.tensor)?);
    let weights = Held::new(&weights.to_dtype(DType::F32)?)?;
    let name = typed("moe_down", h.dtype())?;
    let pack = 16 / h.dtype().size_in_bytes();
    let vec = inter.is_multiple_of(pack) && h.aligned16(&stream)? && w.aligned16(&stream)?;
    let (y, y_w) = output(&dev, DType::F32, assignments * hidden, (assignments, hidden))?;
    if assignments > 0 {
        launch(
            &dev,
            name,
            expert_grid(hidden, n_experts, assignments)?,
            &[
                Arg::Ptr(h.ptr(&stream)?),
                Arg::Ptr(w.ptr(&stream)?),
                Arg::Ptr(plan.ptr(&stream)?),
                Arg::Ptr(weights.ptr(&stream)?),
                Arg::Ptr(y_w.ptr(&stream)?),
                Arg::Int(int(n_experts, "experts")?),
                Arg::Int(int(hidden, "hidden")?),
                Arg::Int(int(inter, "inter")?),
                Arg::Int(i32::from(vec)),
            ],
        )?;
    }
    Ok(y)
}

pub fn combine(y: &Tensor, shared: Option<&Tensor>, top_k: usize, dtype: DType) -> Result<Tensor> {
    let dev = cuda_device(y)?;
    let stream = dev.cuda_stream();
    let (rows, hidden) = y.dims2()?;
    if y.dtype() != DType::F32 || top_k == 0 || rows % top_k != 0 {
        return Err(kernel_error(format!("combining {rows} rows of {top_k} experts each")));
    }
    let tokens = rows / top_k;
    let y = Held::new(y)?;
    let shared = shared.map(|s| Held::new(&s.to_dtype(dtype)?)).transpose()?;
    if shared.as_ref().is_some_and(|s| s.tensor.dims() != [tokens, hidden]) {
        return Err(kernel_error(format!("a shared expert output for other than {tokens} tokens")));
    }
    let name = typed("moe_combine", dtype)?;
    let (out, out_w) = output(&dev, dtype, tokens * hidden, (tokens, hidden))?;
    if tokens * hidden > 0 {
        let y_ptr = y.ptr(&stream)?;
        let cfg = config(((tokens * hidden).div_ceil(ELEMENTWISE_THREADS as usize), 1), ELEMENTWISE_THREADS)?;
        launch(
            &dev,
            name,
            cfg,
            &[
                Arg::Ptr(y_ptr),
                Arg::Ptr(shared.as_ref().map_or(Ok(y_ptr), |s| s.ptr(&stream))?),
                Arg::Int(i32::from(shared.is_some())),
                Arg::Ptr(out_w.ptr(&stream)?),
                Arg::Int(int(tokens, "tokens")?),
                Arg::Int(int(top_k, "top_k")?),
                Arg::Int(int(hidden, "hidden")?),
            ],
        )?;
    }
    Ok(out)
}

pub fn mla_decode(
    q_lat: &Tensor,
    q: &Tensor,
    nope: usize,
    scale: f32,
    rotary: &DeviceRotary<'_>,
    paged: &PagedCache<'_>,
) -> Result<Tensor> {
    let dev = cuda_device(q)?;
    let stream = dev.cuda_stream();
    let (heads, seqs, rank) = q_lat.dims3()?;
    let (_, width) = paged.cache.dims2()?;
    let (table_rows, max_blocks) = paged.tables.dims2()?;
    let rope = width.saturating_sub(rank);
    let dtype = paged.cache.dtype();
    if width > MLA_MAX_WIDTH
        || rank > MLA_MAX_RANK
        || rank > width
        || q.elem_count() != seqs * heads * (nope + rope)
        || table_rows != seqs
        || paged.lens.elem_count() != seqs
        || rotary.positions.elem_count() != seqs
        || rotary.cos.dim(1)? * 2 != rope
        || [q_lat.dtype(), q.dtype(), rotary.cos.dtype(), rotary.sin.dtype()].iter().any(|&d| d != dtype)
        || [paged.tables.dtype(), paged.lens.dtype(), rotary.positions.dtype()].iter().any(|&d| d != DType::U32)
        || paged.block_size == 0
    {
        return Err(kernel_error(format!(
            "MLA decode of queries {:?} and {:?} over a cache of width {width}, tables {:?}",
            q_lat.dims(),
            q.dims(),
            paged.tables.dims()
        )));
    }
    let name = typed("mla_decode", dtype)?;
    let (q_lat, q) = (Held::new(q_lat)?, Held::new(q)?);
    let (cos, sin, positions) = (Held::new(rotary.cos)?, Held::new(rotary.sin)?, Held::new(rotary.positions)?);
    let (cache, tables, lens) = (Held::in_place(paged.cache)?, Held::new(paged.tables)?, Held::new(paged.lens)?);
    let (out, out_w) = output(&dev, dtype, heads * seqs * rank, (heads, seqs, rank))?;
    if seqs > 0 {
        let cfg = config((heads, seqs), MLA_THREADS)?;
        launch(
            &dev,
            name,
            cfg,
            &[
                Arg::Ptr(q_lat.ptr(&stream)?),
                Arg::Ptr(q.ptr(&stream)?),
                Arg::Ptr(cos.ptr(&stream)?),
                Arg::Ptr(sin.ptr(&stream)?),
                Arg::Ptr(positions.ptr(&stream)?),
                Arg::Float(scale),
                Arg::Int(int(nope, "nope")?),
                Arg::Int(i32::from(rotary.interleave)),
                Arg::Ptr(cache.ptr(&stream)?),
                Arg::Ptr(tables.ptr(&stream)?),
                Arg::Ptr(lens.ptr(&stream)?),
                Arg::Ptr(out_w.ptr(&stream)?),
                Arg::Int(int(seqs, "sequences")?),
                Arg::Int(int(heads, "heads")?),
                Arg::Int(int(width, "width")?),
                Arg::Int(int(rank, "rank")?),
                Arg::Int(int(max_blocks, "blocks")?),
                Arg::Int(int(paged.block_size, "block size")?),
            ],
        )?;
    }
    Ok(out)
}

pub fn kv_write(
    kv: &Tensor,
    norm: &Tensor,
    eps: f32,
    rotary: &DeviceRotary<'_>,
    slots: &Tensor,
    cache: &Tensor,
) -> Result<()> {
    let dev = cuda_device(cache)?;
    let stream = dev.cuda_stream();
    let (n, width) = kv.dims2()?;
    let (_, cache_width) = cache.dims2()?;
    let rank = norm.elem_count();
    let dtype = cache.dtype();
    if cache_width != width
        || rank >= width
        || slots.elem_count() != n
        || rotary.positions.elem_count() != n
        || rotary.cos.dim(1)? * 2 != width - rank
        || [kv.dtype(), norm.dtype(), rotary.cos.dtype(), rotary.sin.dtype()].iter().any(|&d| d != dtype)
        || slots.dtype() != DType::U32
    {
        return Err(kernel_error(format!("writing rows {:?} into a cache of width {cache_width}", kv.dims())));
    }
    let name = typed("kv_write", dtype)?;
    let (kv, norm, slots, cache) = (Held::new(kv)?, Held::new(norm)?, Held::new(slots)?, Held::in_place(cache)?);
    let (cos, sin, positions) = (Held::new(rotary.cos)?, Held::new(rotary.sin)?, Held::new(rotary.positions)?);
    if n == 0 {
        return Ok(());
    }
    let cfg = config((n, 1), KV_THREADS)?;
    launch(
        &dev,
        name,
        cfg,
        &[
            Arg::Ptr(kv.ptr(&stream)?),
            Arg::Ptr(norm.ptr(&stream)?),
            Arg::Float(eps),
            Arg::Ptr(cos.ptr(&stream)?),
            Arg::Ptr(sin.ptr(&stream)?),
            Arg::Ptr(positions.ptr(&stream)?),
            Arg::Ptr(slots.ptr(&stream)?),
            Arg::Ptr(cache.ptr(&stream)?),
            Arg::Int(int(rank, "rank")?),
            Arg::Int(int(width, "width")?),
            Arg::Int(i32::from(rotary.interleave)),
        ],
    )
}

pub fn pad_rows(plan: &Plan, rows: usize) -> Result<Tensor> {
    let dev = cuda_device(&plan.tensor)?;
    let stream = dev.cuda_stream();
    if rows < plan.tokens {
        return Err(kernel_error(format!("slabs of {rows} rows for {} tokens", plan.tokens)));
    }
    let (n_experts, top_k) = (plan.n_experts, plan.top_k);
    let plan = Held::new(&plan.tensor)?;
    let len = n_experts * rows;
    let (idx, idx_w) = output(&dev, DType::U32, len, len)?;
    if len > 0 {
        let cfg = config((len.div_ceil(ELEMENTWISE_THREADS as usize), 1), ELEMENTWISE_THREADS)?;
        launch(
            &dev,
            "moe_pad_rows",
            cfg,
            &[
                Arg::Ptr(plan.ptr(&stream)?),
                Arg::Ptr(idx_w.ptr(&stream)?),
                Arg::Int(int(n_experts, "experts")?),
                Arg::Int(int(top_k, "top_k")?),
                Arg::Int(int(rows, "rows")?),
                Arg::Int(int(rows, "rows")?),
            ],
        )?;
    }
    Ok(idx)
}

pub fn unpad_rows(out: &Tensor, plan: &Plan, weights: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(out)?;
    let stream = dev.cuda_stream();
    let (n_experts, rows, hidden) = out.dims3()?;
    if n_experts != plan.n_experts || rows < plan.tokens {
        return Err(kernel_error(format!("slabs {:?} for a plan over {} experts", out.dims(), plan.n_experts)));
    }
    let assignments = plan.assignments();
    if weights.elem_count() != assignments {
        return Err(kernel_error(format!("{} routing weights for {assignments} routed rows", weights.elem_count())));
    }
    let name = typed("moe_unpad_rows", out.dtype())?;
    let (out, plan, weights) = (Held::new(out)?, Held::new(&plan.tensor)?, Held::new(&weights.to_dtype(DType::F32)?)?);
    let (y, y_w) = output(&dev, DType::F32, assignments * hidden, (assignments, hidden))?;
    if assignments > 0 {
        let cfg = config((rows, n_experts), ELEMENTWISE_THREADS)?;
        launch(
            &dev,
            name,
            cfg,
            &[
                Arg::Ptr(out.ptr(&stream)?),
                Arg::Ptr(plan.ptr(&stream)?),
                Arg::Ptr(weights.ptr(&stream)?),
                Arg::Ptr(y_w.ptr(&stream)?),
                Arg::Int(int(n_experts, "experts")?),
                Arg::Int(int(hidden, "hidden")?),
                Arg::Int(int(rows, "rows")?),
            ],
        )?;
    }
    Ok(y)
}

pub fn random_normal(n: usize, seed: u64, mean: f32, std: f32, device: &candle_core::Device) -> Result<Tensor> {
    let candle_core::Device::Cuda(dev) = device else {
        return Err(kernel_error(format!("random weights on {device:?} from a CUDA kernel")));
    };
    let stream = dev.cuda_stream();
    let (out, out_w) = output(dev, DType::F32, n, n)?;
    if n > 0 {
        // A grid-stride loop: enough blocks to fill the device, each thread drawing several values.
        let cfg = config((n.div_ceil(ELEMENTWISE_THREADS as usize).min(65_536), 1), ELEMENTWISE_THREADS)?;
        launch(
            dev,
            "random_normal_f32",
            cfg,
            &[Arg::Ptr(out_w.ptr(&stream)?), Arg::Long(n as u64), Arg::Long(seed), Arg::Float(mean), Arg::Float(std)],
        )?;
    }
    Ok(out)
}
