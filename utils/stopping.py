"""How a tunnel runs and stops: what the TCP relay (utils/base.py) and the UDP association
(utils/association.py) share (threaded runtime).

A tunnel is a few workers that move bytes between a plain side and a stream of the
session. It ends in one of two ways. A clean stop: each worker returns at its next look.
An abort (an error, the idle timeout, a shutdown): the first reason wins, blocked readers
are woken and the stream is RESET, so that the peer sees the cut. Blocked reads time out
every POLL_INTERVAL to look; a tunnel is idle when nothing has moved either way for
``idle_timeout``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from utils.errors import SockproxyError
from utils.events import describe
from utils.session import Stream
from utils.workers import Completion

T = TypeVar("T")

POLL_INTERVAL = 0.5  # how often a blocked worker looks for a stop and the idle timeout
IDLE_TIMEOUT = "idle timeout"  # the reason of an abort for want of traffic


class Stopped(Exception):
    """The tunnel is stopping: the worker leaves without finishing its direction."""


class Tunnel:
    """Workers between a plain side and ``stream``: one stop, one abort, one idle timeout."""

    def __init__(self, stream: Stream, idle_timeout: float) -> None:
        self.stream = stream
        self.idle_timeout = idle_timeout
        self.to_channel = 0
        self.to_plain = 0
        self.failure: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._last_activity = time.monotonic()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self, main: Callable[[], None], *workers: Callable[[], None]) -> str | None:
        """Run ``workers`` on pooled threads and ``main`` here until each has returned.

        An error in one aborts the tunnel. Returns None on a clean end, else the reason of
        the abort.
        """
        tasks = [Completion(self._guard, work) for work in workers]
        self._guard(main)
        for task in tasks:  # each looks for a stop at least every POLL_INTERVAL
            task.join()
        return self.failure

    def stop(self) -> None:
        """A clean stop: each worker returns at its next look."""
        self._stopping.set()

    def abort(self, reason: str) -> None:
        """Stop at once and RESET the stream; the first reason wins (any thread may call
        it: a worker that failed, the idle timeout, a shutdown)."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
        self._stopping.set()
        self._interrupt()
        self.stream.abort(reason)

    def _interrupt(self) -> None:
        """Wake workers blocked outside the stream (the stream wakes its own readers)."""

    def touch(self) -> None:
        """Bytes moved: the idle clock starts again."""
        self._last_activity = time.monotonic()

    def check_idle(self) -> None:
        """Abort when nothing has moved either way for ``idle_timeout``."""
        if time.monotonic() - self._last_activity >= self.idle_timeout:
            self.abort(IDLE_TIMEOUT)

    def check_stopping(self) -> None:
        if self._stopping.is_set():
            raise Stopped

    def wait(self, read: Callable[[], T]) -> T:
        """What ``read`` returns; it raises TimeoutError after at most POLL_INTERVAL, and
        is tried again until the tunnel stops or idles out (then: Stopped)."""
        while True:
            self.check_stopping()
            try:
                return read()
            except TimeoutError:
                self.check_idle()

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Stopped:
            pass
        except (OSError, SockproxyError) as exc:
            if not self.stopping:  # once stopping, an error is only the echo of the stop
                self.abort(describe(exc))
        except BaseException as exc:
            self.abort(f"internal error ({type(exc).__name__})")
            raise
