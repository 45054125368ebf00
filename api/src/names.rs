//! Names shared across Baleen components.
//!
//! Rules: environment variables are `BALEEN_<COMPONENT>_<NAME>`; model sources are URI-like strings whose
//! scheme says where the weights come from.

/// Model source of the built-in random-weight demo model (DeepSeek-V3 architecture, byte-level tokenizer).
pub const BUILTIN_TINY_MOE: &str = "builtin:tiny-moe";

/// Prefix of every built-in model source.
pub const BUILTIN_SCHEME: &str = "builtin:";

/// Runtime: compute device (`cpu`, `cuda`, `cuda:N`).
pub const ENV_RUNTIME_DEVICE: &str = "BALEEN_RUNTIME_DEVICE";
/// Runtime: compute dtype (`f32`, `bf16`, `f16`).
pub const ENV_RUNTIME_DTYPE: &str = "BALEEN_RUNTIME_DTYPE";
/// Runtime: CPU compute threads (0 = choose from the model size).
pub const ENV_RUNTIME_THREADS: &str = "BALEEN_RUNTIME_THREADS";
/// Runtime: log filter (`tracing` env-filter syntax).
pub const ENV_RUNTIME_LOG: &str = "BALEEN_RUNTIME_LOG";

/// Thread-count variable read by rayon's global pool and by candle's CPU matmul (gemm). The runtime sets it
/// once at start-up, before any thread exists, from `--threads`.
pub const ENV_RAYON_NUM_THREADS: &str = "RAYON_NUM_THREADS";
