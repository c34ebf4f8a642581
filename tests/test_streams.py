"""Many client connections on one session: isolation, bursts, and fast open (issue 8)."""

from __future__ import annotations

import hashlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import (
    DataFiles,
    HTTPFiles,
    Launcher,
    TCPServer,
    free_port,
    read_to_end,
    run_curl,
    socks_request,
    wait_for,
)
from utils.socks5 import Reply

BLOCK = 1 << 16
SOURCE_SIZE = 366 * BLOCK  # 24 MB


class Source(TCPServer):
    """Sends SOURCE_SIZE pattern bytes to each connection and counts what the kernel took."""

    def __init__(self) -> None:
        self.sent: dict[int, int] = {}
        super().__init__(self._send)

    def _send(self, conn: socket.socket, peer: Any) -> None:
        block = pattern(BLOCK)
        self.sent[peer[1]] = 0
        for _ in range(SOURCE_SIZE // BLOCK):
            conn.sendall(block)
            self.sent[peer[1]] += len(block)
        conn.shutdown(socket.SHUT_WR)


def pattern(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def _session_count(log: str) -> int:
    return log.count(") opened")


@pytest.fixture(scope="module")
def pair(module_launcher: Launcher) -> tuple[Any, Any]:
    return module_launcher.pair()


def test_connections_share_one_session(pair: tuple[Any, Any], http_files: HTTPFiles) -> None:
    server, local = pair
    url = f"http://127.0.0.1:{http_files.port}/small.bin"
    for _ in range(10):
        result = run_curl("--socks5-hostname", f"127.0.0.1:{local.port}", "-o", "/dev/null", url)
        assert result.returncode == 0, result.stderr
    assert _session_count(server.stderr()) == 1


def test_a_burst_of_fifty_rides_the_session(
    pair: tuple[Any, Any], http_files: HTTPFiles, data_files: DataFiles
) -> None:
    server, local = pair

    def fetch(_: int) -> bytes:
        result = socks_request(local.port, "127.0.0.1", http_files.port)
        with result.sock:
            result.sock.sendall(b"GET /small.bin HTTP/1.0\r\n\r\n")
            data, ended = read_to_end(result.sock, result.rest)
        assert ended == "eof"
        return data.split(b"\r\n\r\n", 1)[1]

    with ThreadPoolExecutor(50) as pool:
        bodies = list(pool.map(fetch, range(50)))
    assert all(body == data_files.small for body in bodies)
    assert _session_count(server.stderr()) == 1


def test_a_stalled_reader_stalls_only_its_own_stream(
    pair: tuple[Any, Any], http_files: HTTPFiles, data_files: DataFiles
) -> None:
    _, local = pair
    source = Source()
    try:
        stalled = socks_request(local.port, "127.0.0.1", source.port)
        first = stalled.rest + stalled.sock.recv(100_000)
        assert first  # the download has started; now this client stops reading
        # Meanwhile another client fetches 50 MB through the same session.
        url = f"http://127.0.0.1:{http_files.port}/big.bin"
        started = time.monotonic()
        result = run_curl("--socks5-hostname", f"127.0.0.1:{local.port}", url, timeout=60)
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256(result.stdout).hexdigest() == data_files.big_sha256
        # Back-pressure held: the stalled stream's source could not send everything.
        (sent,) = source.sent.values()
        assert sent < SOURCE_SIZE // 2, sent
        # The stalled client resumes and gets every byte, in order.
        with stalled.sock:
            rest, ended = read_to_end(stalled.sock, first)
        expected = pattern(BLOCK) * (SOURCE_SIZE // BLOCK)
        assert ended == "eof" and len(rest) == SOURCE_SIZE
        assert hashlib.sha256(rest).digest() == hashlib.sha256(expected).digest()
        print(f"50 MB beside a stalled stream: {elapsed:.2f} s")
    finally:
        source.close()


@pytest.fixture(scope="module")
def fast(module_launcher: Launcher) -> tuple[Any, Any]:
    return module_launcher.pair(local={"fast_open": True})


def test_fast_open_fetches_every_byte(
    fast: tuple[Any, Any], http_files: HTTPFiles, data_files: DataFiles
) -> None:
    _, local = fast
    for proxy in ("--socks5-hostname", "--proxy"):
        address = f"127.0.0.1:{local.port}"
        target = address if proxy == "--socks5-hostname" else f"http://{address}"
        extra = [] if proxy == "--socks5-hostname" else ["--proxytunnel"]
        result = run_curl(proxy, target, *extra, f"http://127.0.0.1:{http_files.port}/small.bin")
        assert result.returncode == 0, result.stderr
        assert result.stdout == data_files.small


def test_fast_open_answers_at_once_and_resets_on_a_refused_destination(
    fast: tuple[Any, Any],
) -> None:
    server, local = fast
    closed_port = free_port()
    result = socks_request(local.port, "127.0.0.1", closed_port)
    assert result.reply == Reply.SUCCEEDED  # fast open answers before the destination does
    with result.sock:
        result.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data, ended = read_to_end(result.sock, result.rest)
    assert (data, ended) == (b"", "reset")  # the refusal shows as a reset, never as an EOF
    assert wait_for(lambda: "connection_refused" in server.stderr(), 5)


def test_fast_open_resets_the_client_when_no_server_answers(module_launcher: Launcher) -> None:
    """The client was told "succeeded" before the local knew whether any server would take
    the request: when none does, the client must see a reset, never a clean-looking EOF."""
    local = module_launcher.local(free_port(), fast_open=True)
    try:
        result = socks_request(local.port, "127.0.0.1", free_port())
        assert result.reply == Reply.SUCCEEDED
        with result.sock:
            result.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert read_to_end(result.sock, result.rest) == (b"", "reset")
    finally:
        local.stop()


def test_fast_open_client_that_sends_nothing_first(
    fast: tuple[Any, Any], echo_server: TCPServer
) -> None:
    """A protocol where the server speaks first: the local waits only briefly for bytes."""
    _, local = fast
    result = socks_request(local.port, "127.0.0.1", echo_server.port)
    with result.sock:
        time.sleep(0.1)
        result.sock.sendall(b"late")
        assert result.sock.recv(4) == b"late"
        result.sock.shutdown(socket.SHUT_WR)
        assert read_to_end(result.sock) == (b"", "eof")
