//! The `baleen-runtime serve` command line of a ModelDeployment's ranks: one builder for every launcher —
//! `baleen up` (processes on this machine) and the operator (rank pods) — and one list of the flags it owns,
//! which `spec.runtime.args` and `spec.runtime.env` may not repeat.

use super::{ManifestError, ModelDeploymentSpec};
use crate::names::{
    ENV_RUNTIME_DATA_PARALLEL_ATTENTION, ENV_RUNTIME_DEVICE, ENV_RUNTIME_DRAIN_TIMEOUT, ENV_RUNTIME_DTYPE,
    ENV_RUNTIME_GRPC_PORT, ENV_RUNTIME_HOST, ENV_RUNTIME_KV_CACHE_MEMORY, ENV_RUNTIME_MAX_MODEL_LEN,
    ENV_RUNTIME_MAX_NUM_SEQS, ENV_RUNTIME_MODEL, ENV_RUNTIME_PEER_PATTERN, ENV_RUNTIME_PEERS, ENV_RUNTIME_PORT,
    ENV_RUNTIME_RANK, ENV_RUNTIME_RANK_FROM_HOSTNAME, ENV_RUNTIME_REPLICATE, ENV_RUNTIME_SERVED_MODEL_NAME,
    ENV_RUNTIME_WORLD_SIZE, FLAG_DATA_PARALLEL_ATTENTION, FLAG_DEVICE, FLAG_DRAIN_TIMEOUT, FLAG_DTYPE, FLAG_GRPC_PORT,
    FLAG_HOST, FLAG_KV_CACHE_MEMORY, FLAG_MAX_MODEL_LEN, FLAG_MAX_NUM_SEQS, FLAG_MODEL, FLAG_PEER_PATTERN, FLAG_PEERS,
    FLAG_PORT, FLAG_RANK, FLAG_RANK_FROM_HOSTNAME, FLAG_REPLICATE, FLAG_SERVED_MODEL_NAME, FLAG_WORLD_SIZE,
};

/// The flags (and their environment variables) the launchers set, with what sets each.
pub const RESERVED_FLAGS: &[(&str, &str, &str)] = &[
    (FLAG_MODEL, ENV_RUNTIME_MODEL, "spec.model.source"),
    (FLAG_HOST, ENV_RUNTIME_HOST, "the launcher (`baleen up --host` or the operator)"),
    (FLAG_PORT, ENV_RUNTIME_PORT, "the launcher (`baleen up --port` or the operator)"),
    (FLAG_DEVICE, ENV_RUNTIME_DEVICE, "spec.runtime.gpusPerRank"),
    (FLAG_DTYPE, ENV_RUNTIME_DTYPE, "spec.model.dtype"),
    (FLAG_SERVED_MODEL_NAME, ENV_RUNTIME_SERVED_MODEL_NAME, "spec.model.servedName"),
    (FLAG_MAX_NUM_SEQS, ENV_RUNTIME_MAX_NUM_SEQS, "spec.runtime.maxNumSeqs"),
    (FLAG_MAX_MODEL_LEN, ENV_RUNTIME_MAX_MODEL_LEN, "spec.runtime.maxModelLen"),
    (FLAG_KV_CACHE_MEMORY, ENV_RUNTIME_KV_CACHE_MEMORY, "spec.runtime.kvCacheMemory"),
    (FLAG_DRAIN_TIMEOUT, ENV_RUNTIME_DRAIN_TIMEOUT, "the launcher (the operator's --drain-timeout)"),
    (FLAG_RANK, ENV_RUNTIME_RANK, "spec.parallelism.expert"),
    (FLAG_WORLD_SIZE, ENV_RUNTIME_WORLD_SIZE, "spec.parallelism.expert"),
    (FLAG_PEERS, ENV_RUNTIME_PEERS, "spec.parallelism.expert"),
    (FLAG_PEER_PATTERN, ENV_RUNTIME_PEER_PATTERN, "spec.parallelism.expert"),
    (FLAG_RANK_FROM_HOSTNAME, ENV_RUNTIME_RANK_FROM_HOSTNAME, "spec.parallelism.expert"),
    (FLAG_GRPC_PORT, ENV_RUNTIME_GRPC_PORT, "spec.parallelism.expert"),
    (FLAG_REPLICATE, ENV_RUNTIME_REPLICATE, "spec.parallelism.redundantExperts"),
    (FLAG_DATA_PARALLEL_ATTENTION, ENV_RUNTIME_DATA_PARALLEL_ATTENTION, "spec.parallelism.dataParallelAttention"),
];

