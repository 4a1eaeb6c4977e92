# syntax=docker/dockerfile:1
# Multi-stage build: a static musl binary on a distroless base, running as non-root.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin rustygate \
 && cp target/x86_64-unknown-linux-musl/release/rustygate /rustygate

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /rustygate /usr/local/bin/rustygate
COPY examples/quickstart /etc/rustygate/config
ENV RUSTYGATE_REPO=/etc/rustygate/config \
    RUSTYGATE_LISTEN=0.0.0.0:8080 \
    RUSTYGATE_ADMIN_LISTEN=0.0.0.0:8081
EXPOSE 8080 8081
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/rustygate"]
CMD ["serve"]
