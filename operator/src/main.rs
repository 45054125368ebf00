//! `baleen-operator`: `run` (the controller), `crd` (print the CRD), `render -f FILE` (print every object the
//! operator would create, without a cluster).

use std::path::PathBuf;

use anyhow::Context;
use baleen_api::names::{
    ENV_OPERATOR_ADMIN_ADDR, ENV_OPERATOR_IDENTITY, ENV_OPERATOR_LEASE_NAMESPACE, ENV_OPERATOR_LOG,
    ENV_OPERATOR_NAMESPACE, ENV_OPERATOR_RUNTIME_IMAGE,
};
use baleen_operator::config::{DEFAULT_DRAIN_TIMEOUT_SECONDS, DEFAULT_RUNTIME_IMAGE};
use baleen_operator::controller::RunSettings;
use baleen_operator::{OperatorConfig, render};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "baleen-operator", version, about = "Reconciles Baleen ModelDeployments into runtime rank groups")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch ModelDeployments and reconcile them (leader-elected; metrics and /healthz on the admin address).
    Run {
        #[command(flatten)]
        config: ConfigArgs,
        /// Namespace to watch; empty watches every namespace.
        #[arg(long, default_value = "", env = ENV_OPERATOR_NAMESPACE)]
        namespace: String,
        /// Namespace of the leader Lease [default: the namespace of the operator's own pod, else `default`].
        #[arg(long, env = ENV_OPERATOR_LEASE_NAMESPACE)]
        lease_namespace: Option<String>,
        /// This replica's identity in the Lease [default: the host (pod) name].
        #[arg(long, env = ENV_OPERATOR_IDENTITY)]
        identity: Option<String>,
        /// Address of `/metrics` and `/healthz`.
        #[arg(long, default_value = "0.0.0.0:9090", env = ENV_OPERATOR_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
    },
    /// Print the ModelDeployment CustomResourceDefinition as YAML.
    Crd,
    /// Print, as YAML, every object the operator would create for the ModelDeployment(s) in FILE.
    Render {
        /// A YAML file with one or more ModelDeployment documents (`-` reads standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// Operator defaults that shape the objects it creates.
#[derive(Debug, Args)]
struct ConfigArgs {
    /// Runtime image for ModelDeployments without `spec.runtime.image` (it also downloads `hf://` models).
    #[arg(long, default_value = DEFAULT_RUNTIME_IMAGE, env = ENV_OPERATOR_RUNTIME_IMAGE)]
    runtime_image: String,
    /// Create a PodMonitor (monitoring.coreos.com/v1) per ModelDeployment.
    #[arg(long)]
    pod_monitor: bool,
    /// Seconds a rank drains in-flight requests after SIGTERM.
    #[arg(long, default_value_t = DEFAULT_DRAIN_TIMEOUT_SECONDS)]
    drain_timeout: u32,
}

impl ConfigArgs {
    fn config(&self) -> OperatorConfig {
        OperatorConfig {
            runtime_image: self.runtime_image.clone(),
            pod_monitor: self.pod_monitor,
            drain_timeout_seconds: self.drain_timeout,
        }
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message chain, not a Debug dump (no backtrace even with RUST_BACKTRACE set).
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => emit(&render::crd_yaml()?)?,
        Command::Render { file, config } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
            };
            emit(&render::render_yaml(&text, &config.config())?)?;
        }
        Command::Run { config, namespace, lease_namespace, identity, admin_addr } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env(ENV_OPERATOR_LOG)
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            let settings = RunSettings { config: config.config(), namespace, lease_namespace, identity, admin_addr };
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(baleen_operator::controller::run(settings))?;
        }
    }
    Ok(())
}

/// Writes `text` to standard output; a reader that stopped early (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(anyhow::Error::new(e).context("writing to stdout")),
        _ => Ok(()),
    }
}
