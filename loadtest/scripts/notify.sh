#!/usr/bin/env bash
# End-to-end delivery of user notifications through Redis (docs/benchmarks.md §4).
#
# Starts its own redis-server on a free loopback port (never 6379; memory only), two gateway
# processes on it (gw-a, gw-b), waits for /readyz, then runs `geopush-loadtest notify` once
# per rate: clients spread over both gateways, a publisher in the load process, latency,
# loss, duplicates, CPU/RSS per node and Redis work per delivered notification. The first
# run also measures SUBSCRIBE/UNSUBSCRIBE per connect/disconnect (--churn). Every run is
# bounded in time; only the processes started here are stopped, by PID.
#
# usage: loadtest/scripts/notify.sh [OUT_DIR] [RATES...]
#   env: GATEWAY=target/release/geopush-gateway  LOADTEST=target/release/geopush-loadtest
#        USERS=2000  SECONDS_EACH=30  CHURN=1000  PUBLISHERS=64  THREADS=1
#        VIA_WORKER=0  (1: also start geopush-worker and publish through its HTTP API;
#                      WORKER=target/release/geopush-worker)
#        LOADTEST_ARGS=""  (extra flags for geopush-loadtest notify)
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-/tmp/geopush-notify}"
shift || true
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(1000 10000)
gateway="${GATEWAY:-$here/target/release/geopush-gateway}"
loadtest="${LOADTEST:-$here/target/release/geopush-loadtest}"
users="${USERS:-2000}"
seconds="${SECONDS_EACH:-30}"
churn="${CHURN:-1000}"
publishers="${PUBLISHERS:-64}"
threads="${THREADS:-1}"
via_worker="${VIA_WORKER:-0}"
worker="${WORKER:-$here/target/release/geopush-worker}"
secret="notify-bench-secret"
mkdir -p "$out"

for bin in "$gateway" "$loadtest"; do
    [ -x "$bin" ] || { echo "missing $bin: cargo build --release -p geopush-gateway -p geopush-loadtest" >&2; exit 2; }
done

# shellcheck source=lib.sh
source "$here/loadtest/scripts/lib.sh"

rport="$(free_port)"
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$out" --logfile "$out/redis.log" --daemonize no &
redis_pid=$!
pids+=("$redis_pid")
for _ in $(seq 1 100); do
    redis-cli -p "$rport" ping >/dev/null 2>&1 && break
    sleep 0.05
done
redis_url="redis://127.0.0.1:$rport"

urls=()
gw_pids=()
for node in a b; do
    port="$(free_port)"
    GEOPUSH_LOG=warn "$gateway" --listen "127.0.0.1:$port" --jwt-secret "$secret" \
        --redis-url "$redis_url" --node-id "gw-$node" --log-format json \
        2>"$out/gw-$node.log" &
    gw_pids+=("$!")
    pids+=("$!")
    urls+=("ws://127.0.0.1:$port/v1/ws")
    wait_ready "$port"
done

worker_args=()
if [ "$via_worker" = 1 ]; then
    [ -x "$worker" ] || { echo "missing $worker: cargo build --release -p geopush-worker" >&2; exit 2; }
    wport="$(free_port)"
    GEOPUSH_LOG=warn "$worker" --listen "127.0.0.1:$wport" --redis-url "$redis_url" \
        --log-format json 2>"$out/worker.log" &
    pids+=("$!")
    wait_ready "$wport"
    worker_args=(--worker-url "http://127.0.0.1:$wport")
fi

first=1
for rate in "${rates[@]}"; do
    tag="r${rate}"
    extra=()
    [ "$first" = 1 ] && [ "$churn" -gt 0 ] && extra=(--churn "$churn")
    first=0
    # shellcheck disable=SC2086
    timeout $((seconds + users / 1000 + 60)) "$loadtest" notify \
        --url "$(IFS=,; echo "${urls[*]}")" --secret "$secret" --redis-url "$redis_url" \
        --users "$users" --rate "$rate" --seconds "$seconds" --publishers "$publishers" \
        --threads "$threads" --gateway-pid "$(IFS=,; echo "${gw_pids[*]}")" \
        --sub-prefix "$tag-$$" --json-report "$out/$tag.json" -q \
        "${extra[@]}" "${worker_args[@]}" ${LOADTEST_ARGS:-} | tee "$out/$tag.txt"
    sleep 3
done
