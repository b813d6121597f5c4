#!/usr/bin/env bash
# A local geopush cluster without containers: a private redis-server, three gateways on it
# (distinct node ids), the worker (backend API), and a TCP load balancer (deploy/local/lb.py)
# in front of the gateways, all on loopback ports.
#
#   deploy/local/cluster.sh [start]           start everything, print the URLs, a dev token
#                                             and the dev API key; Ctrl-C (or SIGTERM) stops it
#   deploy/local/cluster.sh restart-gateways  rolling restart of a running cluster's gateways,
#                                             one at a time (SIGTERM, wait for the exit, start
#                                             on the same port, wait for /readyz 200 and for
#                                             the LB to see it up), then the next; exits 0
#                                             when all are back, 1 if one did not come back
#   deploy/local/cluster.sh status            what runs, by PID, and the URLs
#   deploy/local/cluster.sh stop              stop a running cluster (SIGTERM to its cluster.sh)
#
# Started in the background by a non-interactive shell (`cluster.sh &` in a script), bash
# runs with SIGINT ignored and cannot trap it: stop such a cluster with SIGTERM or `stop`.
#
# Environment (all optional):
#   GEOPUSH_LOCAL_BASE_PORT   18080: LB = base, gateway i = base+i, worker = base+4,
#                             redis = base+9 (never 6379)
#   GEOPUSH_LOCAL_LB_PORT, GEOPUSH_LOCAL_GATEWAY_PORTS (comma-separated, one per gateway),
#   GEOPUSH_LOCAL_WORKER_PORT, GEOPUSH_LOCAL_REDIS_PORT   override single ports
#   GEOPUSH_LOCAL_STATE_DIR   ${TMPDIR:-/tmp}/geopush-local-<base port>: pid files, logs,
#                             cluster.env, Redis's directory
#   GEOPUSH_BIN_DIR           where geopush-gateway and geopush-worker are (default:
#                             target/release if both are built there, else target/debug)
#   GEOPUSH_REDIS_SERVER      the redis-server binary (default: from PATH)
#   GEOPUSH_LOCAL_STOP_SECONDS  how long a stop or restart waits for one process to exit
#                             before SIGKILL (default: drain + shutdown grace + 10)
#   every other GEOPUSH_* variable (GEOPUSH_DRAIN_SECONDS, GEOPUSH_JWT_SECRET, …) is passed
#   to the gateways and the worker as is.
#
# One process owns the cluster: the `start` shell. It starts every component as its own
# child and reaps it; `restart-gateways` and `stop` only ask it (SIGUSR1, SIGTERM) and
# wait, so restarted gateways are its children too and run with the environment of the
# first start. Only processes this script started are ever signalled, by the PIDs in the
# state dir, and only while /proc says the PID still runs the program it was started as.

set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
COMMAND="${1:-start}"

BASE_PORT="${GEOPUSH_LOCAL_BASE_PORT:-18080}"
STATE="${GEOPUSH_LOCAL_STATE_DIR:-${TMPDIR:-/tmp}/geopush-local-$BASE_PORT}"

say() { printf '%s\n' "$*"; }
# A progress line on stderr (and in NOTE_LOG while a rolling restart runs).
note() {
    printf 'cluster.sh: %s\n' "$*" >&2
    if [[ -n "${NOTE_LOG:-}" ]]; then printf 'cluster.sh: %s\n' "$*" >>"$NOTE_LOG"; fi
}
die() { note "$*"; exit 1; }

# --- processes --------------------------------------------------------------------------

