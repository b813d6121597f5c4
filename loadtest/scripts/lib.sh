# Shared by the benchmark scripts (sourced, not run): free ports, readiness, and stopping
# exactly the processes the script started (their PIDs in `pids`), on exit.

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
trap stop_all EXIT

wait_ready() { # PORT: wait (30 s at most) until /readyz answers 200
    for _ in $(seq 1 300); do
        curl -fsS "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "nothing ready on port $1 within 30 s" >&2
    return 1
}
