//! `baleen up`: run a ModelDeployment on this machine as `baleen-runtime serve` child processes — one, or with
//! `parallelism.expert` = N a head and N - 1 expert-only ranks exchanging token rows over gRPC on 127.0.0.1.
//!
//! Start the runtime, learn its address from its listening line, poll `/ready` until 200 (or `--ready-timeout`),
//! print the base URL, the served model and a curl line, then serve until Ctrl-C or SIGTERM: send the runtime one
//! SIGTERM (it drains in-flight requests and exits 0), wait up to `--stop-timeout`, kill it if it is still there,
//! and report. A second Ctrl-C while stopping is forwarded (the runtime then aborts what is in flight).

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use baleen_api::crd::{ModelDeploymentManifest, ModelDeploymentSpec};
use baleen_api::names::BUILTIN_TINY_MOE;
use baleen_api::openai::ModelList;
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
    let spec = match &args.manifest {
        Some(path) => load_manifest(path)?.spec,
        None => ModelDeploymentSpec::new(BUILTIN_TINY_MOE),
    };
    let world = spec.expert_parallelism() as usize;
    let grpc_ports = if world > 1 { child::free_ports(world)? } else { Vec::new() };
    let launch = launch::plan(&spec, &args.host, args.port, &grpc_ports)?;
    let bin = find_runtime(&SearchPlaces::of_this_process(args.runtime_bin.clone()))?;
    let mut signals = Signals::new()?;
    for note in &launch.notes {
        say(format!("note: {note}"));
    }
    for (rank, rank_args) in launch.ranks.iter().enumerate() {
        say(format!("starting expert rank {}: {} serve {}", rank + 1, bin.display(), rank_args.join(" ")));
    }
    say(format!("starting runtime: {} serve {}", bin.display(), launch.args.join(" ")));
    let (mut runtime, listening) = Group::spawn(&bin, &launch)?;
    let rank_pids = runtime.rank_pids();
    for (rank, pid) in rank_pids.iter().enumerate() {
        if let Some(pid) = pid {
            say(format!("expert rank {} pid {pid}", rank + 1));
        }
    }
    match runtime.pid() {
        Some(pid) if !rank_pids.is_empty() => {
            say(format!("loading model {} (head pid {pid}, {} ranks)…", launch.source, rank_pids.len() + 1));
        }
        Some(pid) => say(format!("loading model {} (runtime pid {pid})…", launch.source)),
        None => say(format!("loading model {}…", launch.source)),
    }
    let deadline = Instant::now() + args.ready_timeout();

    let bound = tokio::select! {
        found = listening => match found {
            Ok(addr) => addr,
            // stdout closed without the line: the runtime is exiting.
            Err(_) => return Err(Error::RuntimeFailed { status: finish(&mut runtime).await? }),
        },
        status = runtime.wait() => return Err(Error::RuntimeFailed { status: ended(&mut runtime, status).await? }),
        signal = signals.recv() => return stop(runtime, signals, args.stop_timeout(), signal).await,
        () = tokio::time::sleep_until(deadline) => return ready_timeout(runtime, signals, args).await,
    };
    let addr = connect_addr(bound);
    say(format!("runtime listening on http://{bound}; waiting for {READY_PATH}…"));
    tokio::select! {
        () = wait_ready(addr) => {}
        status = runtime.wait() => return Err(Error::RuntimeFailed { status: ended(&mut runtime, status).await? }),
        signal = signals.recv() => return stop(runtime, signals, args.stop_timeout(), signal).await,
        () = tokio::time::sleep_until(deadline) => return ready_timeout(runtime, signals, args).await,
    }

    let model = match served_model(addr).await {
        Ok(name) => name,
        Err(e) => {
            tracing::warn!(error = %e, "GET {MODELS_PATH} failed; showing the expected model name");
            launch.served_name.clone()
        }
    };
    for line in banner::ready_lines(addr, &model, launch.is_demo()) {
        say(line);
    }

    tokio::select! {
        status = runtime.wait() => {
            let status = ended(&mut runtime, status).await?;
            complain(format!("the runtime exited on its own ({status}); its log above says why"));
            Ok(Outcome::Exited(status))
        }
        signal = signals.recv() => stop(runtime, signals, args.stop_timeout(), signal).await,
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

/// Asks the runtime to drain and exit; forwards a second signal; kills it after `timeout`.
async fn stop(mut runtime: Group, mut signals: Signals, timeout: Duration, signal: &str) -> Result<Outcome, Error> {
    say(format!("{signal}: stopping the runtime (finishing in-flight requests, up to {}s)…", timeout.as_secs()));
    runtime.terminate()?;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            status = runtime.wait_all() => {
                let status = ended(&mut runtime, status).await?;
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
    stop(runtime, signals, args.stop_timeout(), "not ready in time").await?;
    Err(Error::ReadyTimeout { timeout: args.ready_timeout() })
}

/// The status of a runtime that exited (`wait` already returned), after its last log lines are printed.
async fn ended(runtime: &mut Group, status: Result<ExitStatus, Error>) -> Result<ExitStatus, Error> {
    runtime.flush_logs().await;
    status
}

/// Waits for a runtime that is exiting, then flushes its logs.
async fn finish(runtime: &mut Group) -> Result<ExitStatus, Error> {
    let status = runtime.wait().await;
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
