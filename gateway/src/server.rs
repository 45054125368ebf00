//! Serving: the API port on our own HTTP/1.1 server (`server/http1.rs`), on event loops of their own threads
//! (`server/event_loops.rs`); the admin port on hyper's, on the caller's runtime; the probe loop; graceful
//! shutdown.

mod event_loops;
mod http1;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baleen_api::crd::AutoscalingSpec;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::autoscale::prometheus::Prometheus;
use crate::autoscale::{self, Actuator, Autoscaler};
use crate::backends::scrape;
use crate::config::{PolicyKind, Settings, StaticConfig, backend_base};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::{App, Client, routes};
use event_loops::EventLoops;

/// How long a client may take to send a request's headers.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for answers in flight (streams included) before it closes their connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an upstream connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an idle upstream connection stays pooled.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The upstream client: keep-alive pool, no Nagle delay, a connect timeout.
pub fn client() -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// The gateway as a library: its models and backends ([`Gateway::set_model`]) and [`Gateway::serve`].
#[derive(Debug, Clone)]
pub struct Gateway {
    app: Arc<App>,
}

impl Gateway {
    pub fn new(settings: Settings) -> Result<Self> {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let client = client();
        let timeout = scrape::probe_timeout(settings.scrape_interval);
        let prometheus = settings.prometheus_url.clone().map(|url| Prometheus::new(url, client.clone(), timeout));
        let app = App {
            settings,
            registry: Arc::new(Registry::default()),
            client,
            metrics: Arc::new(Metrics::new()?),
            autoscaler: Autoscaler::new(prometheus),
            created,
        };
        Ok(Self { app: Arc::new(app) })
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Adds or updates a model with its backends' base URLs (`http://host:port`); the error names the bad URL.
    pub fn set_model(&self, name: &str, policy: PolicyKind, backends: &[String]) -> Result<()> {
        let urls = backends
            .iter()
            .map(|url| {
                backend_base(url).map_err(|reason| Error::Invalid { field: format!("backend of `{name}`"), reason })
            })
            .collect::<Result<Vec<_>>>()?;
        for gone in self.app.registry.set_model(name, policy, &urls) {
            self.app.metrics.forget_backend(name, &gone.url);
        }
        Ok(())
    }

    /// Autoscales `model` by `spec` (at `current` replicas now, each with `heads_per_replica` API heads): its
    /// requests are held while it has no ready replica, and `actuator` carries out each change.
    pub fn autoscale(
        &self,
        model: &str,
        spec: &AutoscalingSpec,
        current: u32,
        heads_per_replica: u32,
        actuator: Arc<dyn Actuator>,
    ) -> Result<()> {
        let windows = self.app.settings.windows;
        self.app.autoscaler.register(model, spec, windows, current, heads_per_replica, actuator)?;
        if let Some(pool) = self.app.registry.get(model) {
            pool.hold.set_enabled(true);
        }
        Ok(())
    }

    /// Stops autoscaling `model` (its requests are no longer held).
    pub fn stop_autoscaling(&self, model: &str) {
        self.app.autoscaler.unregister(model);
        if let Some(pool) = self.app.registry.get(model) {
            pool.hold.set_enabled(false);
        }
    }

    /// Stops serving a model (discovery found its deployment gone).
    pub fn remove_model(&self, name: &str) {
        for gone in self.app.registry.remove_model(name) {
            self.app.metrics.forget_backend(name, &gone.url);
        }
    }

    /// Every model of a static file.
    pub fn load(&self, config: &StaticConfig) -> Result<()> {
        config.validate()?;
        for model in &config.models {
            self.set_model(&model.name, model.policy, &model.backends)?;
        }
        Ok(())
    }

    /// Probes every backend once now (before serving, or after a backend was added).
    pub async fn probe_now(&self) {
        let timeout = scrape::probe_timeout(self.app.settings.scrape_interval);
        scrape::probe_all(&self.app.client, &self.app.registry, timeout, &self.app.metrics).await;
    }

    /// Starts the API port's event loops (`--workers` threads); [`Started::serve`] then serves. Fails when a loop
    /// cannot start.
    pub async fn start(self) -> Result<Started> {
        let loops = EventLoops::start(self.app.settings.workers, &self.app).await?;
        Ok(Started { app: self.app, loops })
    }

    /// [`Gateway::start`], then [`Started::serve`].
    pub async fn serve<F>(self, api: TcpListener, admin: TcpListener, shutdown: F) -> Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.start().await?.serve(api, admin, shutdown).await;
        Ok(())
    }
}

