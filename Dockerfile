# syntax=docker/dockerfile:1
#
# sluice container image: a static-ish Rust binary on distroless (glibc, CA
# certificates, no shell), running as the unprivileged user 65532.
#
#   docker build -t sluice:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9901:9901 -e OPENAI_API_KEY \
#     -v "$PWD/sluice.toml:/etc/sluice/sluice.toml:ro" sluice:0.1.0
#
# Inside a container, set `listen = "0.0.0.0:8080"` (and, for -p 9901,
# `admin_listen = "0.0.0.0:9901"`) in the mounted config to reach sluice
# from outside it (as a Kubernetes sidecar, loopback is right:
# see deploy/kubernetes/). The image ships no config: mount one.

# Builder: Debian 12 (bookworm), the same glibc as the runtime image below.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the crate registry and target/ between builds; the binary
# is copied out of the cached target/ within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
    && install -m 0755 target/release/sluice /usr/local/bin/sluice

# Runtime: distroless "cc" has glibc, libgcc and the CA bundle sluice's
# native-roots TLS reads; the :nonroot variant runs as 65532:65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
USER 65532:65532
# 8080: data plane ([server] listen); 9901: admin /healthz /readyz /metrics.
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["--config", "/etc/sluice/sluice.toml"]
