//! From a `ModelDeployment` spec to one `baleen-runtime serve` command line (pure; no I/O).
//!
//! What `baleen up` can run on one machine today: one replica — one rank, or an expert-parallel group of ranks
//! (`parallelism.expert`), each a process exchanging token rows with the head over gRPC on 127.0.0.1 — with a
//! `builtin:` or `file://` source. Anything else is refused with the field that asks for it and what to do
//! instead.

use baleen_api::crd::{ModelDeploymentSpec, ModelSource};
use baleen_api::names::BUILTIN_TINY_MOE;

use crate::error::Error;

/// The runtime's `serve` arguments and environment for one spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The parsed model source.
    pub source: ModelSource,
    /// The name the runtime will serve the model as (its rule: `servedName`, else `NAME` of `builtin:NAME`, else
    /// the `--model` string); `GET /v1/models` is the authority, this is the fallback.
    pub served_name: String,
    /// Arguments after `serve` of the head (rank 0, the HTTP API).
    pub args: Vec<String>,
    /// Arguments after `serve` of each expert-only rank 1..N of an expert-parallel group (empty for one rank).
    pub ranks: Vec<Vec<String>>,
    /// Extra environment of the runtime process (`spec.runtime.env`).
    pub env: Vec<(String, String)>,
    /// Things in the spec that `baleen up` ignores, one sentence each, to print.
    pub notes: Vec<String>,
}

impl Launch {
    /// True for the random-weight demo model, whose replies are noise.
    pub fn is_demo(&self) -> bool {
        matches!(&self.source, ModelSource::Builtin { .. }) && self.source.to_string() == BUILTIN_TINY_MOE
    }
}

/// Flags `baleen up` sets itself, with where to set them instead; `spec.runtime.args` must not repeat them.
const OWNED_FLAGS: [(&str, &str); 14] = [
    ("--model", "spec.model.source"),
    ("--host", "`baleen up --host`"),
    ("--port", "`baleen up --port`"),
    ("--served-model-name", "spec.model.servedName"),
    ("--dtype", "spec.model.dtype"),
    ("--max-num-seqs", "spec.runtime.maxNumSeqs"),
    ("--max-model-len", "spec.runtime.maxModelLen"),
    ("--kv-cache-memory", "spec.runtime.kvCacheMemory"),
    ("--rank", "spec.parallelism.expert"),
    ("--world-size", "spec.parallelism.expert"),
    ("--peers", "spec.parallelism.expert"),
    ("--peer-pattern", "spec.parallelism.expert"),
    ("--replicate", "spec.parallelism.redundantExperts"),
    ("--data-parallel-attention", "spec.parallelism.dataParallelAttention"),
];

