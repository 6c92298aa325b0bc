#!/usr/bin/env bash
# The data-plane benchmark: tailnode side by side with the anchors, in one run, one table.
#
#   bash benches/run.sh            # all scenarios, RUNS=3 runs of DURATION=10 s each
#   SKIP_ONETUN=1 bash benches/run.sh
#
# Scenarios (see ../shared/anchors/README.md for the harness and its quiet-machine guard):
#   tailnode_lo    tailnode -> tailnode, two processes on loopback UDP   (scripts/loopback.sh)
#   tailnode_wggo  tailnode (namespace A) -> wireguard-go (namespace B)  (tunnel.sh, A_IMPL=custom)
#   wggo           wireguard-go <-> wireguard-go                          (04-wggo.sh)
#   onetun         onetun -> wireguard-go                                  (05-onetun.sh)
# Needs root (namespaces), iperf3, wireguard-go, wireguard-tools; onetun is built with
# `cargo install onetun --root /tmp/anchors-cargo` when missing.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=${ANCHORS:-$(cd "$ROOT/../shared/anchors" && pwd)}
export ANCHORS ANC_WORK=${ANC_WORK:-/tmp/tailnode-bench}
mkdir -p "$ANC_WORK"
LOG="$ANC_WORK/bench.log"; : > "$LOG"

for p in iperf3 wireguard-go wireguard-tools iputils-ping iproute2 python3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="${missing:-} $p"
done
if [ -n "${missing:-}" ]; then apt-get update -qq && apt-get install -y -qq $missing >/dev/null; fi
(cd "$ROOT" && cargo build --release -p tailnode-cli --bin tailnode) || exit 1
export TAILNODE_BIN="$ROOT/target/release/tailnode"
ONETUN=${ONETUN:-/tmp/anchors-cargo/bin/onetun}
if [ "${SKIP_ONETUN:-0}" != 1 ] && [ ! -x "$ONETUN" ]; then
  cargo install onetun --root /tmp/anchors-cargo >&2 || SKIP_ONETUN=1
fi

{
  echo "# bench $(date -u +%FT%TZ) kernel=$(uname -r) nproc=$(nproc) RUNS=${RUNS:-3} DURATION=${DURATION:-10}"
  echo "# tailnode $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); wireguard-go $(wireguard-go --version 2>&1 | head -1)"
} | tee -a "$LOG"
run() { echo "## $*" | tee -a "$LOG"; "$@" 2>&1 | tee -a "$LOG"; }
run "$ROOT/benches/scripts/loopback.sh" tcp tcp_rev rr
A_IMPL=custom A_NAME=tailnode_wggo A_SOCKS=127.0.0.1:1080 A_CMD="$ROOT/benches/scripts/tailnode-anchor.sh" \
  run "$ANCHORS/tunnel.sh" tcp tcp_rev rr ping
run "$ANCHORS/04-wggo.sh" tcp tcp_rev rr ping
[ "${SKIP_ONETUN:-0}" = 1 ] || ONETUN=$ONETUN run "$ANCHORS/05-onetun.sh" tcp tcp_rev rr

grep '^RESULT' "$LOG" > "$ANC_WORK/results.txt"
python3 - "$ANC_WORK/results.txt" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    _, kv, unit = line.split()
    k, v = kv.split("=")
    r[k] = v
rows = [("tailnode -> tailnode (loopback)", "tailnode_lo"),
        ("tailnode -> wireguard-go", "tailnode_wggo"),
        ("wireguard-go <-> wireguard-go", "wggo"),
        ("onetun -> wireguard-go", "onetun")]
g = lambda p, k: r.get(f"{p}_{k}", "-")
def peak(p):
    vals = [r.get(f"{p}_{t}_rss_peak_a") for t in ("tcp", "tcp_rev")]
    vals = [float(v) for v in vals if v not in (None, "nan")]
    return f"{max(vals):.0f}" if vals else "-"
print()
print("| scenario | A→B Mbit/s | B→A Mbit/s | RR median µs | RR p99 µs | ping ms | peak RSS A MiB | CPU A→B %core (A/B) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name, p in rows:
    if not any(k.startswith(p + "_") for k in r):
        continue
    print(f"| {name} | {g(p,'tcp')} | {g(p,'tcp_rev')} | {g(p,'rr_median')} | {g(p,'rr_p99')} | "
          f"{g(p,'ping_median')} | {peak(p)} | {g(p,'tcp_cpu_a')}/{g(p,'tcp_cpu_b')} |")
PY
