//! From a `ModelDeployment` spec to the `baleen-runtime serve` command lines of its processes (pure; no I/O).
//!
//! What `baleen up` runs on one machine: `replicas` replicas, each one rank or an expert-parallel group of ranks
//! (`parallelism.expert`) exchanging token rows over gRPC on 127.0.0.1 — with `dataParallelAttention` every rank
//! of a group is a head with its own API — from a `builtin:`, `file://` or `hf://` source (the caller downloads
//! an `hf://` model into the local Hugging Face cache first). Every head serves on 127.0.0.1 (a free port) behind
//! the in-process gateway, which owns the user's `--host`/`--port`. Anything else is refused with the field that
//! asks for it and what to do instead.

use baleen_api::crd::{
    AutoscalingSpec, Launcher, ManifestError, ModelDeploymentSpec, ModelSource, Peers, RoutingPolicy,
};
use baleen_api::names::BUILTIN_TINY_MOE;

use crate::error::Error;

/// The runtime's `serve` arguments and environment for one spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The parsed model source.
    pub source: ModelSource,
    /// The name the runtime will serve the model as (its rule: `servedName`, else `NAME` of `builtin:NAME`, else
    /// the `--model` string); `GET /v1/models` is the authority, this is the fallback.
    pub served_name: String,
    /// The processes of each replica started first (`spec.replicas`).
    pub replicas: Vec<ReplicaLaunch>,
    /// How the gateway spreads requests over the heads (`spec.routing.policy`).
    pub policy: RoutingPolicy,
    /// Extra environment of the runtime process (`spec.runtime.env`).
    pub env: Vec<(String, String)>,
    /// Things in the spec that `baleen up` ignores, one sentence each, to print.
    pub notes: Vec<String>,
    /// `spec.autoscaling`: replicas are started and stopped between its bounds by the gateway's autoscaler.
    pub autoscaling: Option<AutoscalingSpec>,
    /// The spec and `--model` value further replicas are planned from ([`Launch::replica`]).
    spec: ModelDeploymentSpec,
    model: String,
}

/// One replica's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaLaunch {
    /// Arguments after `serve` of the head (rank 0, the HTTP API on 127.0.0.1, a free port).
    pub head: Vec<String>,
    /// Arguments after `serve` of ranks 1..N of an expert-parallel group (empty for one rank).
    pub ranks: Vec<Vec<String>>,
    /// Ranks 1..N are heads too (`dataParallelAttention`): each serves the API on 127.0.0.1 and is a backend.
    pub ranks_serve_api: bool,
}

impl Launch {
    /// How many processes the launch starts.
    pub fn processes(&self) -> usize {
        self.replicas.iter().map(|r| 1 + r.ranks.len()).sum()
    }

    /// Ranks per replica (`parallelism.expert`).
    pub fn world(&self) -> usize {
        self.spec.expert_parallelism() as usize
    }

    /// API heads per replica: 1, or every rank with data-parallel attention.
    pub fn heads_per_replica(&self) -> usize {
        self.spec.heads_per_group() as usize
    }

    /// One more replica whose ranks exchange rows on `127.0.0.1:grpc_ports[rank]` (`world()` free ports; none
    /// for one rank).
    pub fn replica(&self, grpc_ports: &[u16]) -> Result<ReplicaLaunch, Error> {
        let world = self.world();
        if grpc_ports.len() != if world > 1 { world } else { 0 } {
            return Err(Error::Setting {
                name: "grpc ports",
                reason: format!("{} ports for a replica of {world} ranks", grpc_ports.len()),
            });
        }
        // Every rank has the same command line but its rank; with expert parallelism the ranks exchange rows
        // over gRPC on loopback ports, and with data-parallel attention every rank is also a head.
        let args = |rank: usize| -> Result<Vec<String>, Error> {
            let peers = (world > 1).then(|| Peers::List {
                addrs: grpc_ports.iter().map(|p| format!("{HEAD_HOST}:{p}")).collect(),
                rank: rank as u32,
            });
            let launcher = Launcher {
                model: self.model.clone(),
                host: HEAD_HOST.into(),
                port: 0,
                device: None,
                drain_timeout: None,
                peers,
            };
            self.spec.serve_args(&launcher).map_err(|e| match e {
                ManifestError::Invalid { field, reason } => Error::Unsupported { field, reason },
                other => Error::Unsupported { field: "spec", reason: other.to_string() },
            })
        };
        let head = args(0)?;
        let ranks = (1..world).map(args).collect::<Result<Vec<_>, _>>()?;
        Ok(ReplicaLaunch { head, ranks, ranks_serve_api: self.heads_per_replica() > 1 })
    }

