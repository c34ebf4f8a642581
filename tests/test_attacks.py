"""Attacks on the real programs over loopback: tampering, replay, strangers and impostors.

A man-in-the-middle relay (tests/hardening_support.py) sits between a real local.py and a
real server.py and, in one phase and direction, flips a bit, drops, duplicates or reorders a
unit, or cuts the stream half-way through it. Whatever it does, the SOCKS client's connection
must close within a few seconds, and the destination and the client must have received only
a correct prefix of what was sent: never a wrong byte, and never a complete-looking transfer
(full length and a clean EOF) in a direction that was tampered with.

Every action meets every phase of both handshakes (full and resumed), the request and the
reply, a data record and the end-of-stream record. The 70 cases run concurrently on six
"lanes" (a relay, a local and a destination each; one server for all) in a module fixture,
since many wait out a handshake timeout; each parametrized test then checks its own case.
Each transfer goes both ways at once: the in-test destination sends a known download while
it records what it gets of a known upload.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pss

from tests.conftest import (
    Keys,
    Launcher,
    Program,
    TCPServer,
    read_to_end,
    socks_request,
    wait_for,
)
from tests.hardening_support import (
    ACTIONS,
    DOWNLOAD,
    L2S,
    S2L,
    UPLOAD,
    ClientOutcome,
    Exchange,
    Link,
    Received,
    Relay,
    StreamTamperer,
    Tamper,
    access_line_for,
    closed_without_answer,
    exchange,
    forged_client_messages,
    is_prefix,
    read_server_hello,
    rsa_operations,
)
from utils import handshake as hs
from utils.socks5 import Reply

HANDSHAKE_TIMEOUT = 3  # both programs, for the tampering lanes and the replays
CLOSE_LIMIT = 10.0  # "within a few seconds": the handshake timeout plus a loaded machine
LANES_PER_KIND = 3
GENERAL_FAILURE = b"\x05\x01\x00\x01" + bytes(6)


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Phase:
    """Where a case acts in each direction it covers, and which handshake it wants."""

    where: dict[str, str]  # direction -> Tamper phase (see hardening_support.Tamper)
    handshake: str  # "full", "resumed", or "any"
    lane: str = ""  # for "any": the kind of lane that runs it (the lanes share the work)

    @property
    def lane_kind(self) -> str:
        return self.lane or self.handshake


PHASES: dict[str, Phase] = {
    "server-hello/full": Phase({S2L: "hello"}, "full"),
    "server-hello/resumed": Phase({S2L: "hello"}, "resumed"),
    "client-handshake/full": Phase({L2S: "handshake"}, "full"),
    "client-handshake/resumed": Phase({L2S: "handshake"}, "resumed"),
    "server-handshake/full": Phase({S2L: "handshake"}, "full"),
    "server-handshake/resumed": Phase({S2L: "handshake"}, "resumed"),
    "request/full": Phase({L2S: "control"}, "full"),
    "request/resumed": Phase({L2S: "control"}, "resumed"),  # rides with ClientFinished
    "reply/full": Phase({S2L: "control"}, "full"),
    "reply/resumed": Phase({S2L: "control"}, "resumed"),
    "data": Phase({L2S: "data", S2L: "data"}, "any", lane="full"),
    # The sharpest case: every data byte arrived, only the end-of-stream record is touched.
    "end": Phase({L2S: "end", S2L: "end"}, "any", lane="resumed"),
}
HANDSHAKE_PHASES = ("server-hello", "client-handshake", "server-handshake")
CASES = [
    (phase, direction, action)
    for phase, spec in PHASES.items()
    for direction in spec.where
    for action in ACTIONS
]


def case_id(phase: str, direction: str, action: str) -> str:
    return f"{phase}-{direction}-{action}"


@dataclass
class Lane:
    kind: str  # "full": the local never resumes; "resumed": it does
    relay: Relay
    local: Program
    destination: Exchange


@dataclass
class CaseOutcome:
    client: ClientOutcome = field(default_factory=ClientOutcome)
    links: list[Link] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    all_closed: bool = False
    error: str = ""


def _settle(lane: Lane) -> None:
    """Wait until the lane's relay and destination have no connection in progress."""
    lane.relay.wait_idle(list(lane.relay.links), CLOSE_LIMIT)
    wait_for(lambda: all(r.finished.is_set() for r in lane.destination.received), CLOSE_LIMIT)


