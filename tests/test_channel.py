"""utils/channel.py's I/O on non-blocking sockets: at once when the socket is ready, one
wait (bounded, stoppable) when it is not, and never a partial send that looks whole."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from utils.channel import receive, receive_into, send_all, send_now


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


def test_receive_into_takes_what_waits_and_then_waits_for_more() -> None:
    a, b = _pair()
    with a, b:
        b.sendall(b"abc")
        buffer = bytearray(10)
        assert receive_into(a, buffer, 5.0) == 3
        assert buffer[:3] == b"abc"
        threading.Timer(0.2, b.sendall, args=(b"later",)).start()
        start = time.monotonic()
        assert receive_into(a, buffer, 5.0) == 5
        assert buffer[:5] == b"later"
        assert 0.1 < time.monotonic() - start < 3.0


def test_receive_into_times_out_and_sees_eof() -> None:
    a, b = _pair()
    with a:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            receive_into(a, bytearray(10), 0.3)
        assert 0.25 <= time.monotonic() - start < 2.0
        b.close()
        assert receive_into(a, bytearray(10), 5.0) == 0  # EOF, not a timeout


def test_receive_returns_data_eof_or_none() -> None:
    a, b = _pair()
    with a:
        assert receive(a, 10, 0.2) is None  # nothing came in time
        b.sendall(b"xy")
        assert receive(a, 10, 5.0) == b"xy"
        stop = threading.Event()
        threading.Timer(0.2, stop.set).start()
        start = time.monotonic()
        assert receive(a, 10, 30.0, stop) is None  # the stop ends the wait long before 30 s
        assert time.monotonic() - start < 2.0
        b.close()
        assert receive(a, 10, 5.0) == b""


def test_send_now_never_waits() -> None:
    """Into a socket nobody reads: what fits, then 0 (a wait would hang the thread)."""
    a, b = _pair()
    with a, b:
        totals: list[int] = []

        def fill() -> None:
            block, total = b"x" * 65536, 0
            while (sent := send_now(a, block)) > 0:
                total += sent
            totals.append(total)

        filler = threading.Thread(target=fill, daemon=True)
        filler.start()
        filler.join(5.0)
        assert not filler.is_alive(), "send_now waited on a full socket"
        assert totals and totals[0] > 0


def test_send_all_delivers_every_byte_to_a_slow_reader() -> None:
    a, b = _pair()
    data = bytes(range(256)) * 8192  # 2 MiB: many times the socket buffers
    received = bytearray()

    def read_slowly() -> None:
        while chunk := b.recv(65536):
            received.extend(chunk)
            time.sleep(0.001)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    progress: list[int] = []
    with a:
        send_all(a, data, 5.0, progress=lambda: progress.append(1))
        a.shutdown(socket.SHUT_WR)
        reader.join(10)
    b.close()
    assert bytes(received) == data
    assert len(progress) > 1  # each part the reader made room for counts as progress


def test_send_all_times_out_when_the_peer_never_reads_and_stops_on_request() -> None:
    a, b = _pair()
    with a, b:
        with pytest.raises(TimeoutError):
            send_all(a, b"x" * (8 << 20), 0.3)
        stop = threading.Event()
        threading.Timer(0.2, stop.set).start()
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            send_all(a, b"x" * (8 << 20), 30.0, stop)
        assert time.monotonic() - start < 2.0
