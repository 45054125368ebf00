#!/usr/bin/env bash
# Assembles what `cargo build --features cuda` needs from NVIDIA's PyPI wheels, on a machine without the CUDA
# toolkit or a GPU (our build machines): nvcc 13.0 with its headers (CCCL included), and the libraries candle links
# (cuBLAS, cuBLASLt, cuRAND, the CUDA runtime). The driver's libcuda comes with the GPU machine; for linking, a
# stub with cudarc's driver symbols stands in for it (its functions are never called: the real libcuda.so.1 of the
# GPU machine is loaded at run time).
#
#   scripts/cuda-toolkit-from-pypi.sh DEST          # e.g. /tmp/cuda (about 1.5 GB)
#   source DEST/env.sh                              # CUDA_HOME, PATH, CUDA_COMPUTE_CAP=90 (Hopper), CARGO_TARGET_DIR
#   cargo build --release -p baleen-runtime --features cuda
#
# CUDA 13.0 matches the 580 driver of the H200 machines; a newer nvcc writes PTX that driver cannot load. Override
# the target architecture with CUDA_COMPUTE_CAP before building (80 for A100, 90 for H100/H200).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$(mkdir -p "${1:?usage: scripts/cuda-toolkit-from-pypi.sh DEST}" && cd "$1" && pwd)"
WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DEST/wheels" "${WHEELS[@]}"
rm -rf "$DEST/unpacked" "$DEST/home" && mkdir -p "$DEST/unpacked"
for w in "$DEST"/wheels/*.whl; do python3 -m zipfile -e "$w" "$DEST/unpacked"; done
cp -a "$DEST/unpacked/nvidia/cu13" "$DEST/home"
chmod +x "$DEST"/home/bin/* "$DEST"/home/nvvm/bin/* 2>/dev/null || true

# lib64: the names the linker looks for (libX.so) next to the wheels' versioned files.
mkdir -p "$DEST/home/lib64"
for f in "$DEST"/home/lib/*.so.*; do
    b="$(basename "$f")"
    ln -sf "../lib/$b" "$DEST/home/lib64/$b"
    ln -sf "$b" "$DEST/home/lib64/${b%%.so*}.so"
done

# The libcuda stub: every driver function cudarc declares, from the cudarc source cargo fetched.
(cd "$ROOT" && cargo fetch -q)
version="$(awk '/^name = "cudarc"/ {getline; gsub(/"/, "", $3); print $3}' "$ROOT/Cargo.lock")"
sys="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name "cudarc-$version" | head -n 1)/src/driver/sys/mod.rs"
[[ -f "$sys" ]] || { echo "cudarc $version source not found (looked for $sys)" >&2; exit 1; }
grep -ohP '^\s+fn \Kcu\w+(?=\()' "$sys" | sort -u | awk '{print "int " $1 "(void) { return 999; }"}' > "$DEST/libcuda-stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$DEST/home/lib64/libcuda.so.1" "$DEST/libcuda-stub.c"
ln -sf libcuda.so.1 "$DEST/home/lib64/libcuda.so"

cat > "$DEST/env.sh" <<EOF
export CUDA_HOME="$DEST/home"
export PATH="$DEST/home/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="\${CARGO_TARGET_DIR:-$ROOT/target-cuda}"
EOF
"$DEST/home/bin/nvcc" --version | tail -n 2
echo "ready: source $DEST/env.sh && cargo build --release -p baleen-runtime --features cuda"
