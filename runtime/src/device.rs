//! Device, dtype and CPU-thread selection from command-line strings.

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::model::ModelConfig;

fn setting(name: &str, reason: impl Into<String>) -> Error {
    Error::Setting { name: name.into(), reason: reason.into() }
}

/// `cpu`, `cuda` (device 0) or `cuda:N`. CUDA needs a build with the `cuda` feature.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse::<usize>().map_err(|_| setting("device", format!("`{s}`: expected cuda:N")))?,
            };
            cuda_device(ordinal)
        }
        other => Err(setting("device", format!("`{other}`: expected cpu, cuda or cuda:N"))),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    Err(setting("device", "this binary was built without the `cuda` feature (cargo build --features cuda)"))
}

/// `f32`, `bf16` or `f16`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(setting("dtype", format!("`{other}`: expected f32, bf16 or f16"))),
    }
}

/// Hidden sizes below this run fastest on one CPU thread: each op is microseconds of work and waking a thread
/// pool costs more than it saves (measured: candle-transformers' deepseek2 at hidden 64 decodes ~7× faster at
/// batch 1 with one thread than with the default pool on 2 cores).
pub const SMALL_MODEL_HIDDEN: usize = 1024;

/// CPU compute threads: `requested` when non-zero, else one thread for small models and every available core
/// for larger ones.
pub fn cpu_threads(config: &ModelConfig, requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    if config.hidden_size < SMALL_MODEL_HIDDEN {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Sizes rayon's global pool (used by candle's CPU kernels) to `threads` and makes the calling thread its first
/// worker, so data-parallel kernels called from this thread run inline instead of being handed to a pool thread
/// and waited for — with one thread that handoff costs more than the tiny-model kernels themselves. Call it once,
/// from the thread that will run the model, before any tensor work.
pub fn init_compute_pool(threads: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .use_current_thread()
        .build_global()
        .map_err(|e| setting("threads", format!("cannot build the compute thread pool: {e}")))
}
