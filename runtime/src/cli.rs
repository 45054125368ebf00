//! The `baleen-runtime` commands besides `serve` (a contract other checks rely on; see the design brief):
//! `logits`, `generate`, `bench`, `info` and `download`. Each prints one JSON object on stdout.

use std::sync::Arc;
use std::time::Instant;

use baleen_api::names::ENV_RUNTIME_MODEL;
use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::device::parse_dtype;
use crate::engine::sampler::SamplingParams;
use crate::engine::{EngineConfig, EngineError, Event, EventStream, GenerateRequest, KvCacheMemory};
use crate::error::{Error, Result};
use crate::hub::{self, Fetch, FetchOptions, HubSettings, ModelRef};
use crate::loader::{LoadedModel, ModelSource};
use crate::metrics::Metrics;
use crate::model::{AttentionMode, DEFAULT_BLOCK_SIZE, DeepseekModel, ForwardOptions, LatentPool, LogitsFor, SeqCache};
pub use crate::settings::{ExpertArgs, ModelArgs};

#[derive(Debug, Parser)]
#[command(name = "baleen-runtime", version, about = "Baleen inference runtime for DeepSeek-V2/V3 MoE models")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the logits at every position of one prefill: {"logits": [[f32; vocab]; T]}.
    Logits(LogitsArgs),
    /// Generate tokens (greedy unless sampling flags are given): {"ids": [...], "text": "..."}.
    Generate(GenerateArgs),
    /// Measure prefill and decode throughput of a batch: one JSON object.
    Bench(BenchArgs),
    /// Describe a model from its config alone (no weights are read).
    Info(InfoArgs),
    /// Serve the OpenAI-compatible HTTP API, /health, /ready and /metrics until SIGTERM (then drain and exit 0).
    Serve(crate::server::ServeArgs),
    /// Download a Hub model into the Hub cache and verify it, without serving: {"path": ..., "commit": ...}.
    Download(DownloadArgs),
}

/// Comma-separated token ids given to `flag`.
fn parse_ids(flag: &str, spec: &str) -> Result<Vec<u32>> {
    spec.split(',')
        .map(|s| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| Error::Setting { name: flag.into(), reason: format!("`{s}` is not a token id") })
        })
        .collect()
}

/// The prompt: `--ids` as given, or `--prompt` encoded with the model's tokenizer (BOS added).
#[derive(Debug, Args)]
pub struct PromptArgs {
    /// Comma-separated prompt token ids.
    #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
    pub ids: Option<String>,
    /// Prompt text, tokenized with the model's tokenizer.
    #[arg(long)]
    pub prompt: Option<String>,
}

impl PromptArgs {
    fn tokens(&self, loaded: &LoadedModel) -> Result<Vec<u32>> {
        match (&self.ids, &self.prompt) {
            (Some(ids), _) => parse_ids("ids", ids),
            (None, Some(text)) => loaded.tokenizer.encode(text, true),
            (None, None) => Err(Error::Setting { name: "ids".into(), reason: "give --ids or --prompt".into() }),
        }
    }
}

#[derive(Debug, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// MLA form: naive (decompressed K/V), absorbed (latent) or auto.
    #[arg(long, default_value = "naive", value_parser = ["naive", "absorbed", "auto"])]
    pub attention: String,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Number of tokens to generate (fewer only if a stop token appears).
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub presence_penalty: f32,
    /// Comma-separated token ids that end generation (the stop token is included in the output).
    #[arg(long)]
    pub stop_token_ids: Option<String>,
    /// Also stop at the model's end-of-sequence tokens.
    #[arg(long)]
    pub stop_at_eos: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sequences decoded together in each step; a comma-separated list runs each size in turn on the one loaded
    /// model and prints one JSON object per line as each finishes.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub batch: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub gen_len: usize,
    /// Timed repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Hugging Face model directory (only config.json is read) or `builtin:NAME`.
    #[arg(long)]
    pub model: String,
    /// KV-cache dtype the byte counts are given for.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
}

