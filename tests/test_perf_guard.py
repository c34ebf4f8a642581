"""Performance regression guard: fails only on gross slowdowns of the real programs.

Every bound is a ratio to a baseline measured in the same test on the same machine (a direct
loopback connection to the same target), never an absolute time, so a slow or busy CI
machine slows both sides alike. The bounds are far from today's figures (see the constants):
this catches a sleep or a per-byte Python loop sneaking into the hot path, not 20 %.

The real server.py and local.py run on free 127.0.0.1 ports with fresh 2048-bit keys.
"""

from __future__ import annotations

import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.peers import SockproxyPair, start_sockproxy
from bench.procs import Processes

TIMEOUT = 15.0
BULK_BYTES = 20_000_000
CHUNK = 256 * 1024
LENGTH = struct.Struct("!Q")

# Throughput through the proxy against a direct loopback connection. Today: about 1/10
# (250-420 MB/s against 3-5 GB/s on the project's 2-core VM, 1/9 to 1/16; 1/7 to 1/22 with
# two busy loops hogging both cores). Fails below 1/40.
MIN_THROUGHPUT_RATIO = 1 / 40
# The fastest of 20 resumed connections through the proxy (SOCKS5 greeting, CONNECT, channel
# handshake, 1-byte echo) against the fastest of 20 direct TCP connects + 1-byte echo. The
# fastest, not the median: under load from elsewhere a median swings (it reached 37 once with
# two busy loops on the 2 cores) while the fastest barely moves, and a slowdown that hits
# every connection moves it all the same. Today on the 2-core VM: 7.3-11 (8 runs), 8.2-14.8
# with two busy loops hogging both cores (8 runs). One sleep(0.01) per sealed record: 84-103.
MAX_CONNECT_RATIO = 60.0
CONNECTS = 20

Handler = Callable[[socket.socket], None]


class Target:
    """A thread-per-connection TCP server on 127.0.0.1 running ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._listener.close()


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def serve_source(conn: socket.socket) -> None:
    """Read a length, send that many bytes, then close."""
    (size,) = LENGTH.unpack(recv_exact(conn, LENGTH.size))
    block = memoryview(bytes(range(256)) * (CHUNK // 256))
    sent = 0
    while sent < size:
        n = min(CHUNK, size - sent)
        conn.sendall(block[:n])
        sent += n
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(4096):
        pass


def serve_sink(conn: socket.socket) -> None:
    """Read a length, then that many bytes; answer with the count received."""
    (size,) = LENGTH.unpack(recv_exact(conn, LENGTH.size))
    buffer = bytearray(CHUNK)
    count = 0
    while count < size:
        n = conn.recv_into(buffer, min(CHUNK, size - count))
        if n == 0:
            break
        count += n
    conn.sendall(LENGTH.pack(count))


def serve_echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


@pytest.fixture(scope="module")
def targets() -> Iterator[dict[str, Target]]:
    servers = {"source": Target(serve_source), "sink": Target(serve_sink)}
    servers["echo"] = Target(serve_echo)
    yield servers
    for server in servers.values():
        server.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SockproxyPair]:
    procs = Processes()
    workdir: Path = tmp_path_factory.mktemp("perf-guard")
    try:
        yield start_sockproxy(procs, workdir, bits=2048)
    finally:
        procs.stop_all()


def open_direct(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def open_via(proxy_port: int, port: int) -> socket.socket:
    """A SOCKS5 (no auth) CONNECT to 127.0.0.1:``port`` through the local."""
    sock = open_direct(proxy_port)
    try:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
        version, reply, _, atyp = recv_exact(sock, 4)
        assert (version, reply) == (5, 0), f"CONNECT refused: REP={reply}"
        recv_exact(sock, {1: 4, 4: 16}.get(atyp) or recv_exact(sock, 1)[0])
        recv_exact(sock, 2)
    except BaseException:
        sock.close()
        raise
    return sock


def download_seconds(opener: Callable[[int], socket.socket], port: int) -> float:
    sock = opener(port)
    try:
        buffer = bytearray(CHUNK)
        start = time.perf_counter()
        sock.sendall(LENGTH.pack(BULK_BYTES))
        count = 0
        while n := sock.recv_into(buffer):
            count += n
        elapsed = time.perf_counter() - start
    finally:
        sock.close()
    assert count == BULK_BYTES
    return elapsed


def upload_seconds(opener: Callable[[int], socket.socket], port: int) -> float:
    block = memoryview(bytes(range(256)) * (CHUNK // 256))
    sock = opener(port)
    try:
        start = time.perf_counter()
        sock.sendall(LENGTH.pack(BULK_BYTES))
        sent = 0
        while sent < BULK_BYTES:
            n = min(CHUNK, BULK_BYTES - sent)
            sock.sendall(block[:n])
            sent += n
        (count,) = LENGTH.unpack(recv_exact(sock, LENGTH.size))
        elapsed = time.perf_counter() - start
    finally:
        sock.close()
    assert count == BULK_BYTES
    return elapsed


def echo_once(opener: Callable[[int], socket.socket], port: int) -> float:
    start = time.perf_counter()
    sock = opener(port)
    try:
        sock.sendall(b"x")
        assert recv_exact(sock, 1) == b"x"
    finally:
        sock.close()
    return time.perf_counter() - start


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_throughput_is_not_grossly_below_direct_loopback(
    proxy: SockproxyPair, targets: dict[str, Target], direction: str
) -> None:
    measure, port = {
        "download": (download_seconds, targets["source"].port),
        "upload": (upload_seconds, targets["sink"].port),
    }[direction]

    def via(target_port: int) -> socket.socket:
        return open_via(proxy.local_port, target_port)

    # Best of 3 runs on each side, interleaved: a scheduling hiccup or a burst of load from
    # elsewhere on the machine must not decide the verdict.
    runs = [(measure(open_direct, port), measure(via, port)) for _ in range(3)]
    direct = min(d for d, _ in runs)
    proxied = min(p for _, p in runs)
    ratio = direct / proxied  # proxy throughput / direct throughput
    figures = (
        f"{direction}: proxy {BULK_BYTES / proxied / 1e6:.0f} MB/s, "
        f"direct {BULK_BYTES / direct / 1e6:.0f} MB/s, ratio 1/{1 / ratio:.1f}"
    )
    print(figures)
    assert ratio >= MIN_THROUGHPUT_RATIO, f"{figures}; must be at least 1/40"


def test_resumed_connect_is_not_grossly_slower_than_direct(
    proxy: SockproxyPair, targets: dict[str, Target]
) -> None:
    port = targets["echo"].port

    def via(target_port: int) -> socket.socket:
        return open_via(proxy.local_port, target_port)

    for _ in range(2):  # the first one does the full RSA handshake; the rest resume
        echo_once(via, port)
    # Interleaved, so that load from elsewhere on the machine falls on both sides alike.
    runs = [(echo_once(open_direct, port), echo_once(via, port)) for _ in range(CONNECTS)]
    direct = min(d for d, _ in runs)
    proxied = min(p for _, p in runs)
    ratio = proxied / direct
    medians = statistics.median(p for _, p in runs) / statistics.median(d for d, _ in runs)
    figures = (
        f"connect + 1-byte echo, fastest of {CONNECTS}: proxy {proxied * 1e3:.2f} ms, "
        f"direct {direct * 1e3:.3f} ms, ratio {ratio:.1f} (ratio of medians {medians:.1f})"
    )
    print(figures)
    assert ratio <= MAX_CONNECT_RATIO, f"{figures}; must be at most {MAX_CONNECT_RATIO:.0f}"
