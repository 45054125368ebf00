//! Model sources: a Hugging Face model directory or a built-in model (`builtin:NAME`), resolved into a model and
//! its tokenizer.

use std::path::PathBuf;

use baleen_api::names::BUILTIN_SCHEME;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::builtin;
use crate::error::{Error, Result};
use crate::model::host::Quantize;
use crate::model::{DeepseekModel, ExpertParallel, ModelConfig};
use crate::tokenizer::Tokenizer;
use crate::weights::{self, Checkpoint};

/// Where a model comes from, parsed from `--model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer.json).
    Dir(PathBuf),
    /// A built-in model, by name (`builtin:tiny-moe` → `tiny-moe`).
    Builtin(String),
}

impl ModelSource {
    pub fn parse(spec: &str) -> Self {
        match spec.strip_prefix(BUILTIN_SCHEME) {
            Some(name) => Self::Builtin(name.to_string()),
            None => Self::Dir(PathBuf::from(spec)),
        }
    }

    /// The validated configuration, without touching any weights.
    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            Self::Dir(dir) => ModelConfig::from_dir(dir),
            Self::Builtin(name) => builtin::config(name),
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(dir) => write!(f, "{}", dir.display()),
            Self::Builtin(name) => write!(f, "{BUILTIN_SCHEME}{name}"),
        }
    }
}

/// A model ready to run, with its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    pub source: ModelSource,
    pub model: DeepseekModel,
    pub tokenizer: Tokenizer,
}

pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<LoadedModel> {
    load_parallel(source, device, dtype, None, Quantize::None)
}

/// The checkpoint's tensors (or the built-in model's generated ones) as a VarBuilder.
pub fn var_builder(
    source: &ModelSource,
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    match source {
        ModelSource::Builtin(_) => Ok(builtin::var_builder(dtype, device)),
        ModelSource::Dir(dir) => {
            let ckpt = Checkpoint::open(dir, config.fp8_block)?;
            log_skipped_mtp(&ckpt, config);
            Ok(weights::var_builder(ckpt, dtype, device))
        }
    }
}

/// Loads the model as the head of an expert-parallel group when `parallel` is given (only this rank's routed
/// experts are read), else whole. `quantize` `fp8` keeps an FP8 checkpoint's weights in 8 bits as they load (the
/// other choices narrow after loading: [`DeepseekModel::quantize`]).
pub fn load_parallel(
    source: &ModelSource,
    device: &Device,
    dtype: DType,
    parallel: Option<&ExpertParallel>,
    quantize: Quantize,
) -> Result<LoadedModel> {
    let mut config = source.config()?;
    quantize.configure(&mut config)?;
    if let ModelSource::Builtin(_) = source {
        tracing::info!(model = %source, "loading built-in random-weight demo model (its output is meaningless text)");
    }
    let model = DeepseekModel::load_parallel(&config, parallel, var_builder(source, &config, dtype, device)?)?;
    let tokenizer = match source {
        ModelSource::Builtin(_) => Tokenizer::byte_level_for_vocab(config.vocab_size),
        ModelSource::Dir(dir) => Tokenizer::from_dir(dir)?,
    };
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(Error::Tokenizer(format!(
            "tokenizer has {} tokens but the model's vocab_size is {}",
            tokenizer.vocab_size(),
            config.vocab_size
        )));
    }
    tracing::info!(
        model = %source,
        layers = config.num_hidden_layers,
        routed_experts = config.moe.as_ref().map_or(0, |m| m.n_routed_experts),
        dtype = ?dtype,
        "model loaded"
    );
    Ok(LoadedModel { source: source.clone(), model, tokenizer })
}

/// DeepSeek-V3 checkpoints carry a multi-token-prediction module as layer `num_hidden_layers`; it is not used for
/// decoding and never loaded.
fn log_skipped_mtp(ckpt: &Checkpoint, config: &ModelConfig) {
    let skipped = ckpt
        .tensor_names()
        .iter()
        .filter(|n| {
            n.strip_prefix("model.layers.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i >= config.num_hidden_layers)
        })
        .count();
    if skipped > 0 {
        tracing::info!(
            tensors = skipped,
            "skipping multi-token-prediction tensors model.layers.{}.* (not used for decoding)",
            config.num_hidden_layers
        );
    }
}
