//! The replicas `baleen up` runs. Each replica is a task that owns its processes — start them, learn the heads'
//! addresses, wait for `/ready`, serve, and on request drain (one SIGTERM, a second forwarded, a kill after
//! `--stop-timeout`) — and reports to the [`Fleet`] by [`Event`]s. The fleet starts and stops replicas to follow
//! `spec.replicas` and the autoscaler's decisions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::banner::say;
use crate::child::{self, Group, Listening, connect_addr};
use crate::error::Error;
use crate::launch::{Launch, ReplicaLaunch};
use crate::probe::{READY_PATH, wait_ready};

/// Processes' names and ids.
pub type Pids = Vec<(String, Option<i32>)>;

/// What a replica task reports.
#[derive(Debug)]
pub enum Event {
    /// Every head answers `/ready`; `took` since its processes started.
    Ready { id: usize, heads: Vec<SocketAddr>, took: Duration },
    /// It did not become ready: a process exited, or `--ready-timeout` passed (its processes are stopped).
    Failed { id: usize, error: Error },
    /// A process of a serving replica exited on its own.
    Exited { id: usize, name: String, status: Result<ExitStatus, Error> },
    /// It stopped on request: the first failing status (else success), and whether it had to be killed.
    Stopped { id: usize, status: Result<ExitStatus, Error>, killed: bool },
}

/// What the fleet tells a replica task.
#[derive(Debug, Clone, Copy)]
enum Command {
    /// Drain and exit (the first signal), or abort what is in flight (any later one).
    Stop,
}

/// The fleet's view of one replica.
#[derive(Debug)]
struct Replica {
    control: mpsc::UnboundedSender<Command>,
    /// Its API heads, once ready.
    heads: Option<Vec<SocketAddr>>,
    /// Asked to stop.
    stopping: bool,
}

