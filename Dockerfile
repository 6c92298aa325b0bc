# tailnode in a container: no NET_ADMIN, no /dev/net/tun, not root.
#
#   docker build -t tailnode .
#   docker run --rm -e TAILNODE_COORDINATOR=ws://coord:8080 -e TAILNODE_AUTH_KEY=... \
#              -e TAILNODE_NAME=app tailnode
#
# Build stage: a release binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tailnode-cli --bin tailnode \
 && strip target/release/tailnode

# Run stage: glibc and CA certificates (for wss:// coordinators), nothing else.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/tailnode --create-home tailnode
COPY --from=build /src/target/release/tailnode /usr/local/bin/tailnode
USER tailnode
# Key file and API socket live here; mount a volume to keep the node's identity.
# SOCKS5 stays on 127.0.0.1:1080: processes in the same pod share the network
# namespace and reach it there (ALL_PROXY=socks5h://127.0.0.1:1080).
ENV STATE_DIRECTORY=/var/lib/tailnode \
    RUST_LOG=info
VOLUME /var/lib/tailnode
ENTRYPOINT ["tailnode"]
CMD ["up"]
