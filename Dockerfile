# syntax=docker/dockerfile:1
# wakegate container image: `docker build -t wakegate .`
#
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#     -v "$PWD/wakegate.toml:/etc/wakegate/wakegate.toml:ro" wakegate
#
# The configuration is not in the image: mount it at /etc/wakegate/wakegate.toml, or pass
# `run --config PATH`. In a container the listeners default to all interfaces (below);
# set WAKEGATE_LISTEN_PROXY / WAKEGATE_LISTEN_ADMIN to change that.

ARG RUST_IMAGE=rust:1-slim-bookworm
# glibc and libgcc_s, which is all the binary links to; runs as uid/gid 65532 (nonroot).
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml names the benchmark target, and cargo reads every target's path.
COPY benches ./benches
# The other workspace members: cargo loads every member (and wakegate's dev-dependencies),
# with their targets, even to build one binary.
COPY loadtest ./loadtest
COPY test-support ./test-support
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin wakegate \
    && cp target/release/wakegate /usr/local/bin/wakegate

FROM ${RUNTIME_IMAGE}
COPY --from=build /usr/local/bin/wakegate /usr/local/bin/wakegate
# Numeric, so the image is non-root whichever base it is built on.
USER 65532:65532
ENV WAKEGATE_LISTEN_PROXY=0.0.0.0:8080 \
    WAKEGATE_LISTEN_ADMIN=0.0.0.0:9090 \
    WAKEGATE_LOG_FORMAT=json
EXPOSE 8080 9090
# SIGTERM drains in-flight requests (up to the configured drain timeout), SIGHUP reloads.
STOPSIGNAL SIGTERM
ENTRYPOINT ["wakegate"]
CMD ["run", "--config", "/etc/wakegate/wakegate.toml"]