def _warm_up(lane: Lane) -> None:
    """One clean transfer, so the local holds a resumption ticket."""
    for _ in range(3):
        lane.relay.plan = None
        outcome = exchange(lane.local.port, lane.destination.port)
        _settle(lane)
        if outcome.downloaded == DOWNLOAD and outcome.ended == "eof":
            return
    raise AssertionError(f"warm-up transfer through lane {lane.kind} failed: {outcome}")


def _run_case(lane: Lane, phase: str, direction: str, action: str) -> CaseOutcome:
    result = CaseOutcome()
    try:
        if PHASES[phase].handshake == "resumed":
            _warm_up(lane)
        _settle(lane)
        links_before = len(lane.relay.links)
        received_before = len(lane.destination.received)
        seed = zlib.crc32(case_id(phase, direction, action).encode())
        lane.relay.plan = Tamper(direction, PHASES[phase].where[direction], action, seed)
        try:
            result.client = exchange(lane.local.port, lane.destination.port)
        finally:
            lane.relay.plan = None
        result.links = lane.relay.links[links_before:]
        closed = lane.relay.wait_idle(result.links, CLOSE_LIMIT)
        # Only this case's destination connection: one from an earlier case can still be
        # waiting in the listen queue when the case starts.
        result.received = [
            r
            for r in lane.destination.received[received_before:]
            if not result.client.bind_port or r.peer_port == result.client.bind_port
        ]
        done = wait_for(lambda: all(r.finished.is_set() for r in result.received), CLOSE_LIMIT)
        result.all_closed = closed and done
    except Exception as exc:  # reported by the case's own test
        result.error = f"{type(exc).__name__}: {exc}"
    return result


@pytest.fixture(scope="module")
def tamper_server(module_launcher: Launcher) -> Program:
    return module_launcher.server(handshake_timeout=HANDSHAKE_TIMEOUT, idle_timeout=20)


@pytest.fixture(scope="module")
def lanes(module_launcher: Launcher, tamper_server: Program) -> Iterator[list[Lane]]:
    made: list[Lane] = []
    try:
        for kind in ("full", "resumed") * LANES_PER_KIND:
            relay, destination = Relay(tamper_server.port), Exchange()
            local = module_launcher.local(
                relay.port,
                wait=False,
                handshake_timeout=HANDSHAKE_TIMEOUT,
                idle_timeout=20,
                resumption_lifetime=0 if kind == "full" else 3600,
            )
            made.append(Lane(kind, relay, local, destination))
        for lane in made:
            lane.local.wait_ready()
        yield made
    finally:
        for lane in made:
            lane.relay.close()
            lane.destination.close()


@pytest.fixture(scope="module")
def tamper_outcomes(lanes: list[Lane]) -> dict[str, CaseOutcome]:
    """Every case, run concurrently: one worker per lane takes cases of its kind."""
    work: dict[str, queue.SimpleQueue[tuple[str, str, str]]] = {
        "full": queue.SimpleQueue(),
        "resumed": queue.SimpleQueue(),
    }
    for case in CASES:
        work[PHASES[case[0]].lane_kind].put(case)
    outcomes: dict[str, CaseOutcome] = {}

    def worker(lane: Lane) -> None:
        while True:
            try:
                case = work[lane.kind].get_nowait()
            except queue.Empty:
                return
            outcomes[case_id(*case)] = _run_case(lane, *case)

    with ThreadPoolExecutor(len(lanes)) as pool:
        for future in [pool.submit(worker, lane) for lane in lanes]:
            future.result()
    return outcomes


