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

use baleen_api::names::{
    BUILTIN_SCHEME, ENV_RUNTIME_BLOCK_SIZE, ENV_RUNTIME_DRAIN_TIMEOUT, ENV_RUNTIME_HOST, ENV_RUNTIME_KV_CACHE_MEMORY,
    ENV_RUNTIME_MAX_MODEL_LEN, ENV_RUNTIME_MAX_NUM_BATCHED_TOKENS, ENV_RUNTIME_MAX_NUM_SEQS,
    ENV_RUNTIME_MAX_REQUEST_BYTES, ENV_RUNTIME_MAX_WAITING, ENV_RUNTIME_NO_PREFIX_CACHING, ENV_RUNTIME_PORT,
    ENV_RUNTIME_SERVED_MODEL_NAME, RUNTIME_LISTENING_PREFIX,
};
use baleen_api::names::{
    ENV_RUNTIME_ALLOWED_ORIGINS, ENV_RUNTIME_API_KEY, ENV_RUNTIME_BODY_READ_TIMEOUT, ENV_RUNTIME_CHAT_TEMPLATE,
    ENV_RUNTIME_HEADER_READ_TIMEOUT, ENV_RUNTIME_MAX_CONNECTIONS,
};
use serde_json::Value;
use tokio::net::TcpListener;

use super::{AppState, Edge, HttpLimits, serve};
use crate::cli::ModelArgs;
use crate::device::{parse_device, parse_dtype};
use crate::engine::{EngineConfig, EngineHandle, KvCacheMemory};
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

/// The flags of `baleen-runtime serve`; each can also come from its `BALEEN_RUNTIME_*` variable.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind: 0.0.0.0 (every interface) suits a pod; use 127.0.0.1 to serve this machine only.
    #[arg(long, default_value = "0.0.0.0", env = ENV_RUNTIME_HOST)]
    pub host: String,
    /// Port to bind; 0 picks a free one (the listening line says which).
    #[arg(long, default_value_t = 8000, env = ENV_RUNTIME_PORT)]
    pub port: u16,
    /// Name clients send as `model` [default: the --model string; `builtin:NAME` → NAME].
    #[arg(long, env = ENV_RUNTIME_SERVED_MODEL_NAME)]
    pub served_model_name: Option<String>,
    /// Sequences in the running batch at most.
    #[arg(long, default_value_t = 64, env = ENV_RUNTIME_MAX_NUM_SEQS)]
    pub max_num_seqs: usize,
    /// Tokens processed in one engine step at most (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = 2048, env = ENV_RUNTIME_MAX_NUM_BATCHED_TOKENS)]
    pub max_num_batched_tokens: usize,
    /// Prompt plus generated tokens of one request at most [default: the model's max_position_embeddings].
    #[arg(long, env = ENV_RUNTIME_MAX_MODEL_LEN)]
    pub max_model_len: Option<usize>,
    /// Memory for the latent KV cache: a fraction of device memory (0.2) or a size (512MiB, 4GiB).
    #[arg(long, default_value = "1GiB", env = ENV_RUNTIME_KV_CACHE_MEMORY)]
    pub kv_cache_memory: KvCacheMemory,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16, env = ENV_RUNTIME_BLOCK_SIZE)]
    pub block_size: usize,
    /// Requests waiting for admission at most; beyond it requests are refused with 429.
    #[arg(long, default_value_t = 256, env = ENV_RUNTIME_MAX_WAITING)]
    pub max_waiting: usize,
    /// Turn prefix caching off.
    #[arg(long, env = ENV_RUNTIME_NO_PREFIX_CACHING)]
    pub no_prefix_caching: bool,
    /// Request bodies larger than this many bytes are refused with 413 before they are read.
    #[arg(long, default_value_t = 1 << 20, env = ENV_RUNTIME_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// Seconds to let in-flight requests finish after SIGTERM before aborting them.
    #[arg(long, default_value_t = 30, env = ENV_RUNTIME_DRAIN_TIMEOUT)]
    pub drain_timeout: u64,
    /// Seconds a client may take to send a request's headers; idle keep-alive connections close after it too.
    #[arg(long, default_value_t = 60, env = ENV_RUNTIME_HEADER_READ_TIMEOUT)]
    pub header_read_timeout: u64,
    /// Seconds a client may take to send a request's body (else 408).
    #[arg(long, default_value_t = 60, env = ENV_RUNTIME_BODY_READ_TIMEOUT)]
    pub body_read_timeout: u64,
    /// Open client connections at most; beyond it a connection is served only /health, /ready and /metrics
    /// (others get 503) and closed after one answer.
    #[arg(long, default_value_t = 4096, env = ENV_RUNTIME_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// API keys, comma-separated: /v1/* then needs `Authorization: Bearer KEY` (the probes and /metrics stay
    /// open). Prefer the variable to the flag, which other users of the machine can read.
    #[arg(long, env = ENV_RUNTIME_API_KEY, value_delimiter = ',', hide_env_values = true)]
    pub api_key: Vec<String>,
    /// Browser origins allowed to call the API (CORS), comma-separated, or `*`; none by default.
    #[arg(long, env = ENV_RUNTIME_ALLOWED_ORIGINS, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// A Jinja chat template file to use instead of the model's (transformers' conventions: `messages`,
    /// `tools`, `add_generation_prompt`, the special tokens); it must compile, or the server does not start.
    #[arg(long, env = ENV_RUNTIME_CHAT_TEMPLATE)]
    pub chat_template: Option<std::path::PathBuf>,
}

