//! The flags every `baleen-runtime` command shares: which model, on which device and dtype, and this process's
//! place in an expert-parallel group — and how they load the model. Commands (`cli`) and the server (`server`)
//! both build on them; they import nothing from either.

use std::sync::Arc;

use baleen_api::names::{
    ENV_HOSTNAME, ENV_RUNTIME_CUDA_GRAPHS, ENV_RUNTIME_CUDA_KERNELS, ENV_RUNTIME_DATA_PARALLEL_ATTENTION,
    ENV_RUNTIME_DEVICE, ENV_RUNTIME_DTYPE, ENV_RUNTIME_EXPERT_TIMEOUT, ENV_RUNTIME_GRPC_PORT, ENV_RUNTIME_MODEL,
    ENV_RUNTIME_PEER_PATTERN, ENV_RUNTIME_PEERS, ENV_RUNTIME_QUANTIZE, ENV_RUNTIME_RANK,
    ENV_RUNTIME_RANK_FROM_HOSTNAME, ENV_RUNTIME_REPLICATE, ENV_RUNTIME_THREADS, ENV_RUNTIME_WORLD_SIZE,
};
use baleen_api::topology::ExpertPlacement;
use candle_core::{DType, Device};
use clap::Args;

use crate::device::{cpu_threads, parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::expert::{ExpertPeers, model_fingerprint};
use crate::hub::{self, Fetch, FetchOptions, HubRepo, HubSettings, ModelRef};
use crate::loader::{LoadedModel, ModelSource, load_parallel};
use crate::model::host::{Quantize, host_dtype};
use crate::model::{Accel, ExpertParallel};

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A Hugging Face model directory, a Hub model (`hf://org/name[@revision]`, or `org/name` when no such
    /// directory exists here; downloaded into the Hub cache unless it is there), or `builtin:tiny-moe`
    /// (random-weight demo model).
    #[arg(long, env = ENV_RUNTIME_MODEL)]
    pub model: String,
    /// The Hub repository `--model` named, once [`ModelArgs::resolve_source`] replaced it by its snapshot directory.
    #[arg(skip)]
    pub hub: Option<HubRepo>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", env = ENV_RUNTIME_DEVICE)]
    pub device: String,
    /// Compute and KV-cache dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32", env = ENV_RUNTIME_DTYPE)]
    pub dtype: String,
    /// Store the large matrices narrower: none; int8 (quantized at load, a scale per 32 values of a column, like
    /// llama.cpp's Q8_0; projections, experts, dense and shared MLPs and lm_head); or fp8 (an FP8 checkpoint's
    /// weights kept in 8 bits with their block scales instead of dequantized). CPU with f32 or bf16.
    #[arg(long, default_value = "none", env = ENV_RUNTIME_QUANTIZE)]
    pub quantize: String,
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
    /// Turns a Hub `--model` into its snapshot directory in the Hub cache (downloading what is missing unless the
    /// cache is complete or `HF_HUB_OFFLINE` is set) and a `file://` one into its path. Joins every thread it
    /// starts before it returns.
    pub fn resolve_source(&mut self) -> Result<()> {
        match ModelRef::parse(&self.model)? {
            ModelRef::Local(path) => self.model = path,
            ModelRef::Hub(repo) => {
                let settings = HubSettings::from_env()?;
                let snapshot = hub::resolve_blocking(&repo, &settings, Fetch::PreferCache, FetchOptions::default())?;
                self.model = snapshot.dir.to_string_lossy().into_owned();
                self.hub = Some(repo);
            }
        }
        Ok(())
    }

    /// Threads this process should compute with (decided before any thread pool exists).
    pub fn threads(&self) -> Result<usize> {
        Ok(cpu_threads(&ModelSource::parse(&self.model).config()?, self.threads))
    }

    pub(crate) fn load(&self) -> Result<(LoadedModel, Device, DType)> {
        let (loaded, peers) = self.load_head()?;
        if let Some(peers) = peers {
            peers.wait_ready(self.expert.timeout())?;
            tracing::info!(world_size = self.expert.world_size, "expert peers ready");
        }
        Ok((loaded, parse_device(&self.device)?, parse_dtype(&self.dtype)?))
    }

    /// `--quantize`, checked against the device and dtype (int8 runs on the CPU's host kernels, from f32 or bf16).
    pub fn quantize(&self) -> Result<Quantize> {
        let quantize = Quantize::parse(&self.quantize)?;
        let (device, dtype) = (parse_device(&self.device)?, parse_dtype(&self.dtype)?);
        if quantize != Quantize::None && !(device.is_cpu() && host_dtype(dtype)) {
            return Err(Error::Setting {
                name: "quantize".into(),
                reason: format!(
                    "{} weights run on the CPU's host kernels: use --device cpu with --dtype f32 or bf16 (not {} {})",
                    quantize.as_str(),
                    self.device,
                    self.dtype
                ),
            });
        }
        Ok(quantize)
    }

    /// The CUDA paths chosen by `--cuda-kernels` and `--cuda-graphs`.
    pub fn accel(&self) -> Accel {
        Accel { kernels: self.cuda_kernels, graphs: self.cuda_kernels && self.cuda_graphs }
    }

    /// Loads the model as a head; in an expert-parallel group, only this rank's routed experts, with a transport
    /// to the other ranks (connecting in the background: callers wait for [`ExpertPeers::wait_ready`] when they
    /// are ready to, e.g. after starting their own expert service).
    pub fn load_head(&self) -> Result<(LoadedModel, Option<Arc<ExpertPeers>>)> {
        let quantize = self.quantize()?;
        let (mut loaded, peers) = self.load_head_default(quantize)?;
        loaded.model.set_accel(self.accel());
        let loaded_bytes = loaded.model.weight_bytes();
        loaded.model.quantize(quantize)?;
        tracing::info!(
            weight_format = %loaded.model.weight_format(),
            weight_bytes = loaded.model.weight_bytes(),
            loaded_bytes,
            "model weights resident"
        );
        Ok((loaded, peers))
    }

    fn load_head_default(&self, quantize: Quantize) -> Result<(LoadedModel, Option<Arc<ExpertPeers>>)> {
        let device = parse_device(&self.device)?;
        let dtype = parse_dtype(&self.dtype)?;
        let source = ModelSource::parse(&self.model);
        let config = source.config()?;
        let Some(placement) = self.expert.placement(&config)? else {
            return Ok((load_parallel(&source, &device, dtype, None, quantize)?, None));
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
        let fingerprint = model_fingerprint(&source.to_string(), &config, dtype, quantize);
        let peers = Arc::new(ExpertPeers::new(
            self.expert.peers.clone(),
            rank,
            fingerprint,
            placement.fingerprint(),
            self.expert.timeout(),
        )?);
        tracing::info!(rank, world_size = placement.world_size(), experts = ?placement.experts_on(rank), "expert-parallel head");
        let parallel = ExpertParallel { placement, rank, dispatcher: peers.clone() };
        Ok((load_parallel(&source, &device, dtype, Some(&parallel), quantize)?, Some(peers)))
    }
}
