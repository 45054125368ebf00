# syntax=docker/dockerfile:1
#
# baleen-runtime: the inference server (OpenAI API, /health, /ready, /metrics on 8000; expert gRPC on 50051).
# CPU build (candle's CPU backend); the `cuda` feature needs a CUDA toolkit image and is not built here.
#
#   docker build -f deploy/docker/runtime.Dockerfile -t ghcr.io/baleen-dev/baleen-runtime:0.1.0 .
#
# Built from the repository root (the build context); .dockerignore keeps target/ and .git out of it.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The whole workspace: Cargo loads every member's manifest, and build.rs compiles runtime/proto/expert.proto
# with protox (no protoc needed). The C parts (oniguruma for the tokenizer) build with the image's gcc.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release -p baleen-runtime --locked \
    && install -D -m 0755 target/release/baleen-runtime /out/baleen-runtime

FROM debian:${DEBIAN_RELEASE}-slim
LABEL org.opencontainers.image.title="baleen-runtime" \
      org.opencontainers.image.description="Baleen inference runtime: DeepSeek-style MoE models, OpenAI-compatible API" \
      org.opencontainers.image.source="https://github.com/baleen-dev/baleen" \
      org.opencontainers.image.licenses="Apache-2.0"
# ca-certificates follows the Debian release's security updates, so it is not pinned to one version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 65532 baleen \
    && useradd --system --uid 65532 --gid 65532 --home-dir /home/baleen --create-home --shell /usr/sbin/nologin baleen
COPY --from=builder /out/baleen-runtime /usr/local/bin/baleen-runtime
# A numeric user, so the kubelet can verify runAsNonRoot without a runAsUser in the pod.
USER 65532:65532
WORKDIR /home/baleen
EXPOSE 8000 50051
ENTRYPOINT ["/usr/local/bin/baleen-runtime"]
# The operator gives its own arguments; run alone, the image serves the built-in demo model.
CMD ["serve", "--model", "builtin:tiny-moe"]
