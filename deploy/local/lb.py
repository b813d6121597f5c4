#!/usr/bin/env python3
"""A loopback TCP load balancer for the local geopush cluster (deploy/local/cluster.sh).

Round robin over the backends that are up; a backend is up while `GET /readyz` answers 200
(checked every --check-interval seconds), so a draining gateway (readyz 503) gets no new
connections. A backend that refuses a connection is marked down at once and the next one
is tried. The bytes are piped as they are: a WebSocket is one long TCP connection, and when
a draining gateway closes it (1001), the client reconnects through here to another backend.

Python standard library only (asyncio): it runs wherever the test suite runs, with nothing
to build or install. It is for a developer machine and the tests, not for production (use
the Kubernetes Service there).

    lb.py --listen 127.0.0.1:18080 --backend 127.0.0.1:18081 --backend 127.0.0.1:18082 \
          [--check-path /readyz] [--check-interval 0.25] [--status-file FILE] [--parent-pid PID]

--status-file is rewritten (atomically) whenever a backend goes up or down: one line per
backend, `host:port up|down`. --parent-pid: exit when that process is gone (so the LB does
not outlive a cluster.sh that was killed with SIGKILL).
"""

import argparse
import asyncio
import os
import signal
import sys
import time

READ_CHUNK = 64 * 1024
CONNECT_TIMEOUT = 2.0
CHECK_TIMEOUT = 1.0


def log(message):
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f"{stamp} lb: {message}", file=sys.stderr, flush=True)


def parse_addr(text):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host, int(port)


class Backend:
    def __init__(self, host, port):
        self.host = host
        self.port = port
        # Unknown until the first check: try it (a refused connect marks it down).
        self.up = True
        self.connections = 0

    @property
    def name(self):
        return f"{self.host}:{self.port}"


class Balancer:
    def __init__(self, backends, check_path, check_interval, status_file):
        self.backends = backends
        self.check_path = check_path
        self.check_interval = check_interval
        self.status_file = status_file
        self.next = 0
        self.clients = set()
        self.accepted = 0
        self.refused = 0

    def candidates(self):
        """Backends in round-robin order starting after the last pick: up ones first, then
        the rest (one that is down by the last check may be back already)."""
        n = len(self.backends)
        order = [self.backends[(self.next + i) % n] for i in range(n)]
        self.next = (self.next + 1) % n
        return [b for b in order if b.up] + [b for b in order if not b.up]

    def set_up(self, backend, up, why):
        if backend.up != up:
            backend.up = up
            log(f"backend {backend.name} {'up' if up else 'down'} ({why})")
            self.write_status()

    def write_status(self):
        if not self.status_file:
            return
        tmp = f"{self.status_file}.tmp"
        with open(tmp, "w") as f:
            for b in self.backends:
                f.write(f"{b.name} {'up' if b.up else 'down'}\n")
        os.replace(tmp, self.status_file)

    async def check(self, backend):
        request = (
            f"GET {self.check_path} HTTP/1.1\r\nHost: {backend.name}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(backend.host, backend.port), CHECK_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError) as e:
            self.set_up(backend, False, f"check: {e.__class__.__name__}")
            return
        try:
            writer.write(request)
            status_line = await asyncio.wait_for(reader.readline(), CHECK_TIMEOUT)
            parts = status_line.split()
            ok = len(parts) >= 2 and parts[1] == b"200"
            self.set_up(
                backend, ok, f"{self.check_path} {parts[1].decode() if len(parts) >= 2 else '?'}"
            )
        except (OSError, asyncio.TimeoutError) as e:
            self.set_up(backend, False, f"check: {e.__class__.__name__}")
        finally:
            writer.close()

    async def check_loop(self):
        self.write_status()
        while True:
            await asyncio.gather(*(self.check(b) for b in self.backends))
            await asyncio.sleep(self.check_interval)

    async def handle(self, client_reader, client_writer):
        task = asyncio.current_task()
        self.clients.add(task)
        try:
            await self.proxy(client_reader, client_writer)
        finally:
            self.clients.discard(task)

    async def proxy(self, client_reader, client_writer):
        for backend in self.candidates():
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(backend.host, backend.port), CONNECT_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError) as e:
                self.set_up(backend, False, f"connect: {e.__class__.__name__}")
                continue
            break
        else:
            self.refused += 1
            log("no backend accepted the connection; closing it")
            client_writer.close()
            return
        self.accepted += 1
        backend.connections += 1
        try:
            await asyncio.gather(
                pipe(client_reader, up_writer), pipe(up_reader, client_writer)
            )
        finally:
            backend.connections -= 1
            for w in (up_writer, client_writer):
                w.close()


async def pipe(reader, writer):
    """Copy until EOF, then half-close the other side (a WebSocket close handshake may still
    flow the other way)."""
    try:
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        # A reset on one side ends both: closing the writers in `proxy` passes it on.
        writer.close()


async def watch_parent(pid, stop):
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log(f"parent {pid} is gone; stopping")
            stop.set()
            return
        except PermissionError:
            pass
        await asyncio.sleep(1.0)


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=parse_addr, required=True)
    parser.add_argument("--backend", type=parse_addr, action="append", required=True)
    parser.add_argument("--check-path", default="/readyz")
    parser.add_argument("--check-interval", type=float, default=0.25)
    parser.add_argument("--status-file")
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args()

    balancer = Balancer(
        [Backend(h, p) for h, p in args.backend],
        args.check_path,
        args.check_interval,
        args.status_file,
    )
    server = await asyncio.start_server(
        balancer.handle, args.listen[0], args.listen[1], reuse_address=True, backlog=1024
    )
    log(
        f"listening on {args.listen[0]}:{args.listen[1]}, backends "
        + ", ".join(b.name for b in balancer.backends)
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(balancer.check_loop())]
    if args.parent_pid:
        tasks.append(asyncio.create_task(watch_parent(args.parent_pid, stop)))
    await stop.wait()

    server.close()
    for task in tasks + list(balancer.clients):
        task.cancel()
    await asyncio.gather(*tasks, *balancer.clients, return_exceptions=True)
    log(f"stopped ({balancer.accepted} connections proxied, {balancer.refused} refused)")


if __name__ == "__main__":
    asyncio.run(main())