/// The `serve` command lines for `spec`: the head's API on `host:port`, and with `parallelism.expert` = N > 1 the
/// N ranks' expert gRPC services on `127.0.0.1:grpc_ports[r]` (the caller picks N free ports; ignored for one
/// rank). The spec is assumed validated (the manifest parser does it); what it asks for beyond one local replica
/// is refused here.
pub fn plan(spec: &ModelDeploymentSpec, host: &str, port: u16, grpc_ports: &[u16]) -> Result<Launch, Error> {
    let source = spec.source().map_err(|e| Error::Unsupported { field: "spec.model.source", reason: e.to_string() })?;
    let (model, default_name) = match &source {
        ModelSource::Builtin { name } => (source.to_string(), name.clone()),
        ModelSource::File { path } => (path.clone(), path.clone()),
        ModelSource::HuggingFace { .. } | ModelSource::Pvc { .. } => {
            return Err(Error::Unsupported {
                field: "spec.model.source",
                reason: format!(
                    "`{source}` needs a cluster for now (`kubectl apply -f` the manifest there). `baleen up` runs \
                     local sources only: download the model directory and use `file:///path/to/model`, or use \
                     `{BUILTIN_TINY_MOE}`"
                ),
            });
        }
    };
    let world = spec.expert_parallelism() as usize;
    if world > 1 && spec.data_parallel_attention() {
        return Err(Error::Unsupported {
            field: "spec.parallelism.dataParallelAttention",
            reason: "every rank is a head with its own API, which needs the in-process gateway in front of them; it \
                     arrives with a later release. `baleen up` runs expert-parallel groups with one head for now"
                .to_string(),
        });
    }
    if world > 1 && grpc_ports.len() != world {
        return Err(Error::Setting {
            name: "grpc ports",
            reason: format!("{} ports for a group of {world} ranks", grpc_ports.len()),
        });
    }
    if spec.replicas() == 0 {
        return Err(Error::Unsupported {
            field: "spec.replicas",
            reason: "0 replicas runs nothing; `baleen up` serves one replica (replicas: 1)".to_string(),
        });
    }
    if spec.replicas() > 1 {
        return Err(Error::Unsupported {
            field: "spec.replicas",
            reason: format!(
                "{} replicas requested, but more than one replica needs the in-process gateway, which arrives with \
                 a later release; `baleen up` runs replicas: 1 for now",
                spec.replicas()
            ),
        });
    }

    let served_name = spec.model.served_name.clone().unwrap_or(default_name);
    // Flags every rank of a group shares: the model and its dtype.
    let mut shared = vec!["--model".to_string(), model.clone()];
    if let Some(dtype) = spec.model.dtype {
        shared.extend(["--dtype".to_string(), dtype.as_str().to_string()]);
    }
    let mut args = vec!["--model".to_string(), model, "--host".into(), host.into(), "--port".into(), port.to_string()];
    let mut flag = |name: &str, value: String| {
        args.push(name.to_string());
        args.push(value);
    };
    for (name, value) in spec.serve_flags() {
        flag(name, value);
    }
    let mut env = Vec::new();
    let mut notes = Vec::new();
    let mut extra = Vec::new();
    if let Some(runtime) = &spec.runtime {
        for arg in &runtime.args {
            let name = arg.split_once('=').map_or(arg.as_str(), |(name, _)| name);
            if let Some((_, instead)) = OWNED_FLAGS.iter().find(|(owned, _)| *owned == name) {
                return Err(Error::Unsupported {
                    field: "spec.runtime.args",
                    reason: format!("`{name}` is set by `baleen up`; use {instead} instead"),
                });
            }
        }
        extra.clone_from(&runtime.args);
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
    // An expert-parallel group: the head is rank 0; ranks 1..N serve their experts (and probes) only.
    let mut ranks = Vec::new();
    if world > 1 {
        let peers = grpc_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let mut group = vec!["--world-size".to_string(), world.to_string(), "--peers".to_string(), peers];
        let replicas = spec.redundant_experts().iter().map(|r| format!("{}@{}", r.expert, r.rank)).collect::<Vec<_>>();
        if !replicas.is_empty() {
            group.extend(["--replicate".to_string(), replicas.join(",")]);
        }
        args.extend(["--rank".to_string(), "0".to_string()]);
        args.extend(group.iter().cloned());
        for rank in 1..world {
            let mut rank_args = shared.clone();
            rank_args.extend(["--host", "127.0.0.1", "--port", "0", "--rank"].map(str::to_string));
            rank_args.push(rank.to_string());
            rank_args.extend(group.iter().cloned());
            ranks.push(rank_args);
        }
    }
    args.extend(extra.iter().cloned());
    for rank_args in &mut ranks {
        rank_args.extend(extra.iter().cloned());
    }
    for (field, set) in [
        ("spec.scheduling", spec.scheduling.is_some()),
        ("spec.autoscaling", spec.autoscaling.is_some()),
        ("spec.rollout", spec.rollout.is_some()),
    ] {
        if set {
            notes.push(format!("{field} is ignored: it applies to a cluster, and `baleen up` runs one replica here"));
        }
    }
    Ok(Launch { source, served_name, args, ranks, env, notes })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use baleen_api::crd::{Dtype, EnvVar, ParallelismSpec, RuntimeSpec};

    use super::*;

    fn unsupported_field(spec: &ModelDeploymentSpec) -> (&'static str, String) {
        match plan(spec, "127.0.0.1", 0, &[]) {
            Err(Error::Unsupported { field, reason }) => (field, reason),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_default_spec_serves_the_builtin_demo() {
        let launch = plan(&ModelDeploymentSpec::new(BUILTIN_TINY_MOE), "127.0.0.1", 8080, &[]).unwrap();
        assert_eq!(launch.args, ["--model", "builtin:tiny-moe", "--host", "127.0.0.1", "--port", "8080"]);
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
        let launch = plan(&spec, "0.0.0.0", 0, &[]).unwrap();
        assert_eq!(
            launch.args,
            [
                "--model",
                "/srv/models/v2-lite",
                "--host",
                "0.0.0.0",
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
    fn cluster_sources_are_refused_with_what_to_do_instead() {
        for source in ["hf://deepseek-ai/DeepSeek-V2-Lite", "pvc://models/v3"] {
            let (field, reason) = unsupported_field(&ModelDeploymentSpec::new(source));
            assert_eq!(field, "spec.model.source");
            assert!(reason.contains(source) && reason.contains("cluster") && reason.contains("file://"), "{reason}");
        }
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
        let launch = plan(&spec, "127.0.0.1", 8080, &[7001, 7002]).unwrap();
        let group = ["--world-size", "2", "--peers", "127.0.0.1:7001,127.0.0.1:7002", "--replicate", "3@1"];
        let head: Vec<String> =
            ["--model", "builtin:tiny-moe", "--host", "127.0.0.1", "--port", "8080", "--dtype", "f32"]
                .into_iter()
                .chain(["--rank", "0"])
                .chain(group)
                .chain(["--threads", "1"])
                .map(str::to_string)
                .collect();
        assert_eq!(launch.args, head);
        let rank1: Vec<String> =
            ["--model", "builtin:tiny-moe", "--dtype", "f32", "--host", "127.0.0.1", "--port", "0"]
                .into_iter()
                .chain(["--rank", "1"])
                .chain(group)
                .chain(["--threads", "1"])
                .map(str::to_string)
                .collect();
        assert_eq!(launch.ranks, [rank1]);
    }

    #[test]
    fn data_parallel_heads_need_the_gateway() {
        let mut spec = ModelDeploymentSpec::new(BUILTIN_TINY_MOE);
        spec.parallelism = Some(ParallelismSpec {
            expert: Some(2),
            data_parallel_attention: Some(true),
            ..ParallelismSpec::default()
        });
        let (field, reason) = unsupported_field(&spec);
        assert_eq!(field, "spec.parallelism.dataParallelAttention");
        assert!(reason.contains("gateway"), "{reason}");
    }

    #[test]
    fn more_than_one_replica_is_refused() {
        let mut spec = ModelDeploymentSpec::new(BUILTIN_TINY_MOE);
        spec.replicas = Some(2);
        assert_eq!(unsupported_field(&spec).0, "spec.replicas");
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
