//! Command-line configuration of `baleen` (clap derive; every flag also reads its environment variable).

use std::path::PathBuf;
use std::time::Duration;

use baleen_api::names::{
    ADMIN_PORT, ENV_RUNTIME_BIN, ENV_UP_ADMIN_PORT, ENV_UP_HOST, ENV_UP_PORT, ENV_UP_READY_TIMEOUT, ENV_UP_STOP_TIMEOUT,
};
use baleen_gateway::config::RoutingArgs;
use clap::{Args, Parser, Subcommand};

use crate::error::Error;

#[derive(Debug, Parser)]
#[command(
    name = "baleen",
    version,
    about = "Baleen: DeepSeek-style MoE models served on Kubernetes, or on this machine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a ModelDeployment on this machine (no cluster): start the runtime, wait until it is ready, print the
    /// OpenAI base URL, and serve until Ctrl-C or SIGTERM.
    Up(UpArgs),
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// ModelDeployment manifest (YAML). Without one, `builtin:tiny-moe` (a random-weight demo model) is served.
    pub manifest: Option<PathBuf>,
    /// Address the gateway (OpenAI API and `/metrics`) binds to; the runtimes listen on 127.0.0.1 behind it.
    #[arg(long, default_value = "127.0.0.1", env = ENV_UP_HOST)]
    pub host: String,
    /// Port of the OpenAI API (the in-process gateway); 0 picks a free one (the printed URL says which).
    #[arg(long, default_value_t = 8080, env = ENV_UP_PORT)]
    pub port: u16,
    /// Port of the gateway's `/metrics`; 0 picks a free one.
    #[arg(long, default_value_t = ADMIN_PORT, env = ENV_UP_ADMIN_PORT)]
    pub admin_port: u16,
    #[command(flatten)]
    pub routing: RoutingArgs,
    /// The `baleen-runtime` binary [default: next to `baleen`, else on PATH].
    #[arg(long, env = ENV_RUNTIME_BIN, value_name = "PATH")]
    pub runtime_bin: Option<PathBuf>,
    /// Seconds to wait for the model to load and the runtime to report ready.
    #[arg(long, default_value_t = 300, env = ENV_UP_READY_TIMEOUT, value_name = "SECONDS")]
    pub ready_timeout: u64,
    /// Seconds to wait, after Ctrl-C or SIGTERM, for the runtime to finish in-flight requests and exit before it
    /// is killed.
    #[arg(long, default_value_t = 60, env = ENV_UP_STOP_TIMEOUT, value_name = "SECONDS")]
    pub stop_timeout: u64,
}

impl UpArgs {
    /// Checks what clap cannot; the error names the flag.
    pub fn validate(&self) -> Result<(), Error> {
        if self.host.trim().is_empty() {
            return Err(Error::Setting { name: "--host", reason: "must not be empty".into() });
        }
        if self.ready_timeout == 0 {
            return Err(Error::Setting { name: "--ready-timeout", reason: "must be at least 1 second".into() });
        }
        if self.stop_timeout == 0 {
            return Err(Error::Setting { name: "--stop-timeout", reason: "must be at least 1 second".into() });
        }
        Ok(())
    }

    pub fn ready_timeout(&self) -> Duration {
        Duration::from_secs(self.ready_timeout)
    }

    pub fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.stop_timeout)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn up(args: &[&str]) -> UpArgs {
        let cli = Cli::try_parse_from(["baleen", "up"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Up(up) => up,
        }
    }

    #[test]
    fn defaults_serve_the_demo_on_localhost_8080() {
        let args = up(&[]);
        assert_eq!(args.manifest, None);
        assert_eq!((args.host.as_str(), args.port), ("127.0.0.1", 8080));
        assert_eq!((args.ready_timeout, args.stop_timeout), (300, 60));
        assert!(args.validate().is_ok());
    }

    #[test]
    fn flags_are_read() {
        let args =
            up(&["m.yaml", "--port", "0", "--host", "0.0.0.0", "--runtime-bin", "/x/rt", "--ready-timeout", "5"]);
        assert_eq!(args.manifest, Some(PathBuf::from("m.yaml")));
        assert_eq!((args.host.as_str(), args.port, args.ready_timeout), ("0.0.0.0", 0, 5));
        assert_eq!(args.runtime_bin, Some(PathBuf::from("/x/rt")));
    }

    #[test]
    fn zero_timeouts_are_refused_naming_the_flag() {
        let err = up(&["--ready-timeout", "0"]).validate().unwrap_err();
        assert!(err.to_string().contains("--ready-timeout"), "{err}");
        let err = up(&["--stop-timeout", "0"]).validate().unwrap_err();
        assert!(err.to_string().contains("--stop-timeout"), "{err}");
    }
}
