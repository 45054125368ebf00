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
use crate::expert::{ShardCompute, model_fingerprint, serve_experts};
use crate::loader::{ModelSource, var_builder};
use crate::model::ExpertShard;

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
    let compute = Arc::new(ShardCompute::new(shard, placement, rank, fingerprint, device, args.model.threads()?)?);
    let own = &expert.peers[rank];
    let port: u16 = own
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| Error::Setting { name: "peers".into(), reason: format!("`{own}`: expected host:port") })?;
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