/// Every replica `baleen up` runs, by id (replica number, counted from 0).
#[derive(Debug)]
pub struct Fleet {
    bin: PathBuf,
    launch: Arc<Launch>,
    numbered: bool,
    ready_timeout: Duration,
    stop_timeout: Duration,
    next_id: usize,
    replicas: BTreeMap<usize, Replica>,
    sender: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Fleet {
    pub fn new(bin: PathBuf, launch: Arc<Launch>, ready_timeout: Duration, stop_timeout: Duration) -> Self {
        let numbered = launch.replicas.len() > 1 || launch.autoscaling.is_some();
        let (sender, events) = mpsc::unbounded_channel();
        Self {
            bin,
            launch,
            numbered,
            ready_timeout,
            stop_timeout,
            next_id: 0,
            replicas: BTreeMap::new(),
            sender,
            events,
        }
    }

    /// The name of replica `id` in messages.
    pub fn name(&self, id: usize) -> String {
        child::process_name(self.numbered, id, 0)
    }

    /// Starts a replica (`planned`, or one planned now on free ports), printing its command lines. Returns its
    /// id and its processes' names and ids.
    pub fn start(&mut self, planned: Option<ReplicaLaunch>) -> Result<(usize, Pids), Error> {
        let replica = match planned {
            Some(replica) => replica,
            None => {
                let world = self.launch.world();
                let ports = if world > 1 { child::free_ports(world)? } else { Vec::new() };
                self.launch.replica(&ports)?
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        for (k, args) in replica.ranks.iter().enumerate() {
            let name = child::process_name(self.numbered, id, k + 1);
            say(format!("starting {name}: {} serve {}", self.bin.display(), args.join(" ")));
        }
        say(format!("starting {}: {} serve {}", self.name(id), self.bin.display(), replica.head.join(" ")));
        let (group, listening) = Group::spawn(&self.bin, &replica, &self.launch.env, id, self.numbered)?;
        let pids = group.pids().into_iter().map(|(name, pid)| (name.to_string(), pid)).collect();
        let (control, commands) = mpsc::unbounded_channel();
        let task = ReplicaTask {
            id,
            group,
            commands,
            events: self.sender.clone(),
            ready_timeout: self.ready_timeout,
            stop_timeout: self.stop_timeout,
        };
        tokio::spawn(task.run(listening));
        self.replicas.insert(id, Replica { control, heads: None, stopping: false });
        Ok((id, pids))
    }

    /// The next event of any replica; records readiness and forgets replicas that ended.
    pub async fn next_event(&mut self) -> Event {
        // The fleet holds a sender, so the channel never closes.
        let Some(event) = self.events.recv().await else { return std::future::pending().await };
        match &event {
            Event::Ready { id, heads, .. } => {
                if let Some(replica) = self.replicas.get_mut(id) {
                    replica.heads = Some(heads.clone());
                }
            }
            Event::Failed { id, .. } | Event::Exited { id, .. } | Event::Stopped { id, .. } => {
                self.replicas.remove(id);
            }
        }
        event
    }

    /// Replicas running and not asked to stop (ready or starting).
    pub fn active(&self) -> usize {
        self.replicas.values().filter(|r| !r.stopping).count()
    }

    /// No replica is running (stopping ones count as running).
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// The heads of the ready replicas not asked to stop: the gateway's backends.
    pub fn serving_heads(&self) -> Vec<SocketAddr> {
        self.replicas.values().filter(|r| !r.stopping).filter_map(|r| r.heads.clone()).flatten().collect()
    }

    /// Picks `n` replicas to stop — those still starting first, then the newest — and marks them stopping (take
    /// them out of the gateway, then [`Fleet::stop`] them). Returns their ids.
    pub fn pick_to_stop(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<(bool, usize)> =
            self.replicas.iter().filter(|(_, r)| !r.stopping).map(|(id, r)| (r.heads.is_some(), *id)).collect();
        // Starting (false) before ready (true); newest (highest id) first within each.
        order.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let ids: Vec<usize> = order.into_iter().take(n).map(|(_, id)| id).collect();
        for id in &ids {
            if let Some(replica) = self.replicas.get_mut(id) {
                replica.stopping = true;
            }
        }
        ids
    }

    /// Asks replica `id` to drain and exit (again: to abort what is in flight).
    pub fn stop(&mut self, id: usize) {
        if let Some(replica) = self.replicas.get_mut(&id) {
            replica.stopping = true;
            let _ = replica.control.send(Command::Stop);
        }
    }

    /// Asks every replica to stop (again: to abort).
    pub fn stop_all(&mut self) {
        let ids: Vec<usize> = self.replicas.keys().copied().collect();
        for id in ids {
            self.stop(id);
        }
    }
}

/// One replica's processes, driven from start to exit.
struct ReplicaTask {
    id: usize,
    group: Group,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    ready_timeout: Duration,
    stop_timeout: Duration,
}

impl ReplicaTask {
    async fn run(mut self, listening: Vec<(String, Listening)>) {
        let started = Instant::now();
        let deadline = started + self.ready_timeout;
        let (names, receivers): (Vec<String>, Vec<Listening>) = listening.into_iter().unzip();
        let heads = async {
            let bound = futures_util::future::try_join_all(receivers).await.ok()?;
            for (name, addr) in names.iter().zip(&bound) {
                say(format!("{name} listening on http://{addr}"));
            }
            let heads: Vec<SocketAddr> = bound.into_iter().map(connect_addr).collect();
            say(format!("waiting for {READY_PATH}…"));
            futures_util::future::join_all(heads.iter().map(|addr| wait_ready(*addr))).await;
            Some(heads)
        };
        let event = tokio::select! {
            heads = heads => match heads {
                Some(heads) => Event::Ready { id: self.id, heads, took: started.elapsed() },
                // A stdout closed without the listening line: that process is exiting.
                None => {
                    let (_, status) = self.group.wait().await;
                    self.failed(status).await
                }
            },
            (_, status) = self.group.wait() => self.failed(status).await,
            _ = self.commands.recv() => return self.stop().await,
            () = tokio::time::sleep_until(deadline) => {
                let _ = self.drain().await;
                Event::Failed { id: self.id, error: Error::ReadyTimeout { timeout: self.ready_timeout } }
            }
        };
        let ready = matches!(event, Event::Ready { .. });
        let _ = self.events.send(event);
        if !ready {
            return;
        }
        tokio::select! {
            (name, status) = self.group.wait() => {
                self.group.flush_logs().await;
                // The other processes of the group cannot serve without it.
                let _ = self.group.terminate();
                let _ = self.events.send(Event::Exited { id: self.id, name, status });
            }
            _ = self.commands.recv() => self.stop().await,
        }
    }

    /// The event for a replica whose process exited before it was ready.
    async fn failed(&mut self, status: Result<ExitStatus, Error>) -> Event {
        self.group.flush_logs().await;
        let _ = self.group.terminate();
        let error = match status {
            Ok(status) => Error::RuntimeFailed { status },
            Err(e) => e,
        };
        Event::Failed { id: self.id, error }
    }

    /// SIGTERM, then wait for every process (forwarding later stop commands as signals), killing them after the
    /// stop timeout. Returns the status and whether they were killed.
    async fn drain(&mut self) -> (Result<ExitStatus, Error>, bool) {
        if let Err(e) = self.group.terminate() {
            return (Err(e), false);
        }
        let deadline = tokio::time::sleep(self.stop_timeout);
        tokio::pin!(deadline);
        // Once the fleet is gone (baleen is exiting) no command can come; keep draining until the deadline.
        let mut commands_open = true;
        loop {
            tokio::select! {
                status = self.group.wait_all() => {
                    self.group.flush_logs().await;
                    return (status, false);
                }
                command = self.commands.recv(), if commands_open => match command {
                    Some(Command::Stop) => {
                        let _ = self.group.terminate();
                    }
                    None => commands_open = false,
                },
                () = &mut deadline => {
                    if let Err(e) = self.group.kill().await {
                        return (Err(e), true);
                    }
                    self.group.flush_logs().await;
                    return (self.group.wait_all().await, true);
                }
            }
        }
    }

    async fn stop(mut self) {
        let (status, killed) = self.drain().await;
        let _ = self.events.send(Event::Stopped { id: self.id, status, killed });
    }
}
