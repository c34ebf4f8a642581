"""Each platform branch of utils/platform_support.py, reached by deleting the feature it tests."""

from __future__ import annotations

import logging
import os
import signal
import socket
import socketserver
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from utils import cli
from utils import platform_support as ps
from utils.base import ProxyServer
from utils.config import Whitelist

# --- files -----------------------------------------------------------------------------------


def test_set_file_mode_uses_fchmod_where_present(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        ps.set_file_mode(fd, path, 0o600)
    finally:
        os.close(fd)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_set_file_mode_falls_back_to_chmod_without_fchmod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "fchmod")
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        ps.set_file_mode(fd, path, 0o640)
    finally:
        os.close(fd)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_posix_permissions_follow_geteuid(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ps.has_posix_permissions()
    monkeypatch.delattr(os, "geteuid")
    assert not ps.has_posix_permissions()


def test_o_nonblock_is_the_os_value_here() -> None:
    assert ps.O_NONBLOCK == os.O_NONBLOCK
    assert ps.O_BINARY == 0  # POSIX has no text mode


# --- signals ---------------------------------------------------------------------------------


def test_optional_signal_present_and_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ps.optional_signal("SIGHUP") == signal.SIGHUP
    monkeypatch.delattr(signal, "SIGHUP")
    assert ps.optional_signal("SIGHUP") is None


def test_stop_signals_add_sigbreak_where_it_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ps.stop_signals() == (signal.SIGINT, signal.SIGTERM)
    monkeypatch.setattr(signal, "SIGBREAK", 21, raising=False)
    assert ps.stop_signals() == (signal.SIGINT, signal.SIGTERM, 21)


# --- open-file limit -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "limit", "allowed"),
    [
        (1024, None, 1024),  # no limit to respect (Windows)
        (1024, 1_048_576, 1024),
        (1024, 256, (256 - 32) // 3),  # the macOS default: 74 connections
        (1024, 1024, (1024 - 32) // 3),
        (10, 40, 2),
        (10, 10, 1),  # never below one
    ],
)
def test_connections_for_fd_limit(requested: int, limit: int | None, allowed: int) -> None:
    assert ps.connections_for_fd_limit(requested, limit) == allowed


@dataclass(frozen=True)
class _Config:
    max_connections: int


def test_within_fd_limit_clamps_and_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cli, "open_file_limit", lambda: 256)
    caplog.set_level(logging.WARNING, "sockproxy")
    clamped = cli.within_fd_limit(_Config(1024))  # type: ignore[type-var]
    assert clamped == _Config(74)
    assert caplog.messages == [
        "max_connections lowered from 1024 to 74: the open-file limit is 256 "
        "(3 per connection plus 32); raise it with ulimit -n"
    ]


def test_within_fd_limit_keeps_what_fits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cli, "open_file_limit", lambda: None)
    config = _Config(1024)
    assert cli.within_fd_limit(config) is config  # type: ignore[type-var]
    assert not caplog.messages


class _FakeResource:
    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int, refuse_above: int | None = None) -> None:
        self.limits = (soft, hard)
        self.refuse_above = refuse_above
        self.calls: list[tuple[int, int]] = []

    def getrlimit(self, _which: int) -> tuple[int, int]:
        return self.limits

    def setrlimit(self, _which: int, limits: tuple[int, int]) -> None:
        self.calls.append(limits)
        if self.refuse_above is not None and limits[0] > self.refuse_above:
            raise ValueError("not allowed")
        self.limits = limits


@pytest.mark.parametrize(
    ("soft", "hard", "refuse_above", "result"),
    [
        (1024, 524288, None, 524288),  # Linux: up to the hard limit
        (256, -1, 10240, 10240),  # macOS: unlimited hard, but at most kern.maxfilesperproc
        (256, -1, None, 65536),
        (256, 20000, 10240, 10240),
        (4096, 4096, None, 4096),  # nothing to raise
        (256, 1_000_000, 100, 256),  # every raise refused: the old limit stays
    ],
)
def test_raise_open_file_limit(
    monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, refuse_above: int | None, result: int
) -> None:
    fake = _FakeResource(soft, hard, refuse_above)
    monkeypatch.setattr(ps, "_resource", lambda: fake)
    assert ps.raise_open_file_limit() == result
    assert all(call[1] == hard for call in fake.calls)  # the hard limit is never touched


def test_no_resource_module_means_no_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ps, "_resource", lambda: None)
    assert ps.raise_open_file_limit() is None
    assert ps.open_file_limit() is None


def test_real_limit_is_raised_to_the_hard_limit() -> None:
    import resource  # noqa: PLC0415

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        raised = ps.raise_open_file_limit()
        expected = hard if hard != resource.RLIM_INFINITY else ps._UNLIMITED_TARGET
        assert raised == expected
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- sockets ---------------------------------------------------------------------------------


def _listener(monkeypatch: pytest.MonkeyPatch, option: int | None) -> ProxyServer:
    import utils.base  # noqa: PLC0415

    monkeypatch.setattr(utils.base, "exclusive_bind_option", lambda: option)
    return ProxyServer(("127.0.0.1", 0), _NoHandler, Whitelist((), any=True), 4)


class _NoHandler(socketserver.BaseRequestHandler):  # never called: no client connects
    pass


def test_bind_reuses_address_on_posix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ps.exclusive_bind_option() is None  # Linux has no SO_EXCLUSIVEADDRUSE
    server = _listener(monkeypatch, None)
    try:
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    finally:
        server.server_close()


