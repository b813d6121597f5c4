#!/usr/bin/env bash
# Resident memory per idle authenticated connection of ONE gateway process.
#
# For each connection count and variant (welcome only / one fix each) this starts a fresh
# gateway, opens the fleet from a separate geopush-loadtest process, samples the gateway's
# VmRSS before and after (see docs/benchmarks.md), stops the gateway, and prints one line.
# Every run is bounded in time; only the processes started here are stopped, by PID.
#
# usage: loadtest/scripts/memory.sh [OUT_DIR] [COUNTS...]
#   env: GATEWAY=target/release/geopush-gateway  LOADTEST=target/release/geopush-loadtest
#        PORT_BASE=19100  HOLD=35  SETTLE=5  RATE=2000  VARIANTS="welcome fix-once"
#        SOURCE_IPS=4  (loopback source addresses the clients spread over)
#        GATEWAY_ENV="MALLOC_ARENA_MAX=2"  (extra environment for the gateway only)
#        CITIES=../shared/data/cities1000.csv
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-/tmp/geopush-memory}"
shift || true
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(10000 18000)
gateway="${GATEWAY:-$here/target/release/geopush-gateway}"
loadtest="${LOADTEST:-$here/target/release/geopush-loadtest}"
port="${PORT_BASE:-19100}"
hold="${HOLD:-35}"
settle="${SETTLE:-5}"
rate="${RATE:-2000}"
source_ips="${SOURCE_IPS:-4}"
variants="${VARIANTS:-welcome fix-once}"
cities="${CITIES:-$here/../shared/data/cities1000.csv}"
secret="memory-bench-secret"
mkdir -p "$out"

for bin in "$gateway" "$loadtest"; do
    [ -x "$bin" ] || { echo "missing $bin: cargo build --release -p geopush-gateway -p geopush-loadtest" >&2; exit 2; }
done

gw_pid=""
stop_gateway() {
    [ -n "$gw_pid" ] || return 0
    if kill -0 "$gw_pid" 2>/dev/null; then
        kill -TERM "$gw_pid" 2>/dev/null || true
        for _ in $(seq 1 150); do kill -0 "$gw_pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$gw_pid" 2>/dev/null && kill -KILL "$gw_pid" 2>/dev/null || true
    fi
    wait "$gw_pid" 2>/dev/null || true
    gw_pid=""
}
trap stop_gateway EXIT

for n in "${counts[@]}"; do
    for variant in $variants; do
        port=$((port + 1))
        tag="n${n}-${variant}"
        # shellcheck disable=SC2086
        env ${GATEWAY_ENV:-} GEOPUSH_LOG=warn "$gateway" --listen "127.0.0.1:$port" \
            --jwt-secret "$secret" --max-connections 20000 --log-format json \
            2>"$out/$tag.gateway.log" &
        gw_pid=$!
        for _ in $(seq 1 100); do
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
            sleep 0.05
        done
        extra=()
        [ "$variant" = "fix-once" ] && extra=(--fix-once --cities "$cities")
        timeout $((hold + n / rate + 90)) "$loadtest" connect \
            --url "ws://127.0.0.1:$port/v1/ws" --secret "$secret" \
            --connections "$n" --rate "$rate" --hold-seconds "$hold" --settle-seconds "$settle" \
            --gateway-pid "$gw_pid" --sub-prefix "$tag" --json-report "$out/$tag.json" -q \
            --source-ips "$source_ips" \
            "${extra[@]}" | tee "$out/$tag.txt"
        stop_gateway
        sleep 1
    done
done

if command -v python3 >/dev/null; then
    python3 - "$out" <<'EOF'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "n*.json"))):
    r = json.load(open(path))
    g = r["gateways"][0]
    variant = "fix-once" if "fix-once" in os.path.basename(path) else "welcome"
    settled = g["rss_delta_kib"] * 1024 / max(r["connected"], 1)
    end = (g["end"]["vm_rss_kib"] - g["before"]["vm_rss_kib"]) * 1024 / max(r["connected"], 1)
    anon = (g["settled"]["rss_anon_kib"] - g["before"]["rss_anon_kib"]) * 1024 / max(r["connected"], 1)
    cpu = r["client"]["cpu"]["user_s"] + r["client"]["cpu"]["system_s"]
    rows.append((r["connected"], variant, g["before"]["vm_rss_kib"], g["settled"]["vm_rss_kib"],
                 settled, end, anon, cpu, g["cpu"]["user_s"] + g["cpu"]["system_s"],
                 r["failed"], sum(r["closes"].values())))
print("| N | variant | RSS before KiB | RSS after KiB | bytes/conn (settled) | bytes/conn (end of hold) | anon bytes/conn | client CPU s | gateway CPU s | failed | closed |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for row in sorted(rows, key=lambda r: (r[0], r[1])):
    print("| {} | {} | {} | {} | {:.0f} | {:.0f} | {:.0f} | {:.2f} | {:.2f} | {} | {} |".format(*row))
EOF
fi