# True while PID runs and is not a zombie (an exited child not yet reaped counts as gone).
alive() {
    local pid="$1" state
    [[ -n "$pid" ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/stat" ]]; then
        state="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
        [[ "$state" != "Z" && -n "$state" ]] || return 1
    fi
    return 0
}

# True when PID is alive and its command line mentions WHAT (guards against a reused PID).
ours() {
    local pid="$1" what="$2"
    alive "$pid" || return 1
    if [[ -r "/proc/$pid/cmdline" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$what" || return 1
    fi
    return 0
}

pid_of() { cat "$STATE/$1.pid" 2>/dev/null || true; }

# spawn COMMAND…: run it in the background in a session of its own, so a Ctrl-C in the
# terminal reaches only this script, which then stops everything in order. (`setsid` execs
# in place here, the PID stays the one `$!` names.)
spawn() {
    if command -v setsid >/dev/null; then
        setsid "$@" &
    else
        "$@" &
    fi
}

# What each component's command line contains (for `ours`).
signature() {
    case "$1" in
        redis) echo "redis-server" ;;
        gateway-*) echo "geopush-gateway" ;;
        worker) echo "geopush-worker" ;;
        lb) echo "lb.py" ;;
        cluster) echo "cluster.sh" ;;
    esac
}

# stop_one NAME: SIGTERM the component's PID, wait for it to exit (SIGKILL after
# STOP_SECONDS), remove its pid file.
stop_one() {
    local name="$1" pid waited=0
    pid="$(pid_of "$name")"
    if [[ -z "$pid" ]] || ! ours "$pid" "$(signature "$name")"; then
        rm -f "$STATE/$name.pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid"; do
        if (( waited >= STOP_SECONDS * 10 )); then
            note "$name (pid $pid) did not exit within ${STOP_SECONDS}s; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    # Reap it when it is our child (a no-op otherwise).
    wait "$pid" 2>/dev/null || true
    rm -f "$STATE/$name.pid"
}

# HTTP status of GET PATH on 127.0.0.1:PORT, or 000 (bash's /dev/tcp: no curl needed).
http_status() {
    local port="$1" path="$2" line=""
    {
        exec 3<>"/dev/tcp/127.0.0.1/$port" &&
            printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3 &&
            IFS= read -r -t 2 line <&3
        exec 3>&- 3<&-
    } 2>/dev/null || true
    line="${line#HTTP/1.? }"
    echo "${line:0:3}" | grep -E '^[0-9]{3}$' || echo 000
}

