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
//!
//! While serving, a replica whose process exits on its own (or a replacement that fails to start) leaves the
//! gateway and is started again after a back-off, as the kubelet restarts a crashed container: 1 s, doubling
//! for each failure within [`RESTART_RESET`] of the previous one, at most [`RESTART_MAX_BACKOFF`].

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitCode, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

use baleen_api::crd::{ModelDeploymentManifest, ModelDeploymentSpec, ModelSource, RoutingPolicy};
use baleen_api::names::BUILTIN_TINY_MOE;
use baleen_api::openai::ModelList;
use baleen_gateway::Gateway;
use baleen_gateway::autoscale::{Actuator, ActuatorFuture, Decision};
use baleen_gateway::config::Settings;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::banner;
use crate::banner::say;
use crate::child::{self, connect_addr};
use crate::config::UpArgs;
use crate::error::Error;
use crate::fleet::{Event, Fleet};
use crate::launch;
use crate::locate::{SearchPlaces, find_runtime};
use crate::probe::{self, PROBE_TIMEOUT};

/// The runtime's model list.
const MODELS_PATH: &str = "/v1/models";
/// The first restart's delay.
const RESTART_MIN_BACKOFF: Duration = Duration::from_secs(1);
/// The longest delay between restarts (the kubelet's crash-loop back-off caps at 5 min; a laptop wants less).
const RESTART_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A failure this long after the previous one starts the back-off over.
const RESTART_RESET: Duration = Duration::from_secs(300);

/// How a run ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped on request; the runtime exited with this status.
    Stopped(ExitStatus),
    /// Stopped on request, but a process was killed: the runtime outlived `--stop-timeout`, or the model was still
    /// downloading.
    Killed,
}

impl Outcome {
    /// 0 only when the runtime drained and exited cleanly on request.
    pub fn exit_code(self) -> ExitCode {
        match self {
            Self::Stopped(status) if status.success() => ExitCode::SUCCESS,
            Self::Stopped(status) => ExitCode::from(child::exit_code(status)),
            Self::Killed => ExitCode::FAILURE,
        }
    }
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
    let launch = Arc::new(launch::plan(&spec, &grpc_ports)?);
    let bin = find_runtime(&SearchPlaces::of_this_process(args.runtime_bin.clone()))?;
    // The gateway's ports first: one in use fails before any model loads.
    let api = bind(&args.host, args.port).await?;
    let admin = bind(&args.host, args.admin_port).await?;
    let mut signals = Signals::new()?;
    for note in &launch.notes {
        say(format!("note: {note}"));
    }
    if let ModelSource::HuggingFace { .. } = &launch.source {
        // One download into the local Hugging Face cache; every rank (and every later replica) then loads the
        // model from there without a request to the Hub.
        say(format!(
            "downloading model {} (a model already in the Hugging Face cache is not fetched again)…",
            launch.source
        ));
        let mut download = child::spawn_download(&bin, &launch.source.to_string(), &launch.env)?;
        tokio::select! {
            status = download.wait() => {
                let status = status.map_err(|source| Error::Process { what: "waiting for the download", source })?;
                if !status.success() {
                    return Err(Error::DownloadFailed { status });
                }
            }
            signal = signals.recv() => {
                // The download shares our process group: a terminal's Ctrl-C reached it too; a SIGTERM did not.
                let _ = download.kill().await;
                say(format!("{signal}: stopped the download (it resumes where it stopped next time)"));
                return Ok(Outcome::Killed);
            }
        }
    }
    let mut fleet = Fleet::new(bin, Arc::clone(&launch), args.ready_timeout(), args.stop_timeout());
    let mut pids = Vec::new();
    for replica in &launch.replicas {
        let (_, started) = fleet.start(Some(replica.clone()))?;
        pids.extend(started.into_iter().filter_map(|(name, pid)| pid.map(|pid| format!("{name} {pid}"))));
    }
    let replicas = launch.replicas.len();
    if replicas == 0 {
        say(format!("model {}: 0 replicas until the first request (minReplicas: 0)", launch.source));
    } else {
        say(format!(
            "loading model {} ({} replica{}, {} process{}: pid {})…",
            launch.source,
            replicas,
            if replicas == 1 { "" } else { "s" },
            launch.processes(),
            if launch.processes() == 1 { "" } else { "es" },
            pids.join(", ")
        ));
    }