/// How the ranks of an expert-parallel group find each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// Every rank's expert gRPC address in rank order, and this process's rank (`baleen up`: loopback ports).
    List { addrs: Vec<String>, rank: u32 },
    /// A DNS pattern with `{rank}`, the rank taken from the host name, the gRPC port bound (the operator's
    /// StatefulSet: one pod template for every rank).
    Pattern { pattern: String, grpc_port: u16 },
}

/// What the launcher decides; the spec decides the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launcher {
    /// `--model`: where this launcher put the weights (a path, or `builtin:NAME`).
    pub model: String,
    pub host: String,
    pub port: u16,
    /// `--device`, when not the runtime's default.
    pub device: Option<String>,
    /// `--drain-timeout` seconds, when set.
    pub drain_timeout: Option<u64>,
    /// The group's peers; required when `parallelism.expert` > 1, ignored otherwise.
    pub peers: Option<Peers>,
}

impl ModelDeploymentSpec {
    /// Refuses `runtime.args` and `runtime.env` entries that set a [`RESERVED_FLAGS`] flag: two sources for one
    /// setting would leave the spec saying one thing and the processes doing another.
    pub fn check_reserved_settings(&self) -> Result<(), ManifestError> {
        let Some(runtime) = &self.runtime else { return Ok(()) };
        for arg in &runtime.args {
            let given = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
            if let Some((flag, _, by)) = RESERVED_FLAGS.iter().find(|(flag, _, _)| *flag == given) {
                return Err(ManifestError::invalid(
                    "spec.runtime.args",
                    format!("`{arg}`: {flag} is set by {by}; remove it from args"),
                ));
            }
        }
        for var in &runtime.env {
            if let Some((_, env, by)) = RESERVED_FLAGS.iter().find(|(_, env, _)| *env == var.name) {
                return Err(ManifestError::invalid(
                    "spec.runtime.env",
                    format!("{env} is set by {by}; remove it from env"),
                ));
            }
        }
        Ok(())
    }

