//! Holding requests for a model with no ready replica — at zero, or while all its replicas start — until one is
//! ready: a bounded queue per model, woken by the probe loop when a backend turns ready.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baleen_api::http::ApiError;
use tokio::sync::Notify;

/// One model's hold queue and the time of its last request (the autoscaler's idleness).
#[derive(Debug)]
pub struct Hold {
    /// Set for autoscaled models: only they hold requests (the others answer 503 at once).
    enabled: AtomicBool,
    held: AtomicUsize,
    ready: Notify,
    /// Milliseconds from `epoch` to the last request's arrival; 0: none yet.
    last_arrival_ms: AtomicU64,
    epoch: Instant,
}

impl Default for Hold {
    fn default() -> Self {
        Self {
            enabled: AtomicBool::new(false),
            held: AtomicUsize::new(0),
            ready: Notify::new(),
            last_arrival_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// Decrements the held count when a waiting request leaves (served, timed out, or its client gone).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hold {
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Records a request's arrival.
    pub fn arrived(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
        self.last_arrival_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When the last request arrived.
    pub fn last_arrival(&self) -> Option<Instant> {
        match self.last_arrival_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.epoch + Duration::from_millis(ms)),
        }
    }

    /// Requests waiting now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Wakes every waiting request to look again (a backend turned ready).
    pub fn notify_ready(&self) {
        self.ready.notify_waiters();
    }

    /// Waits until `ready()` holds, at most `timeout`; `wake` is notified once the request is counted (the
    /// autoscaler decides at once instead of at its next tick). At most `max` requests wait; more, and a wait
    /// that times out, get a 503 naming `model`.
    pub async fn wait(
        &self,
        model: &str,
        ready: impl Fn() -> bool,
        timeout: Duration,
        max: usize,
        wake: &Notify,
    ) -> Result<(), ApiError> {
        if self.held.fetch_add(1, Ordering::Relaxed) >= max {
            self.held.fetch_sub(1, Ordering::Relaxed);
            let mut e = ApiError::unavailable(format!(
                "the model `{model}` is starting and {max} requests already wait for it; retry shortly"
            ));
            e.retry_after = Some(5);
            return Err(e);
        }
        let _waiting = Waiting(&self.held);
        wake.notify_one();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if ready() {
                return Ok(());
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => {
                    let mut e = ApiError::unavailable(format!(
                        "the model `{model}` is starting (scaling up from no ready replica) and was not ready \
                         within {}s; retry shortly",
                        timeout.as_secs()
                    ));
                    e.retry_after = Some(5);
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[tokio::test]
    async fn a_held_request_goes_on_when_notified_and_the_queue_is_bounded() {
        let hold = Arc::new(Hold::default());
        let wake = Arc::new(Notify::new());
        let up = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (hold, wake, up) = (Arc::clone(&hold), Arc::clone(&wake), Arc::clone(&up));
            tokio::spawn(async move {
                hold.wait("m", || up.load(Ordering::Relaxed), Duration::from_secs(30), 1, &wake).await
            })
        };
        wake.notified().await;
        assert_eq!(hold.held(), 1);
        // The queue holds one: a second is refused at once.
        let e = hold.wait("m", || false, Duration::from_secs(30), 1, &wake).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 503);
        assert!(e.message.contains("already wait"), "{}", e.message);
        // A notification without a ready backend changes nothing; with one, the request goes on.
        hold.notify_ready();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        up.store(true, Ordering::Relaxed);
        hold.notify_ready();
        waiter.await.unwrap().unwrap();
        assert_eq!(hold.held(), 0);
    }

    #[tokio::test]
    async fn a_wait_past_the_timeout_is_a_503_that_says_the_model_is_starting() {
        let hold = Hold::default();
        let e = hold.wait("whale", || false, Duration::from_millis(20), 8, &Notify::new()).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 503);
        assert_eq!(e.retry_after, Some(5));
        assert!(e.message.contains("`whale` is starting"), "{}", e.message);
        assert_eq!(hold.held(), 0);
        assert!(hold.last_arrival().is_none());
        hold.arrived();
        assert!(hold.last_arrival().is_some());
    }
}
