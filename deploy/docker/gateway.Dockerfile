# syntax=docker/dockerfile:1
#
# baleen-gateway: the OpenAI front door that routes each request to a ready replica of its model (OpenAI API,
# /health and /ready on 8080; admin /metrics and /health on 9090).
#
#   docker build -f deploy/docker/gateway.Dockerfile -t ghcr.io/baleen-dev/baleen-gateway:0.1.0 .
#
# Built from the repository root (the build context); .dockerignore keeps target/ and .git out of it.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The whole workspace: Cargo loads every member's manifest even when building one package.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release -p baleen-gateway --locked \
    && install -D -m 0755 target/release/baleen-gateway /out/baleen-gateway

FROM debian:${DEBIAN_RELEASE}-slim
LABEL org.opencontainers.image.title="baleen-gateway" \
      org.opencontainers.image.description="Baleen gateway: one OpenAI API routing across model replicas by load and affinity" \
      org.opencontainers.image.source="https://github.com/baleen-dev/baleen" \
      org.opencontainers.image.licenses="Apache-2.0"
# ca-certificates for any HTTPS endpoint outside the cluster (in-cluster, kube uses the service account's CA).
# ca-certificates follows the Debian release's security updates, so it is not pinned to one version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/baleen-gateway /usr/local/bin/baleen-gateway
# A numeric user (no passwd entry needed), so the kubelet can verify runAsNonRoot; the root filesystem may be
# read-only: the gateway writes no files.
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/baleen-gateway"]
CMD ["serve", "--kubernetes"]
