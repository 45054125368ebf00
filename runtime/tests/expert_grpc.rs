#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The expert gRPC transport end to end on 127.0.0.1: a fake `ExpertCompute` (output = rows * (expert + 1) *
//! weight) served in-process on its own tokio runtime thread, and the synchronous `ExpertPeers` client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use baleen_runtime::Result;
use baleen_runtime::expert::{ExpertCompute, ExpertPeers, serve_experts};
use baleen_runtime::model::experts::Dispatch;
use candle_core::{DType, Device, Tensor};
use tokio::sync::oneshot;

const MODEL: &str = "tiny-moe@abc123";
const PLACEMENT: u64 = 0x5eed_0001;
const TIMEOUT: Duration = Duration::from_secs(5);

struct Fake {
    rank: usize,
    world_size: usize,
    model: String,
    placement: u64,
    delay: Duration,
}

impl Fake {
    fn new(rank: usize, world_size: usize) -> Self {
        Self { rank, world_size, model: MODEL.into(), placement: PLACEMENT, delay: Duration::ZERO }
    }
}

impl ExpertCompute for Fake {
    fn compute(&self, batch: Dispatch<'_>) -> Result<Tensor> {
        let Dispatch { rows, experts, weights, .. } = batch;
        std::thread::sleep(self.delay);
        let scale: Vec<f32> = experts.iter().zip(weights).map(|(&e, &w)| (e as f32 + 1.0) * w).collect();
        let scale = Tensor::from_vec(scale, (experts.len(), 1), rows.device())?.to_dtype(rows.dtype())?;
        Ok(rows.broadcast_mul(&scale)?)
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn model_fingerprint(&self) -> String {
        self.model.clone()
    }
    fn placement_fingerprint(&self) -> u64 {
        self.placement
    }
}

enum Stop {
    Graceful,
    Kill,
}

/// An expert server on its own thread and tokio runtime, like a separate rank.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<Stop>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(bind: &str, compute: Fake) -> Self {
        let bind = bind.to_owned();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<Stop>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let compute: Arc<dyn ExpertCompute> = Arc::new(compute);
            let killed = rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&bind).await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let (graceful_tx, graceful_rx) = oneshot::channel::<()>();
                let serve = serve_experts(listener, compute, async move {
                    let _ = graceful_rx.await;
                });
                tokio::pin!(serve);
                tokio::select! {
                    result = &mut serve => { result.unwrap(); false }
                    stop = stop_rx => match stop {
                        Ok(Stop::Kill) => true,
                        _ => {
                            let _ = graceful_tx.send(());
                            serve.await.unwrap();
                            false
                        }
                    },
                }
            });
            if killed {
                // Drops every connection task without a goodbye, like a crashed process.
                rt.shutdown_background();
            }
        });
        let addr = addr_rx.recv_timeout(TIMEOUT).unwrap();
        Self { addr, stop: Some(stop_tx), thread: Some(thread) }
    }

    fn stop(mut self, how: Stop) {
        let _ = self.stop.take().unwrap().send(how);
        self.thread.take().unwrap().join().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Stop::Kill);
        }
    }
}

/// Rank 0's client of a group whose other ranks are `servers`.
fn client(servers: &[&Server], timeout: Duration) -> ExpertPeers {
    let mut peers = vec!["127.0.0.1:1".to_owned()]; // rank 0: ourselves, never dialled
    peers.extend(servers.iter().map(|s| s.addr.to_string()));
    ExpertPeers::new(peers, 0, MODEL.into(), PLACEMENT, timeout).unwrap()
}

fn rows(m: usize, hidden: usize, seed: f32, dtype: DType) -> Tensor {
    let t = Tensor::arange(0f32, (m * hidden) as f32, &Device::Cpu).unwrap().reshape((m, hidden)).unwrap();
    ((t * 0.013).unwrap() + seed as f64).unwrap().sin().unwrap().to_dtype(dtype).unwrap()
}

fn routing(m: usize) -> (Vec<u32>, Vec<f32>) {
    ((0..m as u32).map(|i| i % 8).collect(), (0..m).map(|i| 0.25 + i as f32 * 0.01).collect())
}

fn assert_bits_equal(a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims());
    assert_eq!(a.dtype(), b.dtype());
    let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
    let a: Vec<u32> = a.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect();
    let b: Vec<u32> = b.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect();
    assert_eq!(a, b);
}

