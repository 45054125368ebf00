//! `baleen-gateway`: one OpenAI front door for Baleen's model replicas. It reads what routing needs of each
//! request (model, the prompt's leading text, session), picks a backend of the model by its policy
//! ([`policy`]: least load, prefix affinity, session affinity, round robin) from the backends discovery found
//! ready ([`backends`]), and streams the answer through; `/metrics` on the admin port ([`metrics`]).
//!
//! [`server::Gateway`] is the whole gateway as a library: `baleen-gateway serve` runs it from the static file,
//! `baleen up` in-process in front of its runtime processes.

pub mod auth;
pub mod autoscale;
pub mod backends;
pub mod cmd;
pub mod config;
pub mod error;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod routes;
pub mod server;
pub mod wire;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;

pub use error::{Error, Result};
pub use server::Gateway;

/// The probes' HTTP/1.1 client (requests go over each backend's own connections: `backends::pool`).
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// What every request handler shares.
#[derive(Debug)]
pub struct App {
    pub settings: config::Settings,
    pub registry: Arc<registry::Registry>,
    pub client: Client,
    pub metrics: Arc<metrics::Metrics>,
    /// The autoscaled models.
    pub autoscaler: autoscale::Autoscaler,
    /// Unix seconds at start (the `created` of `/v1/models`).
    pub created: u64,
}