/// `baleen-runtime download`: the files the loader reads, into the Hub cache (progress bars on a terminal, log
/// lines otherwise). The Hub's credentials, mirror and offline mode come from `HF_TOKEN`, `HF_ENDPOINT` and
/// `HF_HUB_OFFLINE`.
#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// `hf://org/name[@revision]`, or `org/name` (the default branch).
    #[arg(long, env = ENV_RUNTIME_MODEL)]
    pub model: String,
    /// The Hub cache to download into [default: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub].
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Bytes per ranged request (K, M, G suffixes: powers of 1024). An interrupted download resumes from the last
    /// complete chunk of each file.
    #[arg(long, default_value = "16M", value_parser = hub::parse_size)]
    pub chunk_size: usize,
    /// Ranged requests in flight per file.
    #[arg(long, default_value_t = hub::DEFAULT_PARALLEL, value_parser = parse_parallel)]
    pub parallel: usize,
}

fn parse_parallel(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n @ 1..=64) => Ok(n),
        _ => Err(format!("`{text}`: expected 1 to 64")),
    }
}

impl Command {
    pub fn model_args_mut(&mut self) -> Option<&mut ModelArgs> {
        match self {
            Self::Logits(a) => Some(&mut a.model),
            Self::Generate(a) => Some(&mut a.model),
            Self::Bench(a) => Some(&mut a.model),
            Self::Serve(a) => Some(&mut a.model),
            Self::Info(_) | Self::Download(_) => None,
        }
    }

    pub fn model_args(&self) -> Option<&ModelArgs> {
        match self {
            Self::Logits(a) => Some(&a.model),
            Self::Generate(a) => Some(&a.model),
            Self::Bench(a) => Some(&a.model),
            Self::Info(_) | Self::Download(_) => None,
            Self::Serve(a) => Some(&a.model),
        }
    }

    pub fn run(&self) -> Result<Value> {
        match self {
            Self::Logits(a) => logits(a),
            Self::Generate(a) => generate(a),
            Self::Bench(a) => bench(a),
            Self::Info(a) => info(a),
            Self::Serve(a) => crate::server::cmd::run(a),
            Self::Download(a) => download(a),
        }
    }
}

fn download(args: &DownloadArgs) -> Result<Value> {
    let repo = match ModelRef::parse(&args.model)? {
        ModelRef::Hub(repo) => repo,
        ModelRef::Local(_) => {
            return Err(Error::Setting {
                name: "model".into(),
                reason: format!("`{}` is not a Hub model: give hf://org/name[@revision] or org/name", args.model),
            });
        }
    };
    let mut settings = HubSettings::from_env()?;
    if let Some(dir) = &args.dir {
        settings.cache = dir.clone();
    }
    let options = FetchOptions { chunk_size: args.chunk_size, parallel: args.parallel };
    let start = Instant::now();
    let snapshot = hub::resolve_blocking(&repo, &settings, Fetch::Refresh, options)?;
    Ok(json!({
        "model": repo.to_string(),
        "path": snapshot.dir,
        "commit": snapshot.commit,
        "files": snapshot.files,
        "downloaded_bytes": snapshot.downloaded_bytes,
        "from_cache": snapshot.from_cache,
        "seconds": start.elapsed().as_secs_f64(),
    }))
}

fn logits(args: &LogitsArgs) -> Result<Value> {
    let (loaded, _, _) = args.model.load()?;
    let tokens = args.prompt.tokens(&loaded)?;
    let attention = match args.attention.as_str() {
        "absorbed" => AttentionMode::Absorbed,
        "auto" => AttentionMode::Auto,
        _ => AttentionMode::Naive,
    };
    let mut pool = loaded.model.new_pool(0, DEFAULT_BLOCK_SIZE)?;
    let out = loaded.model.forward_cached(
        &mut pool,
        &mut [(&tokens, &mut SeqCache::default())],
        ForwardOptions { attention, logits: LogitsFor::AllTokens, ..Default::default() },
    )?;
    Ok(json!({ "logits": out.logits.to_vec2::<f32>()? }))
}

