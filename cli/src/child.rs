//! The `baleen-runtime serve` child processes: spawn them, forward their logs, learn the head's address, signal
//! them. A [`Group`] is one replica: the head and, with expert parallelism, its expert-only ranks.
//!
//! The child runs in its own process group, so a Ctrl-C in the terminal reaches `baleen` alone and the runtime
//! gets exactly one SIGTERM from us (a second signal makes the runtime abort in-flight requests instead of
//! draining them). It is killed if `baleen` drops it without stopping it (`kill_on_drop`).

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use baleen_api::names::{
    ENV_NO_COLOR, FLAG_MODEL, RUNTIME_DOWNLOAD_COMMAND, RUNTIME_LISTENING_PREFIX, RUNTIME_SERVE_COMMAND,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::launch::ReplicaLaunch;

/// The name of one process in logs and messages: `runtime` for the head of the only replica, `rank K` for its
/// other ranks; when replicas are `numbered` (several, or autoscaled) `rR` and `rR.K` (R counted from 1).
pub fn process_name(numbered: bool, replica: usize, rank: usize) -> String {
    match (numbered, rank) {
        (false, 0) => "runtime".to_string(),
        (false, k) => format!("rank {k}"),
        (true, 0) => format!("r{}", replica + 1),
        (true, k) => format!("r{}.{k}", replica + 1),
    }
}
/// Starts `bin download --model MODEL` (a Hugging Face source) with extra environment `env`: it fills the local
/// Hugging Face cache, so every rank started after it finds the model there and loads it without a request. Its
/// progress (bars on a terminal) goes to our stderr; its JSON summary is dropped. It shares our process group, so a
/// Ctrl-C reaches it too; it is killed if dropped.
pub fn spawn_download(bin: &Path, model: &str, env: &[(String, String)]) -> Result<Child, Error> {
    Command::new(bin)
        .args([RUNTIME_DOWNLOAD_COMMAND, FLAG_MODEL, model])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Spawn { path: bin.to_path_buf(), source })
}

/// How long the log forwarders may take to drain the pipes after the child exited.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A running runtime process.
#[derive(Debug)]
pub struct Runtime {
    child: Child,
    pid: Option<Pid>,
    forwarders: Vec<JoinHandle<()>>,
}

/// Resolves to the address from the runtime's listening line; fails if its stdout closed without one.
pub type Listening = oneshot::Receiver<SocketAddr>;

impl Runtime {
    /// Starts `bin serve ARGS` with extra environment `env`; its log lines are prefixed with `prefix`.
    pub fn spawn(
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        name: &str,
    ) -> Result<(Self, Listening), Error> {
        let prefix: Arc<str> = Arc::from(format!("{name:<7} | "));
        let mut command = Command::new(bin);
        command.arg(RUNTIME_SERVE_COMMAND).args(args);
        if !std::io::stderr().is_terminal() {
            // Colour codes are noise in a log file or a test's captured output; the manifest's env may override.
            command.env(ENV_NO_COLOR, "1");
        }
        command
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(unix)]
        command.process_group(0);
        let mut child = command.spawn().map_err(|source| Error::Spawn { path: bin.to_path_buf(), source })?;
        let pid = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
        let (found, listening) = oneshot::channel();
        let mut forwarders = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            forwarders.push(tokio::spawn(read_stdout(stdout, found, Arc::clone(&prefix))));
        }
        if let Some(stderr) = child.stderr.take() {
            forwarders.push(tokio::spawn(forward_lines(stderr, prefix)));
        }
        Ok((Self { child, pid, forwarders }, listening))
    }

    /// The process id.
    pub fn pid(&self) -> Option<i32> {
        self.pid.map(Pid::as_raw)
    }

    /// Waits for the process to exit (cancel-safe: may be raced in `select!` and called again).
    pub async fn wait(&mut self) -> Result<ExitStatus, Error> {
        self.child.wait().await.map_err(|source| Error::Process { what: "waiting for the runtime", source })
    }

    /// Sends SIGTERM: the runtime stops accepting requests, finishes the ones in flight, and exits 0.
    pub fn terminate(&self) -> Result<(), Error> {
        let Some(pid) = self.pid else { return Ok(()) };
        match kill(pid, Signal::SIGTERM) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(errno) => Err(Error::Process { what: "sending SIGTERM to the runtime", source: errno.into() }),
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub async fn kill(&mut self) -> Result<ExitStatus, Error> {
        self.child.kill().await.map_err(|source| Error::Process { what: "killing the runtime", source })?;
        self.wait().await
    }

    /// Lets the log forwarders print what the exited process left in its pipes.
    pub async fn flush_logs(&mut self) {
        for forwarder in self.forwarders.drain(..) {
            if tokio::time::timeout(LOG_DRAIN_TIMEOUT, forwarder).await.is_err() {
                tracing::debug!("a runtime log pipe stayed open after the runtime exited");
            }
        }
    }
}

/// Every process of one replica — its head and its other ranks — started and stopped together.
#[derive(Debug)]
pub struct Group {
    /// (name, process); the other ranks, then the head.
    processes: Vec<(String, Runtime)>,
}