    /// The arguments after `baleen-runtime serve` of a rank: `--model --host --port [--device]`, the spec's
    /// [`serve_flags`](Self::serve_flags), `[--drain-timeout]`, with `parallelism.expert` = N > 1 the group's
    /// flags (`--world-size`, the peers, `--replicate`, `--data-parallel-attention`), then `spec.runtime.args`.
    pub fn serve_args(&self, launcher: &Launcher) -> Result<Vec<String>, ManifestError> {
        self.check_reserved_settings()?;
        let mut args: Vec<String> = Vec::new();
        let mut flag = |name: &str, value: String| {
            args.push(name.to_string());
            args.push(value);
        };
        flag(FLAG_MODEL, launcher.model.clone());
        flag(FLAG_HOST, launcher.host.clone());
        flag(FLAG_PORT, launcher.port.to_string());
        if let Some(device) = &launcher.device {
            flag(FLAG_DEVICE, device.clone());
        }
        for (name, value) in self.serve_flags() {
            flag(name, value);
        }
        if let Some(seconds) = launcher.drain_timeout {
            flag(FLAG_DRAIN_TIMEOUT, seconds.to_string());
        }
        let world = self.expert_parallelism();
        if world > 1 {
            flag(FLAG_WORLD_SIZE, world.to_string());
            match &launcher.peers {
                Some(Peers::List { addrs, rank }) => {
                    if addrs.len() != world as usize {
                        return Err(ManifestError::invalid(
                            "spec.parallelism.expert",
                            format!("{world} ranks, but the launcher gave {} peer addresses", addrs.len()),
                        ));
                    }
                    flag(FLAG_RANK, rank.to_string());
                    flag(FLAG_PEERS, addrs.join(","));
                }
                Some(Peers::Pattern { pattern, grpc_port }) => {
                    args.push(FLAG_RANK_FROM_HOSTNAME.to_string());
                    args.push(FLAG_PEER_PATTERN.to_string());
                    args.push(pattern.clone());
                    args.push(FLAG_GRPC_PORT.to_string());
                    args.push(grpc_port.to_string());
                }
                None => {
                    return Err(ManifestError::invalid(
                        "spec.parallelism.expert",
                        format!("{world} ranks need their peers' addresses, and the launcher gave none"),
                    ));
                }
            }
            let redundant: Vec<String> =
                self.redundant_experts().iter().map(|r| format!("{}@{}", r.expert, r.rank)).collect();
            if !redundant.is_empty() {
                args.push(FLAG_REPLICATE.to_string());
                args.push(redundant.join(","));
            }
            if self.data_parallel_attention() {
                args.push(FLAG_DATA_PARALLEL_ATTENTION.to_string());
            }
        }
        if let Some(runtime) = &self.runtime {
            args.extend(runtime.args.iter().cloned());
        }
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::crd::{ParallelismSpec, RuntimeSpec};

    fn launcher(peers: Option<Peers>) -> Launcher {
        Launcher {
            model: "builtin:tiny-moe".into(),
            host: "h".into(),
            port: 1,
            device: None,
            drain_timeout: None,
            peers,
        }
    }

    #[test]
    fn both_launchers_get_the_same_flags_but_how_peers_are_found() {
        let mut spec = ModelDeploymentSpec::new("builtin:tiny-moe");
        spec.parallelism = Some(ParallelismSpec {
            expert: Some(2),
            data_parallel_attention: Some(true),
            ..ParallelismSpec::default()
        });
        let list =
            spec.serve_args(&launcher(Some(Peers::List { addrs: vec!["a:1".into(), "b:2".into()], rank: 1 }))).unwrap();
        let pattern = spec
            .serve_args(&Launcher {
                device: Some("cuda".into()),
                drain_timeout: Some(30),
                ..launcher(Some(Peers::Pattern { pattern: "g-{rank}.g:50051".into(), grpc_port: 50051 }))
            })
            .unwrap();
        let head = ["--model", "builtin:tiny-moe", "--host", "h", "--port", "1"];
        assert_eq!(list[..6], head);
        assert_eq!(list[6..], ["--world-size", "2", "--rank", "1", "--peers", "a:1,b:2", "--data-parallel-attention"]);
        assert_eq!(pattern[..6], head);
        assert_eq!(
            pattern[6..],
            [
                "--device",
                "cuda",
                "--drain-timeout",
                "30",
                "--world-size",
                "2",
                "--rank-from-hostname",
                "--peer-pattern",
                "g-{rank}.g:50051",
                "--grpc-port",
                "50051",
                "--data-parallel-attention"
            ]
        );
        let e = spec.serve_args(&launcher(None)).unwrap_err();
        assert_eq!(e.field(), Some("spec.parallelism.expert"));
    }

    #[test]
    fn reserved_flags_and_variables_are_refused_naming_what_sets_them() {
        for (flag, env, _) in RESERVED_FLAGS {
            let mut spec = ModelDeploymentSpec::new("builtin:tiny-moe");
            spec.runtime = Some(RuntimeSpec { args: vec![format!("{flag}=1")], ..RuntimeSpec::default() });
            let e = spec.serve_args(&launcher(None)).unwrap_err().to_string();
            assert!(e.contains("spec.runtime.args") && e.contains(flag), "{e}");
            spec.runtime = Some(RuntimeSpec {
                env: vec![crate::crd::EnvVar { name: (*env).into(), value: Some("1".into()), value_from: None }],
                ..RuntimeSpec::default()
            });
            let e = spec.check_reserved_settings().unwrap_err().to_string();
            assert!(e.contains("spec.runtime.env") && e.contains(env), "{e}");
        }
    }
}
