#!/usr/bin/env bash
# One fleet scenario at scale on this machine (docs/benchmarks.md, "The loadtest scenarios").
#
# Starts its own redis-server on a free loopback port (never 6379; memory only), GATEWAYS
# gateway processes on it with the sample places, optionally the worker, then PROCS
# geopush-loadtest processes of SCENARIO side by side (one process holds fewer than 20,000
# sockets here), each with N/PROCS clients spread over every gateway, and merges their
# reports into one table, JSON and chart. Gateway RSS is also read by this script before any
# client connects and once every client is connected, for the memory per connection. Every
# run is bounded in time; only the processes started here are stopped, by PID.
#
# usage: loadtest/scripts/fleet.sh SCENARIO [OUT_DIR]
#   env: N=10000 PROCS=1 GATEWAYS=2 SECONDS_EACH=20 RATE=2000 (connects/s per process)
#        WORKER=0 (1: start geopush-worker and publish through it)
#        SOURCE_IPS=4 THREADS=1 SETTLE=3
#        ARGS=""          flags for every loadtest process
#        FIRST_ARGS=""    flags for the first process only (it alone publishes broadcasts
#                         and sends the drain's SIGTERM; the others get none)
#        GATEWAY_ENV=""   extra VAR=value settings for every gateway
#        DRAIN=0          (1: the first process SIGTERMs the first gateway: --drain-pid)
#        BIN=target/release
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
scenario="${1:?usage: fleet.sh SCENARIO [OUT_DIR]}"
out="${2:-/tmp/geopush-fleet-$scenario}"
bin="${BIN:-$here/target/release}"
n="${N:-10000}"
procs="${PROCS:-1}"
gateways="${GATEWAYS:-2}"
seconds="${SECONDS_EACH:-20}"
rate="${RATE:-2000}"
settle="${SETTLE:-3}"
source_ips="${SOURCE_IPS:-4}"
threads="${THREADS:-1}"
secret="fleet-bench-secret"
mkdir -p "$out"
rm -f "$out"/p*.json

for b in geopush-gateway geopush-loadtest geopush-worker; do
    [ -x "$bin/$b" ] || { echo "missing $bin/$b: cargo build --release --bins" >&2; exit 2; }
done
ulimit -n "$(ulimit -Hn)"

# shellcheck source=lib.sh
source "$here/loadtest/scripts/lib.sh"

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

redis_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --maxclients 10000 >"$out/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done
# With Redis, gateways take their places from the Redis store.
GEOPUSH_REDIS_URL="redis://127.0.0.1:$redis_port" \
    "$bin/geopush-worker" import "$here/deploy/places/sample-cities.ndjson" >"$out/import.log" 2>&1

gw_pids=()
urls=()
for i in $(seq 1 "$gateways"); do
    port="$(free_port)"
    # shellcheck disable=SC2086
    env GEOPUSH_LISTEN="127.0.0.1:$port" GEOPUSH_REDIS_URL="redis://127.0.0.1:$redis_port" \
        GEOPUSH_NODE_ID="gw-$i" GEOPUSH_JWT_SECRET="$secret" GEOPUSH_MAX_CONNECTIONS=60000 \
        GEOPUSH_LOG_FORMAT=json \
        ${GATEWAY_ENV:-} "$bin/geopush-gateway" >"$out/gw-$i.log" 2>&1 &
    pids+=($!)
    gw_pids+=($!)
    urls+=("ws://127.0.0.1:$port/v1/ws")
    wait_ready "$port"
done
url_list="$(IFS=,; echo "${urls[*]}")"
pid_list="$(IFS=,; echo "${gw_pids[*]}")"

publish_args=()
if [ "${WORKER:-0}" = 1 ]; then
    worker_port="$(free_port)"
    GEOPUSH_LISTEN="127.0.0.1:$worker_port" GEOPUSH_REDIS_URL="redis://127.0.0.1:$redis_port" \
        GEOPUSH_JWT_SECRET="$secret" GEOPUSH_LOG_FORMAT=json \
        "$bin/geopush-worker" >"$out/worker.log" 2>&1 &
    pids+=($!)
    wait_ready "$worker_port"
    publish_args=(--worker-url "http://127.0.0.1:$worker_port")
else
    publish_args=(--redis-url "redis://127.0.0.1:$redis_port")
fi

rss_before=0
for pid in "${gw_pids[@]}"; do rss_before=$((rss_before + $(rss_kib "$pid"))); done

