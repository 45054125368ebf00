//! Baleen runtime: DeepSeek-V2/V3 (MLA + DeepSeekMoE) inference on candle.
//!
//! - [`model`]: config (the Hugging Face `config.json`), RoPE/YaRN, MLA (naive prefill and absorbed decode over
//!   a latent KV cache), the DeepSeekMoE router in all its variants, grouped expert dispatch, the full model.
//! - [`weights`]: memory-mapped safetensors checkpoints (single file or sharded index), FP8 block dequantization.
//! - [`tokenizer`]: Hugging Face `tokenizer.json` and chat templates, or the built-in byte-level tokenizer.
//! - [`engine`]: the continuous-batching scheduler over a paged latent KV cache, and sampling.
//! - [`server`]: the OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`),
//!   `/health`, `/ready` and `/metrics`, and the `serve` command.
//! - [`metrics`]: Prometheus metrics (vLLM's names verbatim, plus `baleen_runtime_*`).
//! - [`builtin`]: `builtin:tiny-moe`, a deterministic random-weight demo model.
//! - [`device`]: device, dtype and CPU thread selection.
//! - [`kernels`]: Baleen's own CUDA kernels (routing, dispatch, grouped experts, MLA decode) for the `cuda` build.

pub mod builtin;
pub mod cli;
pub mod device;
pub mod driver;
pub mod engine;
pub mod error;
pub mod expert;
pub mod grammar;
pub mod hub;
pub mod kernels;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod server;
pub mod settings;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
