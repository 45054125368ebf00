//! `baleen-gateway serve --config FILE [--port 8080] [--admin-port 9090]`.

use baleen_api::names::ENV_GATEWAY_LOG;
use baleen_gateway::config::{Cli, Command};
use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env(ENV_GATEWAY_LOG).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(baleen_gateway::cmd::run(*args))?,
        Command::HashKey => {
            let mut key = String::new();
            std::io::stdin().read_line(&mut key)?;
            let key = key.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(!key.is_empty(), "no key on stdin (try: echo -n KEY | baleen-gateway hash-key)");
            println!("{}", baleen_gateway::auth::hash_key(key));
        }
    }
    Ok(())
}
