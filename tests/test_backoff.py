"""client/backoff.py: password guessing costs time, per source (issue 12, item 6)."""

from __future__ import annotations

import base64
import socket
import time

import pytest

from client.backoff import MAX_SOURCES, PasswordBackoff, check_after_backoff
from tests.conftest import Launcher, SocksRefused, socks_handshake
from utils.socks5 import METHOD_USERPASS

GOOD = ("alice", "correct horse battery staple")


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def test_delay_doubles_from_a_tenth_to_five_seconds() -> None:
    backoff = PasswordBackoff()
    assert [backoff.delay(n) for n in range(0, 9)] == [0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5, 5]
    assert backoff.delay(10_000) == 5


def test_each_failure_pushes_the_sources_next_check() -> None:
    clock = Clock()
    backoff = PasswordBackoff(clock=clock)
    assert backoff.reserve("a") == 0  # nothing known: at once
    backoff.failed("a")
    assert backoff.reserve("a") == pytest.approx(0.1)
    clock.now += 0.1
    backoff.failed("a")
    assert backoff.reserve("a") == pytest.approx(0.2)
    assert backoff.reserve("b") == 0  # another source is not slowed


def test_parallel_attempts_queue_behind_each_other() -> None:
    clock = Clock()
    backoff = PasswordBackoff(clock=clock)
    for _ in range(7):
        backoff.failed("a")  # delay now 5 s (capped)
    waits = [backoff.reserve("a") for _ in range(4)]
    assert waits == pytest.approx([5, 10, 15, 20])  # more connections buy no more guesses


def test_success_resets_and_quiet_sources_are_forgotten() -> None:
    clock = Clock()
    backoff = PasswordBackoff(forget_after=600, clock=clock)
    backoff.failed("a")
    backoff.succeeded("a")
    assert backoff.reserve("a") == 0
    for _ in range(5):
        backoff.failed("b")
    clock.now += 600
    assert backoff.reserve("b") == 0


def test_many_sources_keep_bounded_memory() -> None:
    backoff = PasswordBackoff(clock=Clock())
    for i in range(MAX_SOURCES + 50):
        backoff.failed(f"s{i}")
    assert len(backoff._sources) <= MAX_SOURCES


def test_a_wait_past_the_deadline_is_a_timeout_without_checking() -> None:
    backoff = PasswordBackoff(clock=Clock())
    for _ in range(7):
        backoff.failed("a")
    checked: list[bool] = []

    def check() -> bool:
        checked.append(True)
        return True

    with pytest.raises(TimeoutError):
        check_after_backoff(backoff, "a", check, remaining=lambda: 2.0)
    assert checked == []
    assert check_after_backoff(backoff, "b", check, remaining=lambda: 2.0) is True


# --------------------------------------------------------------------------- the real local


def _connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(15)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _socks_attempt(source: str, port: int, password: str) -> bool:
    with _connect_from(source, port) as sock:
        try:
            socks_handshake(sock, bytes((METHOD_USERPASS,)), (GOOD[0], password))
        except (SocksRefused, EOFError):
            return False
        return True


def _http_attempt(source: str, port: int, password: str) -> bytes:
    token = base64.b64encode(f"{GOOD[0]}:{password}".encode()).decode()
    with _connect_from(source, port) as sock:
        sock.sendall(
            f"CONNECT 127.0.0.1:9 HTTP/1.1\r\nProxy-Authorization: Basic {token}\r\n\r\n".encode()
        )
        return sock.recv(64)


def test_wrong_passwords_slow_their_source_only(launcher: Launcher) -> None:
    _, local = launcher.pair(
        local={
            "auth": True,
            "username": GOOD[0],
            "password": GOOD[1],
            "whitelist": ["127.0.0.0/8"],
        }
    )
    start = time.monotonic()
    results = [_socks_attempt("127.0.0.1", local.port, f"guess{n}") for n in range(5)]
    guessing = time.monotonic() - start
    assert results == [False] * 5
    assert guessing >= 1.4, f"5 wrong guesses took {guessing:.2f}s"  # 0.1 + 0.2 + 0.4 + 0.8

    start = time.monotonic()
    assert _socks_attempt("127.0.0.2", local.port, GOOD[1])  # another source: not slowed
    assert time.monotonic() - start < 0.5

    start = time.monotonic()  # HTTP Basic shares the back-off of the source
    assert _http_attempt("127.0.0.1", local.port, "guess5").startswith(b"HTTP/1.1 407 ")
    assert time.monotonic() - start >= 1.5  # the sixth failure of this source waits 1.6 s