    // Every first replica ready before the gateway opens.
    let mut starting = replicas;
    while starting > 0 {
        tokio::select! {
            event = fleet.next_event() => match event {
                Event::Ready { .. } => starting -= 1,
                Event::Failed { error, .. } => {
                    stop(fleet, None, signals, "a replica failed to start").await?;
                    return Err(error);
                }
                Event::Exited { status, .. } | Event::Stopped { status, .. } => {
                    let status = status?;
                    stop(fleet, None, signals, "a replica failed to start").await?;
                    return Err(Error::RuntimeFailed { status });
                }
            },
            signal = signals.recv() => return stop(fleet, None, signals, signal).await,
        }
    }
    let heads = fleet.serving_heads();
    let model = match heads.first() {
        Some(head) => served_model(*head).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "GET {MODELS_PATH} failed; showing the expected model name");
            launch.served_name.clone()
        }),
        None => launch.served_name.clone(),
    };
    let front = Front::start(settings, &model, launch.policy, &heads, api, admin).await?;
    let (decisions, mut desired) = mpsc::unbounded_channel();
    if let Some(autoscaling) = &launch.autoscaling {
        let actuator = Arc::new(LocalActuator { decisions });
        let per_replica = u32::try_from(launch.heads_per_replica()).unwrap_or(1);
        front.gateway.autoscale(&model, autoscaling, replicas as u32, per_replica, actuator)?;
    }
    let scaling = launch.autoscaling.as_ref().map_or_else(String::new, |a| {
        format!(
            ", autoscaled {}..={} on {} (target {} per replica)",
            a.min_replicas(),
            a.max_replicas,
            a.metric.kind.as_str(),
            a.target
        )
    });
    let details = [
        format!(
            "  replicas:        {} ({} behind the gateway, {} routing{scaling})",
            replicas,
            plural(heads.len(), "head"),
            launch.policy.as_str()
        ),
        format!("  gateway metrics: http://{}/metrics", front.admin),
    ];
    for line in banner::ready_lines(front.api, &model, launch.is_demo(), &details) {
        say(line);
    }

    // Replicas the run keeps: `spec.replicas`, then the autoscaler's decisions.
    let mut target = replicas;
    let mut restarts = Restarts::default();
    loop {
        tokio::select! {
            Some((from, decision)) = desired.recv() => {
                say(format!("scaling {model} {}", decision.describe(from)));
                target = decision.desired as usize;
                scale(&mut fleet, &front, target)?;
            }
            () = until(restarts.due) => {
                restarts.due = None;
                for _ in fleet.active()..target {
                    match fleet.start(None) {
                        Ok((id, pids)) => {
                            let pids: Vec<String> =
                                pids.iter().filter_map(|(n, p)| p.map(|p| format!("{n} {p}"))).collect();
                            say(format!(
                                "{} restarting (restart {}): pid {}",
                                fleet.name(id),
                                restarts.count,
                                pids.join(", ")
                            ));
                        }
                        Err(e) => {
                            let delay = restarts.failed();
                            complain(format!("starting a replica failed: {e}; retrying in {} s", delay.as_secs()));
                            break;
                        }
                    }
                }
            }
            event = fleet.next_event() => match event {
                Event::Ready { id, took, .. } => {
                    say(format!("{} ready in {:.1}s", fleet.name(id), took.as_secs_f64()));
                    front.set_backends(&fleet.serving_heads()).await?;
                }
                Event::Failed { id, error } => {
                    let delay = restarts.failed();
                    complain(format!(
                        "{} failed to start: {error}; retrying in {} s",
                        fleet.name(id),
                        delay.as_secs()
                    ));
                }
                Event::Exited { id, name, status } => {
                    // The exited replica is out of the fleet: out of the gateway too, before its restart.
                    front.set_backends_now(&fleet.serving_heads())?;
                    let delay = restarts.failed();
                    let status = match status {
                        Ok(status) => status.to_string(),
                        Err(e) => e.to_string(),
                    };
                    complain(format!(
                        "{name} exited on its own ({status}; its log above says why); restarting {} in {} s",
                        fleet.name(id),
                        delay.as_secs()
                    ));
                }
                Event::Stopped { id, status, killed } => {
                    let how = match (&status, killed) {
                        (_, true) => "killed after --stop-timeout".to_string(),
                        (Ok(status), false) if status.success() => "drained".to_string(),
                        (Ok(status), false) => status.to_string(),
                        (Err(e), false) => e.to_string(),
                    };
                    say(format!("{} stopped ({how})", fleet.name(id)));
                }
            },
            signal = signals.recv() => return stop(fleet, Some(front), signals, signal).await,
        }
    }
}

/// When to start replicas again after failures, with the kubelet's kind of back-off.
#[derive(Debug, Default)]
struct Restarts {
    /// The delay of the last restart.
    backoff: Option<Duration>,
    /// When the last failure happened.
    last_failure: Option<tokio::time::Instant>,
    /// When the next restart is due (one for every replica missing then).
    due: Option<tokio::time::Instant>,
    /// Failures so far.
    count: u32,
}

impl Restarts {
    /// Records a failure; returns the delay before the restart.
    fn failed(&mut self) -> Duration {
        let now = tokio::time::Instant::now();
        let backoff = match (self.backoff, self.last_failure) {
            (Some(backoff), Some(last)) if now.duration_since(last) < RESTART_RESET => {
                (backoff * 2).min(RESTART_MAX_BACKOFF)
            }
            _ => RESTART_MIN_BACKOFF,
        };
        self.backoff = Some(backoff);
        self.last_failure = Some(now);
        self.count += 1;
        let due = now + backoff;
        self.due = Some(self.due.map_or(due, |d| d.max(due)));
        backoff
    }
}

