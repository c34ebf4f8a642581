"""server/replay.py: the clock window, the replay cache, its bound, and the restart rule."""

from __future__ import annotations

import pytest

from server.replay import Replayed, ReplayFilter


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_client_init_passes_once() -> None:
    clock = Clock(1000.0)
    replay = ReplayFilter(window=60, clock=clock)
    replay.check(b"r" * 32, 1_000_000)
    with pytest.raises(Replayed, match="replayed"):
        replay.check(b"r" * 32, 1_000_000)
    replay.check(b"s" * 32, 1_000_000)


@pytest.mark.parametrize("skew", [-61, 61, -3600, 10**6])
def test_stale_or_future_client_inits_are_refused(skew: float) -> None:
    replay = ReplayFilter(window=60, clock=Clock(1000.0))
    with pytest.raises(Replayed, match="clock differs"):
        replay.check(b"r" * 32, int((1000.0 + skew) * 1000))


def test_entries_are_forgotten_once_the_window_has_passed() -> None:
    clock = Clock(1000.0)
    replay = ReplayFilter(window=60, capacity=2, clock=clock)
    replay.check(b"a" * 32, 1_000_000)
    replay.check(b"b" * 32, 1_000_000)
    with pytest.raises(Replayed, match="full"):
        replay.check(b"c" * 32, 1_000_000)
    clock.now += 121  # both are now too old to pass the window: forgotten
    replay.check(b"c" * 32, int(clock.now * 1000))


def test_early_data_waits_while_a_recording_from_before_the_start_could_pass() -> None:
    clock = Clock(5000.0)
    replay = ReplayFilter(window=60, clock=clock)
    assert replay.must_defer(int(4990.0 * 1000))  # recorded before the restart
    assert replay.must_defer(int(4999.999 * 1000))
    assert not replay.must_defer(int(5000.0 * 1000))  # made since: the cache has seen it
