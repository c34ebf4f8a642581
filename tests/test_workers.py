"""The reusable worker pool: every task runs, none waits for a busy worker, idle ones expire."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from utils.workers import Completion, WorkerPool


def test_tasks_that_wait_for_each_other_never_deadlock() -> None:
    """A relay's two directions block on each other: the pool must run both at once."""
    pool = WorkerPool(keep_idle=1.0, max_idle=2)
    done = threading.Barrier(51, timeout=10)
    for _ in range(50):
        pool.submit(done.wait)
    done.wait()  # only passes if all 50 tasks run concurrently


def test_idle_workers_are_reused() -> None:
    pool = WorkerPool(keep_idle=5.0, max_idle=4)
    names: list[str] = []
    for _ in range(20):
        finished = threading.Event()

        def record(event: threading.Event = finished) -> None:
            names.append(threading.current_thread().name)
            event.set()

        pool.submit(record)
        assert finished.wait(5)
        time.sleep(0.01)  # let the worker get back to waiting
    assert len(set(names)) == 1


def test_idle_workers_expire_and_are_capped() -> None:
    pool = WorkerPool(keep_idle=0.3, max_idle=3)
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        started.release()
        release.wait(5)

    before = threading.active_count()
    for _ in range(10):
        pool.submit(hold)
    for _ in range(10):
        assert started.acquire(timeout=5)
    assert threading.active_count() >= before + 10
    release.set()
    deadline = time.monotonic() + 5
    while threading.active_count() > before + 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() <= before + 3  # at most max_idle stay...
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before  # ...and they leave after keep_idle


def test_a_failing_task_does_not_kill_the_worker() -> None:
    pool = WorkerPool(keep_idle=5.0, max_idle=1)
    ran = threading.Event()

    def fail() -> None:
        raise ValueError("boom")

    pool.submit(fail)
    time.sleep(0.05)
    pool.submit(ran.set)
    assert ran.wait(5)


def test_completion_joins() -> None:
    result: list[int] = []

    def slow() -> None:
        time.sleep(0.05)
        result.append(1)

    task = Completion(slow)
    task.join()
    assert result == [1]


def test_workers_leave_instead_of_parking_during_a_burst() -> None:
    """With many tasks running, a finished worker exits (its stack pages go back to the OS)."""
    pool = WorkerPool(keep_idle=5.0, max_idle=8, reuse_below=4)
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        started.release()
        release.wait(5)

    def quick() -> None:
        started.release()

    before = threading.active_count()
    for _ in range(6):
        pool.submit(hold)
    for _ in range(6):
        assert started.acquire(timeout=5)
    pool.submit(quick)  # runs and ends while 6 are busy: its worker must not park
    assert started.acquire(timeout=5)
    deadline = time.monotonic() + 5
    while threading.active_count() > before + 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before + 6
    release.set()


def test_the_reserve_is_started_ahead_and_never_expires() -> None:
    """prestart() parks ``reserve`` workers; they take tasks without a thread start and
    stay after keep_idle, while workers beyond the reserve leave."""
    pool = WorkerPool(keep_idle=0.2, max_idle=6, reserve=3)
    before = set(threading.enumerate())  # Thread objects: an ident may be reused
    pool.prestart()
    pool.prestart()  # the reserve is full already: no more threads
    reserve = set(threading.enumerate()) - before
    assert len(reserve) == 3
    release = threading.Event()
    started = threading.Semaphore(0)
    ran_on: list[threading.Thread] = []

    def hold() -> None:
        ran_on.append(threading.current_thread())
        started.release()
        release.wait(5)

    for _ in range(6):
        pool.submit(hold)
    for _ in range(6):
        assert started.acquire(timeout=5)
    assert reserve < set(ran_on)  # the first three ran on the reserve, three more on new threads
    extra = set(ran_on) - reserve
    assert len(extra) == 3
    release.set()
    deadline = time.monotonic() + 5  # keep_idle is 0.2 s: the extra ones leave soon
    while len((reserve | extra) & set(threading.enumerate())) > 3:
        assert time.monotonic() < deadline, "workers beyond the reserve did not leave"
        time.sleep(0.05)
    time.sleep(1.0)  # five times keep_idle more: the reserve stays
    assert len((reserve | extra) & set(threading.enumerate())) == 3


def test_a_refused_thread_start_leaves_the_reserve_short_not_miscounted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the system refuses a thread (pids or TasksMax), prestart keeps what it got and
    says so; every task submitted later still runs (none waits for a worker that was never
    started)."""
    pool = WorkerPool(keep_idle=5.0, max_idle=3, reserve=3)
    real_start = threading.Thread.start
    starts: list[int] = []

    def start_once(thread: threading.Thread) -> None:
        starts.append(1)
        if len(starts) > 1:
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_once)
    with caplog.at_level(logging.WARNING):
        pool.prestart()
    monkeypatch.setattr(threading.Thread, "start", real_start)
    assert "started 1 of 3 reserve worker threads" in caplog.text
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        started.release()
        release.wait(5)

    for _ in range(3):
        pool.submit(hold)
    for _ in range(3):
        assert started.acquire(timeout=5)  # one on the reserve's worker, two on new threads
    release.set()
