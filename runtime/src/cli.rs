//! The `baleen-runtime` debugging commands (a contract other checks rely on; see the design brief):
//! `logits`, `generate`, `bench` and `info`. Each prints one JSON object on stdout.

use std::time::Instant;

use std::sync::Arc;

use baleen_api::names::{
    ENV_HOSTNAME, ENV_RUNTIME_CUDA_GRAPHS, ENV_RUNTIME_CUDA_KERNELS, ENV_RUNTIME_DATA_PARALLEL_ATTENTION,
    ENV_RUNTIME_DEVICE, ENV_RUNTIME_DTYPE, ENV_RUNTIME_EXPERT_TIMEOUT, ENV_RUNTIME_GRPC_PORT, ENV_RUNTIME_MODEL,
    ENV_RUNTIME_PEER_PATTERN, ENV_RUNTIME_PEERS, ENV_RUNTIME_RANK, ENV_RUNTIME_RANK_FROM_HOSTNAME,
    ENV_RUNTIME_REPLICATE, ENV_RUNTIME_THREADS, ENV_RUNTIME_WORLD_SIZE,
};
use baleen_api::topology::ExpertPlacement;
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::device::{cpu_threads, parse_device, parse_dtype};
use crate::engine::sampler::{Sampler, SamplingParams};
use crate::error::{Error, Result};
use crate::expert::{ExpertPeers, model_fingerprint};
use crate::loader::{LoadedModel, ModelSource, load, load_parallel};
use crate::model::{
    Accel, AttentionMode, DEFAULT_BLOCK_SIZE, DeepseekModel, ExpertParallel, ForwardOptions, LatentPool, LogitsFor,
    SeqCache,
};

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
    Serve(crate::server::cmd::ServeArgs),
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Hugging Face model directory, or `builtin:tiny-moe` (random-weight demo model).
    #[arg(long, env = ENV_RUNTIME_MODEL)]
    pub model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", env = ENV_RUNTIME_DEVICE)]
    pub device: String,
    /// Compute and KV-cache dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32", env = ENV_RUNTIME_DTYPE)]
    pub dtype: String,
    /// CPU compute threads; 0 picks one thread for small models (hidden < 1024) and all cores otherwise.
    #[arg(long, default_value_t = 0, env = ENV_RUNTIME_THREADS)]
    pub threads: usize,
    /// Baleen's CUDA kernels: routing and dispatch on the device, grouped expert projections, decode attention
    /// over the paged cache (CUDA only). false: candle's ops throughout, the router on the host.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = ENV_RUNTIME_CUDA_KERNELS)]
    pub cuda_kernels: bool,
    /// Capture decode steps in CUDA graphs and replay them (CUDA only; needs --cuda-kernels).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = ENV_RUNTIME_CUDA_GRAPHS)]
    pub cuda_graphs: bool,
    #[command(flatten)]
    pub expert: ExpertArgs,
}

/// Expert parallelism: this process as one rank of a group whose routed experts are spread over the ranks.
#[derive(Debug, Args)]
pub struct ExpertArgs {
    /// This process's rank in its expert-parallel group; rank 0 is the head (attention, engine, HTTP API).
    #[arg(long, default_value_t = 0, env = ENV_RUNTIME_RANK)]
    pub rank: usize,
    /// Ranks in the group.
    #[arg(long, default_value_t = 1, env = ENV_RUNTIME_WORLD_SIZE)]
    pub world_size: usize,
    /// Every rank's expert gRPC address in rank order (host:port,...), its own included.
    #[arg(long, env = ENV_RUNTIME_PEERS, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Port this rank's expert gRPC service binds [default: the port of its own `--peers` entry; 50051 by
    /// convention].
    #[arg(long, env = ENV_RUNTIME_GRPC_PORT)]
    pub grpc_port: Option<u16>,
    /// Redundant replicas of hot experts, as EXPERT@RANK pairs (e.g. 3@1,7@0).
    #[arg(long, env = ENV_RUNTIME_REPLICATE, value_delimiter = ',')]
    pub replicate: Vec<String>,
    /// Every rank is a head (own engine and HTTP API) and also serves its experts to the other heads.
    #[arg(long, env = ENV_RUNTIME_DATA_PARALLEL_ATTENTION)]
    pub data_parallel_attention: bool,
    /// Seconds to wait for the peers at start-up and for each expert dispatch.
    #[arg(long, default_value_t = 10.0, env = ENV_RUNTIME_EXPERT_TIMEOUT)]
    pub expert_timeout: f64,
    /// Take the rank from this pod's StatefulSet ordinal: the number after the last `-` of the host name.
    #[arg(long, env = ENV_RUNTIME_RANK_FROM_HOSTNAME)]
    pub rank_from_hostname: bool,
    /// Build `--peers` from a pattern with `{rank}`, e.g. `md-g0-{rank}.md-g0:50051` (a headless service's DNS).
    #[arg(long, env = ENV_RUNTIME_PEER_PATTERN, conflicts_with = "peers")]
    pub peer_pattern: Option<String>,
}

