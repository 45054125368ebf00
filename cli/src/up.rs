//! `baleen up`: run a ModelDeployment on this machine as `baleen-runtime serve` child processes behind the
//! in-process gateway — `replicas` replicas, each one process, or with `parallelism.expert` = N a head and N - 1
//! ranks exchanging token rows over gRPC on 127.0.0.1 (with `dataParallelAttention` every rank is a head).
//!
//! Start every process, learn each head's address from its listening line, poll their `/ready` until 200 (or
//! `--ready-timeout`), put the gateway in front of them on `--host`/`--port` (routing by `spec.routing.policy`,
//! `/metrics` on `--admin-port`), print the base URL, the served model and a curl line, then serve until Ctrl-C or
//! SIGTERM: the gateway stops accepting and every runtime gets one SIGTERM (each drains its in-flight requests
//! and exits 0); wait up to `--stop-timeout`, kill what is still there, and report. A second Ctrl-C while
//! stopping is forwarded (the runtimes then abort what is in flight).

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use baleen_api::crd::{ModelDeploymentManifest, ModelDeploymentSpec, RoutingPolicy};
use baleen_api::names::BUILTIN_TINY_MOE;
use baleen_api::openai::ModelList;
use baleen_gateway::Gateway;
use baleen_gateway::config::Settings;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::banner;
use crate::child::{self, Group, connect_addr};
use crate::config::UpArgs;
use crate::error::Error;
use crate::launch;
use crate::locate::{SearchPlaces, find_runtime};
use crate::probe;

/// The runtime's readiness endpoint (200 once the model is loaded).
const READY_PATH: &str = "/ready";
/// The runtime's model list.
const MODELS_PATH: &str = "/v1/models";
/// Pause between two `/ready` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Time limit of one request to the runtime.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a run ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped on request; the runtime exited with this status.
    Stopped(ExitStatus),
    /// Stopped on request, but the runtime outlived `--stop-timeout` and was killed.
    Killed,
    /// The runtime exited on its own while serving.
    Exited(ExitStatus),
}

impl Outcome {
    /// 0 only when the runtime drained and exited cleanly on request.
    pub fn exit_code(self) -> ExitCode {
        match self {
            Self::Stopped(status) if status.success() => ExitCode::SUCCESS,
            Self::Stopped(status) | Self::Exited(status) => ExitCode::from(child::exit_code(status)),
            Self::Killed => ExitCode::FAILURE,
        }
    }
}

/// Progress for the person at the terminal, on stdout (the runtime's logs go to stderr). A closed stdout
/// (`baleen up | head`) must not stop the server, so write errors are ignored.
fn say(line: impl AsRef<str>) {
    let _ = writeln!(std::io::stdout().lock(), "{}", line.as_ref());
}

/// A problem, on stderr.
fn complain(line: impl AsRef<str>) {
    let _ = writeln!(std::io::stderr().lock(), "baleen: {}", line.as_ref());
}

/// Reads and validates a manifest file.
pub fn load_manifest(path: &Path) -> Result<ModelDeploymentManifest, Error> {
    let text =
        std::fs::read_to_string(path).map_err(|source| Error::ReadManifest { path: path.to_path_buf(), source })?;
    ModelDeploymentManifest::from_yaml(&text).map_err(|source| Error::Manifest { path: path.to_path_buf(), source })
}

