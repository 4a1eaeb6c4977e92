# syntax=docker/dockerfile:1
# RustyGate: a static musl binary on distroless/static (CA certificates, /etc/passwd with the
# nonroot user, nothing else), running as uid 65532.
#
#   docker build --build-arg RUSTYGATE_GIT_COMMIT="$(git rev-parse HEAD)" -t rustygate .
#
# The build context has no .git (see .dockerignore), so the commit `rustygate --version` prints
# comes from the RUSTYGATE_GIT_COMMIT build arg ("unknown" without it).
#
# Stages: `build` compiles a profile-guided binary (scripts/pgo-build.sh: instrumented, trained
# on loopback, optimised with the profile; docs/performance.md); `image` (the default) copies
# its binary; `prebuilt` copies dist/<arch>/rustygate instead, which release.yml uses to put the
# very binaries of a release into the multi-arch image.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
ARG TARGET=x86_64-unknown-linux-musl
# nghttp2-client (h2load), openssl (a certificate, a JWT), python3-websockets (a WebSocket
# client and echo server) and redis-server (rate limits kept in Redis) for the training.
# Unpinned: Debian's security updates replace them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 nghttp2-client openssl \
    python3-websockets redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "${TARGET}" \
 && rustup component add llvm-tools
WORKDIR /src

# No layer of dependencies built ahead: every crate is compiled twice with flags of this build
# (instrumented, then with the profile), so none could be reused from a stub build.
COPY Cargo.toml Cargo.lock build.rs ./
COPY crates ./crates
COPY src ./src
COPY benches ./benches
COPY scripts/pgo-build.sh ./scripts/
COPY examples/plugins/plugins/tag.wasm ./examples/plugins/plugins/
ARG RUSTYGATE_GIT_COMMIT=unknown
ARG SOURCE_DATE_EPOCH
RUN PGO_CLEAN=1 scripts/pgo-build.sh --locked --target "${TARGET}" \
 && install -D -m 0755 "target/${TARGET}/release/rustygate" /out/rustygate \
 && /out/rustygate --version

FROM gcr.io/distroless/static-debian12:nonroot AS base
ARG VERSION=dev
ARG RUSTYGATE_GIT_COMMIT=unknown
ARG CREATED=unknown
ARG SOURCE_URL=
LABEL org.opencontainers.image.title="rustygate" \
      org.opencontainers.image.description="A declarative GitOps API gateway: routes in TOML, policies in Rhai, pulled from git and swapped in atomically." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${RUSTYGATE_GIT_COMMIT}" \
      org.opencontainers.image.created="${CREATED}"
# The example config answers "RustyGate is running" on /: mount or pull a real one
# (RUSTYGATE_REPO=https://... or a ConfigMap directory, see docs/operations.md).
COPY examples/quickstart /etc/rustygate/config
# HOME: libgit2 reads $HOME/.ssh/known_hosts for SSH config repos. A git source keeps its
# mirror under /tmp unless RUSTYGATE_CACHE_DIR says otherwise (the Helm chart mounts an emptyDir
# there, so the root filesystem can be read-only).
ENV RUSTYGATE_REPO=/etc/rustygate/config \
    RUSTYGATE_LISTEN=0.0.0.0:8080 \
    RUSTYGATE_ADMIN_LISTEN=0.0.0.0:8081 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    HOME=/home/nonroot
EXPOSE 8080 8081
USER 65532:65532
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/rustygate"]
CMD ["serve"]

FROM base AS prebuilt
ARG TARGETARCH
COPY --chmod=0755 dist/${TARGETARCH}/rustygate /usr/local/bin/rustygate

FROM base AS image
COPY --from=build /out/rustygate /usr/local/bin/rustygate
