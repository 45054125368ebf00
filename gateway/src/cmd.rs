//! `baleen-gateway serve`: the gateway from its command line — models from the static file, or discovered in the
//! cluster (with the autoscaler's leader election) — served until SIGINT/SIGTERM.

use std::io::Write;

use baleen_api::names::{GATEWAY_AUTOSCALER_FIELD_MANAGER, GATEWAY_LISTENING_PREFIX};

use crate::autoscale;
use crate::backends::kubernetes::{self, AbortOnDrop};
use crate::config::{ServeArgs, StaticConfig};
use crate::error::{Error, Result};
use crate::server::{Gateway, bind, local_addr, shutdown_signal};

/// `baleen-gateway serve`: the static file's models, served until SIGINT/SIGTERM.
pub async fn run(args: ServeArgs) -> Result<()> {
    let settings = args.routing.settings()?;
    let gateway = Gateway::new(settings)?;
    let discovery = match &args.config {
        Some(path) => {
            let config = StaticConfig::load(path)?;
            gateway.load(&config)?;
            for model in &config.models {
                tracing::info!(model = %model.name, policy = model.policy.as_str(), backends = ?model.backends, "routing");
            }
            None
        }
        None => {
            let client = kube::Client::try_default().await?;
            let relist = crate::config::seconds("--relist-interval", args.relist_interval)?;
            tracing::info!(namespace = ?args.namespace, "discovering ModelDeployments in the cluster");
            // The autoscaler's Lease lives in the gateway's own namespace; the pod name is its identity.
            let identity = baleen_api::lease::default_identity(GATEWAY_AUTOSCALER_FIELD_MANAGER);
            let lease_namespace = client.default_namespace().to_string();
            let (writer, election) = autoscale::kubernetes::elect(client.clone(), &lease_namespace, identity);
            let (namespace, discovering) = (args.namespace.clone(), gateway.clone());
            Some(tokio::spawn(async move {
                let _election = AbortOnDrop(vec![election]);
                kubernetes::run(discovering, client, namespace, relist, writer).await;
            }))
        }
    };
    let gateway = gateway.start().await?;
    let api = bind(&args.host, args.port).await?;
    let admin = bind(&args.host, args.admin_port).await?;
    let (api_addr, admin_addr) = (local_addr(&api)?, local_addr(&admin)?);
    // The one stdout line (port 0 picks free ports: this says which), for scripts and `baleen up`.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{GATEWAY_LISTENING_PREFIX}{api_addr} admin http://{admin_addr}")
        .and_then(|()| stdout.flush())
        .map_err(Error::Stdout)?;
    drop(stdout);
    gateway.serve(api, admin, shutdown_signal()).await;
    if let Some(discovery) = discovery {
        discovery.abort();
    }
    tracing::info!("stopped");
    Ok(())
}