#[test]
fn round_trip_matches_local_compute_for_f32_and_bf16() {
    let server = Server::start("127.0.0.1:0", Fake::new(1, 2));
    let peers = client(&[&server], TIMEOUT);
    peers.wait_ready(TIMEOUT).unwrap();
    assert!(peers.all_ready());
    let local = Fake::new(1, 2);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let x = rows(7, 48, 0.3, dtype);
        let (experts, weights) = routing(7);
        let out = peers
            .dispatch(1, Dispatch { layer: 3, rows: &x, experts: &experts, weights: &weights })
            .unwrap()
            .wait()
            .unwrap();
        assert_bits_equal(
            &out,
            &local.compute(Dispatch { layer: 3, rows: &x, experts: &experts, weights: &weights }).unwrap(),
        );
    }
    let stats = peers.stats();
    assert_eq!(stats.completed.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert!(stats.bytes_sent.load(std::sync::atomic::Ordering::Relaxed) > 7 * 48 * (4 + 2 + 2));
}

#[test]
fn concurrent_dispatches_to_several_peers_are_matched_by_id() {
    let (one, two) = (Server::start("127.0.0.1:0", Fake::new(1, 3)), Server::start("127.0.0.1:0", Fake::new(2, 3)));
    let peers = client(&[&one, &two], TIMEOUT);
    peers.wait_ready(TIMEOUT).unwrap();
    let local = Fake::new(1, 3);
    let mut inflight = Vec::new();
    for i in 0..40 {
        let m = 1 + i % 5;
        let x = rows(m, 32, i as f32, DType::F32);
        let (experts, weights) = routing(m);
        let pending =
            peers.dispatch(1 + i % 2, Dispatch { layer: i, rows: &x, experts: &experts, weights: &weights }).unwrap();
        inflight.push((
            pending,
            local.compute(Dispatch { layer: i, rows: &x, experts: &experts, weights: &weights }).unwrap(),
        ));
    }
    // Wait in reverse order: responses must be routed by id, not by arrival.
    for (pending, expected) in inflight.into_iter().rev() {
        assert_bits_equal(&pending.wait().unwrap(), &expected);
    }
}

#[test]
fn mismatched_fingerprints_keep_the_peer_not_ready_with_a_clear_error() {
    let model = Server::start("127.0.0.1:0", Fake { model: "other-model".into(), ..Fake::new(1, 3) });
    let placement = Server::start("127.0.0.1:0", Fake { placement: 7, ..Fake::new(2, 3) });
    let peers = client(&[&model, &placement], TIMEOUT);
    let err = peers.wait_ready(Duration::from_millis(800)).unwrap_err().to_string();
    assert!(!peers.all_ready());
    assert!(err.contains("rank 1") && err.contains("model fingerprint mismatch"), "{err}");
    assert!(err.contains("other-model") && err.contains(MODEL), "{err}");
    assert!(err.contains("rank 2") && err.contains("placement fingerprint mismatch"), "{err}");
    let x = rows(1, 8, 0.0, DType::F32);
    let down =
        peers.dispatch(1, Dispatch { layer: 0, rows: &x, experts: &[0], weights: &[1.0] }).unwrap_err().to_string();
    assert!(down.contains("rank 1") && down.contains("is down") && down.contains("mismatch"), "{down}");
}

#[test]
fn dispatch_to_an_unreachable_peer_fails_fast_and_wait_ready_names_it() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let peers =
        ExpertPeers::new(vec!["127.0.0.1:1".into(), free.to_string()], 0, MODEL.into(), PLACEMENT, TIMEOUT).unwrap();
    let started = Instant::now();
    let err = peers
        .dispatch(1, Dispatch { layer: 0, rows: &rows(1, 8, 0.0, DType::F32), experts: &[0], weights: &[1.0] })
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(err.contains(&free.to_string()), "{err}");
    let err = peers.wait_ready(Duration::from_millis(300)).unwrap_err().to_string();
    assert!(err.contains("rank 1") && err.contains("connect failed"), "{err}");
    assert!(
        peers
            .dispatch(0, Dispatch { layer: 0, rows: &rows(1, 8, 0.0, DType::F32), experts: &[0], weights: &[1.0] })
            .is_err(),
        "own rank"
    );
    assert!(
        peers
            .dispatch(2, Dispatch { layer: 0, rows: &rows(1, 8, 0.0, DType::F32), experts: &[0], weights: &[1.0] })
            .is_err(),
        "outside the group"
    );
    assert!(
        peers
            .dispatch(1, Dispatch { layer: 0, rows: &rows(2, 8, 0.0, DType::F32), experts: &[0], weights: &[1.0] })
            .is_err(),
        "routing length"
    );
}

