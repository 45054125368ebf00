//! `baleen-runtime serve`: load the model, start the engine thread, serve HTTP until SIGTERM or Ctrl-C, then
//! drain (new requests get 503, `/ready` turns 503, in-flight requests finish or `--drain-timeout` passes), stop
//! the engine and the HTTP server, and exit: 0 when every in-flight request finished, 1 when the drain timeout or
//! a second signal cut some short (their streams end with `finish_reason: "abort"`).
//!
//! Once bound, it prints exactly one line on stdout, `baleen-runtime listening on http://HOST:PORT`, with the
//! port actually bound (`--port 0` picks a free one); tests and `baleen up` parse it.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baleen_api::names::RUNTIME_LISTENING_PREFIX;
use serde_json::Value;
use tokio::net::TcpListener;

pub use super::args::ServeArgs;
use super::signals::Signals;
use super::{AppState, Edge, serve};
use crate::device::{parse_device, parse_dtype};
use crate::engine::EngineHandle;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// How long the HTTP server may take to close its connections after the engine stopped.
const HTTP_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often serving checks that the engine thread is still alive.
const ENGINE_WATCH: Duration = Duration::from_millis(500);
/// How often the drain checks for requests still in flight.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// File descriptors kept for everything but client connections (model files, the expert transport, logs).
const RESERVED_FDS: u64 = 256;

/// Runs the server until a shutdown signal has been handled. Prints nothing on stdout besides the listening line
/// (the final state is logged), so callers can read stdout as a contract.
pub fn run(args: &ServeArgs) -> Result<Value> {
    let config = args.engine_config()?;
    // Fail fast on bad device/dtype/quantize strings, before any thread or socket exists.
    parse_device(&args.model.device)?;
    parse_dtype(&args.model.dtype)?;
    args.model.quantize()?;
    let threads = args.model.threads()?;
    let served = args.served_model_name();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("baleen-http")
        .enable_all()
        .build()
        .map_err(|e| Error::Server(format!("starting the HTTP runtime failed: {e}")))?;
    // Handle signals from before the model loads: a SIGTERM during start-up then drains (nothing) and exits 0.
    let signals = {
        let _context = runtime.enter();
        Signals::new()?
    };
    if args.model.expert.world_size > 1 && args.model.expert.rank != 0 && !args.model.expert.data_parallel_attention {
        return super::expert_rank::run(args, &runtime, signals);
    }
    let metrics = Arc::new(Metrics::new(&served)?);
    let (mut loaded, peers) = args.model.load_head()?;
    if let Some(path) = &args.chat_template {
        let source = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        loaded.tokenizer.set_chat_template(source)?;
        tracing::info!(path = %path.display(), "chat template replaced");
    }
    loaded.model.observe_experts(&metrics.expert_tokens_total)?;
    let mut head_service = None;
    if let Some(peers) = &peers {
        peers.register(&metrics.registry)?;
        if args.model.expert.data_parallel_attention {
            head_service = Some(super::expert_rank::start_head_service(args, &loaded.model)?);
        }
        // Ranks of a group start in any order and load at their own pace (pods of a StatefulSet): a head whose
        // peers are late serves anyway, with `/ready` answering 503 (naming the missing peers) until they answer.
        match peers.wait_ready(args.model.expert.timeout()) {
            Ok(()) => tracing::info!("expert peers ready"),
            Err(e) => {
                tracing::warn!(error = %e, "serving before every expert peer is ready; /ready stays 503 until then")
            }
        }
    }
    let (engine, engine_thread) = crate::engine::spawn(loaded, config, metrics.clone(), served.clone(), threads)?;
    let served_result = runtime.block_on(serve_until_signal(args, signals, engine.clone(), metrics, peers));
    runtime.shutdown_timeout(Duration::from_secs(1));
    engine.shutdown();
    if engine_thread.join().is_err() {
        tracing::error!("the engine thread panicked");
    }
    if let Some(service) = head_service {
        service.stop();
    }
    let drained = served_result?;
    tracing::info!(model = %served, drained, "stopped");
    if !drained {
        return Err(Error::Server("stopped before every in-flight request finished (they were aborted)".into()));
    }
    Ok(Value::Null)
}