impl ExpertArgs {
    /// Fills `rank` from the host name and `peers` from the pattern when asked to (StatefulSet discovery).
    pub fn resolve(&mut self, hostname: Option<&str>) -> Result<()> {
        if self.rank_from_hostname {
            let host = hostname.ok_or_else(|| Error::Setting {
                name: "rank-from-hostname".into(),
                reason: format!("the host name is unknown (set {ENV_HOSTNAME})"),
            })?;
            self.rank = host.rsplit_once('-').and_then(|(_, n)| n.parse().ok()).ok_or_else(|| Error::Setting {
                name: "rank-from-hostname".into(),
                reason: format!("host name `{host}` does not end in -ORDINAL"),
            })?;
        }
        if let Some(pattern) = &self.peer_pattern {
            if !pattern.contains("{rank}") {
                return Err(Error::Setting {
                    name: "peer-pattern".into(),
                    reason: format!("`{pattern}` has no {{rank}}"),
                });
            }
            self.peers = (0..self.world_size).map(|r| pattern.replace("{rank}", &r.to_string())).collect();
        }
        Ok(())
    }

    /// The group's placement (`None` without expert parallelism), validated against the model.
    pub fn placement(&self, config: &crate::model::ModelConfig) -> Result<Option<ExpertPlacement>> {
        let bad = |reason: String| Error::Setting { name: "world-size".into(), reason };
        if self.world_size <= 1 {
            return Ok(None);
        }
        if self.rank >= self.world_size {
            return Err(bad(format!("--rank {} is outside a group of {}", self.rank, self.world_size)));
        }
        if self.peers.len() != self.world_size {
            return Err(bad(format!(
                "--peers lists {} addresses for a group of {}; give every rank's host:port in rank order",
                self.peers.len(),
                self.world_size
            )));
        }
        let experts = config.moe.as_ref().map_or(0, |m| m.n_routed_experts);
        let mut replicas = Vec::new();
        for spec in &self.replicate {
            let parsed = spec.split_once('@').and_then(|(e, r)| Some((e.parse().ok()?, r.parse().ok()?)));
            replicas.push(parsed.ok_or_else(|| Error::Setting {
                name: "replicate".into(),
                reason: format!("`{spec}`: expected EXPERT@RANK"),
            })?);
        }
        ExpertPlacement::contiguous(experts, self.world_size)
            .and_then(|p| p.with_replicas(&replicas))
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }

    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.expert_timeout.max(0.001))
    }
}

impl ModelArgs {
    /// Threads this process should compute with (decided before any thread pool exists).
    pub fn threads(&self) -> Result<usize> {
        Ok(cpu_threads(&ModelSource::parse(&self.model).config()?, self.threads))
    }

    fn load(&self) -> Result<(LoadedModel, Device, DType)> {
        let (loaded, peers) = self.load_head()?;
        if let Some(peers) = peers {
            peers.wait_ready(self.expert.timeout())?;
            tracing::info!(world_size = self.expert.world_size, "expert peers ready");
        }
        Ok((loaded, parse_device(&self.device)?, parse_dtype(&self.dtype)?))
    }

    /// The CUDA paths chosen by `--cuda-kernels` and `--cuda-graphs`.
    pub fn accel(&self) -> Accel {
        Accel { kernels: self.cuda_kernels, graphs: self.cuda_kernels && self.cuda_graphs }
    }

    /// Loads the model as a head; in an expert-parallel group, only this rank's routed experts, with a transport
    /// to the other ranks (connecting in the background: callers wait for [`ExpertPeers::wait_ready`] when they
    /// are ready to, e.g. after starting their own expert service).
    pub fn load_head(&self) -> Result<(LoadedModel, Option<Arc<ExpertPeers>>)> {
        let (mut loaded, peers) = self.load_head_default()?;
        loaded.model.set_accel(self.accel());
        Ok((loaded, peers))
    }

