//! `baleen-runtime`: thin entry point; the commands live in `baleen_runtime::cli`.

use baleen_api::names::{ENV_HOSTNAME, ENV_RAYON_NUM_THREADS, ENV_RUNTIME_LOG};
use baleen_runtime::cli::{Cli, Command};
use clap::Parser;
use std::io::IsTerminal;

/// mimalloc instead of glibc malloc: a decode step allocates and frees hundreds of short-lived buffers of a few
/// KiB, which glibc serves from its shared heap (consolidation, unlinking); mimalloc's per-thread free lists do
/// not. Measured with `scripts/bench-serving.sh` (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if let Some(model) = cli.command.model_args_mut() {
        model.expert.resolve(std::env::var(ENV_HOSTNAME).ok().as_deref())?;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(ENV_RUNTIME_LOG)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Some(model) = cli.command.model_args_mut() {
        // A Hub model downloads here, in a runtime of its own that is gone (threads joined) when this returns.
        model.resolve_source()?;
    }
    if let Some(model) = cli.command.model_args() {
        let threads = model.threads()?;
        set_compute_threads(threads);
        // One-shot commands compute on this thread: make it the pool's first worker. `serve` computes on its engine
        // thread (which builds its own such pool) and on the expert service's threads, which need a pool whose
        // workers are free — this thread is busy running the async runtime.
        if !matches!(cli.command, Command::Serve(_)) {
            baleen_runtime::device::init_compute_pool(threads)?;
        }
        tracing::info!(threads, "CPU compute threads");
    }
    // Commands print one JSON object; `serve` prints only its listening line (and returns null).
    let value = cli.command.run()?;
    if !value.is_null() {
        println!("{value}");
    }
    Ok(())
}

/// candle's CPU matmul (gemm) and rayon's global pool both size themselves from `RAYON_NUM_THREADS` when first
/// used. It is set here once, while the process is still single-threaded and before any tensor work.
#[allow(unsafe_code, clippy::disallowed_methods)]
fn set_compute_threads(threads: usize) {
    // SAFETY: called from main before any other thread exists (the logger spawns none), so no concurrent
    // reader of the environment can race with this write.
    unsafe { std::env::set_var(ENV_RAYON_NUM_THREADS, threads.to_string()) };
}
