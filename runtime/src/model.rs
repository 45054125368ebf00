//! DeepSeek-V2/V3 model code on candle: one concern per file.

pub mod cache;
pub mod config;
pub mod deepseek;
pub mod experts;
pub mod host;
pub mod latent_attention;
pub mod mla;
pub mod moe;
pub mod rope;
pub(crate) mod step;

pub use cache::{LatentPool, SeqCache};
pub use config::ModelConfig;
pub use deepseek::{
    Accel, DEFAULT_BLOCK_SIZE, DeepseekModel, ForwardOptions, ForwardOutput, GRAPH_BATCHES, LogitsFor, SeqInput,
};
pub use experts::{ExpertDispatcher, ExpertParallel, ExpertShard, InProcessExperts, PendingRows};
pub use mla::AttentionMode;
pub use moe::{DEVICE_MOE_MAX_TOKENS, MoeStep, Routing};