@pytest.mark.parametrize(("phase", "direction", "action"), CASES, ids=[case_id(*c) for c in CASES])
def test_tampering_closes_and_delivers_only_a_correct_prefix(
    tamper_outcomes: dict[str, CaseOutcome], phase: str, direction: str, action: str
) -> None:
    outcome = tamper_outcomes[case_id(phase, direction, action)]
    assert not outcome.error
    client = outcome.client
    # The relay really met the phase it was to tamper with, on the wanted handshake.
    assert outcome.links, "the local never connected through the relay"
    first = outcome.links[0]
    assert first.seen, f"the relay never saw the target unit; client: {client}"
    wanted = {"full": hs.CLIENT_HELLO, "resumed": hs.RESUME_HELLO}.get(PHASES[phase].handshake)
    if wanted is not None and first.first_message_type is not None:  # if the local spoke
        assert first.first_message_type == wanted
    # The client's connection closed, soon; everything else closed too.
    assert client.ended in ("eof", "reset"), client
    assert client.seconds < CLOSE_LIMIT, client
    assert outcome.all_closed, "a relayed or destination connection stayed open"
    # Only correct prefixes arrived, anywhere.
    assert is_prefix(client.downloaded, DOWNLOAD), "the client received a wrong byte"
    for received in outcome.received:
        assert is_prefix(received.data, UPLOAD), "the destination received a wrong byte"
        assert received.ended in ("eof", "reset"), received
    if phase.split("/", maxsplit=1)[0] in HANDSHAKE_PHASES:
        # No data reaches the destination. A resumed local's request rides with its
        # ClientFinished, which the server checks before it connects: tampering with the
        # server's own messages after that cannot stop the connection, only the data.
        assert not any(r.data for r in outcome.received)
        if direction == L2S or PHASES[phase].handshake == "full":
            assert not outcome.received, "the server connected without a valid handshake"
    # Never a complete-looking transfer in the direction that was tampered with.
    if direction == S2L:
        assert not (client.downloaded == DOWNLOAD and client.ended == "eof"), client
    else:
        complete = [r for r in outcome.received if r.data == UPLOAD and r.ended == "eof"]
        assert not complete, "the destination got the whole upload and a clean EOF"
    # Once the tunnel carried data, the side that got tampered data is reset (docs/PROTOCOL.md
    # section 3), even when every data byte had arrived ("end").
    if phase in ("data", "end"):
        assert client.reply == 0
        if direction == S2L:
            assert client.ended == "reset", client
        else:
            assert [r.ended for r in outcome.received] == ["reset"], outcome.received


def test_a_clean_relay_delivers_everything(lanes: list[Lane]) -> None:
    """The control: with nothing tampered, the same transfer is complete both ways."""
    lane = lanes[0]
    _settle(lane)
    before = len(lane.destination.received)
    client = exchange(lane.local.port, lane.destination.port)
    assert (client.reply, client.downloaded, client.ended) == (0, DOWNLOAD, "eof")
    assert wait_for(lambda: len(lane.destination.received) > before, CLOSE_LIMIT)
    received = lane.destination.received[before]
    assert received.finished.wait(CLOSE_LIMIT)
    assert (bytes(received.data), received.ended) == (UPLOAD, "eof")


def _framed(*sizes: int) -> bytes:
    """Handshake messages of the given total sizes (length prefix included), random inside."""
    return b"".join((size - 2).to_bytes(2, "big") + os.urandom(size - 2) for size in sizes)


def _feed_bytewise(tamperer: StreamTamperer, stream: bytes) -> tuple[bytes, bool]:
    out = b""
    for byte in stream:
        piece, cut = tamperer.feed(bytes([byte]))
        out += piece
        if cut:
            return out, True
    return out, False


@pytest.mark.parametrize("action", ACTIONS)
def test_stream_tamperer_acts_on_exactly_one_unit(action: str) -> None:
    """The relay's own logic: fed one byte at a time, it changes only the target unit."""
    head = _framed(42, 32)  # ClientHello, ClientSignature
    request, data = os.urandom(98), os.urandom(2 * 1314)
    tamperer = StreamTamperer(L2S, Tamper(L2S, "control", action, seed=7), lambda: "full")
    out, cut = _feed_bytewise(tamperer, head + request + data)
    expected = {
        "drop": head + data,
        "duplicate": head + request + request + data,
        "reorder": head + data[:1314] + request + data[1314:],
        "truncate": head + request[:49],
    }
    assert tamperer.reached and tamperer.seen
    assert cut == (action == "truncate")
    if action == "flip":
        stream = head + request + data
        diff = [i for i in range(len(out)) if out[i] != stream[i]]
        assert len(out) == len(stream) and len(diff) == 1
        assert len(head) <= diff[0] < len(head) + 98
        assert bin(out[diff[0]] ^ stream[diff[0]]).count("1") == 1
    else:
        assert out == expected[action]


