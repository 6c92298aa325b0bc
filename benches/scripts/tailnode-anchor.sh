#!/usr/bin/env bash
# A_CMD for the anchors' tunnel.sh (A_IMPL=custom): turns the variables tunnel.sh
# exports into a wg-quick file and execs tailnode with the two TCP forwards and the
# SOCKS5 proxy the harness expects. exec keeps the PID, so tunnel.sh measures tailnode.
set -euo pipefail
: "${TAILNODE_BIN:?}" "${A_PRIV_KEY:?}" "${B_PUB_KEY:?}" "${B_ENDPOINT:?}" "${OV_A:?}" "${OV6_A:?}" "${OV_B:?}"
conf=$(mktemp /tmp/tailnode-anchor-XXXXXX.conf)
cat > "$conf" <<CONF
[Interface]
PrivateKey = $A_PRIV_KEY
Address = $OV_A/32, $OV6_A/128
MTU = ${WG_MTU:-1420}

[Peer]
PublicKey = $B_PUB_KEY
AllowedIPs = 100.64.0.0/24, fd7a:115c:a1e0::/64
Endpoint = $B_ENDPOINT
CONF
exec "$TAILNODE_BIN" up --wg-config "$conf" --socks5 127.0.0.1:1080 \
  --forward "tcp:127.0.0.1:${IPERF_PORT}=${OV_B}:${IPERF_PORT}" \
  --forward "tcp:127.0.0.1:${ECHO_PORT}=${OV_B}:${ECHO_PORT}"
