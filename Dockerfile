# syntax=docker/dockerfile:1
#
# geopush container images: one build, two small runtime images.
#
#   docker build --target gateway -t geopush-gateway:0.1.0 .
#   docker build --target worker  -t geopush-worker:0.1.0  .
#
# The runtime images are distroless (glibc + libgcc + CA certificates, no shell, no package
# manager), run as the numeric non-root UID 65532, write nothing to the root filesystem (so
# Kubernetes' readOnlyRootFilesystem works), and start the binary itself as PID 1: SIGTERM
# reaches it directly and it drains (gateway) or finishes in-flight requests (worker) before
# exiting 0. No init wrapper is needed: the binaries spawn no child processes to reap.
#
# Base images are pinned to a version; `.ci/k8s-validate` rejects `latest` and untagged bases.
# A release pipeline should additionally pin them by digest (`image:tag@sha256:...`).

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---- build: both binaries, once ------------------------------------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# jemalloc (tikv-jemalloc-sys) builds with make and cc, both in the full rust image.
COPY . .
# Cache mounts keep the registry and target dir between builds (BuildKit); the binaries are
# copied out of the cached target dir within the same RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p geopush-gateway -p geopush-worker --bins \
 && mkdir -p /out \
 && cp target/release/geopush-gateway target/release/geopush-worker /out/

# ---- runtime: gateway (docker build --target gateway) --------------------------------------
FROM ${RUNTIME_IMAGE} AS gateway
COPY --from=build /out/geopush-gateway /usr/local/bin/geopush-gateway
# The default GEOPUSH_LISTEN is loopback-only; in a container listen on every interface.
ENV GEOPUSH_LISTEN=0.0.0.0:8080 \
    GEOPUSH_LOG_FORMAT=json
EXPOSE 8080
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/geopush-gateway"]
CMD ["serve"]

# ---- runtime: worker (docker build --target worker) ----------------------------------------
FROM ${RUNTIME_IMAGE} AS worker
COPY --from=build /out/geopush-worker /usr/local/bin/geopush-worker
ENV GEOPUSH_LISTEN=0.0.0.0:8081 \
    GEOPUSH_LOG_FORMAT=json
EXPOSE 8081
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/geopush-worker"]
CMD ["serve"]
