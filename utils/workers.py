"""Threads that are reused: one per connection and direction, without a pthread_create each.

Starting a thread costs 100-300 µs here (most of it with the GIL held, and the accept loop
waits for it), several times the rest of a resumed connection. Workers that finish a task
wait for the next one for a while before they exit, so a steady stream of connections runs
on the same threads, and a burst grows the pool as far as it needs: a task never waits for
a busy worker, so the two directions of a relay can never block each other. Workers park
only while few tasks run (``reuse_below``) and at most ``max_idle`` at a time: a parked
thread keeps its stack pages resident, an exiting one gives them back, which keeps the
memory of a 1,000-connection burst about 25 MB lower (measured with socksbench).
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
    """An elastic pool: reuse an idle worker if there is one, else start a new one."""

    def __init__(self, keep_idle: float = 2.0, max_idle: int = 8, reuse_below: int = 32) -> None:
        self._keep_idle = keep_idle
        self._max_idle = max_idle
        self._reuse_below = reuse_below
        self._lock = threading.Lock()
        self._idle = 0  # workers waiting, minus tasks already queued for them
        self._busy = 0  # workers running a task
        self._tasks: queue.SimpleQueue[Task] = queue.SimpleQueue()

    def submit(self, function: Callable[..., object], *args: Any) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                self._tasks.put((function, args))
                return
        threading.Thread(target=self._work, args=((function, args),), daemon=True).start()

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
        try:
            return self._tasks.get(timeout=self._keep_idle)
        except queue.Empty:
            with self._lock:
                # A task may have been queued for us between the timeout and the lock.
                try:
                    return self._tasks.get_nowait()
                except queue.Empty:
                    self._idle -= 1
                    return None


WORKERS = WorkerPool()


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