@pytest.mark.parametrize("action", ACTIONS)
def test_stream_tamperer_end_phase_acts_on_the_last_18_bytes(action: str) -> None:
    head, control = _framed(42, 32), os.urandom(98)
    data, end = os.urandom(1314), os.urandom(18)
    tamperer = StreamTamperer(L2S, Tamper(L2S, "end", action, seed=3), lambda: "full")
    out, cut = _feed_bytewise(tamperer, head + control + data + end)
    assert (out, cut) == (head + control + data[:-18], False)  # the tail waits for the EOF
    rest, cut = tamperer.finish()
    expected = {
        "drop": data[-18:],
        "duplicate": data[-18:] + end + end,
        "reorder": end + data[-18:],
        "truncate": data[-18:] + end[:9],
    }
    assert tamperer.reached and cut == (action == "truncate")
    if action == "flip":
        assert rest[:18] == data[-18:] and len(rest) == 36
        assert sum(bin(a ^ b).count("1") for a, b in zip(rest[18:], end, strict=True)) == 1
    else:
        assert rest == expected[action]


def test_stream_tamperer_waits_to_know_the_handshake_kind() -> None:
    """Server to local: the hello passes at once; the rest waits until the kind is known."""
    kind: list[str | None] = [None]
    hello, finished, reply = _framed(68), _framed(35), os.urandom(98)
    tamperer = StreamTamperer(S2L, Tamper(S2L, "control", "drop"), lambda: kind[0])
    assert tamperer.feed(hello + finished[:10]) == (hello, False)
    kind[0] = "resumed"  # ServerHello, ServerFinished, then the reply record
    assert tamperer.feed(finished[10:] + reply + b"rest") == (finished + b"rest", False)


# --------------------------------------------------------------------------- replay


class CountingEcho(TCPServer):
    """An echo destination; ``len(peers)`` counts the connections it got."""

    def __init__(self) -> None:
        super().__init__(self._echo)

    @staticmethod
    def _echo(conn: socket.socket, _peer: Any) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)


@dataclass
class Recorded:
    server: Program
    echo: CountingEcho
    full: Link
    resumed: Link


def _echo_session(local_port: int, echo_port: int) -> None:
    result = socks_request(local_port, "127.0.0.1", echo_port, timeout=10)
    with result.sock as sock:
        assert result.reply == Reply.SUCCEEDED
        payload = os.urandom(3000)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        echoed, ended = read_to_end(sock, result.rest)
    assert (echoed, ended) == (payload, "eof")


@pytest.fixture(scope="module")
def recorded(module_launcher: Launcher, tamper_server: Program) -> Iterator[Recorded]:
    """Two real sessions through a recording relay: a full handshake, then a resumed one."""
    relay = Relay(tamper_server.port)
    echo = CountingEcho()
    try:
        local = module_launcher.local(relay.port, handshake_timeout=HANDSHAKE_TIMEOUT)
        for _ in range(2):
            _echo_session(local.port, echo.port)
        assert relay.wait_idle(relay.links, CLOSE_LIMIT)
        full, resumed = relay.links
        assert full.first_message_type == hs.CLIENT_HELLO
        assert resumed.first_message_type == hs.RESUME_HELLO
        line = wait_for(
            lambda: access_line_for(tamper_server, resumed.upstream_port) is not None, 5
        )
        assert line, "no access line for the resumed session"
        assert "resumed" in (access_line_for(tamper_server, resumed.upstream_port) or "")
        assert "resumed" not in (access_line_for(tamper_server, full.upstream_port) or "resumed")
        yield Recorded(tamper_server, echo, full, resumed)
    finally:
        relay.close()
        echo.close()


