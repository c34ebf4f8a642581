"""utils/replyfilter.py: the UDP reply filter is bounded like a NAT table (issue 12, item 3)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from client.tunnel import Connector
from tests.conftest import Launcher, wait_for
from tests.test_features import UDPServer, _reverse
from utils.channel import Deadline
from utils.config import load_local_config
from utils.replyfilter import ReplyFilter
from utils.session import Stream
from utils.socks5 import CMD_UDP_ASSOCIATE, Address, Reply, Request
from utils.udp import DatagramDecoder, encode_channel_datagram

UDP_REQUEST = Request(CMD_UDP_ASSOCIATE, Address("0.0.0.0", 0))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_answers_only_from_where_we_sent() -> None:
    peers = ReplyFilter(clock=Clock())
    peers.sent(("192.0.2.1", 53))
    assert peers.admits(("192.0.2.1", 53))
    assert not peers.admits(("192.0.2.1", 54))
    assert not peers.admits(("192.0.2.2", 53))


def test_quiet_entries_expire_and_sending_refreshes() -> None:
    clock = Clock()
    peers = ReplyFilter(lifetime=120.0, clock=clock)
    peers.sent(("192.0.2.1", 1))
    peers.sent(("192.0.2.2", 2))
    clock.now += 100
    peers.sent(("192.0.2.1", 1))  # refreshed by outbound traffic
    clock.now += 30
    assert peers.admits(("192.0.2.1", 1))
    assert not peers.admits(("192.0.2.2", 2))  # 130 s quiet: an answer is no longer let in
    peers.sent(("192.0.2.3", 3))
    assert len(peers) == 2  # and the expired entry is gone from memory


def test_the_cap_drops_the_least_recently_used_and_says_so_once() -> None:
    peers = ReplyFilter(capacity=3, clock=Clock())
    first_overflow = [peers.sent(("192.0.2.9", port)) for port in range(1, 11)]
    assert first_overflow == [False] * 3 + [True] + [False] * 6
    assert len(peers) == 3 and peers.evicted == 7
    assert [peers.admits(("192.0.2.9", p)) for p in (7, 8, 9, 10)] == [False, True, True, True]


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        ReplyFilter(capacity=0)
    with pytest.raises(ValueError):
        ReplyFilter(lifetime=0)


# --------------------------------------------------------------------------- the real server


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def _spray(stream: Stream, start: int, stop: int) -> None:
    """Datagrams to ``stop - start`` distinct loopback destinations (nothing answers them),
    800 to a record: the channel's flow control paces us, nothing is dropped."""
    batch = bytearray()
    for i in range(start, stop):  # LENGTH=8 | ATYP 1 | 127.x.y.z | port 9 | "x"
        batch += struct.pack(">HBIHc", 8, 1, 0x7F010000 + i, 9, b"x")
        if len(batch) >= 8000 or i == stop - 1:
            stream.send(bytes(batch), 60)
            batch.clear()


def _round_trip(stream: Stream, echo: UDPServer, token: bytes) -> None:
    """An echo through the association: every datagram sent before it was handled."""
    stream.send(encode_channel_datagram(Address("127.0.0.1", echo.port), token), 60)
    decoder = DatagramDecoder()
    deadline = Deadline(60)
    while True:
        try:
            received = b"".join(stream.receive(1.0))
            stream.consumed(len(received))
        except TimeoutError:  # the server is still busy with what we sent before
            deadline.remaining()
            continue
        for source, data in decoder.feed(received):
            if (source.port, data) == (echo.port, token[::-1]):
                return


def _close(stream: Stream) -> None:
    stream.abort("done")
    stream.close()


def test_one_association_to_100000_destinations_keeps_the_server_small(
    launcher: Launcher,
) -> None:
    """Driven like the local does (client.tunnel.Connector), datagrams packed 800 a record."""
    server = launcher.server()
    config = load_local_config(launcher.write_config("local", launcher.local_config(server.port)))
    stream, reply, _ = Connector(config).open(UDP_REQUEST, Deadline(10))
    assert reply == Reply.SUCCEEDED
    echo = UDPServer("127.0.0.1", _reverse)
    try:
        _spray(stream, 0, 20_000)  # past the cap: the table is as big as it gets
        _round_trip(stream, echo, b"warm")
        before = _rss_kib(server.proc.pid)
        _spray(stream, 20_000, 100_000)
        _round_trip(stream, echo, b"done")
        after = _rss_kib(server.proc.pid)
    finally:
        _close(stream)
        echo.close()
    print(f"server VmRSS: {before} KiB after 20,000 destinations, {after} KiB after 100,000")
    # Unbounded, 80,000 more destinations cost ~16 MB (about 200 bytes each).
    assert after - before < 4096, f"server RSS grew {before} -> {after} KiB"
    assert wait_for(lambda: "forgetting the oldest" in server.stderr(), 5)
    assert server.stderr().count("forgetting the oldest") == 1