port_in_use() {
    { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
    exec 3>&- 3<&-
    return 0
}

# wait_until SECONDS DESCRIPTION COMMAND…: poll every 0.1 s.
wait_until() {
    local seconds="$1" what="$2" tries=0
    shift 2
    until "$@"; do
        if (( tries >= seconds * 10 )); then
            note "timed out after ${seconds}s waiting for $what"
            return 1
        fi
        sleep 0.1
        tries=$((tries + 1))
    done
}

ready_200() { [[ "$(http_status "$1" /readyz)" == 200 ]]; }
lb_sees_up() { grep -qx "127.0.0.1:$1 up" "$STATE/lb-backends" 2>/dev/null; }

# --- configuration ----------------------------------------------------------------------

configure() {
    LB_PORT="${GEOPUSH_LOCAL_LB_PORT:-$BASE_PORT}"
    WORKER_PORT="${GEOPUSH_LOCAL_WORKER_PORT:-$((BASE_PORT + 4))}"
    REDIS_PORT="${GEOPUSH_LOCAL_REDIS_PORT:-$((BASE_PORT + 9))}"
    GATEWAY_PORTS="${GEOPUSH_LOCAL_GATEWAY_PORTS:-$((BASE_PORT + 1)),$((BASE_PORT + 2)),$((BASE_PORT + 3))}"
    [[ "$REDIS_PORT" != 6379 ]] || die "refusing Redis port 6379 (a shared instance lives there)"
    if [[ -z "${GEOPUSH_BIN_DIR:-}" ]]; then
        if [[ -x "$REPO/target/release/geopush-gateway" && -x "$REPO/target/release/geopush-worker" ]]; then
            GEOPUSH_BIN_DIR="$REPO/target/release"
        else
            GEOPUSH_BIN_DIR="$REPO/target/debug"
        fi
    fi
    BIN_DIR="$(cd "$GEOPUSH_BIN_DIR" 2>/dev/null && pwd)" ||
        die "no such directory: $GEOPUSH_BIN_DIR (build first: cargo build --release -p geopush-gateway -p geopush-worker)"
    for bin in geopush-gateway geopush-worker; do
        [[ -x "$BIN_DIR/$bin" ]] ||
            die "$BIN_DIR/$bin is missing (build first: cargo build --release -p geopush-gateway -p geopush-worker)"
    done
    REDIS_SERVER="${GEOPUSH_REDIS_SERVER:-redis-server}"
    command -v "$REDIS_SERVER" >/dev/null || die "redis-server not found (apt-get install redis-server)"
    command -v python3 >/dev/null || die "python3 not found (the load balancer needs it)"
}

# The cluster's layout, written at start and read by the other commands.
write_cluster_env() {
    {
        printf 'LB_PORT=%q\n' "$LB_PORT"
        printf 'GATEWAY_PORTS=%q\n' "$GATEWAY_PORTS"
        printf 'WORKER_PORT=%q\n' "$WORKER_PORT"
        printf 'REDIS_PORT=%q\n' "$REDIS_PORT"
        printf 'BIN_DIR=%q\n' "$BIN_DIR"
        printf 'REDIS_SERVER=%q\n' "$REDIS_SERVER"
        printf 'STOP_SECONDS=%q\n' "$STOP_SECONDS"
    } >"$STATE/cluster.env"
}

load_cluster_env() {
    [[ -f "$STATE/cluster.env" ]] || die "no cluster in $STATE (set GEOPUSH_LOCAL_STATE_DIR or GEOPUSH_LOCAL_BASE_PORT)"
    # shellcheck disable=SC1091
    source "$STATE/cluster.env"
}

default_stop_seconds() {
    local drain="${GEOPUSH_DRAIN_SECONDS:-10}" grace="${GEOPUSH_SHUTDOWN_GRACE_SECONDS:-5}"
    STOP_SECONDS="${GEOPUSH_LOCAL_STOP_SECONDS:-$(( ${drain%.*} + ${grace%.*} + 10 ))}"
}

gateway_port() { cut -d, -f"$1" <<<"$GATEWAY_PORTS"; }
gateway_count() { tr ',' '\n' <<<"$GATEWAY_PORTS" | grep -c .; }

# --- components ---------------------------------------------------------------------------

start_redis() {
    mkdir -p "$STATE/redis"
    spawn "$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$STATE/redis" --logfile "$STATE/logs/redis.log" --daemonize no \
        </dev/null >/dev/null 2>&1
    echo $! >"$STATE/redis.pid"
    wait_until 10 "redis-server on port $REDIS_PORT" redis_answers ||
        die "redis-server did not start; see $STATE/logs/redis.log"
}

redis_answers() {
    local line=""
    {
        exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" && printf 'PING\r\n' >&3 && IFS= read -r -t 1 line <&3
        exec 3>&- 3<&-
    } 2>/dev/null || true
    [[ "$line" == "+PONG"* ]]
}

# start_gateway I: gateway I (1-based) on its port, logs appended to logs/gateway-I.log.
start_gateway() {
    local i="$1" port
    port="$(gateway_port "$i")"
    GEOPUSH_LISTEN="127.0.0.1:$port" GEOPUSH_NODE_ID="gw-$i" \
        GEOPUSH_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" GEOPUSH_LOG_FORMAT="${GEOPUSH_LOG_FORMAT:-json}" \
        spawn "$BIN_DIR/geopush-gateway" serve </dev/null >>"$STATE/logs/gateway-$i.log" 2>&1
    echo $! >"$STATE/gateway-$i.pid"
}

start_worker() {
    GEOPUSH_LISTEN="127.0.0.1:$WORKER_PORT" GEOPUSH_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
        GEOPUSH_WORKER_ID="${GEOPUSH_WORKER_ID:-local-worker}" GEOPUSH_LOG_FORMAT="${GEOPUSH_LOG_FORMAT:-json}" \
        spawn "$BIN_DIR/geopush-worker" serve </dev/null >>"$STATE/logs/worker.log" 2>&1
    echo $! >"$STATE/worker.pid"
}

start_lb() {
    local args=() i
    for ((i = 1; i <= $(gateway_count); i++)); do
        args+=(--backend "127.0.0.1:$(gateway_port "$i")")
    done
    spawn python3 "$HERE/lb.py" --listen "127.0.0.1:$LB_PORT" "${args[@]}" \
        --status-file "$STATE/lb-backends" --parent-pid "$$" \
        </dev/null >>"$STATE/logs/lb.log" 2>&1
    echo $! >"$STATE/lb.pid"
}

# wait_gateway_ready I: /readyz 200 and the LB counts it up; 1 (with a note) otherwise.
wait_gateway_ready() {
    local i="$1" port pid
    port="$(gateway_port "$i")"
    pid="$(pid_of "gateway-$i")"
    if ! wait_until 30 "gateway $i (127.0.0.1:$port) /readyz 200" gateway_ready_or_dead "$pid" "$port"; then
        note "gateway $i never got ready; see $STATE/logs/gateway-$i.log"
        return 1
    fi
    if ! alive "$pid"; then
        note "gateway $i exited at start; see $STATE/logs/gateway-$i.log"
        return 1
    fi
    # The LB may not have noticed the restart at all (then its "up" is right already).
    if alive "$(pid_of lb)" && ! wait_until 10 "the load balancer to see gateway $i up" lb_sees_up "$port"; then
        note "the load balancer does not see gateway $i; see $STATE/logs/lb.log"
        return 1
    fi
}

gateway_ready_or_dead() { ! alive "$1" || ready_200 "$2"; }

print_urls() {
    local i token api_key
    token="$("$BIN_DIR/geopush-gateway" token --sub demo --did demo-phone --ttl 86400 2>/dev/null)" ||
        token="(minting failed: $BIN_DIR/geopush-gateway token --sub demo)"
    if [[ -n "${GEOPUSH_API_KEYS:-}" ]]; then
        api_key="(GEOPUSH_API_KEYS is set: use one of your keys)"
    else
        api_key="geopush-insecure-dev-api-key"
    fi
    say ""
    say "geopush local cluster is up (state: $STATE)"
    say "  WebSocket via LB  ws://127.0.0.1:$LB_PORT/v1/ws"
    for ((i = 1; i <= $(gateway_count); i++)); do
        say "  gateway gw-$i      ws://127.0.0.1:$(gateway_port "$i")/v1/ws   metrics http://127.0.0.1:$(gateway_port "$i")/metrics"
    done
    say "  worker API        http://127.0.0.1:$WORKER_PORT/v1/notifications   metrics http://127.0.0.1:$WORKER_PORT/metrics"
    say "  redis             redis://127.0.0.1:$REDIS_PORT"
    say "  logs              $STATE/logs/"
    say "  binaries          $BIN_DIR"
    say ""
    if [[ -z "${GEOPUSH_JWT_SECRET:-}${GEOPUSH_JWT_PUBLIC_KEY:-}${GEOPUSH_JWKS_FILE:-}" ]]; then
        say "  INSECURE development secret and key (never use them outside this machine):"
    fi
    say "  TOKEN=$token"
    say "  KEY=$api_key"
    say ""
    say "  python3 -m websockets \"ws://127.0.0.1:$LB_PORT/v1/ws?access_token=\$TOKEN\""
    say "  curl -s -XPOST 127.0.0.1:$WORKER_PORT/v1/notifications -H \"Authorization: Bearer \$KEY\" \\"
    say "       -d '{\"target\":{\"users\":[\"demo\"]},\"title\":\"Hello\",\"body\":\"from the local cluster\"}'"
    say "  GEOPUSH_LOCAL_STATE_DIR=$STATE $0 restart-gateways   # rolling restart"
    say "  Ctrl-C stops everything."
}

# Stop in dependency order: the LB (no new connections), the gateways (they drain their
# clients in parallel), the worker, Redis last.
STOPPED=""
stop_all() {
    local i pids=() n
    [[ -z "$STOPPED" ]] || return 0
    STOPPED=1
    trap '' INT TERM
    note "stopping"
    stop_one lb
    n="$(gateway_count)"
    for ((i = 1; i <= n; i++)); do
        stop_one "gateway-$i" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    stop_one worker
    stop_one redis
    rm -f "$STATE/cluster.pid" "$STATE/ready" "$STATE/lb-backends" "$STATE/restart.request"
    note "stopped"
}

cmd_start() {
    configure
    default_stop_seconds
    mkdir -p "$STATE/logs"
    local existing
    existing="$(pid_of cluster)"
    if [[ -n "$existing" ]] && ours "$existing" cluster.sh; then
        die "a cluster already runs from $STATE (cluster.sh pid $existing); '$0 stop' it first"
    fi
    local port
    for port in "$LB_PORT" "$WORKER_PORT" "$REDIS_PORT" ${GATEWAY_PORTS//,/ }; do
        ! port_in_use "$port" || die "port $port is in use (choose another GEOPUSH_LOCAL_BASE_PORT)"
    done
    rm -f "$STATE/ready" "$STATE/lb-backends" "$STATE/restart.request" "$STATE/restart.result"
    echo $$ >"$STATE/cluster.pid"
    write_cluster_env
    trap 'stop_all; exit 0' INT TERM
    trap 'stop_all' EXIT
    # restart-gateways asks with SIGUSR1; the loop below serves it.
    RESTART_REQUESTED=""
    trap 'RESTART_REQUESTED=1' USR1

    note "redis-server on $REDIS_PORT"
    start_redis
    local i n
    n="$(gateway_count)"
    for ((i = 1; i <= n; i++)); do
        note "gateway gw-$i on $(gateway_port "$i")"
        start_gateway "$i"
    done
    note "worker on $WORKER_PORT"
    start_worker
    note "load balancer on $LB_PORT"
    start_lb
    for ((i = 1; i <= n; i++)); do wait_gateway_ready "$i" || exit 1; done
    wait_until 30 "the worker's /readyz" ready_200 "$WORKER_PORT" ||
        die "the worker never got ready; see $STATE/logs/worker.log"
    print_urls
    date -u +%FT%TZ >"$STATE/ready"

    # Supervise: `wait` on a background sleep lets the INT/TERM/USR1 traps run at once. A
    # process that dies on its own is reported, not restarted.
    local reported="" name
    while true; do
        sleep 1 &
        wait $! || true
        if [[ -n "$RESTART_REQUESTED" ]]; then
            RESTART_REQUESTED=""
            serve_restart_request
            reported=""
        fi
        for name in redis worker lb $(gateway_names); do
            if ! alive "$(pid_of "$name")" && [[ " $reported " != *" $name "* ]]; then
                note "$name exited; see $STATE/logs/"
                reported+=" $name"
            fi
        done
    done
}

gateway_names() {
    local i
    for ((i = 1; i <= $(gateway_count); i++)); do echo "gateway-$i"; done
}

# In the supervisor: run the rolling restart asked for in restart.request, answer in
# restart.result ("<id> ok" or "<id> failed"), log the steps to logs/restart.log too.
serve_restart_request() {
    local id outcome=ok
    id="$(cat "$STATE/restart.request" 2>/dev/null || true)"
    [[ -n "$id" ]] || return 0
    # Served already (a repeated signal).
    [[ "$(cut -d' ' -f1 "$STATE/restart.result" 2>/dev/null)" != "$id" ]] || return 0
    NOTE_LOG="$STATE/logs/restart.log"
    rolling_restart || outcome=failed
    NOTE_LOG=""
    echo "$id $outcome" >"$STATE/restart.result.tmp"
    mv "$STATE/restart.result.tmp" "$STATE/restart.result"
}

# Gateways one at a time: SIGTERM, wait for the exit (the drain), start on the same port,
# wait until it is ready and the LB sees it, next.
rolling_restart() {
    local i n pid
    n="$(gateway_count)"
    for ((i = 1; i <= n; i++)); do
        pid="$(pid_of "gateway-$i")"
        note "gateway $i: SIGTERM to pid $pid, waiting for its drain"
        stop_one "gateway-$i"
        note "gateway $i: starting again on $(gateway_port "$i")"
        start_gateway "$i"
        wait_gateway_ready "$i" || return 1
        note "gateway $i: ready (pid $(pid_of "gateway-$i"))"
    done
    note "rolling restart done"
}

# Ask the running cluster's supervisor for a rolling restart and wait for its answer,
# printing its steps.
cmd_restart_gateways() {
    load_cluster_env
    local cluster_pid id answer="" waited=0 limit shown=0 total
    cluster_pid="$(pid_of cluster)"
    ours "$cluster_pid" cluster.sh || die "no running cluster in $STATE"
    [[ -f "$STATE/ready" ]] || die "the cluster in $STATE is not up yet"
    id="$$-$(date +%s%N)"
    touch "$STATE/logs/restart.log"
    shown="$(wc -l <"$STATE/logs/restart.log")"
    echo "$id" >"$STATE/restart.request"
    kill -USR1 "$cluster_pid"
    limit=$(( ($(gateway_count) * (STOP_SECONDS + 45)) * 10 ))
    while true; do
        total="$(wc -l <"$STATE/logs/restart.log")"
        if (( total > shown )); then
            tail -n +"$((shown + 1))" "$STATE/logs/restart.log" | head -n "$((total - shown))" >&2
            shown="$total"
        fi
        answer="$(cat "$STATE/restart.result" 2>/dev/null || true)"
        [[ "$answer" == "$id "* ]] && break
        ours "$cluster_pid" cluster.sh || die "the cluster stopped during the restart"
        (( waited < limit )) || die "no answer from the cluster (pid $cluster_pid) in $((limit / 10))s"
        sleep 0.1
        waited=$((waited + 1))
    done
    [[ "$answer" == "$id ok" ]] || die "rolling restart failed; see $STATE/logs/"
}

cmd_status() {
    load_cluster_env
    local name pid
    for name in cluster redis $(gateway_names) worker lb; do
        pid="$(pid_of "$name")"
        if [[ -n "$pid" ]] && ours "$pid" "$(signature "$name")"; then
            say "$name pid $pid running"
        else
            say "$name not running"
        fi
    done
    say "LB ws://127.0.0.1:$LB_PORT/v1/ws, gateways $GATEWAY_PORTS, worker $WORKER_PORT, redis $REDIS_PORT"
    [[ -f "$STATE/lb-backends" ]] && sed 's/^/lb backend /' "$STATE/lb-backends"
    return 0
}

cmd_stop() {
    load_cluster_env
    local pid waited=0
    pid="$(pid_of cluster)"
    ours "$pid" cluster.sh || die "no running cluster in $STATE"
    kill -TERM "$pid"
    while alive "$pid"; do
        if (( waited >= (STOP_SECONDS * 3 + 10) * 10 )); then
            die "cluster.sh (pid $pid) did not stop"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

case "$COMMAND" in
    start) cmd_start ;;
    restart-gateways) cmd_restart_gateways ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    -h | --help | help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0" ;;
    *) die "unknown command $COMMAND (start, restart-gateways, status, stop)" ;;
esac
