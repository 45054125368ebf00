//! The runtime that carries a head's expert traffic, driven by the thread that waits on it.
//!
//! A head's engine thread spends each MoE layer waiting for other ranks' rows. With a transport thread of its
//! own, every dispatch costs two cross-thread wake-ups (engine → transport thread → engine) on top of the socket.
//! Instead, the expert client lives on a current-thread tokio runtime that the engine thread drives itself
//! whenever it would otherwise block: when it sends (the request is written before `dispatch` returns), while it
//! waits for a response, and while it is idle waiting for requests. No thread hand-off is left on the path of a
//! dispatch.
//!
//! A fallback thread drives the runtime in short slices whenever no thread has for a while (a long prefill, a
//! command-line run between calls), so reconnects, handshakes and keepalives still progress.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// How long the runtime may go undriven before the fallback thread drives it, and how long it then drives
/// before checking again whether a waiting thread has taken over.
const FALLBACK_SLICE: Duration = Duration::from_millis(2);
/// At shutdown, how long the fallback thread waits for the last other user of the runtime to let go, so that
/// the runtime is dropped on a thread outside any async context.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// A current-thread runtime driven by whichever thread blocks on it; cheap to clone. See the module docs.
#[derive(Clone)]
pub struct Driver {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: tokio::runtime::Runtime,
    /// Threads inside [`Driver::block_on`] now.
    driving: AtomicUsize,
    /// When a thread last left [`Driver::block_on`], in µs since `epoch`.
    last_driven: AtomicU64,
    epoch: Instant,
    stop: CancellationToken,
}

impl Inner {
    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Nobody drove the runtime for a slice.
    fn neglected(&self) -> bool {
        let slice = u64::try_from(FALLBACK_SLICE.as_micros()).unwrap_or(u64::MAX);
        self.driving.load(Ordering::Acquire) == 0
            && self.now_us().saturating_sub(self.last_driven.load(Ordering::Acquire)) >= slice
    }
}

impl Driver {
    /// Starts the runtime and its fallback thread (`name`).
    pub fn new(name: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Expert(format!("cannot start the expert transport runtime: {e}")))?;
        let inner = Arc::new(Inner {
            runtime,
            driving: AtomicUsize::new(0),
            last_driven: AtomicU64::new(0),
            epoch: Instant::now(),
            stop: CancellationToken::new(),
        });
        let fallback = inner.clone();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run_fallback(fallback))
            .map_err(|e| Error::Expert(format!("cannot start the expert transport thread: {e}")))?;
        Ok(Self { inner })
    }

    /// Runs `future` to completion on the calling thread, driving the runtime's tasks and sockets meanwhile (or,
    /// while another thread drives them, waiting for it to finish). Must not be called from async code.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let inner = &self.inner;
        inner.driving.fetch_add(1, Ordering::AcqRel);
        let out = inner.runtime.block_on(future);
        inner.last_driven.store(inner.now_us(), Ordering::Release);
        inner.driving.fetch_sub(1, Ordering::AcqRel);
        out
    }

    /// Runs every task that is ready (a dispatch just queued is written to its socket) and returns.
    pub fn flush(&self) {
        self.block_on(tokio::task::yield_now());
    }

    /// Spawns a task on the runtime.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.runtime.spawn(future)
    }

    /// Stops the fallback thread, which then drops the runtime once no one else holds it.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("driving", &self.inner.driving.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

/// Drives the runtime in slices while no one else does, until shut down; then releases it.
fn run_fallback(inner: Arc<Inner>) {
    while !inner.stop.is_cancelled() {
        std::thread::sleep(FALLBACK_SLICE);
        if inner.neglected() {
            let stop = inner.stop.clone();
            inner.runtime.block_on(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(FALLBACK_SLICE) => {}
                }
            });
        }
    }
    // Drop the runtime here, never inside an async context (where a last handle may otherwise go away).
    let deadline = Instant::now() + RELEASE_WAIT;
    let mut inner = inner;
    loop {
        match Arc::try_unwrap(inner) {
            Ok(sole) => {
                drop(sole);
                return;
            }
            Err(shared) if Instant::now() < deadline => {
                inner = shared;
                std::thread::sleep(FALLBACK_SLICE);
            }
            // Still in use (the process is exiting around it): leave it to whoever holds it last.
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Tasks progress while no thread waits on the runtime (the fallback drives it), and a waiting thread runs
    /// them itself.
    #[test]
    fn tasks_progress_with_and_without_a_waiting_thread() {
        let driver = Driver::new("test-driver").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        driver.spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            tx.send(std::thread::current().name().map(str::to_owned)).unwrap();
        });
        // Nobody calls block_on: the fallback thread must run the task.
        let ran_on = rx.recv_timeout(Duration::from_secs(5)).expect("the fallback thread drove the runtime");
        assert_eq!(ran_on.as_deref(), Some("test-driver"));
        // A waiting thread runs the tasks itself: within a slice the fallback lets go, and it does not drive
        // while a thread waits.
        let me = std::thread::current().id();
        let ran_on = driver.block_on(async {
            tokio::time::sleep(FALLBACK_SLICE * 5).await;
            tokio::spawn(async { std::thread::current().id() }).await.unwrap()
        });
        assert_eq!(ran_on, me);
        driver.shutdown();
    }
}
