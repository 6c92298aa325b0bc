#!/usr/bin/env bash
# loopback.sh [tcp] [tcp_rev] [rr] — tailnode -> tailnode, two processes on loopback UDP,
# measured like the anchors' tunnel.sh (same iperf3/rr.py wrappers, quiet-machine guard,
# CPU and RSS sampling). A forwards 127.0.0.1:$FWD_PORT to B's tailnet port 5201, which B
# exposes to an iperf3 server on 127.0.0.1; rr goes through A's SOCKS5 to B's port 7007,
# exposed to rr.py's echo server. RESULT names use the prefix tailnode_lo.
ANCHORS=${ANCHORS:-$(cd "$(dirname "$0")/../../../shared/anchors" && pwd)}
source "$ANCHORS/common.sh"
trap cleanup_common EXIT
: "${TAILNODE_BIN:?set TAILNODE_BIN to the release tailnode binary}"
need iperf3 "apt-get install iperf3"
PFX=${A_NAME:-tailnode_lo}
FWD_PORT=${FWD_PORT:-25201}; SRV_PORT=${SRV_PORT:-35201}; ECHO_SRV=${ECHO_SRV:-37007}
SOCKS=${SOCKS:-127.0.0.1:21080}; UDP_A=${UDP_A:-45821}; UDP_B=${UDP_B:-45820}
TESTS=("$@"); [ ${#TESTS[@]} -gt 0 ] || TESTS=(tcp tcp_rev rr)

write_conf() { # write_conf FILE KEY ADDR4 ADDR6 PORT PEERPUB PEER4 PEER6 PEERPORT
  cat > "$1" <<CONF
[Interface]
PrivateKey = $2
Address = $3/32, $4/128
ListenPort = $5

[Peer]
PublicKey = $6
AllowedIPs = $7/32, $8/128
Endpoint = 127.0.0.1:$9
CONF
}

pair_up() {
  local ka kb
  ka=$("$TAILNODE_BIN" keygen); kb=$("$TAILNODE_BIN" keygen)
  write_conf "$WORK/lo-a.conf" "$ka" 100.64.0.1 fd7a:115c:a1e0::1 "$UDP_A" \
    "$(echo "$kb" | "$TAILNODE_BIN" pubkey)" 100.64.0.2 fd7a:115c:a1e0::2 "$UDP_B"
  write_conf "$WORK/lo-b.conf" "$kb" 100.64.0.2 fd7a:115c:a1e0::2 "$UDP_B" \
    "$(echo "$ka" | "$TAILNODE_BIN" pubkey)" 100.64.0.1 fd7a:115c:a1e0::1 "$UDP_A"
  start_bg lo-iperf3 iperf3 -s -B 127.0.0.1 -p "$SRV_PORT"
  start_bg lo-echo "$PY" "$ANC_DIR/rr.py" server --bind 127.0.0.1 --port "$ECHO_SRV"
  start_bg lo-node-b env RUST_LOG=warn "$TAILNODE_BIN" up --wg-config "$WORK/lo-b.conf" --socks5 off \
    --expose "5201=127.0.0.1:$SRV_PORT" --expose "7007=127.0.0.1:$ECHO_SRV"
  PID_B=$LAST_PID
  start_bg lo-node-a env RUST_LOG=warn "$TAILNODE_BIN" up --wg-config "$WORK/lo-a.conf" --socks5 "$SOCKS" \
    --forward "tcp:127.0.0.1:$FWD_PORT=100.64.0.2:5201"
  PID_A=$LAST_PID
  wait_port - 127.0.0.1 "$FWD_PORT"; wait_port - 127.0.0.1 "${SOCKS##*:}"
  wait_port - 127.0.0.1 "$SRV_PORT"; wait_port - 127.0.0.1 "$ECHO_SRV"
  local ok=0
  for _ in $(seq 1 20); do
    if timeout 5 "$PY" "$ANC_DIR/rr.py" client --host 100.64.0.2 --port 7007 --count 5 --warmup 0 \
         --deadline 4 --socks5 "$SOCKS" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.5
  done
  [ "$ok" = 1 ] || { tail -20 "$WORK"/lo-node-*.log >&2; die "tailnode pair did not come up"; }
  MON_ROLES=(a b); MON_PID_a=$PID_A; MON_PID_b=$PID_B
}
fresh_pair() { kill_started; pair_up; }

run_tcp() { # run_tcp NAME [iperf3 args]
  local name=$1; shift
  local f="$WORK/${PFX}_$name.txt" fca="$WORK/${PFX}_${name}_cpu_a.txt" fcb="$WORK/${PFX}_${name}_cpu_b.txt"
  local fra="$WORK/${PFX}_${name}_rss_a.txt" frb="$WORK/${PFX}_${name}_rss_b.txt"
  : > "$f"; : > "$fca"; : > "$fcb"; : > "$fra"; : > "$frb"
  IPERF_PORT=$FWD_PORT
  for i in $(seq 1 "$RUNS"); do
    fresh_pair
    GUARD_RETRY_HOOK=fresh_pair guarded out measured_iperf "${PFX}_$name$i" - 127.0.0.1 "$@"
    read -r mbps retr cpuh cpur ma mb <<<"$out"
    IFS=: read -r _ ca ra <<<"$ma"; IFS=: read -r _ cb rb <<<"$mb"
    echo "$PFX $name run $i: $mbps Mbit/s retrans=$retr A(tailnode): cpu=${ca}% peak_rss=$(kib_to_mib "$ra")MiB" \
         "B(tailnode): cpu=${cb}% peak_rss=$(kib_to_mib "$rb")MiB$GUARD_NOTE"
    echo "$mbps" >> "$f"; echo "$ca" >> "$fca"; echo "$cb" >> "$fcb"
    kib_to_mib "$ra" >> "$fra"; kib_to_mib "$rb" >> "$frb"
    echo "# A VmHWM = $(kib_to_mib "$(hwm_kib "$PID_A")") MiB, B VmHWM = $(kib_to_mib "$(hwm_kib "$PID_B")") MiB" >&2
  done
  report "${PFX}_${name}_cpu_a" "%core" "$fca"
  report "${PFX}_${name}_cpu_b" "%core" "$fcb"
  report "${PFX}_${name}_rss_peak_a" MiB "$fra"
  report "${PFX}_${name}_rss_peak_b" MiB "$frb"
  report "${PFX}_${name}" Mbit/s "$f"
}

for t in "${TESTS[@]}"; do
  case "$t" in
  tcp)     run_tcp tcp ;;
  tcp_rev) run_tcp tcp_rev -R ;;
  rr)
    f="$WORK/${PFX}_rr.txt"; fp="$WORK/${PFX}_rr_p99.txt"; : > "$f"; : > "$fp"
    for i in $(seq 1 "$RUNS"); do
      fresh_pair
      GUARD_RETRY_HOOK=fresh_pair guarded out rr_run - 100.64.0.2 7007 --socks5 "$SOCKS"
      read -r med p90 p99 mn mx mean <<<"$out"
      echo "$PFX rr run $i: median=${med}us p90=${p90}us p99=${p99}us min=${mn}us max=${mx}us mean=${mean}us"
      echo "$med" >> "$f"; echo "$p99" >> "$fp"
    done
    report "${PFX}_rr_p99" us "$fp"
    report "${PFX}_rr_median" us "$f"
    ;;
  *) die "unknown test $t (tcp|tcp_rev|rr)" ;;
  esac
done