/// Serves until a signal, then drains. Returns whether every in-flight request finished within the timeout.
async fn serve_until_signal(
    args: &ServeArgs,
    mut signals: Signals,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    peers: Option<Arc<crate::expert::ExpertPeers>>,
) -> Result<bool> {
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|e| Error::Server(format!("binding {}:{} failed: {e}", args.host, args.port)))?;
    let addr = listener.local_addr().map_err(|e| Error::Server(format!("reading the bound address: {e}")))?;
    announce(addr)?;
    let mut state = AppState::new(engine.clone(), metrics, args.max_request_bytes);
    state.peers = peers;
    state.limits = args.http_limits()?;
    state.edge = Arc::new(Edge::new(&args.api_key, &args.allowed_origins));
    raise_open_file_limit(state.limits.max_connections);
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(serve(listener, state, async {
        let _ = http_stopped.await;
    }));
    tokio::select! {
        signal = signals.recv() => tracing::info!(signal, "shutting down: draining in-flight requests"),
        ended = &mut server => {
            return match ended {
                Ok(Ok(())) => Err(Error::Server("the HTTP server stopped unexpectedly".to_string())),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(Error::Server(format!("the HTTP server task failed: {e}"))),
            };
        }
        () = engine_stopped(&engine) => {
            return Err(Error::Server("the engine thread stopped; exiting so the process is restarted".to_string()));
        }
    }
    engine.start_drain();
    let drained = tokio::select! {
        drained = drain(&engine, Duration::from_secs(args.drain_timeout)) => drained,
        signal = signals.recv() => {
            let in_flight = engine.in_flight();
            tracing::warn!(signal, in_flight, "second signal: aborting in-flight requests");
            // Nothing left to abort (the last request finished as the signal came): the drain did complete.
            in_flight == 0
        }
    };
    engine.shutdown();
    let _ = stop_http.send(());
    match tokio::time::timeout(HTTP_CLOSE_TIMEOUT, &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the HTTP server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP server task failed"),
        Err(_) => {
            tracing::warn!("connections still open after {HTTP_CLOSE_TIMEOUT:?}; closing them");
            server.abort();
        }
    }
    Ok(drained)
}

/// Raises the soft open-file limit to the hard one, so the connection cap (not the file limit) is what refuses
/// clients; warns when even the hard limit is below the cap plus the descriptors kept for the rest.
fn raise_open_file_limit(max_connections: usize) {
    let needed = (max_connections + super::http::OVER_CAPACITY_CONNECTIONS) as u64 + RESERVED_FDS;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < needed => tracing::warn!(
            limit,
            max_connections,
            needed,
            "the open-file limit is below --max-connections plus the probe-only connections and {RESERVED_FDS} \
             more: lower --max-connections"
        ),
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Completes if the engine thread stops while nobody asked it to (it failed).
async fn engine_stopped(engine: &EngineHandle) {
    while engine.is_ready() || engine.is_draining() {
        tokio::time::sleep(ENGINE_WATCH).await;
    }
}

/// Prints the listening line and flushes it.
fn announce(addr: SocketAddr) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{RUNTIME_LISTENING_PREFIX}{addr}")
        .and_then(|()| stdout.flush())
        .map_err(|e| Error::Server(format!("writing the listening line: {e}")))?;
    tracing::info!(%addr, "listening");
    Ok(())
}

/// Waits until no request is waiting or running, or `timeout` passes; true when everything finished.
async fn drain(engine: &EngineHandle, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        let in_flight = engine.in_flight();
        if in_flight == 0 {
            tracing::info!(waited_s = start.elapsed().as_secs_f64(), "drained");
            return true;
        }
        if start.elapsed() >= timeout {
            tracing::warn!(in_flight, "drain timeout passed; aborting the requests still in flight");
            return false;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}
