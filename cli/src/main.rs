//! `baleen`: thin entry point; the commands live in the `baleen` library.

use std::process::ExitCode;

use baleen::config::{Cli, Command};
use baleen_api::names::ENV_UP_LOG;
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(ENV_UP_LOG)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baleen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match cli.command {
        Command::Up(args) => Ok(runtime.block_on(baleen::up::run(&args))?.exit_code()),
    }
}