def test_bind_is_exclusive_where_the_option_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    # SO_KEEPALIVE stands in for SO_EXCLUSIVEADDRUSE: an option we can read back on Linux
    server = _listener(monkeypatch, socket.SO_KEEPALIVE)
    try:
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
    finally:
        server.server_close()


def test_exclusive_bind_option_is_read_from_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "SO_EXCLUSIVEADDRUSE", -5, raising=False)
    assert ps.exclusive_bind_option() == -5


def test_wait_readable_true_when_data_waits() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"x")
        assert ps.wait_readable(a, 5.0, None)


def test_wait_readable_false_on_timeout() -> None:
    a, b = socket.socketpair()
    with a, b:
        start = time.monotonic()
        assert not ps.wait_readable(a, 0.3, None)
        assert 0.25 <= time.monotonic() - start < 2.0


@pytest.mark.parametrize("kind", ["event", "callable"])
def test_wait_readable_wakes_on_stop(kind: str) -> None:
    a, b = socket.socketpair()
    event = threading.Event()
    stop: Any = event if kind == "event" else event.is_set
    threading.Timer(0.2, event.set).start()
    with a, b:
        start = time.monotonic()
        assert not ps.wait_readable(a, None, stop)
        assert time.monotonic() - start < 0.2 + 2 * ps._WAKE_INTERVAL + 0.5


def test_wait_readable_true_on_peer_close_and_own_close() -> None:
    a, b = socket.socketpair()
    b.close()
    with a:
        assert ps.wait_readable(a, 5.0, None)  # the read that follows sees EOF
    assert ps.wait_readable(a, 5.0, None)  # closed: the read that follows raises


def _udp_pair() -> tuple[socket.socket, socket.socket]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return receiver, sender


def test_recv_datagram_returns_datagram_and_none_on_timeout() -> None:
    receiver, sender = _udp_pair()
    with receiver, sender:
        receiver.settimeout(0.2)
        assert ps.recv_datagram(receiver, 100) is None
        sender.sendto(b"hello", receiver.getsockname())
        received = ps.recv_datagram(receiver, 100)
        assert received is not None
        assert received[0] == b"hello"
        assert received[1] == ("127.0.0.1", sender.getsockname()[1])


def test_recv_datagram_survives_an_icmp_error() -> None:
    # Linux reports an ICMP port unreachable on a connected UDP socket as ECONNREFUSED;
    # Windows reports it on any UDP socket as ConnectionResetError. Both are skipped.
    receiver, sender = _udp_pair()
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    gone = closed.getsockname()
    closed.close()
    with receiver, sender:
        receiver.settimeout(1.0)
        receiver.connect(gone)
        receiver.send(b"to nobody")
        time.sleep(0.1)
        assert ps.recv_datagram(receiver, 100) is None  # the error, swallowed


def test_recv_datagram_skips_connection_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    class Resetting:
        def recvfrom(self, _size: int) -> tuple[bytes, Any]:
            raise ConnectionResetError(10054, "WSAECONNRESET")

    assert ps.recv_datagram(Resetting(), 10) is None  # type: ignore[arg-type]


def test_wait_writable_now_or_within_a_timeout_or_until_stopped() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert ps.wait_writable(a)  # an empty send buffer: at once
        a.setblocking(False)
        while True:  # fill both buffers: no reader
            try:
                a.send(b"x" * 65536)
            except BlockingIOError:
                break
        assert not ps.wait_writable(a)
        start = time.monotonic()
        assert not ps.wait_writable(a, 0.3)
        assert 0.25 <= time.monotonic() - start < 2.0
        stop = threading.Event()
        threading.Timer(0.2, stop.set).start()
        start = time.monotonic()
        assert not ps.wait_writable(a, None, stop)
        assert time.monotonic() - start < 0.2 + 2 * ps._WAKE_INTERVAL + 0.5
        threading.Timer(0.2, lambda: b.recv(1 << 20)).start()
        assert ps.wait_writable(a, 5.0)  # the reader made room


def test_a_wait_is_sliced_only_when_a_stop_can_end_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """One wait for the whole timeout without a stop (an idle session wakes only when
    needed); 0.2 s slices with one (utils/test_client.py relies on them for Ctrl-C)."""
    waits: list[float | None] = []

    def nothing_comes(_sock: socket.socket, _events: int, seconds: float | None) -> bool:
        waits.append(seconds)
        time.sleep(seconds or 0.0)
        return False

    monkeypatch.setattr(ps, "_ready", nothing_comes)
    a, b = socket.socketpair()
    with a, b:
        assert not ps.wait_readable(a, 0.5, None)
        assert len(waits) == 1 and 0.4 < (waits[0] or 0) <= 0.5
        waits.clear()
        assert not ps.wait_readable(a, 0.5, lambda: False)
        assert len(waits) >= 2 and all(w is not None and w <= ps._WAKE_INTERVAL for w in waits)


def test_wait_edge_cases_zero_timeout_and_a_stop_set_before() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"x")
        assert ps.wait_readable(a, 0.0, None)  # ready: True even with no time to wait
        assert not ps.wait_readable(a, 5.0, lambda: True)  # stopped before: no wait at all
        assert ps.wait_writable(a, 0.0)
        assert not ps.wait_writable(a, -1.0, lambda: True)
