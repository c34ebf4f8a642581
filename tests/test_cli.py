"""utils/cli.py's signal loop on platforms without SIGHUP/SIGUSR1 and with SIGBREAK (Windows).

SIGBREAK cannot be sent on Linux, so SIGUSR2 stands in for it: the loop must take whatever
``signal.SIGBREAK`` names as a stop, and must not touch signals the platform lacks.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from utils import cli


class _FakeServer:
    """What serve() uses of a ProxyServer."""

    server_address = ("127.0.0.1", 1)

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        self._stopped.wait(30)

    def shutdown(self) -> None:
        self.calls.append("shutdown")
        self._stopped.set()

    def server_close(self) -> None:
        self.calls.append("close")

    def abort_all(self, reason: str) -> None:
        self.calls.append(f"abort: {reason}")

    def summary(self) -> list[str]:
        return []


@pytest.fixture
def saved_handlers() -> Iterator[None]:
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
    saved = {name: signal.getsignal(getattr(signal, name)) for name in names}
    yield
    for name, handler in saved.items():
        signal.signal(getattr(signal, name), handler)


def _serve_until(signum: int, server: Any) -> int:
    threading.Timer(0.3, os.kill, (os.getpid(), signum)).start()
    return cli.serve(server, None)


@pytest.mark.usefixtures("saved_handlers")
def test_sigbreak_stops_with_exit_0(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR2, raising=False)
    server = _FakeServer()
    caplog.set_level("INFO", "sockproxy")
    assert _serve_until(signal.SIGUSR2, server) == 0
    assert server.calls == ["shutdown", "close", "abort: shutting down"]
    assert "SIGUSR2: shutting down" in caplog.messages


@pytest.mark.usefixtures("saved_handlers")
def test_no_sighup_or_sigusr1_handlers_where_they_do_not_exist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hup, usr1 = signal.SIGHUP, signal.SIGUSR1
    signal.signal(hup, signal.SIG_DFL)
    signal.signal(usr1, signal.SIG_DFL)
    monkeypatch.delattr(signal, "SIGHUP")
    monkeypatch.delattr(signal, "SIGUSR1")
    assert _serve_until(signal.SIGINT, _FakeServer()) == 0
    assert signal.getsignal(hup) == signal.SIG_DFL
    assert signal.getsignal(usr1) == signal.SIG_DFL


def test_signal_wait_is_sliced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The main thread never waits without a timeout (Ctrl-C would not run on Windows)."""
    timeouts: list[float | None] = []

    class Recorder(queue.SimpleQueue[int]):
        def get(self, block: bool = True, timeout: float | None = None) -> int:
            timeouts.append(timeout)
            if len(timeouts) < 3:
                raise queue.Empty
            return 7

    assert cli._next_signal(Recorder()) == 7
    assert timeouts == [cli.SIGNAL_POLL] * 3
