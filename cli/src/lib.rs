//! `baleen`: the command line. `baleen up [MANIFEST]` runs a `ModelDeployment` on this machine by starting the
//! `baleen-runtime` binary as a child process (the cli talks to runtimes over HTTP and signals; it does not link
//! them).
//!
//! - [`config`]: flags and their environment variables.
//! - [`launch`]: a spec → the runtime's `serve` command line (pure).
//! - [`locate`]: finding the runtime binary.
//! - [`child`]: the runtime process: spawn, logs, listening address, signals.
//! - [`probe`]: a minimal HTTP GET for `/ready` and `/v1/models`.
//! - [`banner`]: what is printed once the model is ready.
//! - [`up`]: the whole run.

pub mod banner;
pub mod child;
pub mod config;
pub mod error;
pub mod fleet;
pub mod launch;
pub mod locate;
pub mod probe;
pub mod up;

pub use error::Error;
