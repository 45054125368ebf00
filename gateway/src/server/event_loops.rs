//! The API port's event loops: `--workers` threads (one per CPU by default), each running a single-threaded tokio
//! runtime of its own. The listener's task hands each accepted connection to the loop with the fewest open
//! connections, and the connection stays there to its end: its requests, the upstream connections they borrow
//! (each loop keeps its own idle ones, [`pool::set_event_loop`]) and their answers are driven by one thread, with
//! no hop between threads and no work stealing. On tokio's shared multi-threaded scheduler a proxied request
//! cost about one futex wake-up between threads; here it costs none.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::HEADER_READ_TIMEOUT;
use super::http1::{self, Limits};
use crate::App;
use crate::backends::pool;
use crate::error::{Error, Result};

/// How often each loop's heartbeat timer fires; shorter than [`HEADER_READ_TIMEOUT`]. Tokio interrupts a loop's
/// wait (a write to its wake-up descriptor) whenever a timer is armed that is due before the loop's next planned
/// wake-up, and every proxied request arms one (its `--request-timeout`), as every new connection does (its head
/// timer): with the heartbeat's timer always due sooner, arming them costs no system call.
const HEARTBEAT: Duration = Duration::from_secs(10);
const _: () = assert!(HEARTBEAT.as_secs() < HEADER_READ_TIMEOUT.as_secs());

/// An accepted connection on its way to a loop, and the loop's count of open connections, which it keeps raised
/// until the connection ends (or is dropped on the way).
type Handed = (std::net::TcpStream, Open);

/// One open connection of a loop: counted while it lives.
#[derive(Debug)]
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A running loop: where its connections go, how many it serves, and a receiver that resolves when its thread
/// has ended (its sender is dropped last on that thread).
#[derive(Debug)]
struct Loop {
    connections: mpsc::UnboundedSender<Handed>,
    open: Arc<AtomicUsize>,
    ended: oneshot::Receiver<()>,
}

/// The API port's event loops; see the module docs.
#[derive(Debug)]
pub(crate) struct EventLoops {
    loops: Vec<Loop>,
}

impl EventLoops {
    /// Starts `count` loops (1..=[`pool::MAX_EVENT_LOOPS`]) serving `app`, each on a thread of its own; fails if
    /// a thread or runtime cannot be made (the loops already started then stop).
    pub(crate) async fn start(count: usize, app: &Arc<App>) -> Result<Self> {
        if !(1..=pool::MAX_EVENT_LOOPS).contains(&count) {
            let reason = format!("{count} event loops; 1..={} are possible", pool::MAX_EVENT_LOOPS);
            return Err(Error::Invalid { field: "workers".into(), reason });
        }
        let mut loops = Vec::with_capacity(count);
        for index in 1..=count {
            let (connections, received) = mpsc::unbounded_channel();
            let (ended_tx, ended) = oneshot::channel();
            let (started_tx, started) = oneshot::channel();
            let app = Arc::clone(app);
            let spawned = std::thread::Builder::new()
                .name(format!("gateway-loop-{index}"))
                .spawn(move || run(index, app, received, started_tx, ended_tx));
            let started = match spawned {
                Ok(_) => started.await.unwrap_or_else(|_| Err(std::io::Error::other("the thread ended at start"))),
                Err(e) => Err(e),
            };
            if let Err(source) = started {
                EventLoops { loops }.stop().await;
                return Err(Error::EventLoop { index, source });
            }
            loops.push(Loop { connections, open: Arc::new(AtomicUsize::new(0)), ended });
        }
        Ok(Self { loops })
    }

    /// Hands `stream` to the running loop with the fewest open connections (a loop whose thread ended, which only
    /// a bug does, takes none).
    pub(crate) fn hand(&self, stream: TcpStream) {
        let mut stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("cannot move an accepted connection to an event loop: {e}");
                return;
            }
        };
        loop {
            let running = self.loops.iter().filter(|l| !l.connections.is_closed());
            let Some(target) = running.min_by_key(|l| l.open.load(Ordering::Relaxed)) else {
                tracing::error!("every event loop of the API port has stopped; a connection was closed");
                return;
            };
            match target.connections.send((stream, Open::new(&target.open))) {
                Ok(()) => return,
                Err(mpsc::error::SendError((back, _))) => {
                    tracing::error!("an event loop of the API port has stopped");
                    stream = back;
                }
            }
        }
    }

    /// No more connections: every loop lets its answers in flight finish (up to 30 s) and ends.
    pub(crate) async fn stop(self) {
        let ended: Vec<_> = self
            .loops
            .into_iter()
            .map(|l| {
                drop(l.connections);
                l.ended
            })
            .collect();
        for ended in ended {
            let _ = ended.await;
        }
    }
}