/// `generate`: one request through the serving engine (the same admission, cache, sampling and stop rules as
/// `serve`), on a KV cache sized for just this request.
fn generate(args: &GenerateArgs) -> Result<Value> {
    let (loaded, _, _) = args.model.load()?;
    let prompt = args.prompt.tokens(&loaded)?;
    let stop_token_ids = match &args.stop_token_ids {
        Some(spec) => parse_ids("stop-token-ids", spec)?,
        None => Vec::new(),
    };
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        repetition_penalty: args.repetition_penalty,
        frequency_penalty: args.frequency_penalty,
        presence_penalty: args.presence_penalty,
        stop_token_ids,
        logit_bias: Vec::new(),
    }
    .validate()?;
    let block_size = DEFAULT_BLOCK_SIZE;
    // Blocks for this one sequence (at least two, the engine's floor), nothing more; never more than the model's
    // context, so an impossible --max-tokens is refused by the engine's limits rather than by the allocator.
    let tokens = prompt.len().saturating_add(args.max_tokens).min(loaded.model.config().max_position_embeddings);
    let blocks = tokens.div_ceil(block_size).max(2);
    let bytes_per_token = loaded.model.kv_cache_bytes_per_token();
    let config = EngineConfig {
        max_num_seqs: 1,
        kv_cache_memory: KvCacheMemory::Bytes((blocks * block_size * bytes_per_token) as u64),
        block_size,
        enable_prefix_caching: false,
        ..EngineConfig::default()
    };
    let served = loaded.source.to_string();
    let metrics = Arc::new(Metrics::new(&served)?);
    let (engine, thread) = crate::engine::spawn(loaded, config, metrics, served, args.model.threads()?)?;
    let request = GenerateRequest {
        request_id: "generate".into(),
        prompt,
        sampling,
        max_tokens: args.max_tokens,
        stop: Vec::new(),
        ignore_eos: !args.stop_at_eos,
        logprobs: None,
        cancel: CancellationToken::new(),
        stream: false,
        constraint: None,
    };
    let result = engine.submit(request).map_err(Error::from).and_then(collect_ids);
    engine.shutdown();
    if thread.join().is_err() {
        tracing::error!("the engine thread panicked");
    }
    let generated = result?;
    let text = engine.tokenizer().decode(&generated, true)?;
    Ok(json!({ "ids": generated, "text": text }))
}

/// The generated ids of one submitted request, waiting for its finish.
fn collect_ids(mut events: EventStream) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token { id, .. } => ids.push(id),
            Event::Finished { .. } => return Ok(ids),
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(Error::from(EngineError::Stopped))
}

/// Deterministic pseudo-random prompt ids for benchmarks.
fn bench_prompt(seq: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| ((seq * 7919 + i * 104_729 + 17) % vocab) as u32).collect()
}

fn bench(args: &BenchArgs) -> Result<Value> {
    if args.batch.is_empty()
        || args.batch.contains(&0)
        || args.prompt_len == 0
        || args.gen_len == 0
        || args.repeats == 0
    {
        return Err(Error::Setting {
            name: "batch".into(),
            reason: "--batch, --prompt-len, --gen-len and --repeats must be at least 1".into(),
        });
    }
    let (loaded, _, dtype) = args.model.load()?;
    if let [batch] = args.batch[..] {
        return bench_batch(args, &loaded, dtype, batch);
    }
    for &batch in &args.batch {
        println!("{}", bench_batch(args, &loaded, dtype, batch)?);
    }
    Ok(Value::Null)
}

/// One batch size of `bench`: its JSON object.
fn bench_batch(args: &BenchArgs, loaded: &LoadedModel, dtype: DType, batch: usize) -> Result<Value> {
    let model = &loaded.model;
    let vocab = model.config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..batch).map(|s| bench_prompt(s, args.prompt_len, vocab)).collect();
    // One cache pool for every run, so the runs after the warm-up replay the decode graphs it captured.
    let per_seq = (args.prompt_len + args.gen_len).div_ceil(DEFAULT_BLOCK_SIZE);
    let mut pool = model.new_pool(prompts.len() * per_seq, DEFAULT_BLOCK_SIZE)?;
    // Warm-up: touch every code path once (allocator, thread pool, lazily built tables, decode graphs).
    run_batch(model, &mut pool, &prompts, 2)?;
    let (mut best_prefill, mut best_decode) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..args.repeats {
        let (prefill_s, decode_s) = run_batch(model, &mut pool, &prompts, args.gen_len)?;
        best_prefill = best_prefill.min(prefill_s);
        best_decode = best_decode.min(decode_s);
    }
    let (graphs, graph_error) = model.graph_status();
    let prefill_tokens = (batch * args.prompt_len) as f64;
    let decode_tokens = (batch * (args.gen_len - 1)) as f64;
    Ok(json!({
        "model": loaded.source.to_string(),
        "device": args.model.device,
        "dtype": args.model.dtype,
        "threads": args.model.threads()?,
        "batch": batch,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "prefill_s": best_prefill,
        "decode_s": best_decode,
        "prefill_tokens_per_s": prefill_tokens / best_prefill,
        "decode_tokens_per_s": if args.gen_len > 1 { decode_tokens / best_decode } else { 0.0 },
        "decode_step_ms": if args.gen_len > 1 { 1e3 * best_decode / (args.gen_len - 1) as f64 } else { 0.0 },
        "kv_cache_bytes_per_token": model.kv_cache_bytes_per_token(),
        "quantize": model.quantization().as_str(),
        "weight_bytes": model.weight_bytes(),
        "weight_bytes_per_decode_step":
            model.config().decode_weight_bytes(batch, model.quantization().bytes_per_weight(dtype)),
        "cuda_kernels": model.accel().kernels,
        "cuda_graphs": model.accel().graphs,
        "cuda_graphs_captured": graphs,
        "cuda_graph_error": graph_error,
    }))
}