/// Completes at `due`; never without one.
async fn until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Starts or stops replicas until `desired` are running or starting; replicas to stop leave the gateway first,
/// so no new request reaches them while they drain the ones in flight.
fn scale(fleet: &mut Fleet, front: &Front, desired: usize) -> Result<(), Error> {
    let active = fleet.active();
    if desired > active {
        for _ in active..desired {
            let (id, _) = fleet.start(None)?;
            say(format!("{} starting", fleet.name(id)));
        }
    } else if desired < active {
        let ids = fleet.pick_to_stop(active - desired);
        front.set_backends_now(&fleet.serving_heads())?;
        for id in ids {
            say(format!("{} stopping (draining its requests)", fleet.name(id)));
            fleet.stop(id);
        }
    }
    Ok(())
}

/// The autoscaler's actuator in `baleen up`: hands each decision to the run loop, which starts or stops replicas.
#[derive(Debug)]
struct LocalActuator {
    decisions: mpsc::UnboundedSender<(u32, Decision)>,
}

impl Actuator for LocalActuator {
    fn scale<'a>(&'a self, _model: &'a str, from: u32, decision: &'a Decision) -> ActuatorFuture<'a> {
        let sent = self.decisions.send((from, *decision)).map_err(|_| "baleen up is stopping".to_string());
        Box::pin(std::future::ready(sent))
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
    gateway: Gateway,
    model: String,
    policy: RoutingPolicy,
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
            l.local_addr().map(connect_addr).map_err(|source| Error::Bind { addr: "a gateway port".into(), source })
        };
        let (api_addr, admin_addr) = (local(&api)?, local(&admin)?);
        let gateway = Gateway::new(settings)?;
        let urls = addrs.iter().map(|addr| format!("http://{addr}")).collect::<Vec<_>>();
        gateway.set_model(model, policy, &urls)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let started = gateway.clone().start().await?;
        let task = tokio::spawn(started.serve(api, admin, async {
            let _ = stopped.await;
        }));
        Ok(Self { api: api_addr, admin: admin_addr, gateway, model: model.to_string(), policy, stop, task })
    }

    /// Routes over exactly these heads from now on.
    fn set_backends_now(&self, heads: &[SocketAddr]) -> Result<(), Error> {
        let urls = heads.iter().map(|addr| format!("http://{addr}")).collect::<Vec<_>>();
        Ok(self.gateway.set_model(&self.model, self.policy, &urls)?)
    }

    /// Routes over these heads and probes them at once (a new one is routable without waiting for the next
    /// scrape, and held requests go to it).
    async fn set_backends(&self, heads: &[SocketAddr]) -> Result<(), Error> {
        self.set_backends_now(heads)?;
        self.gateway.probe_now().await;
        Ok(())
    }

    /// Stops accepting and lets the answers in flight finish.
    async fn close(self) {
        let _ = self.stop.send(());
        if let Err(e) = self.task.await {
            tracing::warn!("the gateway task failed: {e}");
        }
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

/// Asks the gateway and every replica to drain and exit (at once: requests in flight finish through the gateway
/// while both refuse new ones); forwards a second signal; each replica is killed after `--stop-timeout`.
async fn stop(mut fleet: Fleet, front: Option<Front>, mut signals: Signals, signal: &str) -> Result<Outcome, Error> {
    say(format!("{signal}: stopping the runtime (finishing in-flight requests)…"));
    let front = front.map(|front| tokio::spawn(front.close()));
    fleet.stop_all();
    let mut status: Option<ExitStatus> = None;
    let mut killed = false;
    while !fleet.is_empty() {
        tokio::select! {
            event = fleet.next_event() => {
                let this = match event {
                    Event::Stopped { status, killed: k, .. } => {
                        killed |= k;
                        status?
                    }
                    Event::Exited { status, .. } => status?,
                    Event::Failed { error: Error::RuntimeFailed { status }, .. } => status,
                    Event::Failed { .. } | Event::Ready { .. } => continue,
                };
                if status.is_none_or(|s| s.success() && !this.success()) {
                    status = Some(this);
                }
            }
            again = signals.recv() => {
                say(format!("{again} again: asking the runtime to abort in-flight requests…"));
                fleet.stop_all();
            }
        }
    }
    if let Some(front) = front {
        let _ = front.await;
    }
    if killed {
        complain("a runtime did not exit within --stop-timeout; it was killed");
        say("stopped (killed).");
        return Ok(Outcome::Killed);
    }
    let status = status.unwrap_or_else(|| std::process::ExitStatus::from_raw(0));
    if status.success() {
        say("stopped.");
    } else {
        complain(format!("the runtime exited with {status} while stopping; its log above says why"));
    }
    Ok(Outcome::Stopped(status))
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