#[test]
fn a_hung_peer_times_out_instead_of_hanging() {
    let server = Server::start("127.0.0.1:0", Fake { delay: Duration::from_millis(1500), ..Fake::new(1, 2) });
    let peers = client(&[&server], Duration::from_millis(300));
    peers.wait_ready(TIMEOUT).unwrap();
    let started = Instant::now();
    let err = peers
        .dispatch(1, Dispatch { layer: 4, rows: &rows(2, 8, 0.0, DType::F32), experts: &[1, 2], weights: &[0.5, 0.5] })
        .unwrap()
        .wait()
        .unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(290) && waited < Duration::from_millis(1000), "{waited:?}");
    let err = err.to_string();
    assert!(err.contains("rank 1") && err.contains("no response to the layer 4 dispatch"), "{err}");
}

fn killed_peer_fails_pending_and_the_group_recovers_on_the_same_port(how: Stop) {
    let slow = Fake { delay: Duration::from_millis(400), ..Fake::new(1, 2) };
    let server = Server::start("127.0.0.1:0", slow);
    let addr = server.addr;
    let peers = client(&[&server], TIMEOUT);
    peers.wait_ready(TIMEOUT).unwrap();
    let x = rows(3, 16, 1.0, DType::F32);
    let (experts, weights) = routing(3);

    let pending = peers.dispatch(1, Dispatch { layer: 0, rows: &x, experts: &experts, weights: &weights }).unwrap();
    std::thread::sleep(Duration::from_millis(50)); // in the peer's compute
    let started = Instant::now();
    server.stop(how);
    let err = pending.wait().unwrap_err().to_string();
    let failed_after = started.elapsed();
    println!("pending dispatch failed {failed_after:?} after the peer stopped: {err}");
    assert!(failed_after < Duration::from_secs(2), "{failed_after:?}");
    assert!(err.contains("rank 1") && err.contains(&addr.to_string()), "{err}");
    assert!(!peers.all_ready());
    let down = peers
        .dispatch(1, Dispatch { layer: 0, rows: &x, experts: &experts, weights: &weights })
        .unwrap_err()
        .to_string();
    assert!(down.contains("is down"), "{down}");

    let server = Server::start(&addr.to_string(), Fake::new(1, 2));
    let started = Instant::now();
    peers.wait_ready(TIMEOUT).unwrap();
    println!("reconnected {:?} after the peer restarted", started.elapsed());
    let out = peers
        .dispatch(1, Dispatch { layer: 0, rows: &x, experts: &experts, weights: &weights })
        .unwrap()
        .wait()
        .unwrap();
    assert_bits_equal(
        &out,
        &Fake::new(1, 2).compute(Dispatch { layer: 0, rows: &x, experts: &experts, weights: &weights }).unwrap(),
    );
    server.stop(Stop::Graceful);
}

#[test]
fn gracefully_stopped_peer_fails_pending_and_the_group_recovers_on_the_same_port() {
    killed_peer_fails_pending_and_the_group_recovers_on_the_same_port(Stop::Graceful);
}

#[test]
fn crashed_peer_fails_pending_and_the_group_recovers_on_the_same_port() {
    killed_peer_fails_pending_and_the_group_recovers_on_the_same_port(Stop::Kill);
}

#[test]
fn loopback_dispatch_latency_is_reported_and_exported() {
    let server = Server::start("127.0.0.1:0", Fake::new(1, 2));
    let peers = client(&[&server], TIMEOUT);
    let registry = prometheus::Registry::new();
    peers.register(&registry).unwrap();
    peers.wait_ready(TIMEOUT).unwrap();
    for m in [1, 32] {
        let x = rows(m, 64, 0.5, DType::F32);
        let (experts, weights) = routing(m);
        for _ in 0..50 {
            peers
                .dispatch(1, Dispatch { layer: 0, rows: &x, experts: &experts, weights: &weights })
                .unwrap()
                .wait()
                .unwrap();
        }
        let n = 1000;
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            peers
                .dispatch(1, Dispatch { layer: 0, rows: &x, experts: &experts, weights: &weights })
                .unwrap()
                .wait()
                .unwrap();
            samples.push(started.elapsed());
        }
        samples.sort();
        let mean = samples.iter().sum::<Duration>() / n as u32;
        println!(
            "loopback dispatch {m}x64 f32: mean {:.1} us, p50 {:.1} us, p99 {:.1} us ({n} dispatches)",
            mean.as_secs_f64() * 1e6,
            samples[n / 2].as_secs_f64() * 1e6,
            samples[n * 99 / 100].as_secs_f64() * 1e6
        );
    }
    let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
    assert!(text.contains("baleen_runtime_expert_dispatch_seconds_count{peer=\"1\"} 2100"), "{text}");
    assert!(text.contains("baleen_runtime_expert_peer_up{peer=\"1\"} 1"), "{text}");
    assert!(text.contains("baleen_runtime_expert_bytes_sent_total{peer=\"1\"}"), "{text}");
}
