//! `serve` as an expert-only rank (rank > 0 without data-parallel attention): load this rank's shard of the
//! routed experts — nothing else — and answer the head's dispatches over gRPC until SIGTERM. No HTTP API.

use std::io::Write;
use std::sync::Arc;

use baleen_api::names::RUNTIME_EXPERTS_LISTENING_PREFIX;
use serde_json::Value;
use tokio::net::TcpListener;

use super::cmd::{ServeArgs, Signals};
use crate::device::{parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::expert::{HeldExperts, ShardCompute, model_fingerprint, serve_experts};
use crate::loader::{ModelSource, var_builder};
use crate::model::{DeepseekModel, ExpertShard};

pub(super) fn run(args: &ServeArgs, runtime: &tokio::runtime::Runtime, mut signals: Signals) -> Result<Value> {
    let device = parse_device(&args.model.device)?;
    let dtype = parse_dtype(&args.model.dtype)?;
    let source = ModelSource::parse(&args.model.model);
    let config = source.config()?;
    let expert = &args.model.expert;
    let placement = expert
        .placement(&config)?
        .ok_or_else(|| Error::Setting { name: "world-size".into(), reason: "an expert rank needs a group".into() })?;
    let rank = expert.rank;
    let shard = ExpertShard::load(&config, &placement, rank, var_builder(&source, &config, dtype, &device)?)?;
    tracing::info!(rank, experts = ?shard.held(), expert_bytes = shard.bytes(), "expert shard loaded");
    let fingerprint = model_fingerprint(&source.to_string(), &config, dtype);
    let compute = Arc::new(ShardCompute::new(
        HeldExperts::Shard(shard),
        placement,
        rank,
        fingerprint,
        device,
        args.model.threads()?,
    )?);
    let port = expert_port(expert)?;
    runtime.block_on(async move {
        let listener = TcpListener::bind((args.host.as_str(), port))
            .await
            .map_err(|e| Error::Server(format!("binding {}:{port} failed: {e}", args.host)))?;
        let addr = listener.local_addr().map_err(|e| Error::Server(format!("reading the bound address: {e}")))?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{RUNTIME_EXPERTS_LISTENING_PREFIX}{addr}")
            .and_then(|()| stdout.flush())
            .map_err(|e| Error::Server(format!("writing the listening line: {e}")))?;
        drop(stdout);
        serve_experts(listener, compute, async move {
            let signal = signals.recv().await;
            tracing::info!(signal, "expert rank shutting down");
        })
        .await
    })?;
    Ok(Value::Null)
}

/// Data-parallel attention: a head also serves the experts its own model holds to the other heads, on its
/// `--peers` address, alongside its HTTP API (the service lives as long as the runtime).
pub(super) fn start_head_service(
    args: &ServeArgs,
    runtime: &tokio::runtime::Runtime,
    model: &DeepseekModel,
) -> Result<()> {
    let expert = &args.model.expert;
    let config = model.config();
    let placement = expert
        .placement(config)?
        .ok_or_else(|| Error::Setting { name: "world-size".into(), reason: "a head service needs a group".into() })?;
    let rank = expert.rank;
    let source = ModelSource::parse(&args.model.model);
    let fingerprint = model_fingerprint(&source.to_string(), config, model.dtype());
    let compute = Arc::new(ShardCompute::new(
        HeldExperts::Model(Box::new(model.clone())),
        placement,
        rank,
        fingerprint,
        model.device().clone(),
        args.model.threads()?,
    )?);
    let port = expert_port(expert)?;
    let listener = runtime
        .block_on(TcpListener::bind((args.host.as_str(), port)))
        .map_err(|e| Error::Server(format!("binding the expert service on {}:{port} failed: {e}", args.host)))?;
    tracing::info!(rank, port, "serving this head's experts to the other heads");
    runtime.spawn(async move {
        if let Err(e) = serve_experts(listener, compute, std::future::pending()).await {
            tracing::error!(error = %e, "the expert service stopped");
        }
    });
    Ok(())
}

/// The port this rank's expert service binds: `--grpc-port` when given, else the port of its own `--peers` entry.
fn expert_port(expert: &crate::cli::ExpertArgs) -> Result<u16> {
    if let Some(port) = expert.grpc_port {
        return Ok(port);
    }
    let own = expert.peers.get(expert.rank).map(String::as_str).unwrap_or_default();
    own.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| Error::Setting { name: "peers".into(), reason: format!("`{own}`: expected host:port") })
}