def _replay(port: int, chunks: list[tuple[float, bytes]], timed: bool) -> tuple[int, bytes, str]:
    """Send a recorded local->server stream to the server; what came back and how it ended."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLOSE_LIMIT) as sock:
        source_port: int = sock.getsockname()[1]
        started = time.monotonic()
        try:
            if timed:
                for at, data in chunks:
                    time.sleep(max(0.0, started + at - time.monotonic()))
                    sock.sendall(data)
            else:
                sock.sendall(b"".join(data for _, data in chunks))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server hung up before the whole recording was sent
        answer, ended = read_to_end(sock)
        assert time.monotonic() - started < CLOSE_LIMIT
    return source_port, answer, ended


@pytest.mark.parametrize("timed", [False, True], ids=["byte-exact", "original-timing"])
@pytest.mark.parametrize("session", ["full", "resumed"])
def test_replayed_session_opens_nothing(recorded: Recorded, session: str, timed: bool) -> None:
    link = recorded.full if session == "full" else recorded.resumed
    connections = len(recorded.echo.peers)
    assert connections == 2  # the two recorded sessions, nothing else
    source_port, answer, ended = _replay(recorded.server.port, link.chunks[L2S], timed)
    # The server said its ServerHello (fresh nonce) and nothing else, then closed.
    assert answer[2] == hs.SERVER_HELLO and len(answer) == 2 + int.from_bytes(answer[:2], "big")
    assert answer != link.sent(S2L)[: len(answer)]
    assert ended in ("eof", "reset")
    reason = "signature does not verify" if session == "full" else "finished MAC does not verify"
    assert wait_for(lambda: access_line_for(recorded.server, source_port) is not None, 5)
    line = access_line_for(recorded.server, source_port) or ""
    assert line.endswith(f"outcome={reason}"), line
    time.sleep(0.2)  # a connection to the destination would have been made by now
    assert len(recorded.echo.peers) == connections


# --------------------------------------------------------------------------- strangers


@pytest.fixture(scope="module")
def key_server(module_launcher: Launcher) -> Program:
    """A server for the key tests alone: its RSA count moves only with their handshakes."""
    return module_launcher.server(handshake_timeout=5)


def _refused(local_port: int, destination: TCPServer) -> None:
    result = socks_request(local_port, "127.0.0.1", destination.port, timeout=CLOSE_LIMIT)
    with result.sock:
        assert result.raw == GENERAL_FAILURE
        assert closed_without_answer(result.sock)


def test_unauthorized_local_key_is_refused(
    launcher: Launcher, keys: Keys, key_server: Program, counting_listener: TCPServer
) -> None:
    local = launcher.local(key_server.port, local_private_key=keys.path("other_private"))
    _refused(local.port, counting_listener)
    assert wait_for(lambda: "outcome=unknown local key" in key_server.stderr(), 5)
    assert counting_listener.peers == []


def test_local_not_on_the_server_whitelist_is_refused(
    launcher: Launcher, counting_listener: TCPServer
) -> None:
    server, local = launcher.pair(server={"whitelist": ["10.0.0.0/8"]})
    before = rsa_operations(server)
    _refused(local.port, counting_listener)
    assert wait_for(lambda: "not on the whitelist" in server.stderr(), 5)
    assert counting_listener.peers == []
    assert rsa_operations(server) == before


def test_server_with_the_wrong_key_is_refused(
    launcher: Launcher, keys: Keys, counting_listener: TCPServer
) -> None:
    """server.py run with another private key poses as the real server."""
    server, local = launcher.pair(server={"server_private_key": keys.path("other_private")})
    _refused(local.port, counting_listener)
    assert counting_listener.peers == []
    assert wait_for(lambda: f"server 127.0.0.1:{server.port} failed" in local.stderr(), 5)


class Impostor(TCPServer):
    """A server that completes the handshake, but signs with a key that is not the server's."""

    def __init__(self, signer: RSA.RsaKey, local_public: RSA.RsaKey) -> None:
        self.after_handshake: list[tuple[bytes, str]] = []
        self._signer = signer
        self._local_public = local_public
        super().__init__(self._pose)

    def _pose(self, conn: socket.socket, _peer: Any) -> None:
        conn.settimeout(CLOSE_LIMIT)
        hello = bytes((hs.PROTOCOL_VERSION,)) + os.urandom(hs.SERVER_HELLO_SIZE - 1)
        transcript = hs.frame(hs.SERVER_HELLO, hello)
        conn.sendall(transcript)
        reader = hs.MessageReader()
        while (messages := reader.take(2)) is None:
            data = conn.recv(65536)
            if not data:
                return
            reader.feed(data)
        transcript += b"".join(m.wire for m in messages)
        sealed = hs._seal_share(
            self._local_public, hs.SERVER_SHARE_LABEL, os.urandom(32), os.urandom
        )
        key_message = hs.frame(hs.SERVER_KEY, os.urandom(hs.RANDOM_SIZE) + sealed)
        transcript += key_message
        digest = SHA256.new(hs.SERVER_SIGNATURE_LABEL + transcript)
        signature = hs.frame(hs.SERVER_SIGNATURE, bytes(pss.new(self._signer).sign(digest)))
        conn.sendall(key_message + signature)
        self.after_handshake.append(read_to_end(conn, reader.take_rest()))


