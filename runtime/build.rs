//! Compiles `proto/expert.proto` with protox (pure Rust, no system `protoc`) and generates the tonic client and
//! server with tonic-prost-build; with the `cuda` feature, also compiles `kernels/baleen.cu` to PTX with nvcc.

use std::error::Error;
use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn Error>> {
    const PROTO: &str = "proto/expert.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure().bytes(".baleen.expert.v1.Tensor.data").compile_fds(fds)?;
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_kernels()?;
    }
    Ok(())
}

/// `kernels/baleen.cu` → `$OUT_DIR/baleen.ptx` for `CUDA_COMPUTE_CAP` (default 90, Hopper: the same default as
/// scripts/cuda-toolkit-from-pypi.sh and the CUDA image), with the toolkit's nvcc (`$CUDA_HOME/bin`, else PATH).
fn compile_kernels() -> Result<(), Box<dyn Error>> {
    const SOURCE: &str = "kernels/baleen.cu";
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|home| PathBuf::from(home).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("baleen.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}"), "-o"])
        .arg(&out)
        .arg(SOURCE)
        .status()
        .map_err(|e| format!("cannot run {}: {e} (set CUDA_HOME or put nvcc on PATH)", nvcc.display()))?;
    if !status.success() {
        return Err(format!("{} failed to compile {SOURCE} ({status})", nvcc.display()).into());
    }
    Ok(())
}