impl ServeArgs {
    /// The engine limits these flags set; zero sizes are refused with the flag's name.
    pub fn engine_config(&self) -> Result<EngineConfig> {
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::Setting { name: name.to_string(), reason: "must be at least 1".to_string() })
            } else {
                Ok(v)
            }
        };
        positive("max-request-bytes", self.max_request_bytes)?;
        self.http_limits()?;
        if !self.api_key.is_empty() && self.api_key.iter().all(|k| k.trim().is_empty()) {
            return Err(Error::Setting {
                name: "api-key".into(),
                reason: "is set but holds no key (refusing to serve without the authentication it asks for)".into(),
            });
        }
        if let Some(len) = self.max_model_len {
            positive("max-model-len", len)?;
        }
        Ok(EngineConfig {
            max_num_seqs: positive("max-num-seqs", self.max_num_seqs)?,
            max_num_batched_tokens: positive("max-num-batched-tokens", self.max_num_batched_tokens)?,
            max_model_len: self.max_model_len,
            kv_cache_memory: self.kv_cache_memory,
            block_size: positive("block-size", self.block_size)?,
            max_waiting: positive("max-waiting", self.max_waiting)?,
            enable_prefix_caching: !self.no_prefix_caching,
        })
    }

    /// The connection timeouts and cap; zero is refused with the flag's name.
    pub fn http_limits(&self) -> Result<HttpLimits> {
        let seconds = |name: &str, v: u64| {
            if v == 0 {
                Err(Error::Setting { name: name.to_string(), reason: "must be at least 1 second".to_string() })
            } else {
                Ok(Duration::from_secs(v))
            }
        };
        if self.max_connections == 0 {
            return Err(Error::Setting { name: "max-connections".into(), reason: "must be at least 1".into() });
        }
        Ok(HttpLimits {
            header_read_timeout: seconds("header-read-timeout", self.header_read_timeout)?,
            body_read_timeout: seconds("body-read-timeout", self.body_read_timeout)?,
            max_connections: self.max_connections,
        })
    }

    /// `--served-model-name`, or the model source: `builtin:NAME` → `NAME`, a directory as given.
    pub fn served_model_name(&self) -> String {
        match &self.served_model_name {
            Some(name) => name.clone(),
            None => match self.model.model.strip_prefix(BUILTIN_SCHEME) {
                Some(name) => name.to_string(),
                None => self.model.model.clone(),
            },
        }
    }
}

/// Runs the server until a shutdown signal has been handled. Prints nothing on stdout besides the listening line
/// (the final state is logged), so callers can read stdout as a contract.
pub fn run(args: &ServeArgs) -> Result<Value> {
    let config = args.engine_config()?;
    // Fail fast on bad device/dtype strings, before any thread or socket exists.
    parse_device(&args.model.device)?;
    parse_dtype(&args.model.dtype)?;
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

/// SIGTERM and SIGINT (Ctrl-C), both handled from creation on.
pub(super) struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let install = |kind: SignalKind, name: &str| {
                signal(kind).map_err(|e| Error::Server(format!("installing the {name} handler: {e}")))
            };
            Ok(Self {
                term: install(SignalKind::terminate(), "SIGTERM")?,
                interrupt: install(SignalKind::interrupt(), "SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next signal's name.
    pub(super) async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.interrupt.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "ctrl-c"
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).unwrap().serve
    }

    #[test]
    fn flag_defaults_match_the_engine_defaults() {
        let args = parse(&["--model", "builtin:tiny-moe"]);
        let got = args.engine_config().unwrap();
        let want = EngineConfig::default();
        assert_eq!(got.max_num_seqs, want.max_num_seqs);
        assert_eq!(got.max_num_batched_tokens, want.max_num_batched_tokens);
        assert_eq!(got.max_model_len, want.max_model_len);
        assert_eq!(got.kv_cache_memory, want.kv_cache_memory);
        assert_eq!(got.block_size, want.block_size);
        assert_eq!(got.max_waiting, want.max_waiting);
        assert_eq!(got.enable_prefix_caching, want.enable_prefix_caching);
        assert_eq!((args.host.as_str(), args.port, args.max_request_bytes), ("0.0.0.0", 8000, 1 << 20));
    }

    #[test]
    fn served_name_defaults_to_the_model_source() {
        assert_eq!(parse(&["--model", "builtin:tiny-moe"]).served_model_name(), "tiny-moe");
        assert_eq!(parse(&["--model", "/models/v3"]).served_model_name(), "/models/v3");
        assert_eq!(parse(&["--model", "/m", "--served-model-name", "ds"]).served_model_name(), "ds");
    }

    #[test]
    fn flags_set_the_engine_limits() {
        let args = parse(&[
            "--model",
            "builtin:tiny-moe",
            "--max-num-seqs",
            "2",
            "--kv-cache-memory",
            "64MiB",
            "--max-model-len",
            "128",
            "--no-prefix-caching",
        ]);
        let c = args.engine_config().unwrap();
        assert_eq!((c.max_num_seqs, c.max_model_len), (2, Some(128)));
        assert_eq!(c.kv_cache_memory, KvCacheMemory::Bytes(64 << 20));
        assert!(!c.enable_prefix_caching);
    }

    #[test]
    fn zero_sizes_are_refused_naming_the_flag() {
        let err = parse(&["--model", "x", "--block-size", "0"]).engine_config().unwrap_err();
        assert!(err.to_string().contains("block-size"), "{err}");
        assert!(Cli::try_parse_from(["serve", "--model", "x", "--kv-cache-memory", "lots"]).is_err());
    }
}
