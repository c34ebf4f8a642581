"""Threads that are reused: one per connection and direction, without a pthread_create each.

Starting a thread costs 100-300 µs here (most of it with the GIL held, and the accept loop
waits for it), several times the rest of a resumed connection. Workers that finish a task
wait for the next one for a while before they exit, so a steady stream of connections runs
on the same threads, and a burst grows the pool as far as it needs: a task never waits for
a busy worker, so the two directions of a relay can never block each other. Workers park
only while few tasks run (``reuse_below``) and at most ``max_idle`` at a time: a parked
thread keeps its stack pages resident, an exiting one gives them back, which keeps the
memory of a 1,000-connection burst about 25 MB lower (measured with socksbench). A reserve
of workers, started with the program, never expires: a page load after a quiet while finds
threads waiting. 32 cost about 540 kB of RSS; a burst of 16 new connections after 3 quiet
seconds (bench/connect_path.py --burst 16 --rounds 30, two interleaved runs each) then
finished its median connection in 35-37 ms instead of 38-41 and its slowest in 44-45
instead of 51-52. In a burst the reserve refills like any parking (only while few tasks
run), so 1,000 connections at once peak as before (socksbench: 124-156 MB, 138-155 without).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sockproxy")

Task = tuple[Callable[..., object], tuple[Any, ...]]


class WorkerPool:
    """An elastic pool: reuse an idle worker if there is one, else start a new one.

    ``reserve`` workers never expire (``prestart`` starts them), so the first connections
    of a burst (a page load: a dozen connections, two tasks each in each program) find
    threads waiting even after a quiet hour. At most ``max(max_idle, reserve)`` park; those
    beyond the reserve leave after ``keep_idle`` seconds (with WORKERS' sizes, 32 and 32,
    none is beyond it: the 32 that park stay).
    """

    def __init__(
        self,
        keep_idle: float = 2.0,
        max_idle: int = 8,
        reuse_below: int = 32,
        reserve: int = 0,
    ) -> None:
        self._keep_idle = keep_idle
        self._max_idle = max(max_idle, reserve)
        self._reuse_below = reuse_below
        self._reserve = reserve
        self._lock = threading.Lock()
        self._idle = 0  # workers waiting, minus tasks already queued for them
        self._busy = 0  # workers running a task
        self._tasks: queue.SimpleQueue[Task] = queue.SimpleQueue()

    def prestart(self) -> None:
        """Start the reserve's workers now (at program start), parked for the first tasks.
        If the system refuses threads, the program runs with fewer (a warning says so)."""
        with self._lock:
            missing = self._reserve - self._idle
        for started in range(max(missing, 0)):
            with self._lock:
                self._idle += 1  # counted before it runs: a task may be queued for it at once
            try:
                threading.Thread(target=self._park_first, daemon=True).start()
            except RuntimeError:
                with self._lock:
                    self._idle -= 1
                log.warning("started %d of %d reserve worker threads", started, missing)
                return

    def submit(self, function: Callable[..., object], *args: Any) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                self._tasks.put((function, args))
                return
        threading.Thread(target=self._work, args=((function, args),), daemon=True).start()

    def _park_first(self) -> None:
        self._work(self._wait_for_task())

    def _work(self, task: Task | None) -> None:
        while task is not None:
            function, args = task
            with self._lock:
                self._busy += 1
            try:
                function(*args)
            except Exception:
                log.exception("worker task failed")
            finally:
                with self._lock:
                    self._busy -= 1
            task = self._next_task()

    def _next_task(self) -> Task | None:
        with self._lock:
            # Reuse pays off for a steady trickle of connections. In a burst, a thread that
            # exits gives its stack pages back (glibc frees them), a parked one keeps them.
            if self._idle >= self._max_idle or self._busy >= self._reuse_below:
                return None
            self._idle += 1
        return self._wait_for_task()

    def _wait_for_task(self) -> Task | None:
        """Park (counted in ``_idle`` already) until a task comes, or leave after
        ``keep_idle`` unless the reserve needs this worker."""
        timeout: float | None = self._keep_idle
        while True:
            try:
                return self._tasks.get(timeout=timeout)
            except queue.Empty:
                with self._lock:
                    # A task may have been queued for us between the timeout and the lock.
                    try:
                        return self._tasks.get_nowait()
                    except queue.Empty:
                        if self._idle <= self._reserve:
                            # One of the reserve: wait without waking up every keep_idle
                            # (an idle local on a laptop should not wake for nothing).
                            timeout = None
                            continue
                        self._idle -= 1
                        return None


WORKERS = WorkerPool(reserve=32)


class Completion:
    """Run a task on the pool and wait for it, like Thread.start() and join()."""

    def __init__(self, function: Callable[..., object], *args: Any) -> None:
        self._done = threading.Event()
        WORKERS.submit(self._run, function, args)

    def _run(self, function: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            function(*args)
        finally:
            self._done.set()

    def join(self) -> None:
        self._done.wait()