def test_impostor_signing_with_another_key_gets_no_request(
    launcher: Launcher, keys: Keys, counting_listener: TCPServer
) -> None:
    other = _key(keys, "other_private")
    local_public = _key(keys, "local_public")
    impostor = Impostor(other, local_public)
    try:
        local = launcher.local(impostor.port, resumption_lifetime=0)
        _refused(local.port, counting_listener)
        assert wait_for(lambda: len(impostor.after_handshake) == 1, 5)
        # The local verified the signature, refused, and closed without a request record.
        assert impostor.after_handshake[0][0] == b""
        assert "signature does not verify" in local.stderr()
    finally:
        impostor.close()


def _key(keys: Keys, name: str) -> RSA.RsaKey:
    return RSA.import_key(Path(keys.path(name)).read_bytes())


def _forged_handshake(server: Program, keys: Keys) -> bool:
    """A client naming the authorized key's fingerprint but signing with another key."""
    signer = _key(keys, "other_private")
    claimed = _key(keys, "local_public")
    server_public = _key(keys, "server_public")
    with socket.create_connection(("127.0.0.1", server.port), timeout=CLOSE_LIMIT) as sock:
        hello = read_server_hello(sock)
        sock.sendall(forged_client_messages(hello, signer, claimed, server_public))
        return closed_without_answer(sock)


def test_strangers_cost_no_rsa_private_key_operation(
    launcher: Launcher, keys: Keys, key_server: Program, counting_listener: TCPServer
) -> None:
    good = launcher.local(key_server.port, wait=False, resumption_lifetime=0)
    stranger = launcher.local(
        key_server.port, wait=False, local_private_key=keys.path("other_private")
    )
    good.wait_ready()
    stranger.wait_ready()
    start = rsa_operations(key_server)
    # The counter works: a legitimate full handshake costs the server a decryption and a
    # signature.
    result = socks_request(good.port, "127.0.0.1", counting_listener.port, timeout=CLOSE_LIMIT)
    result.sock.close()
    assert result.reply == Reply.SUCCEEDED
    before = rsa_operations(key_server)
    assert before == start + 2
    unknown = key_server.stderr().count("outcome=unknown local key")
    forged = key_server.stderr().count("outcome=signature does not verify")
    for _ in range(20):
        _refused(stranger.port, counting_listener)
    for _ in range(20):
        assert _forged_handshake(key_server, keys)
    assert rsa_operations(key_server) == before
    assert wait_for(
        lambda: key_server.stderr().count("outcome=unknown local key") == unknown + 20, 5
    )
    assert wait_for(
        lambda: key_server.stderr().count("outcome=signature does not verify") == forged + 20, 5
    )
    assert len(counting_listener.peers) == 1  # the legitimate connection only
