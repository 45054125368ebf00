//! Compiles `proto/expert.proto` with protox (pure Rust, no system `protoc`) and generates the tonic client and
//! server with tonic-prost-build.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    const PROTO: &str = "proto/expert.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure().bytes(".baleen.expert.v1.Tensor.data").compile_fds(fds)?;
    Ok(())
}