/// Loop `index`'s thread: its runtime serves the connections it is handed until the sender is dropped, then
/// drains them.
fn run(
    index: usize,
    app: Arc<App>,
    mut received: mpsc::UnboundedReceiver<Handed>,
    started: oneshot::Sender<std::io::Result<()>>,
    ended: oneshot::Sender<()>,
) {
    let _ended = ended;
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    let _ = started.send(Ok(()));
    pool::set_event_loop(index);
    let app_for_pools = Arc::clone(&app);
    runtime.block_on(async move {
        let heartbeat = tokio::spawn(async {
            let mut ticks = tokio::time::interval(HEARTBEAT);
            loop {
                ticks.tick().await;
            }
        });
        // Stopping: idle connections close at once, the others after their answer under way. Each connection's
        // task holds a sender of `tracked`: the receiver's end of stream says that all have ended.
        let (stop_tx, stop) = watch::channel(false);
        let (tracker, mut tracked) = mpsc::channel::<()>(1);
        let limits = Limits { head_timeout: HEADER_READ_TIMEOUT, max_body: app.settings.max_request_bytes };
        while let Some((stream, open)) = received.recv().await {
            match TcpStream::from_std(stream) {
                Ok(stream) => {
                    let (app, stop, tracker) = (Arc::clone(&app), stop.clone(), tracker.clone());
                    tokio::spawn(async move {
                        http1::serve(&app, stream, limits, stop).await;
                        drop((open, tracker));
                    });
                }
                Err(e) => tracing::warn!("event loop {index} cannot take a connection: {e}"),
            }
        }
        let _ = stop_tx.send(true);
        drop(tracker);
        super::drain(async {
            tracked.recv().await;
        })
        .await;
        heartbeat.abort();
        // Idle upstream connections registered with this runtime are of no use to any other loop.
        for model in app_for_pools.registry.pools() {
            for backend in model.backends() {
                backend.pool.forget_event_loop(index);
            }
        }
    });
    // The runtime is dropped here, before `_ended`: connections still open after the drain are closed first.
    drop(runtime);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::Gateway;
    use crate::config::RoutingArgs;

    fn open(loops: &EventLoops) -> Vec<usize> {
        loops.loops.iter().map(|l| l.open.load(Ordering::Relaxed)).collect()
    }

    /// Connections go to the loop with the fewest open ones and are served there; a closed one is no longer
    /// counted; stopping closes idle keep-alive connections and ends every loop.
    #[tokio::test]
    async fn connections_go_to_the_least_busy_loop_and_stop_ends_the_loops() {
        let gateway = Gateway::new(RoutingArgs::default().settings().unwrap()).unwrap();
        let loops = EventLoops::start(2, gateway.app()).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut clients = Vec::new();
        for _ in 0..3 {
            let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            loops.hand(listener.accept().await.unwrap().0);
            clients.push(client);
        }
        assert_eq!(open(&loops), [2, 1]);
        for client in &mut clients {
            client.write_all(b"GET /health HTTP/1.1\r\nhost: gateway\r\n\r\n").await.unwrap();
            let mut answer = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut answer)).await.unwrap().unwrap();
            assert!(answer[..n].starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&answer[..n]));
        }
        drop(clients.remove(0));
        let closed = async {
            while open(&loops).iter().sum::<usize>() != 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), closed).await.expect("the closed connection is still counted");
        tokio::time::timeout(Duration::from_secs(10), loops.stop()).await.expect("the loops did not stop");
        for client in &mut clients {
            let mut rest = Vec::new();
            let n = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest)).await.unwrap();
            assert_eq!(n.unwrap(), 0, "an idle connection is closed at stop");
        }
    }

    /// A loop whose thread has ended takes no connection (the next one does), and a count of loops outside
    /// 1..=64 is refused.
    #[tokio::test]
    async fn a_stopped_loop_is_passed_over_and_bad_counts_are_refused() {
        let gateway = Gateway::new(RoutingArgs::default().settings().unwrap()).unwrap();
        for count in [0, pool::MAX_EVENT_LOOPS + 1] {
            assert!(matches!(EventLoops::start(count, gateway.app()).await, Err(Error::Invalid { .. })));
        }
        let mut loops = EventLoops::start(1, gateway.app()).await.unwrap();
        let (connections, _) = mpsc::unbounded_channel();
        let (_, ended) = oneshot::channel();
        loops.loops.insert(0, Loop { connections, open: Arc::new(AtomicUsize::new(0)), ended });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        loops.hand(listener.accept().await.unwrap().0);
        assert_eq!(open(&loops), [0, 1]);
        client.write_all(b"GET /health HTTP/1.1\r\nhost: gateway\r\n\r\n").await.unwrap();
        let mut answer = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut answer)).await.unwrap().unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 200 OK"));
        tokio::time::timeout(Duration::from_secs(10), loops.stop()).await.expect("the loops did not stop");
    }
}
