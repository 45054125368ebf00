# syntax=docker/dockerfile:1
#
# baleen-runtime with candle's CUDA backend (`--features cuda`), for rank pods with `runtime.gpusPerRank` (the
# operator passes `--device cuda`). Same ports, user and entrypoint as runtime.Dockerfile.
#
#   docker build -f deploy/docker/runtime-cuda.Dockerfile -t ghcr.io/baleen-dev/baleen-runtime:0.1.0-cuda .
#
# CUDA 13.0 (driver 580 or newer on the nodes); kernels are compiled for CUDA_COMPUTE_CAP (90: H100/H200; 80: A100).
# The runtime stage is NVIDIA's CUDA runtime image, which carries the libraries the binary links (cuBLAS, cuBLASLt,
# cuRAND, cudart); the driver's libcuda comes from the node through the NVIDIA container toolkit. CI has no Docker
# engine, so this file is not built there; the binary it builds is the one scripts/gpu-check.sh checked on an H200
# (docs/benchmarks.md, "On an NVIDIA H200").

ARG CUDA_VERSION=13.0.0
ARG UBUNTU_RELEASE=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU_RELEASE} AS builder
ARG RUST_VERSION=1.95.0
ARG CUDA_COMPUTE_CAP=90
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gcc g++ pkg-config \
    && rm -rf /var/lib/apt/lists/* \
    && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
       | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
ENV PATH=/root/.cargo/bin:${PATH} CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry,sharing=locked \
    --mount=type=cache,target=/root/.cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release -p baleen-runtime --features cuda --locked \
    && install -D -m 0755 target/release/baleen-runtime /out/baleen-runtime

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU_RELEASE}
LABEL org.opencontainers.image.title="baleen-runtime (CUDA)" \
      org.opencontainers.image.description="Baleen inference runtime with CUDA: DeepSeek-style MoE models, OpenAI-compatible API" \
      org.opencontainers.image.source="https://github.com/baleen-dev/baleen" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 65532 baleen \
    && useradd --system --uid 65532 --gid 65532 --home-dir /home/baleen --create-home --shell /usr/sbin/nologin baleen
COPY --from=builder /out/baleen-runtime /usr/local/bin/baleen-runtime
USER 65532:65532
WORKDIR /home/baleen
EXPOSE 8000 50051
ENTRYPOINT ["/usr/local/bin/baleen-runtime"]
CMD ["serve", "--model", "builtin:tiny-moe", "--device", "cuda"]
