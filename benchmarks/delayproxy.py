"""A TCP proxy that delays data by a fixed one-way time in each direction.

This kernel has no `netem`, so round-trip time is added in user space: every chunk
read from one side is written to the other side `delay` seconds after it arrived.
Both directions are delayed, so a request/response exchange costs one extra RTT
(2 × delay), and, with `connect_rtt`, a new connection's first request waits one more
RTT, as the TCP handshake would on a real link.

Limits (stated in RESULTS.md too): the proxy terminates TCP, so the client's own TCP
sees a short RTT. Slow start and the window/BDP behaviour of a long fat pipe are not
reproduced; request latency and serial round trips are. A bounded queue per
direction (`max_buffer`) keeps the proxy from buffering a whole blob when the
shaped link is slower than the upstream.

Run it (usually inside the registry's network namespace):

    python -m benchmarks.delayproxy --listen 10.213.7.2:5000 --upstream 127.0.0.1:5001 \
        --delay 0.010 --stats /tmp/proxy-stats.json

It writes its counters (bytes per direction, connections, its own CPU seconds) to
`--stats` twice a second and once more on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import signal
import socket
import sys
import threading
import time

RECV_SIZE = 64 * 1024


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.up = 0            # client -> upstream bytes
        self.down = 0          # upstream -> client bytes
        self.connections = 0
        self.active = 0

    def add(self, direction: str, n: int) -> None:
        with self.lock:
            if direction == "up":
                self.up += n
            else:
                self.down += n

    def snapshot(self) -> dict:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        with self.lock:
            return {"bytes_up": self.up, "bytes_down": self.down, "connections": self.connections,
                    "active": self.active, "cpu_user": ru.ru_utime, "cpu_sys": ru.ru_stime,
                    "cpu_seconds": ru.ru_utime + ru.ru_stime, "max_rss_kib": ru.ru_maxrss,
                    "time": time.time()}


def write_stats(path: str | None, stats: Stats) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(stats.snapshot(), f)
    os.replace(tmp, path)


class Direction:
    """One direction of one connection: a reader thread queues chunks, a writer thread releases them late."""

    def __init__(self, name: str, src: socket.socket, dst: socket.socket, delay: float, first_extra: float,
                 stats: Stats, max_chunks: int, done: threading.Event) -> None:
        self.name, self.src, self.dst, self.delay = name, src, dst, delay
        self.first_extra, self.stats, self.done = first_extra, stats, done
        self.q: queue.Queue[tuple[float, bytes] | None] = queue.Queue(maxsize=max_chunks)

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        extra = self.first_extra
        try:
            while True:
                data = self.src.recv(RECV_SIZE)
                if not data:
                    break
                self.q.put((time.monotonic() + self.delay + extra, data))
                extra = 0.0
        except OSError:
            pass
        self.q.put(None)

    def _write(self) -> None:
        try:
            while True:
                item = self.q.get()
                if item is None:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    break
                deadline, data = item
                wait = deadline - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
                self.stats.add(self.name, len(data))
        except OSError:
            # The peer went away: drop the connection both ways.
            for s in (self.src, self.dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            # Drain so the reader is never stuck on a full queue.
            while True:
                try:
                    if self.q.get(timeout=1) is None:
                        break
                except queue.Empty:
                    break
        finally:
            self.done.set()


def handle(client: socket.socket, upstream_addr: tuple[str, int], delay: float, connect_rtt: bool,
           stats: Stats, max_buffer: int) -> None:
    try:
        upstream = socket.create_connection(upstream_addr, timeout=10)
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with stats.lock:
        stats.connections += 1
        stats.active += 1
    max_chunks = max(1, max_buffer // RECV_SIZE)
    up_done, down_done = threading.Event(), threading.Event()
    Direction("up", client, upstream, delay, 2 * delay if connect_rtt else 0.0, stats, max_chunks, up_done).start()
    Direction("down", upstream, client, delay, 0.0, stats, max_chunks, down_done).start()
    up_done.wait()
    down_done.wait()
    client.close()
    upstream.close()
    with stats.lock:
        stats.active -= 1


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="host:port to accept on")
    p.add_argument("--upstream", required=True, help="host:port to forward to")
    p.add_argument("--delay", type=float, default=0.010, help="one-way delay per direction, seconds (default 0.010)")
    p.add_argument("--no-connect-rtt", dest="connect_rtt", action="store_false",
                   help="do not charge a new connection's first request an extra RTT for the handshake")
    p.add_argument("--max-buffer", type=int, default=4 << 20, help="bytes held per direction (default 4 MiB)")
    p.add_argument("--stats", help="file to write counters to (JSON)")
    args = p.parse_args(argv)

    stats = Stats()
    stop = threading.Event()

    def on_term(*_: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    listener = socket.create_server(parse_addr(args.listen), backlog=128, reuse_port=False)
    listener.settimeout(0.2)
    upstream = parse_addr(args.upstream)
    last_write = 0.0
    print(f"delayproxy {args.listen} -> {args.upstream}, one-way delay {args.delay * 1000:.1f} ms", flush=True)
    while not stop.is_set():
        try:
            client, _ = listener.accept()
            client.settimeout(None)
            threading.Thread(target=handle, args=(client, upstream, args.delay, args.connect_rtt, stats,
                                                  args.max_buffer), daemon=True).start()
        except TimeoutError:
            pass
        if time.monotonic() - last_write > 0.5:
            write_stats(args.stats, stats)
            last_write = time.monotonic()
    write_stats(args.stats, stats)
    listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