/// Runs `baleen up` to the end.
pub async fn run(args: &UpArgs) -> Result<Outcome, Error> {
    args.validate()?;
    let settings = args.routing.settings()?;
    let spec = match &args.manifest {
        Some(path) => load_manifest(path)?.spec,
        None => ModelDeploymentSpec::new(BUILTIN_TINY_MOE),
    };
    let world = spec.expert_parallelism() as usize;
    let grpc_ports = if world > 1 { child::free_ports(world * spec.replicas() as usize)? } else { Vec::new() };
    let launch = launch::plan(&spec, &grpc_ports)?;
    let bin = find_runtime(&SearchPlaces::of_this_process(args.runtime_bin.clone()))?;
    // The gateway's ports first: one in use fails before any model loads.
    let api = bind(&args.host, args.port).await?;
    let admin = bind(&args.host, args.admin_port).await?;
    let mut signals = Signals::new()?;
    for note in &launch.notes {
        say(format!("note: {note}"));
    }
    let replicas = launch.replicas.len();
    for (r, replica) in launch.replicas.iter().enumerate() {
        for (k, rank_args) in replica.ranks.iter().enumerate() {
            let name = child::process_name(replicas, r, k + 1);
            say(format!("starting {name}: {} serve {}", bin.display(), rank_args.join(" ")));
        }
        let name = child::process_name(replicas, r, 0);
        say(format!("starting {name}: {} serve {}", bin.display(), replica.head.join(" ")));
    }
    let (mut runtime, listening) = Group::spawn(&bin, &launch)?;
    let pids =
        runtime.pids().iter().filter_map(|(name, pid)| pid.map(|pid| format!("{name} {pid}"))).collect::<Vec<_>>();
    say(format!(
        "loading model {} ({} replica{}, {} process{}: pid {})…",
        launch.source,
        replicas,
        if replicas == 1 { "" } else { "s" },
        launch.processes(),
        if launch.processes() == 1 { "" } else { "es" },
        pids.join(", ")
    ));
    let deadline = Instant::now() + args.ready_timeout();

    let (names, receivers): (Vec<String>, Vec<_>) = listening.into_iter().unzip();
    let bound = tokio::select! {
        found = futures_util::future::try_join_all(receivers) => match found {
            Ok(addrs) => addrs,
            // A stdout closed without the line: that process is exiting.
            Err(_) => return Err(Error::RuntimeFailed { status: finish(&mut runtime).await? }),
        },
        (_, status) = runtime.wait() => return Err(Error::RuntimeFailed { status: ended(&mut runtime, status).await? }),
        signal = signals.recv() => return stop(runtime, None, signals, args.stop_timeout(), signal).await,
        () = tokio::time::sleep_until(deadline) => return ready_timeout(runtime, signals, args).await,
    };
    let addrs: Vec<SocketAddr> = bound.iter().copied().map(connect_addr).collect();
    for (name, addr) in names.iter().zip(&bound) {
        say(format!("{name} listening on http://{addr}"));
    }
    say(format!("waiting for {READY_PATH}…"));
    tokio::select! {
        _ = futures_util::future::join_all(addrs.iter().map(|addr| wait_ready(*addr))) => {}
        (_, status) = runtime.wait() => return Err(Error::RuntimeFailed { status: ended(&mut runtime, status).await? }),
        signal = signals.recv() => return stop(runtime, None, signals, args.stop_timeout(), signal).await,
        () = tokio::time::sleep_until(deadline) => return ready_timeout(runtime, signals, args).await,
    }

    let model = match served_model(addrs[0]).await {
        Ok(name) => name,
        Err(e) => {
            tracing::warn!(error = %e, "GET {MODELS_PATH} failed; showing the expected model name");
            launch.served_name.clone()
        }
    };
    let front = Front::start(settings, &model, launch.policy, &addrs, api, admin).await?;
    let details = [
        format!(
            "  replicas:        {} ({} behind the gateway, {} routing)",
            replicas,
            plural(addrs.len(), "head"),
            launch.policy.as_str()
        ),
        format!("  gateway metrics: http://{}/metrics", front.admin),
    ];
    for line in banner::ready_lines(front.api, &model, launch.is_demo(), &details) {
        say(line);
    }

    tokio::select! {
        (name, status) = runtime.wait() => {
            let status = ended(&mut runtime, status).await?;
            complain(format!("{name} exited on its own ({status}); its log above says why"));
            front.close().await;
            Ok(Outcome::Exited(status))
        }
        signal = signals.recv() => stop(runtime, Some(front), signals, args.stop_timeout(), signal).await,
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}

async fn bind(host: &str, port: u16) -> Result<TcpListener, Error> {
    let addr = format!("{host}:{port}");
    TcpListener::bind(&addr).await.map_err(|source| Error::Bind { addr, source })
}

/// The in-process gateway in front of the heads: the user's `--host`/`--port` and `--admin-port`.
struct Front {
    api: SocketAddr,
    admin: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Front {
    /// Routes `model` over the heads at `addrs` and starts serving (after one probe of every head).
    async fn start(
        settings: Settings,
        model: &str,
        policy: RoutingPolicy,
        addrs: &[SocketAddr],
        api: TcpListener,
        admin: TcpListener,
    ) -> Result<Self, Error> {
        let local = |l: &TcpListener| {
            l.local_addr().map(connect_addr).map_err(|source| Error::Bind { addr: "the gateway's port".into(), source })
        };
        let (api_addr, admin_addr) = (local(&api)?, local(&admin)?);
        let gateway = Gateway::new(settings)?;
        let urls = addrs.iter().map(|addr| format!("http://{addr}")).collect::<Vec<_>>();
        gateway.set_model(model, policy, &urls)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(api, admin, async {
            let _ = stopped.await;
        }));
        Ok(Self { api: api_addr, admin: admin_addr, stop, task })
    }

    /// Stops accepting and lets the answers in flight finish.
    async fn close(self) {
        let _ = self.stop.send(());
        if let Err(e) = self.task.await {
            tracing::warn!("the gateway task failed: {e}");
        }
    }
}

/// Polls `/ready` until it answers 200.
async fn wait_ready(addr: SocketAddr) {
    loop {
        match probe::get(addr, READY_PATH, PROBE_TIMEOUT).await {
            Ok(response) if response.status == 200 => return,
            Ok(response) => tracing::debug!(status = response.status, "not ready yet"),
            Err(e) => tracing::debug!(error = %e, "not ready yet"),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The first model id of `GET /v1/models`.
async fn served_model(addr: SocketAddr) -> Result<String, String> {
    let response = probe::get(addr, MODELS_PATH, PROBE_TIMEOUT).await.map_err(|e| e.to_string())?;
    if response.status != 200 {
        return Err(format!("status {}", response.status));
    }
    let list: ModelList = serde_json::from_str(&response.body).map_err(|e| e.to_string())?;
    list.data.into_iter().next().map(|m| m.id).ok_or_else(|| "no models listed".to_string())
}

/// Asks the gateway and the runtimes to drain and exit (at once: requests in flight finish through the gateway
/// while both refuse new ones); forwards a second signal; kills the runtimes after `timeout`.
async fn stop(
    mut runtime: Group,
    front: Option<Front>,
    mut signals: Signals,
    timeout: Duration,
    signal: &str,
) -> Result<Outcome, Error> {
    say(format!("{signal}: stopping the runtime (finishing in-flight requests, up to {}s)…", timeout.as_secs()));
    let front = front.map(|front| tokio::spawn(front.close()));
    runtime.terminate()?;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            status = runtime.wait_all() => {
                let status = ended(&mut runtime, status).await?;
                if let Some(front) = front {
                    let _ = front.await;
                }
                if status.success() {
                    say("stopped.");
                } else {
                    complain(format!("the runtime exited with {status} while stopping; its log above says why"));
                }
                return Ok(Outcome::Stopped(status));
            }
            again = signals.recv() => {
                say(format!("{again} again: asking the runtime to abort in-flight requests…"));
                runtime.terminate()?;
            }
            () = &mut deadline => {
                complain(format!("the runtime did not exit within {}s; killing it", timeout.as_secs()));
                runtime.kill().await?;
                runtime.flush_logs().await;
                say("stopped (killed).");
                return Ok(Outcome::Killed);
            }
        }
    }
}

/// Stops a runtime that missed `--ready-timeout`, then reports the timeout.
async fn ready_timeout(runtime: Group, signals: Signals, args: &UpArgs) -> Result<Outcome, Error> {
    stop(runtime, None, signals, args.stop_timeout(), "not ready in time").await?;
    Err(Error::ReadyTimeout { timeout: args.ready_timeout() })
}

/// The status of a runtime that exited (`wait` already returned), after its last log lines are printed.
async fn ended(runtime: &mut Group, status: Result<ExitStatus, Error>) -> Result<ExitStatus, Error> {
    runtime.flush_logs().await;
    status
}

/// Waits for a runtime process that is exiting, then flushes the logs.
async fn finish(runtime: &mut Group) -> Result<ExitStatus, Error> {
    let (_, status) = runtime.wait().await;
    ended(runtime, status).await
}

/// SIGINT (Ctrl-C) and SIGTERM, both handled from before the runtime starts.
#[derive(Debug)]
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind, what| signal(kind).map_err(|source| Error::Process { what, source });
        Ok(Self {
            interrupt: install(SignalKind::interrupt(), "installing the SIGINT handler")?,
            terminate: install(SignalKind::terminate(), "installing the SIGTERM handler")?,
        })
    }

    /// The name of the next signal.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