impl Group {
    /// Starts replica number `index` (its other ranks, then its head). Returns the listening addresses of the
    /// processes that serve the API — the head, and with data-parallel attention the other ranks — with their
    /// names.
    pub fn spawn(
        bin: &Path,
        replica: &ReplicaLaunch,
        env: &[(String, String)],
        index: usize,
        numbered: bool,
    ) -> Result<(Self, Vec<(String, Listening)>), Error> {
        let mut processes = Vec::with_capacity(1 + replica.ranks.len());
        let mut listening = Vec::new();
        let mut rank_listening = Vec::new();
        for (k, args) in replica.ranks.iter().enumerate() {
            let name = process_name(numbered, index, k + 1);
            let (runtime, found) = Runtime::spawn(bin, args, env, &name)?;
            if replica.ranks_serve_api {
                rank_listening.push((name.clone(), found));
            }
            processes.push((name, runtime));
        }
        let name = process_name(numbered, index, 0);
        let (head, found) = Runtime::spawn(bin, &replica.head, env, &name)?;
        listening.push((name.clone(), found));
        listening.append(&mut rank_listening);
        processes.push((name, head));
        Ok((Self { processes }, listening))
    }

    /// Each process's name and id.
    pub fn pids(&self) -> Vec<(&str, Option<i32>)> {
        self.processes.iter().map(|(name, p)| (name.as_str(), p.pid())).collect()
    }

    /// Waits until any process exits, and returns its name and status (cancel-safe).
    pub async fn wait(&mut self) -> (String, Result<ExitStatus, Error>) {
        let waits = self.processes.iter_mut().map(|(name, p)| {
            Box::pin(async move {
                let status = p.wait().await;
                (name.clone(), status)
            })
        });
        futures_util::future::select_all(waits).await.0
    }

    /// Waits until every process exited: the first failure's status, else success.
    pub async fn wait_all(&mut self) -> Result<ExitStatus, Error> {
        let mut status = None;
        for (_, process) in &mut self.processes {
            let this = process.wait().await?;
            if status.is_none_or(|s: ExitStatus| s.success() && !this.success()) {
                status = Some(this);
            }
        }
        status.ok_or(Error::Process { what: "waiting for the runtime", source: std::io::ErrorKind::NotFound.into() })
    }

    /// SIGTERM to every process (heads drain their requests).
    pub fn terminate(&self) -> Result<(), Error> {
        self.processes.iter().try_for_each(|(_, p)| p.terminate())
    }

    /// Kills every process and reaps them.
    pub async fn kill(&mut self) -> Result<(), Error> {
        for (_, process) in &mut self.processes {
            process.kill().await?;
        }
        Ok(())
    }

    /// Lets the log forwarders print what the exited processes left in their pipes.
    pub async fn flush_logs(&mut self) {
        for (_, process) in &mut self.processes {
            process.flush_logs().await;
        }
    }
}

/// `n` free TCP ports on 127.0.0.1 (bound, read and released; another process could take one in between, which
/// the rank that needs it then reports as a bind error).
pub fn free_ports(n: usize) -> Result<Vec<u16>, Error> {
    let what = "finding free ports for the expert ranks";
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|source| Error::Process { what, source })?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).map_err(|source| Error::Process { what, source }))
        .collect()
}

/// Forwards stdout, sending the address of the listening line once.
async fn read_stdout(stdout: impl AsyncRead + Unpin, found: oneshot::Sender<SocketAddr>, prefix: Arc<str>) {
    let mut found = Some(found);
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(addr) = parse_listening(&line)
            && let Some(found) = found.take()
        {
            let _ = found.send(addr);
            continue;
        }
        log_line(&prefix, &line);
    }
}

/// Writes one runtime log line to stderr; a closed stderr must not stop the server, so errors are ignored.
fn log_line(prefix: &str, line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
}

async fn forward_lines(pipe: impl AsyncRead + Unpin, prefix: Arc<str>) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        log_line(&prefix, &line);
    }
}

/// The address of `baleen-runtime listening on http://HOST:PORT`.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.trim_end().strip_prefix(RUNTIME_LISTENING_PREFIX)?.trim_end_matches('/').parse().ok()
}

/// Where to connect to a server bound to `bound`: a wildcard address (`0.0.0.0`, `::`) means loopback.
pub fn connect_addr(bound: SocketAddr) -> SocketAddr {
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bound.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), bound.port()),
        _ => bound,
    }
}

/// The exit code `baleen` reports for a runtime that ended with `status`: its code, or 128 + its signal, never 0.
pub fn exit_code(status: ExitStatus) -> u8 {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return u8::try_from(128 + signal).unwrap_or(1);
        }
    }
    match status.code().map(|c| u8::try_from(c & 0xff).unwrap_or(1)) {
        Some(0) | None => 1,
        Some(code) => code,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn the_listening_line_gives_the_address() {
        let addr = parse_listening("baleen-runtime listening on http://127.0.0.1:40123\n").unwrap();
        assert_eq!(addr, "127.0.0.1:40123".parse().unwrap());
        assert_eq!(parse_listening("baleen-runtime listening on http://[::1]:8000").unwrap().port(), 8000);
        assert_eq!(parse_listening("INFO listening addr=127.0.0.1:1"), None);
        assert_eq!(parse_listening("baleen-runtime listening on http://nowhere"), None);
    }

    #[test]
    fn wildcard_addresses_are_reached_on_loopback() {
        assert_eq!(connect_addr("0.0.0.0:80".parse().unwrap()), "127.0.0.1:80".parse().unwrap());
        assert_eq!(connect_addr("[::]:80".parse().unwrap()), "[::1]:80".parse().unwrap());
        assert_eq!(connect_addr("10.1.2.3:80".parse().unwrap()), "10.1.2.3:80".parse().unwrap());
    }

    #[test]
    fn exit_codes_are_never_zero() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 1);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }
}