/// A gateway whose event loops are running ([`Gateway::start`]); dropped without serving, the loops end.
#[derive(Debug)]
pub struct Started {
    app: Arc<App>,
    loops: EventLoops,
}

impl Started {
    /// Serves the API on `api` (on the event loops) and `/metrics` on `admin`, probing backends every scrape
    /// interval, until `shutdown` completes; then stops accepting and lets answers in flight finish (up to 30 s).
    pub async fn serve<F>(self, api: TcpListener, admin: TcpListener, shutdown: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Self { app, loops } = self;
        Gateway { app: Arc::clone(&app) }.probe_now().await;
        let probes = tokio::spawn(scrape::run(
            app.client.clone(),
            Arc::clone(&app.registry),
            app.settings.scrape_interval,
            Arc::clone(&app.metrics),
        ));
        let autoscaler = tokio::spawn(autoscale::run(Arc::clone(&app)));
        let (stop_tx, stop) = watch::channel(false);
        let api_task = tokio::spawn({
            let stop = stop.clone();
            async move {
                accept(api, stop, |stream| loops.hand(stream)).await;
                loops.stop().await;
            }
        });
        let admin_task = tokio::spawn(async move {
            let connections = Connections::new(app);
            accept(admin, stop, |stream| connections.serve(stream)).await;
            connections.drain().await;
        });
        shutdown.await;
        let _ = stop_tx.send(true);
        for task in [api_task, admin_task] {
            if let Err(e) = task.await {
                tracing::warn!("a listener task failed: {e}");
            }
        }
        probes.abort();
        autoscaler.abort();
    }
}

/// Accepts connections on `listener` until `stop` turns true, handing each to `place`.
async fn accept(listener: TcpListener, mut stop: watch::Receiver<bool>, mut place: impl FnMut(TcpStream)) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        place(stream);
    }
}

/// The admin port's connections (hyper's server), drained together at shutdown.
struct Connections {
    app: Arc<App>,
    graceful: GracefulShutdown,
}

impl Connections {
    fn new(app: Arc<App>) -> Self {
        Self { app, graceful: GracefulShutdown::new() }
    }

    /// Serves `stream` on a task of the current runtime until the client closes it.
    fn serve(&self, stream: TcpStream) {
        let app = Arc::clone(&self.app);
        let service = service_fn(move |request| {
            let response = routes::admin(&app, &request);
            std::future::ready(Ok::<_, Infallible>(response))
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let connection = self.graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended with an error: {e}");
            }
        });
    }

    /// Lets the answers in flight finish (up to 30 s).
    async fn drain(self) {
        drain(self.graceful.shutdown()).await;
    }
}

/// Waits for `drained` (the answers in flight have finished) up to [`DRAIN_TIMEOUT`], after which their
/// connections are left to be closed.
pub(crate) async fn drain(drained: impl Future<Output = ()>) {
    if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
        tracing::warn!("answers still in flight after {DRAIN_TIMEOUT:?}; closing their connections");
    }
}

pub(crate) fn local_addr(listener: &TcpListener) -> Result<std::net::SocketAddr> {
    listener.local_addr().map_err(|source| Error::Bind { addr: "a bound listener".into(), source })
}

pub(crate) async fn bind(host: &str, port: u16) -> Result<TcpListener> {
    let addr = format!("{host}:{port}");
    TcpListener::bind(&addr).await.map_err(|source| Error::Bind { addr, source })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
