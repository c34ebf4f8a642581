"""What a passive observer of the local <-> server link sees: random bytes, nothing shared.

1,000 client connections, each on a session of its own (``resumption_lifetime`` 0, so each
is a new TCP connection with a full handshake), pass a recording relay; the first 512 bytes
of each direction of each connection must look uniformly random position by position, and
no 12-byte string may appear twice anywhere in what was recorded (issue 11, item 2).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from tests.conftest import Launcher, TCPServer, read_to_end, socks_request

CONNECTIONS = 1000
PREFIX = 512
# Chi-square with 255 degrees of freedom has mean 255 and deviation 22.6: 380 lies 5.5
# deviations out (p ~ 1e-8 per position, ~1e-5 over the 1,024 positions tested).
CHI_SQUARE_LIMIT = 380.0
# With 1,000 samples a byte value is expected 3.9 times per position; 25 is beyond chance.
DOMINANT_COUNT = 25


class RecordingRelay:
    """Forwards every connection to ``upstream`` and keeps the first bytes of each way."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.captures: list[tuple[bytearray, bytearray]] = []
        self._lock = threading.Lock()
        self.server = TCPServer(self._relay, backlog=512)
        self.port = self.server.port

    def _relay(self, local: socket.socket, _peer: Any) -> None:
        capture = (bytearray(), bytearray())
        with self._lock:
            self.captures.append(capture)
        with socket.create_connection(("127.0.0.1", self.upstream), timeout=30) as server:
            up = threading.Thread(target=_pump, args=(local, server, capture[0]), daemon=True)
            up.start()
            _pump(server, local, capture[1])
            up.join(30)

    def close(self) -> None:
        self.server.close()


def _pump(source: socket.socket, sink: socket.socket, capture: bytearray) -> None:
    try:
        while data := source.recv(65536):
            if len(capture) < 4 * PREFIX:
                capture += data[: 4 * PREFIX - len(capture)]
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def chi_square_per_position(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(chi-square statistic, largest count) for each column of a (n, positions) uint8 array."""
    counts = np.zeros((samples.shape[1], 256), dtype=np.int64)
    for position in range(samples.shape[1]):
        counts[position] = np.bincount(samples[:, position], minlength=256)
    expected = samples.shape[0] / 256
    chi = ((counts - expected) ** 2 / expected).sum(axis=1)
    return chi, counts.max(axis=1)


def repeated_windows(streams: list[bytes], width: int = 12) -> int:
    """How many ``width``-byte windows occur more than once across all ``streams``."""
    windows = [
        np.lib.stride_tricks.sliding_window_view(np.frombuffer(s, np.uint8), width)
        for s in streams
        if len(s) >= width
    ]
    rows = np.ascontiguousarray(np.concatenate(windows)).view(f"V{width}").ravel()
    _, counts = np.unique(rows, return_counts=True)
    return int((counts > 1).sum())


def test_the_checks_catch_a_fixed_header() -> None:
    """A test that cannot fail is a defect: a v1-style fixed header fails both checks."""
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 256, size=(CONNECTIONS, 64), dtype=np.uint8)
    chi, top = chi_square_per_position(samples)
    assert chi.max() < CHI_SQUARE_LIMIT and top.max() < DOMINANT_COUNT
    samples[:, 2] = 1  # a version byte
    chi, top = chi_square_per_position(samples)
    assert chi[2] > CHI_SQUARE_LIMIT and top[2] == CONNECTIONS
    assert repeated_windows([bytes(samples[0]), bytes(samples[1])]) == 0
    assert repeated_windows([b"0123456789abX", b"Y0123456789ab"]) == 1


@pytest.fixture(scope="module")
def recorded(module_launcher: Launcher, echo_server: TCPServer) -> Iterator[RecordingRelay]:
    server = module_launcher.server()
    relay = RecordingRelay(server.port)
    try:
        local = module_launcher.local(relay.port, resumption_lifetime=0)

        def one(index: int) -> None:
            result = socks_request(local.port, "127.0.0.1", echo_server.port)
            with result.sock:
                message = f"ping {index}".encode()
                result.sock.sendall(message)
                result.sock.shutdown(socket.SHUT_WR)
                answer, ended = read_to_end(result.sock, result.rest)
            assert (answer, ended) == (message, "eof")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(CONNECTIONS)))
        yield relay
    finally:
        relay.close()


@pytest.mark.parametrize("direction", ["local to server", "server to local"])
def test_every_byte_position_looks_uniformly_random(
    recorded: RecordingRelay, direction: str
) -> None:
    side = 0 if direction == "local to server" else 1
    prefixes = [bytes(c[side][:PREFIX]) for c in recorded.captures if len(c[side]) >= PREFIX]
    assert len(prefixes) >= CONNECTIONS
    samples = np.frombuffer(b"".join(prefixes), np.uint8).reshape(len(prefixes), PREFIX)
    chi, top = chi_square_per_position(samples)
    print(
        f"\n{direction}: {len(prefixes)} connections, chi-square max {chi.max():.1f} "
        f"(mean {chi.mean():.1f}, limit {CHI_SQUARE_LIMIT}), most common value {top.max()}x"
    )
    assert chi.max() < CHI_SQUARE_LIMIT, (int(chi.argmax()), float(chi.max()))
    assert top.max() < DOMINANT_COUNT, (int(top.argmax()), int(top.max()))


def test_no_twelve_byte_string_repeats_between_connections(recorded: RecordingRelay) -> None:
    streams = [bytes(part) for capture in recorded.captures for part in capture]
    assert len(streams) >= 2 * CONNECTIONS
    assert repeated_windows(streams) == 0