    fn load_head_default(&self) -> Result<(LoadedModel, Option<Arc<ExpertPeers>>)> {
        let device = parse_device(&self.device)?;
        let dtype = parse_dtype(&self.dtype)?;
        let source = ModelSource::parse(&self.model);
        let config = source.config()?;
        let Some(placement) = self.expert.placement(&config)? else {
            return Ok((load(&source, &device, dtype)?, None));
        };
        let rank = self.expert.rank;
        if rank != 0 && !self.expert.data_parallel_attention {
            return Err(Error::Setting {
                name: "rank".into(),
                reason: "only rank 0 is a head without --data-parallel-attention; other ranks run \
                         `baleen-runtime serve` as expert ranks"
                    .into(),
            });
        }
        let fingerprint = model_fingerprint(&source.to_string(), &config, dtype);
        let peers = Arc::new(ExpertPeers::new(
            self.expert.peers.clone(),
            rank,
            fingerprint,
            placement.fingerprint(),
            self.expert.timeout(),
        )?);
        tracing::info!(rank, world_size = placement.world_size(), experts = ?placement.experts_on(rank), "expert-parallel head");
        let parallel = ExpertParallel { placement, rank, dispatcher: peers.clone() };
        Ok((load_parallel(&source, &device, dtype, Some(&parallel))?, Some(peers)))
    }
}

fn parse_ids(spec: &str) -> Result<Vec<u32>> {
    spec.split(',')
        .map(|s| s.trim().parse::<u32>().map_err(|_| Error::InvalidRequest(format!("--ids: `{s}` is not a token id"))))
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
            (Some(ids), _) => parse_ids(ids),
            (None, Some(text)) => loaded.tokenizer.encode(text, true),
            (None, None) => Err(Error::InvalidRequest("give --ids or --prompt".into())),
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

impl Command {
    pub fn model_args_mut(&mut self) -> Option<&mut ModelArgs> {
        match self {
            Self::Logits(a) => Some(&mut a.model),
            Self::Generate(a) => Some(&mut a.model),
            Self::Bench(a) => Some(&mut a.model),
            Self::Serve(a) => Some(&mut a.model),
            Self::Info(_) => None,
        }
    }

    pub fn model_args(&self) -> Option<&ModelArgs> {
        match self {
            Self::Logits(a) => Some(&a.model),
            Self::Generate(a) => Some(&a.model),
            Self::Bench(a) => Some(&a.model),
            Self::Info(_) => None,
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
        }
    }
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
        ForwardOptions { attention, logits: LogitsFor::AllTokens, trace_router: false },
    )?;
    Ok(json!({ "logits": out.logits.to_vec2::<f32>()? }))
}

fn generate(args: &GenerateArgs) -> Result<Value> {
    let (loaded, _, _) = args.model.load()?;
    let prompt = args.prompt.tokens(&loaded)?;
    let mut stop_token_ids = match &args.stop_token_ids {
        Some(spec) => parse_ids(spec)?,
        None => Vec::new(),
    };
    if args.stop_at_eos {
        stop_token_ids.extend_from_slice(loaded.tokenizer.eos_token_ids());
    }
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        repetition_penalty: args.repetition_penalty,
        frequency_penalty: args.frequency_penalty,
        presence_penalty: args.presence_penalty,
        stop_token_ids,
        logit_bias: Vec::new(),
    };
    let mut sampler = Sampler::new(params)?;
    let model = &loaded.model;
    let mut pool = model.new_pool(0, DEFAULT_BLOCK_SIZE)?;
    let mut cache = SeqCache::default();
    let mut generated: Vec<u32> = Vec::with_capacity(args.max_tokens);
    let mut next = prompt.clone();
    while generated.len() < args.max_tokens {
        let logits = model.forward_cached(&mut pool, &mut [(&next, &mut cache)], ForwardOptions::default())?;
        let row = logits.logits.squeeze(0)?.to_vec1::<f32>()?;
        let id = sampler.sample(&row, &prompt, &generated)?;
        generated.push(id);
        if sampler.is_stop_token(id) {
            break;
        }
        next = vec![id];
    }
    let text = loaded.tokenizer.decode(&generated, true)?;
    Ok(json!({ "ids": generated, "text": text }))
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
        return Err(Error::InvalidRequest("--batch, --prompt-len, --gen-len and --repeats must be at least 1".into()));
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
        "kv_cache_bytes_per_token": model.config().kv_cache_bytes_per_token(dtype.size_in_bytes()),
        "weight_bytes_per_decode_step": model.config().decode_weight_bytes(batch, dtype.size_in_bytes()),
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