per_proc=$(( (n + procs - 1) / procs ))
# Every process has connected after about per_proc / rate seconds; the first one waits that
# long before its measured phase so that what it publishes meets the whole fleet.
connect_s=$(( per_proc / rate + 2 ))
load_pids=()
for p in $(seq 1 "$procs"); do
    extra=()
    hold="$seconds"
    if [ "$p" = 1 ]; then
        # shellcheck disable=SC2206
        extra=(${FIRST_ARGS:-} --settle-seconds $((settle + connect_s)))
        [ "${DRAIN:-0}" = 1 ] && extra+=(--drain-pid "${gw_pids[0]}")
    else
        extra=(--settle-seconds "$settle" --user-rate 0 --geo-rate 0 --broadcast-every-s 0 -q)
        # Hold on until the first process's measured phase is over.
        hold=$((seconds + connect_s + 2))
    fi
    # shellcheck disable=SC2086
    timeout $((seconds + connect_s * 3 + 120)) "$bin/geopush-loadtest" "$scenario" \
        --url "$url_list" --secret "$secret" -n "$per_proc" --rate "$rate" \
        --seconds "$hold" --sub-prefix "p$p" --seed "$p" \
        --source-ips "$source_ips" --threads "$threads" --gateway-pid "$pid_list" \
        --cities "$here/../shared/data/cities1000.csv" "${publish_args[@]}" \
        --json-report "$out/p$p.json" ${ARGS:-} "${extra[@]}" \
        >"$out/p$p.txt" 2>"$out/p$p.err" &
    load_pids+=($!)
done

# Gateway memory once every client is connected (sampled by this script, not the loadtest,
# because the processes start their connects at different moments).
sleep $((connect_s + settle))
rss_connected=0
for pid in "${gw_pids[@]}"; do rss_connected=$((rss_connected + $(rss_kib "$pid"))); done
connections=0
for url in "${urls[@]}"; do
    port="${url#ws://127.0.0.1:}"; port="${port%%/*}"
    c="$(curl -fsS "http://127.0.0.1:$port/metrics" | awk '$1 == "geopush_connections" {print $2}')"
    connections=$((connections + ${c:-0}))
done

scrape_sum() { # METRIC: its sum over the gateways still up
    local total=0
    for url in "${urls[@]}"; do
        port="${url#ws://127.0.0.1:}"; port="${port%%/*}"
        v="$(curl -fsS "http://127.0.0.1:$port/metrics" 2>/dev/null | awk -v m="$1" '$1 == m {printf "%d", $2}')"
        total=$((total + ${v:-0}))
    done
    echo "$total"
}
status=0
for p in $(seq 1 "$procs"); do
    if ! wait "${load_pids[$((p - 1))]}"; then
        status=1
        echo "loadtest process p$p failed:" >&2
        tail -n 5 "$out/p$p.err" >&2
    fi
done
fixes_indexed="$(scrape_sum geopush_fixes_total)"
# The gateways' own view of delivery: notification handed to a session → frame written to its
# socket (geopush_delivery_seconds), summed over the gateways still up. It leaves out the
# clients' reading, which on this shared machine is most of publish → socket at high fan-out.
for url in "${urls[@]}"; do
    port="${url#ws://127.0.0.1:}"; port="${port%%/*}"
    curl -fsS "http://127.0.0.1:$port/metrics" 2>/dev/null | grep '^geopush_delivery_seconds_bucket' || true
done | python3 -c '
import sys, collections
buckets = collections.Counter()
for line in sys.stdin:
    le = line.split("le=\"")[1].split("\"")[0]
    buckets[float("inf") if le == "+Inf" else float(le)] += float(line.rsplit(" ", 1)[1])
if buckets and max(buckets.values()) > 0:
    total = max(buckets.values())
    def at(q):
        return next(le for le in sorted(buckets) if buckets[le] >= q * total)
    ms = lambda v: "%.2f ms" % (v * 1e3) if v != float("inf") else "above the top bucket"
    print("gateway delivery -> socket write (geopush_delivery_seconds, bucket upper bounds): "
          "%d frames, p50 <= %s, p99 <= %s, max <= %s" % (total, ms(at(0.5)), ms(at(0.99)), ms(at(1.0))))
' | tee "$out/delivery.txt"
cat "$out/p1.txt"
[ "$procs" -gt 1 ] && for p in $(seq 2 "$procs"); do tail -n 3 "$out/p$p.err" | sed "s/^/p$p: /"; done
reports=("$out"/p*.json)
"$bin/geopush-loadtest" merge "${reports[@]}" --json-report "$out/merged.json" \
    --chart "$out/merged.svg" >"$out/merged.txt"
echo "--- merged over $procs process(es) ---"
cat "$out/merged.txt"
{
    echo "gateways: $gateways, connections while sampled: $connections"
    echo "fixes the gateways counted (geopush_fixes_total): $fixes_indexed"
    echo "gateway RSS before: $rss_before KiB, with every client connected: $rss_connected KiB"
    if [ "$connections" -gt 0 ]; then
        echo "gateway RSS per connection: $(( (rss_connected - rss_before) * 1024 / connections )) bytes"
    fi
} | tee "$out/memory.txt"
exit $status
