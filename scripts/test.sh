#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing (Debian
# packages; needs root), then runs every test of the workspace.
#
#   scripts/test.sh [extra cargo test args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the end-to-end tests use: a foreign WireGuard peer in a
# network namespace (wireguard-go, wireguard-tools, iproute2), nftables for
# fault injection, ping, curl as a real SOCKS/HTTP client, iperf3 for benches.
PACKAGES=(wireguard-go wireguard-tools iproute2 nftables iputils-ping curl iperf3 python3 python3-socks)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "# installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "# missing packages (${missing[*]}); run as root to install them" >&2
  fi
fi

# The TCP socket tests of the patched smoltcp copy (third_party/smoltcp/TAILNODE.md).
(cd third_party/smoltcp && CARGO_TARGET_DIR="$PWD/../../target/third-party" \
  cargo test --locked --quiet --lib socket::tcp)

exec cargo test --workspace --locked "$@"
