#!/usr/bin/env bash
# GPU checks of prebuilt CUDA binaries, run on a machine with an NVIDIA GPU (CUDA 13 driver and libraries) but no
# Rust toolchain. Build them first on a build machine (docs/model.md, "Devices, dtypes and threads"):
#
#   scripts/cuda-toolkit-from-pypi.sh /tmp/cuda && source /tmp/cuda/env.sh   # when there is no CUDA toolkit
#   cargo build --release -p baleen-runtime --features cuda
#   cargo test --release -p baleen-runtime --features cuda --test golden --test kernels --no-run
#
# and put `baleen-runtime`, the `golden-*` and `kernels-*` test binaries (renamed `golden` and `kernels`), and
# optionally `wrk` (+ its libluajit) in one folder:
#
#   scripts/gpu-check.sh DIR [OUTDIR]
#
# It runs, in one go, each step's output going to OUTDIR (default: DIR/out):
#   1. the transformers goldens on CUDA (BALEEN_TEST_DEVICE=cuda), f32 at 1e-4 and bf16 against transformers' bf16;
#   2. the kernel tests on CUDA: routing kernel = host router, grouped experts = batched matmuls, kernel decode and
#      its CUDA graph = candle's decode, device-drawn built-in weights = the host's;
#   3. `baleen-runtime bench` on builtin:deepseek-v2-lite (all 27 layers, bf16, weights drawn on the GPU), batch
#      1, 8, 32, 128, prompt 128, 64 generated tokens, three ways in turn: Baleen's kernels with CUDA graphs (the
#      default), the kernels without graphs, and candle's ops alone (--cuda-kernels false, the path before them);
#   4. the same for builtin:deepseek-v3-slice (DeepSeek-V3's layer shapes, 5 layers) at batch 1 and 32;
#   5. `baleen-runtime bench` on the tiny model at batch 1, 8, 32 on CUDA f32, kernels and candle, and the CPU;
#   6. scripts/bench-serving.sh on CUDA (f32, bf16) and on the CPU, at 1, 8 and 32 concurrent requests;
#   7. scripts/bench-expert-parallel.sh on the CPU with every core available (one compute thread per process).
# A failing step is reported and the next one still runs; the exit status is the number of failed steps.
# GPU_CHECK_ONLY (an extended regex) runs only the steps whose names match it; STEP_TIMEOUT (seconds) bounds each
# step (a bench prints each batch size's line as it finishes, so a step cut short still reports what it measured).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$(cd "${1:?usage: scripts/gpu-check.sh DIR [OUTDIR]}" && pwd)"
OUTD="${2:-$DIR/out}"
mkdir -p "$OUTD"
cd "$ROOT"
FAILED=0
step() { local name=$1; shift; [[ "$name" =~ ${GPU_CHECK_ONLY:-.} ]] || return 0; echo "=== $name: $*"; local t0=$SECONDS
    if timeout "${STEP_TIMEOUT:-0}" bash -c '"$@"' "$name" "$@" > "$OUTD/$name.log" 2>&1; then echo "--- $name ok ($((SECONDS - t0)) s)"; else
        echo "--- $name FAILED ($((SECONDS - t0)) s)"; FAILED=$((FAILED + 1))
        local server="$CARGO_TARGET_DIR/bench/serving-server.log"
        [[ "$name" != serving-* || ! -f "$server" ]] || { echo "(server log)"; tail -n 15 "$server"; }
    fi
    tail -n "${TAIL:-25}" "$OUTD/$name.log"; }

# CUDA's libraries: the driver's libcuda and the CUDA 13 math libraries wherever this machine keeps them (not
# CUDA's compat/ libcuda, which a 580 driver refuses with error 803).
libdirs="$(find /usr/local/nvidia /usr/local/cuda* /usr/lib/x86_64-linux-gnu /opt -xdev \
    \( -name 'libcuda.so.1' -o -name 'libcublas.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' \
       -o -name 'libcudart.so.13' -o -name 'libluajit-5.1.so.2' \) -not -path '*/compat/*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)"
export LD_LIBRARY_PATH="$DIR:$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$DIR:$PATH"
export BIN="$DIR/baleen-runtime"
nvidia-smi -L; nproc; grep -m1 "model name" /proc/cpuinfo; for t in curl python3 wrk; do command -v "$t" >/dev/null || echo "missing: $t"; done
ldd "$BIN" | grep -E 'not found|cuda|cublas|curand|nvrtc|cudart'

# The bench scripts take the binary from $CARGO_TARGET_DIR/release.
export CARGO_TARGET_DIR="$OUTD/target"
mkdir -p "$CARGO_TARGET_DIR/release" && cp "$BIN" "$CARGO_TARGET_DIR/release/"

step kernels-cuda env BALEEN_TEST_DEVICE=cuda "$DIR/kernels" --test-threads 1 --nocapture
step goldens-cuda env BALEEN_TEST_DEVICE=cuda "$DIR/golden" --test-threads 1 --nocapture

# full MODEL BATCHES GEN [FLAGS...]: one `bench` process over the batch sizes (one JSON line each).
full() { local model=$1 sizes=$2 gen=$3; shift 3
    "$BIN" bench --model "builtin:$model" --device cuda --dtype bf16 --batch "$sizes" --prompt-len 128 \
        --gen-len "$gen" --repeats 2 "$@"; }
tiny() { "$BIN" bench --model builtin:tiny-moe --batch 1,8,32 --prompt-len 16 --gen-len 32 --repeats 3 "$@"; }
# Steps run in a child shell (under `timeout`), which needs the functions exported.
export -f full tiny
TAIL=4 step v2-lite-graphs full deepseek-v2-lite 1,8,32,128 64
TAIL=4 step v2-lite-candle full deepseek-v2-lite 1,8,32,128 64 --cuda-kernels false
TAIL=4 step v2-lite-kernels full deepseek-v2-lite 1,8,32,128 64 --cuda-graphs false
TAIL=2 step v3-slice-graphs full deepseek-v3-slice 1,32 32
TAIL=2 step v3-slice-candle full deepseek-v3-slice 1,32 32 --cuda-kernels false

TAIL=3 step tiny-cuda-f32-graphs tiny --device cuda --dtype f32
TAIL=3 step tiny-cuda-f32-candle tiny --device cuda --dtype f32 --cuda-kernels false
TAIL=3 step tiny-cpu-f32 tiny --threads 1

export BENCH_DURATION="${BENCH_DURATION:-8}" BENCH_WARMUP=2
TAIL=12 step serving-cuda-f32 env BENCH_SERVER_ARGS="--device cuda" scripts/bench-serving.sh --no-build
TAIL=12 step serving-cuda-bf16 env BENCH_SERVER_ARGS="--device cuda --dtype bf16" scripts/bench-serving.sh --no-build
TAIL=12 step serving-cpu scripts/bench-serving.sh --no-build
TAIL=20 step expert-parallel-cpu scripts/bench-expert-parallel.sh --no-build
echo "failed steps: $FAILED"
exit "$FAILED"