/// Prefills every prompt in one packed batch (which yields the first token), then decodes `gen_len - 1` greedy
/// steps with all sequences batched, in `pool` (reset first). Returns (prefill seconds, decode seconds).
fn run_batch(model: &DeepseekModel, pool: &mut LatentPool, prompts: &[Vec<u32>], gen_len: usize) -> Result<(f64, f64)> {
    pool.reset();
    let mut caches: Vec<SeqCache> = prompts.iter().map(|_| SeqCache::default()).collect();
    let start = Instant::now();
    let mut inputs: Vec<(&[u32], &mut SeqCache)> =
        prompts.iter().zip(caches.iter_mut()).map(|(p, cache)| (p.as_slice(), cache)).collect();
    let logits = model.forward_cached(pool, &mut inputs, ForwardOptions::default())?.logits;
    let mut next: Vec<[u32; 1]> = logits.argmax(1)?.to_vec1::<u32>()?.into_iter().map(|id| [id]).collect();
    let prefill_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 1..gen_len {
        let mut inputs: Vec<(&[u32], &mut SeqCache)> =
            next.iter().zip(caches.iter_mut()).map(|(t, cache)| (t.as_slice(), cache)).collect();
        let logits = model.forward_cached(pool, &mut inputs, ForwardOptions::default())?.logits;
        next = logits.argmax(1)?.to_vec1::<u32>()?.into_iter().map(|id| [id]).collect();
    }
    Ok((prefill_s, start.elapsed().as_secs_f64()))
}

fn info(args: &InfoArgs) -> Result<Value> {
    let source = ModelSource::parse(&args.model);
    let config = source.config()?;
    let dtype = parse_dtype(&args.dtype)?;
    let moe = config.moe.as_ref();
    Ok(json!({
        "model": source.to_string(),
        "architecture": format!("{:?}", config.arch),
        "layers": config.num_hidden_layers,
        "moe_layers": (0..config.num_hidden_layers).filter(|&l| config.is_moe_layer(l)).count(),
        "routed_experts": moe.map_or(0, |m| m.n_routed_experts),
        "shared_experts": moe.map_or(0, |m| m.n_shared_experts),
        "experts_per_token": moe.map_or(0, |m| m.num_experts_per_tok),
        "kv_latent_dim": config.latent_dim(),
        "kv_cache_dtype": args.dtype,
        "kv_cache_bytes_per_token": config.kv_cache_bytes_per_token(dtype.size_in_bytes()),
        "fp8_block": config.fp8_block,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statefulset_ordinal_and_dns_pattern_give_rank_and_peers() {
        let cli = Cli::try_parse_from([
            "baleen-runtime",
            "logits",
            "--model",
            "builtin:tiny-moe",
            "--ids",
            "1",
            "--world-size",
            "3",
            "--rank-from-hostname",
            "--peer-pattern",
            "md-g0-{rank}.md-g0:50051",
        ])
        .unwrap();
        let Command::Logits(mut args) = cli.command else { panic!("logits") };
        args.model.expert.resolve(Some("md-g0-2")).unwrap();
        assert_eq!(args.model.expert.rank, 2);
        assert_eq!(args.model.expert.peers, ["md-g0-0.md-g0:50051", "md-g0-1.md-g0:50051", "md-g0-2.md-g0:50051"]);
        assert!(args.model.expert.resolve(Some("no-ordinal")).unwrap_err().to_string().contains("ORDINAL"));
    }
}