    /// True for the random-weight demo model, whose replies are noise.
    pub fn is_demo(&self) -> bool {
        matches!(&self.source, ModelSource::Builtin { .. }) && self.source.to_string() == BUILTIN_TINY_MOE
    }
}

/// Where every head binds: loopback, a free port (the gateway in front owns the user's address).
const HEAD_HOST: &str = "127.0.0.1";

/// The `serve` command lines for `spec`: `replicas` replicas, each a head and with `parallelism.expert` = N > 1
/// N - 1 more ranks whose expert gRPC services listen on `127.0.0.1:grpc_ports[replica * N + rank]` (the caller
/// picks `replicas * N` free ports; none for one rank). The spec is assumed validated (the manifest parser does
/// it); what `baleen up` cannot run here is refused.
pub fn plan(spec: &ModelDeploymentSpec, grpc_ports: &[u16]) -> Result<Launch, Error> {
    let source = spec.source().map_err(|e| Error::Unsupported { field: "spec.model.source", reason: e.to_string() })?;
    let (model, default_name) = match &source {
        ModelSource::Builtin { name } => (source.to_string(), name.clone()),
        ModelSource::File { path } => (path.clone(), path.clone()),
        ModelSource::HuggingFace { repo, .. } => (source.to_string(), repo.clone()),
        ModelSource::Pvc { .. } => {
            return Err(Error::Unsupported {
                field: "spec.model.source",
                reason: format!(
                    "`{source}` is a volume claim in a cluster (`kubectl apply -f` the manifest there). `baleen up` \
                     runs `hf://org/name`, `file:///path/to/model` or `{BUILTIN_TINY_MOE}` here"
                ),
            });
        }
    };
    let world = spec.expert_parallelism() as usize;
    let replicas = spec.replicas() as usize;
    if replicas == 0 && spec.autoscaling.as_ref().is_none_or(|a| a.min_replicas() > 0) {
        return Err(Error::Unsupported {
            field: "spec.replicas",
            reason: "0 replicas runs nothing; `baleen up` serves at least one replica (replicas: 1), or starts \
                     at zero with `autoscaling: {minReplicas: 0, ...}`"
                .to_string(),
        });
    }
    let ports_needed = if world > 1 { replicas * world } else { 0 };
    if grpc_ports.len() != ports_needed {
        return Err(Error::Setting {
            name: "grpc ports",
            reason: format!("{} ports for {replicas} replicas of {world} ranks", grpc_ports.len()),
        });
    }

    let served_name = spec.model.served_name.clone().unwrap_or(default_name);
    let mut env = Vec::new();
    let mut notes = Vec::new();
    if let Some(runtime) = &spec.runtime {
        for var in &runtime.env {
            if var.value_from.is_some() {
                return Err(Error::Unsupported {
                    field: "spec.runtime.env",
                    reason: format!(
                        "`{}` takes its value from `valueFrom`, which needs a cluster; give `value` for `baleen up`",
                        var.name
                    ),
                });
            }
            env.push((var.name.clone(), var.value.clone().unwrap_or_default()));
        }
        if runtime.gpus_per_rank.is_some() || runtime.resources.is_some() {
            notes.push("spec.runtime.gpusPerRank and resources are ignored: `baleen up` runs on this machine".into());
        }
        if let Some(image) = &runtime.image {
            notes.push(format!(
                "spec.runtime.image ({image}) is ignored: `baleen up` runs the local baleen-runtime binary"
            ));
        }
    }
    for (field, set) in [("spec.scheduling", spec.scheduling.is_some()), ("spec.rollout", spec.rollout.is_some())] {
        if set {
            notes.push(format!("{field} is ignored: it applies to a cluster; `baleen up` runs `replicas` here"));
        }
    }
    let mut launch = Launch {
        source,
        served_name,
        replicas: Vec::with_capacity(replicas),
        policy: spec.routing_policy(),
        env,
        notes,
        autoscaling: spec.autoscaling.clone(),
        spec: spec.clone(),
        model,
    };
    let step = if world > 1 { world } else { 0 };
    for replica in 0..replicas {
        let first = launch.replica(&grpc_ports[replica * step..(replica + 1) * step])?;
        launch.replicas.push(first);
    }
    Ok(launch)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use baleen_api::crd::{Dtype, EnvVar, ParallelismSpec, RoutingSpec, RuntimeSpec};

    use super::*;

    fn unsupported_field(spec: &ModelDeploymentSpec) -> (&'static str, String) {
        match plan(spec, &[]) {
            Err(Error::Unsupported { field, reason }) => (field, reason),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_default_spec_serves_the_builtin_demo() {
        let launch = plan(&ModelDeploymentSpec::new(BUILTIN_TINY_MOE), &[]).unwrap();
        assert_eq!(launch.replicas.len(), 1);
        assert_eq!(launch.replicas[0].head, ["--model", "builtin:tiny-moe", "--host", "127.0.0.1", "--port", "0"]);
        assert!(launch.replicas[0].ranks.is_empty());
        assert_eq!(launch.policy, RoutingPolicy::LeastLoad);
        assert!(launch.env.is_empty() && launch.notes.is_empty());
        assert!(launch.is_demo());
        assert_eq!(launch.served_name, "tiny-moe");
    }

    #[test]
    fn every_spec_field_becomes_a_flag_and_args_come_last() {
        let mut spec = ModelDeploymentSpec::new("file:///srv/models/v2-lite");
        spec.model.served_name = Some("whale".into());
        spec.model.dtype = Some(Dtype::Bf16);
        spec.replicas = Some(1);
        spec.parallelism = Some(ParallelismSpec {
            expert: Some(1),
            data_parallel_attention: Some(true),
            ..ParallelismSpec::default()
        });
        spec.runtime = Some(RuntimeSpec {
            image: Some("img:1".into()),
            max_num_seqs: Some(8),
            max_model_len: Some(512),
            kv_cache_memory: Some("0.2".into()),
            args: vec!["--max-num-batched-tokens".into(), "256".into(), "--no-prefix-caching".into()],
            env: vec![EnvVar { name: "BALEEN_RUNTIME_LOG".into(), value: Some("debug".into()), value_from: None }],
            ..RuntimeSpec::default()
        });
        spec.routing = Some(RoutingSpec { policy: Some(RoutingPolicy::PrefixAffinity) });
        let launch = plan(&spec, &[]).unwrap();
        assert_eq!(launch.policy, RoutingPolicy::PrefixAffinity);
        assert_eq!(
            launch.replicas[0].head,
            [
                "--model",
                "/srv/models/v2-lite",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--served-model-name",
                "whale",
                "--dtype",
                "bf16",
                "--max-num-seqs",
                "8",
                "--max-model-len",
                "512",
                "--kv-cache-memory",
                "0.2",
                "--max-num-batched-tokens",
                "256",
                "--no-prefix-caching"
            ]
        );
        assert_eq!(launch.env, [("BALEEN_RUNTIME_LOG".to_string(), "debug".to_string())]);
        assert_eq!(launch.notes.len(), 1);
        assert!(launch.notes[0].contains("spec.runtime.image"));
        assert!(!launch.is_demo());
        assert_eq!(launch.served_name, "whale");
    }

    #[test]
    fn a_volume_claim_is_refused_with_what_to_do_instead() {
        let (field, reason) = unsupported_field(&ModelDeploymentSpec::new("pvc://models/v3"));
        assert_eq!(field, "spec.model.source");
        assert!(
            reason.contains("pvc://models/v3") && reason.contains("cluster") && reason.contains("hf://"),
            "{reason}"
        );
    }

    #[test]
    fn a_hub_model_is_served_by_its_source_under_its_repo_name() {
        let launch = plan(&ModelDeploymentSpec::new("hf://deepseek-ai/DeepSeek-V2-Lite@v1.0"), &[]).unwrap();
        assert_eq!(launch.served_name, "deepseek-ai/DeepSeek-V2-Lite");
        let head = &launch.replicas[0].head;
        let at = head.iter().position(|a| a == "--model").unwrap();
        assert_eq!(head[at + 1], "hf://deepseek-ai/DeepSeek-V2-Lite@v1.0");
        assert!(!launch.is_demo());
    }

    #[test]
    fn an_expert_parallel_group_is_a_head_and_expert_only_ranks_on_loopback() {
        let mut spec = ModelDeploymentSpec::new(BUILTIN_TINY_MOE);
        spec.model.dtype = Some(Dtype::F32);
        spec.parallelism = Some(ParallelismSpec {
            expert: Some(2),
            redundant_experts: vec![baleen_api::crd::RedundantExpert { expert: 3, rank: 1 }],
            ..ParallelismSpec::default()
        });
        spec.runtime = Some(RuntimeSpec { args: vec!["--threads".into(), "1".into()], ..RuntimeSpec::default() });
        let launch = plan(&spec, &[7001, 7002]).unwrap();
        // Every rank: the same command line but its rank (the operator's pods differ only by host name).
        let rank = |r: &str| -> Vec<String> {
            ["--model", "builtin:tiny-moe", "--host", "127.0.0.1", "--port", "0", "--dtype", "f32", "--world-size", "2"]
                .into_iter()
                .chain(["--rank", r, "--peers", "127.0.0.1:7001,127.0.0.1:7002", "--replicate", "3@1"])
                .chain(["--threads", "1"])
                .map(str::to_string)
                .collect()
        };
        assert_eq!(launch.replicas[0].head, rank("0"));
        let rank1 = rank("1");
        assert_eq!(launch.replicas[0].ranks, [rank1]);
        assert!(!launch.replicas[0].ranks_serve_api);
        assert_eq!(launch.processes(), 2);
    }

    #[test]
    fn replicas_of_data_parallel_groups_are_heads_on_their_own_ports() {
        let mut spec = ModelDeploymentSpec::new(BUILTIN_TINY_MOE);
        spec.replicas = Some(2);
        spec.parallelism = Some(ParallelismSpec {
            expert: Some(2),
            data_parallel_attention: Some(true),
            ..ParallelismSpec::default()
        });
        assert!(matches!(plan(&spec, &[7001, 7002]), Err(Error::Setting { .. })), "two replicas need four ports");
        let launch = plan(&spec, &[7001, 7002, 7003, 7004]).unwrap();
        assert_eq!(launch.replicas.len(), 2);
        assert_eq!(launch.processes(), 4);
        for (replica, peers) in
            launch.replicas.iter().zip(["127.0.0.1:7001,127.0.0.1:7002", "127.0.0.1:7003,127.0.0.1:7004"])
        {
            assert!(replica.ranks_serve_api);
            for args in std::iter::once(&replica.head).chain(&replica.ranks) {
                assert!(args.contains(&"--data-parallel-attention".to_string()), "{args:?}");
                assert!(args.windows(2).any(|w| w[0] == "--peers" && w[1] == peers), "{args:?}");
                assert!(args.windows(2).any(|w| w[0] == "--port" && w[1] == "0"), "{args:?}");
            }
        }
    }

    #[test]
    fn replicas_are_identical_heads_and_zero_is_refused() {
        let mut spec = ModelDeploymentSpec::new(BUILTIN_TINY_MOE);
        spec.replicas = Some(3);
        let launch = plan(&spec, &[]).unwrap();
        assert_eq!(launch.replicas.len(), 3);
        assert!(launch.replicas.iter().all(|r| r.head == launch.replicas[0].head && r.ranks.is_empty()));
        spec.replicas = Some(0);
        assert_eq!(unsupported_field(&spec).0, "spec.replicas");
    }

    #[test]
    fn env_must_not_set_what_the_flags_set() {
        let mut spec = ModelDeploymentSpec::new(BUILTIN_TINY_MOE);
        spec.runtime = Some(RuntimeSpec {
            env: vec![EnvVar { name: "BALEEN_RUNTIME_PORT".into(), value: Some("1".into()), value_from: None }],
            ..RuntimeSpec::default()
        });
        let (field, reason) = unsupported_field(&spec);
        assert_eq!(field, "spec.runtime.env");
        assert!(reason.contains("BALEEN_RUNTIME_PORT"), "{reason}");
    }

    #[test]
    fn extra_args_must_not_repeat_the_flags_up_sets() {
        for arg in ["--port", "--port=9", "--model", "--max-num-seqs"] {
            let mut spec = ModelDeploymentSpec::new(BUILTIN_TINY_MOE);
            spec.runtime = Some(RuntimeSpec { args: vec![arg.into(), "1".into()], ..RuntimeSpec::default() });
            let (field, reason) = unsupported_field(&spec);
            assert_eq!(field, "spec.runtime.args");
            assert!(reason.contains(arg.split('=').next().unwrap()), "{reason}");
        }
    }
}
