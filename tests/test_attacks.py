"""Attacks on the real programs over loopback: tampering, replay, probes, strangers, impostors.

A man-in-the-middle relay (tests/hardening_support.py) sits between a real local.py and a
real server.py and, in one unit of one direction, flips a bit, drops, duplicates or reorders
it, or cuts the stream half-way through it. Whatever it does, the SOCKS client's connection
must close within a few seconds, and the destination and the client must have received only
a correct prefix of what was sent: never a wrong byte, and never a complete-looking transfer
(full length and a clean EOF) in a direction that was tampered with before its end.

The units (protocol v2, docs/PROTOCOL.md): the ClientInit, the early OPEN inside it, the
ServerResponse, the server's first two records (the REPLY, then the first data record), a
data record, a WINDOW frame, the EOF frames and the sessions' end-of-stream records, in both
directions; and on a warm session (the next connection on a live session) the OPEN and the
REPLY records. The cases run concurrently on eight "lanes" (a relay and a local each: seven
make a session per connection, one keeps its session; one server for all; a destination per
case) in a module fixture, since many wait out a timeout; each parametrized test then checks
its own case.

Then: recorded sessions replayed (to the same server: silence; after a restart: a
ServerResponse but nothing acted on), the stranger's probes (no byte back, closed at
handshake_timeout whatever was sent), unauthorized keys and addresses, impostor servers, and
the cost of strangers in RSA private-key operations.
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
    BIG_DOWNLOAD,
    BIG_UPLOAD,
    CONTROL_RECORD_SIZE,
    DATA_RECORD_SIZE,
    DOWNLOAD,
    L2S,
    S2L,
    UPLOAD,
    ClientOutcome,
    Exchange,
    Layout,
    Link,
    Observer,
    Plan,
    Received,
    Relay,
    StreamTamperer,
    Tamper,
    client_init,
    closed_without_answer,
    exchange,
    forged_client_init,
    handshake_failure,
    is_prefix,
    probe,
    probe_table,
    rsa_operations,
    server_public,
    session_end,
    stranger_probes,
)
from utils import handshake as hs
from utils.crypto import RsaKey, rsa_sign, static_x25519
from utils.keys import fingerprint, fingerprint_bytes, load_private_key, load_public_key
from utils.mux import open_frame
from utils.socks5 import CMD_CONNECT, Address, Reply, Request, encode_tunnel_request

HANDSHAKE_TIMEOUT = 2  # both programs, for the tampering lanes
IDLE_TIMEOUT = 2  # both programs: a stream whose EOF was dropped ends this soon
CLOSE_LIMIT = 10.0  # "within a few seconds": the timeouts plus a loaded machine
COLD_LANES, WARM_LANES = 7, 1
GENERAL_FAILURE = b"\x05\x01\x00\x01" + bytes(6)
DATA_UNIT = 5  # the data record a "data" case acts on: five whole records get through first


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Spot:
    """Where a case acts in one direction: a unit (or a tail, see Tamper) of a transfer."""

    unit: int
    shape: str = "paced"  # "paced" both ways, a big "download" or a big "upload"
    tail: str = ""


@dataclass(frozen=True)
class Phase:
    where: dict[str, Spot]
    warm: bool = False  # on a live session (a warm lane), not on a new one
    split: bool = False  # the ClientInit is cut around its early data


PAYLOADS = {  # shape -> (download, upload, paced)
    "paced": (DOWNLOAD, UPLOAD, True),
    "download": (BIG_DOWNLOAD, b"", False),
    "upload": (b"", BIG_UPLOAD, False),
}
C, D = CONTROL_RECORD_SIZE, DATA_RECORD_SIZE
# The records after the opening message, per (warm, shape, direction); see Layout.
RECORDS: dict[tuple[bool, str, str], tuple[tuple[int, ...], int]] = {
    # (The local sends a PING after the ServerResponse only when the server defers the
    # early data, which it does only for ClientInits older than its start: not here.)
    (False, "paced", L2S): ((*[D] * 20,), 0),  # data
    (False, "paced", S2L): ((C, *[D] * 20), 0),  # REPLY, data
    (False, "download", L2S): ((), C),  # WINDOW, WINDOW, ..., EOF
    (False, "download", S2L): ((C,), 0),
    (False, "upload", L2S): ((), 0),
    (False, "upload", S2L): ((C,), C),  # REPLY, WINDOW, WINDOW, ..., EOF
    # OPEN, then for a reorder (the OPEN held back: no reply comes) the stream's RESET
    (True, "paced", L2S): ((C,), C),
    (True, "paced", S2L): ((C, *[D] * 20), 0),  # REPLY, data
}

PHASES: dict[str, Phase] = {
    "client-init": Phase({L2S: Spot(0)}),
    "early-open": Phase({L2S: Spot(1)}, split=True),  # the OPEN riding in the ClientInit
    "server-response": Phase({S2L: Spot(0)}),
    "server-record-1": Phase({S2L: Spot(1)}),  # the REPLY
    "server-record-2": Phase({S2L: Spot(2)}),  # the first data record
    "data": Phase({L2S: Spot(1 + DATA_UNIT), S2L: Spot(2 + DATA_UNIT)}),
    "window": Phase({L2S: Spot(1, "download"), S2L: Spot(2, "upload")}),
    "eof": Phase({L2S: Spot(1, tail="eof-at-fin"), S2L: Spot(2, tail="eof-at-quiet")}),
    "session-end": Phase(
        {L2S: Spot(1, tail="end-at-fin"), S2L: Spot(2, tail="end-after-peer-fin")}
    ),
    "warm-open": Phase({L2S: Spot(0)}, warm=True),
    "warm-reply": Phase({S2L: Spot(0)}, warm=True),
}
# The server sends its end-of-stream record last, after the local's: the record before it
# cannot be held back to swap them without stalling the stream ("eof" S2L covers it).
SKIPPED = {("session-end", S2L, "reorder")}
NO_CONNECTION = ("client-init", "early-open")  # the server never opens the ClientInit's request
NO_DATA = ("server-response", "server-record-1")  # the REPLY never arrives
CASES = [
    (phase, direction, action)
    for phase, spec in PHASES.items()
    for direction in spec.where
    for action in ACTIONS
    if (phase, direction, action) not in SKIPPED
]


def case_id(phase: str, direction: str, action: str) -> str:
    return f"{phase}-{direction}-{action}"


def layouts(phase: Phase, shape: str) -> dict[str, Layout]:
    opening = {L2S: "init-split" if phase.split else "init", S2L: "response"}
    made = {}
    for direction in (L2S, S2L):
        records, then = RECORDS.get((phase.warm, shape, direction), ((), 0))
        made[direction] = Layout("" if phase.warm else opening[direction], records, then)
    return made


@dataclass
class Lane:
    warm: bool  # the local keeps its session (a warm lane) or makes one per connection
    relay: Relay
    local: Program
    warm_up_destination: Exchange


@dataclass
class CaseOutcome:
    client: ClientOutcome = field(default_factory=ClientOutcome)
    client_done: float = 0.0  # time.monotonic() when the client's connection had ended
    links: list[Link] = field(default_factory=list)
    destination: Exchange | None = None  # the case's own
    local_session_failures: int = 0  # "session to ... ended: <why>" lines the case added
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""

    @property
    def received(self) -> list[Received]:
        return self.destination.received if self.destination else []

    def all_closed(self, warm: bool) -> bool:
        """Every relayed and destination connection of the case ended, soon after the
        client's (checked once all cases ran: the cases do not wait for it). A warm lane
        keeps the session its request went to after the tampered one died."""
        links = self.links[:1] if warm else self.links
        links_done = wait_for(lambda: all(link.finished.is_set() for link in links), 5)
        received_done = wait_for(lambda: all(r.finished.is_set() for r in self.received), 5)
        last = max((link.finished_at for link in links), default=self.client_done)
        return links_done and received_done and last - self.client_done < CLOSE_LIMIT


def _settle(lane: Lane) -> None:
    """Wait until the lane has no connection in progress (a warm lane keeps its session)."""
    lane.relay.wait_idle(list(lane.relay.links), CLOSE_LIMIT, live=1 if lane.warm else 0)
    received = lane.warm_up_destination.received
    wait_for(lambda: all(r.finished.is_set() for r in received), CLOSE_LIMIT)


def _warm_up(lane: Lane) -> Link:
    """One clean transfer, so the local holds a live session; that session's link."""
    outcome = ClientOutcome()
    for _ in range(3):
        _settle(lane)
        outcome = exchange(lane.local.port, lane.warm_up_destination.port)
        _settle(lane)
        live = lane.relay.live_links()
        if outcome.downloaded == DOWNLOAD and outcome.ended == "eof" and len(live) == 1:
            return live[0]
    raise AssertionError(f"warm-up transfer through a warm lane failed: {outcome}")


def _session_failures(lane: Lane) -> int:
    return lane.local.stderr().count(f"session to 127.0.0.1:{lane.relay.port} ended: ")


DESTINATIONS: list[Exchange] = []  # closed by the lanes fixture


def _run_case(
    lane: Lane, observer: Observer, phase: str, direction: str, action: str
) -> CaseOutcome:
    result = CaseOutcome(started_at=time.time())
    spec = PHASES[phase]
    spot = spec.where[direction]
    download, upload, paced = PAYLOADS[spot.shape]
    result.destination = destination = Exchange(download, paced)
    DESTINATIONS.append(destination)
    try:
        seed = zlib.crc32(case_id(phase, direction, action).encode())
        tamper = Tamper(direction, spot.unit, action, seed, spot.tail)
        plan = Plan(tamper, layouts(spec, spot.shape))
        armed: Link | None = _warm_up(lane) if spec.warm else None
        links_before = len(lane.relay.links)
        failures_before = _session_failures(lane)
        if armed is not None:
            armed.plan(plan, observer)
        else:
            lane.relay.plan = plan
        try:
            result.client = exchange(lane.local.port, destination.port, upload, paced)
            result.client_done = time.monotonic()
        finally:
            lane.relay.plan = None
        result.links = ([armed] if armed else []) + lane.relay.links[links_before:]
        if spot.tail.startswith("end") or armed is not None:
            # Counted in the lane's log, or the lane's next case needs a quiet session.
            lane.relay.wait_idle(result.links, CLOSE_LIMIT, live=1 if lane.warm else 0)
            if armed is not None:
                armed.finished.wait(CLOSE_LIMIT)
        if spot.tail == "end-after-peer-fin":  # the local logs it once it read the end
            wait_for(lambda: _session_failures(lane) > failures_before, CLOSE_LIMIT)
        result.local_session_failures = _session_failures(lane) - failures_before
        result.finished_at = time.time()
    except Exception as exc:  # reported by the case's own test
        result.error = f"{type(exc).__name__}: {exc}"
    return result


@dataclass
class TamperServer:
    program: Program
    started: float  # wall clock before it started: its replay filter started later


@pytest.fixture(scope="module")
def tamper_server(module_launcher: Launcher) -> TamperServer:
    started = time.time()
    program = module_launcher.server(handshake_timeout=HANDSHAKE_TIMEOUT, idle_timeout=IDLE_TIMEOUT)
    return TamperServer(program, started)


@pytest.fixture(scope="module")
def observer(keys: Keys) -> Observer:
    return Observer(static_x25519(load_private_key(Path(keys.path("server_private")))))


@pytest.fixture(scope="module")
def lanes(
    module_launcher: Launcher, tamper_server: TamperServer, observer: Observer
) -> Iterator[list[Lane]]:
    made: list[Lane] = []
    try:
        for warm in [False] * COLD_LANES + [True] * WARM_LANES:
            relay = Relay(tamper_server.program.port, observer)
            local = module_launcher.local(
                relay.port,
                wait=False,
                handshake_timeout=HANDSHAKE_TIMEOUT,
                idle_timeout=IDLE_TIMEOUT,
                resumption_lifetime=3600 if warm else 0,
            )
            made.append(Lane(warm, relay, local, Exchange()))
        for lane in made:
            lane.local.wait_ready()
        yield made
    finally:
        with ThreadPoolExecutor(16) as pool:  # SIGTERM side by side (each takes ~0.5 s)
            list(pool.map(lambda lane: lane.local.stop(), made))
        for lane in made:
            lane.relay.close()
            lane.warm_up_destination.close()
        with ThreadPoolExecutor(16) as pool:  # each waits for its accept loop's poll
            list(pool.map(Exchange.close, DESTINATIONS))


@pytest.fixture(scope="module")
def tamper_outcomes(lanes: list[Lane], observer: Observer) -> dict[str, CaseOutcome]:
    """Every case, run concurrently: one worker per lane takes cases of its kind."""
    work: dict[bool, queue.SimpleQueue[tuple[str, str, str]]] = {
        False: queue.SimpleQueue(),
        True: queue.SimpleQueue(),
    }
    for case in CASES:
        work[PHASES[case[0]].warm].put(case)
    outcomes: dict[str, CaseOutcome] = {}

    def worker(lane: Lane) -> None:
        while True:
            try:
                case = work[lane.warm].get_nowait()
            except queue.Empty:
                return
            outcomes[case_id(*case)] = _run_case(lane, observer, *case)

    with ThreadPoolExecutor(len(lanes)) as pool:
        for future in [pool.submit(worker, lane) for lane in lanes]:
            future.result()
    slowest = sorted(outcomes.items(), key=lambda kv: kv[1].started_at - kv[1].finished_at)
    print(
        "\nslowest cases:",
        ", ".join(f"{k} {v.finished_at - v.started_at:.1f}s" for k, v in slowest[:12]),
    )
    return outcomes


def _complete(client: ClientOutcome, download: bytes) -> bool:
    return client.downloaded == download and client.ended == "eof"


def _complete_uploads(received: list[Received], upload: bytes) -> list[Received]:
    return [r for r in received if bytes(r.data) == upload and r.ended == "eof"]


@pytest.mark.parametrize(("phase", "direction", "action"), CASES, ids=[case_id(*c) for c in CASES])
def test_tampering_closes_and_delivers_only_a_correct_prefix(
    tamper_outcomes: dict[str, CaseOutcome],
    tamper_server: TamperServer,
    phase: str,
    direction: str,
    action: str,
) -> None:
    outcome = tamper_outcomes[case_id(phase, direction, action)]
    assert not outcome.error
    spec, client = PHASES[phase], outcome.client
    spot = spec.where[direction]
    download, upload, _ = PAYLOADS[spot.shape]
    # The relay really met the unit it was to tamper with.
    assert outcome.links, "the local never connected through the relay"
    tampered = outcome.links[0]
    assert tampered.seen, f"the relay never saw the target unit; client: {client}"
    # The client's connection closed, soon; everything else closed too.
    assert client.ended in ("eof", "reset"), client
    assert client.seconds < CLOSE_LIMIT, client
    assert outcome.all_closed(spec.warm), "a relayed or destination connection stayed open"
    # Only correct prefixes arrived, anywhere.
    assert is_prefix(client.downloaded, download), "the client received a wrong byte"
    for received in outcome.received:
        assert is_prefix(received.data, upload), "the destination received a wrong byte"
        assert received.ended in ("eof", "reset"), received
    # Nothing is ever sent twice to a destination (a request asked again on a fresh
    # session carried no data the first time).
    assert sum(1 for r in outcome.received if r.data) <= 1, outcome.received
    # (A duplicated ClientInit is the genuine one first: the server may act on it.)
    if phase in NO_CONNECTION and not (phase == "client-init" and action == "duplicate"):
        assert not outcome.received, "the server acted on a ClientInit that was tampered with"
    if phase in NO_DATA:
        assert not any(r.data for r in outcome.received)
    if spec.warm:
        # The session died; a request asked again went to a fresh session, untampered.
        assert tampered.finished.is_set()
        if _complete(client, download):
            assert len(outcome.links) >= 2, "a complete transfer on the tampered session"
        return
    if phase == "session-end":
        # Every frame had arrived: the end of the session is what was cut, and noticed.
        if direction == L2S:
            why = session_end(tamper_server.program, tampered.upstream_port)
            assert why not in (None, "closed"), why
        else:
            assert outcome.local_session_failures >= 1
        return
    # Never a complete-looking transfer in the direction that was tampered with (a WINDOW
    # frame governs the other direction). A copy of the EOF record after the genuine one
    # cannot make the transfer wrong: the copy is refused, whichever the transfer saw first.
    if phase == "eof" and action == "duplicate":
        return
    governs_download = (direction == S2L) != (phase == "window")
    if governs_download:
        assert not _complete(client, download), client
    else:
        assert not _complete_uploads(outcome.received, upload)
    # Once the stream carried data, the side that got tampered data is reset.
    if phase in ("data", "window", "eof"):
        assert client.reply == 0
        if governs_download:
            assert client.ended == "reset", client
        else:
            assert [r.ended for r in outcome.received] == ["reset"], outcome.received


def _next_received(destination: Exchange, before: int) -> Received:
    assert wait_for(lambda: len(destination.received) > before, CLOSE_LIMIT)
    return destination.received[before]


def test_a_clean_relay_delivers_everything(lanes: list[Lane]) -> None:
    """The control: with nothing tampered, the same transfers are complete both ways."""
    for lane in (lanes[0], lanes[-1]):  # a new session, then a warm one
        for download, upload, paced in PAYLOADS.values():
            destination = Exchange(download, paced)
            try:
                client = exchange(lane.local.port, destination.port, upload, paced)
                assert (client.reply, client.downloaded == download, client.ended) == (
                    0,
                    True,
                    "eof",
                )
                received = _next_received(destination, 0)
                assert received.finished.wait(CLOSE_LIMIT)
                assert (bytes(received.data) == upload, received.ended) == (True, "eof")
            finally:
                destination.close()


# --------------------------------------------------------------------------- the tamperer alone


def _sizes(*sizes: int, then: int = 0) -> Any:
    def size_of(index: int, _stream: bytes) -> int | None:
        return sizes[index] if index < len(sizes) else (then or None)

    return size_of


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
    init, ping, data = os.urandom(420), os.urandom(98), os.urandom(2 * 1378)
    tamperer = StreamTamperer(Tamper(L2S, 1, action, seed=7), _sizes(420, 98, then=1378))
    out, cut = _feed_bytewise(tamperer, init + ping + data)
    expected = {
        "drop": init + data,
        "duplicate": init + ping + ping + data,
        "reorder": init + data[:1378] + ping + data[1378:],
        "truncate": init + ping[:49],
    }
    assert tamperer.reached and tamperer.seen
    assert cut == (action == "truncate")
    if action == "flip":
        stream = init + ping + data
        diff = [i for i in range(len(out)) if out[i] != stream[i]]
        assert len(out) == len(stream) and len(diff) == 1
        assert len(init) <= diff[0] < len(init) + 98
        assert bin(out[diff[0]] ^ stream[diff[0]]).count("1") == 1
    else:
        assert out == expected[action]


@pytest.mark.parametrize("action", ACTIONS)
def test_stream_tamperer_eof_at_fin_acts_on_the_record_before_the_end(action: str) -> None:
    head, data = os.urandom(500), os.urandom(1378)
    eof, end = os.urandom(98), os.urandom(18)
    tamperer = StreamTamperer(Tamper(L2S, 1, action, 3, "eof-at-fin"), _sizes(500, then=1378))
    out, cut = _feed_bytewise(tamperer, head + data + eof + end)
    assert (out, cut) == (head + data, False)  # the last 116 bytes wait for the FIN
    rest, cut = tamperer.finish()
    expected = {
        "drop": end,
        "duplicate": eof + eof + end,
        "reorder": end + eof,
        "truncate": eof[:49],
    }
    assert tamperer.reached and cut == (action == "truncate")
    if action == "flip":
        assert (
            rest[98:] == end
            and sum(bin(a ^ b).count("1") for a, b in zip(rest[:98], eof, strict=True)) == 1
        )
    else:
        assert rest == expected[action]


@pytest.mark.parametrize("action", ACTIONS)
def test_stream_tamperer_eof_at_quiet_acts_on_the_last_record_before_a_silence(
    action: str,
) -> None:
    head, data, eof, end = os.urandom(300), os.urandom(1378), os.urandom(98), os.urandom(18)
    tamperer = StreamTamperer(Tamper(S2L, 1, action, 5, "eof-at-quiet"), _sizes(300, then=1378))
    out, _ = _feed_bytewise(tamperer, head + data + eof)
    assert out == head + data  # the last 98 bytes are held
    rest, cut = tamperer.quiet()
    if action == "reorder":  # swapped with the end record, which comes before the FIN
        assert (rest, cut) == (b"", False)
        assert tamperer.feed(end) == (b"", False)
        rest, cut = tamperer.finish()
        assert rest == end + eof
        return
    assert cut == (action == "truncate")
    expected = {"drop": b"", "duplicate": eof + eof, "truncate": eof[:49]}
    if action == "flip":
        assert sum(bin(a ^ b).count("1") for a, b in zip(rest, eof, strict=True)) == 1
    else:
        assert rest == expected[action]
    assert tamperer.feed(end) == (end, False)  # done: the rest passes


def test_stream_tamperer_waits_for_the_size_of_the_opening_message() -> None:
    """Server to local: nothing of the target passes until its size can be told."""
    known: list[int | None] = [None]

    def size_of(index: int, _stream: bytes) -> int | None:
        return known[0] if index == 0 else 98

    response, record = os.urandom(400), os.urandom(98)
    tamperer = StreamTamperer(Tamper(S2L, 1, "drop"), size_of)
    assert tamperer.feed(response[:10]) == (response[:10], False)  # unit 0 passes
    known[0] = 400
    assert tamperer.feed(response[10:] + record + b"rest") == (response[10:] + b"rest", False)


def test_observer_cuts_a_real_client_init_and_response(keys: Keys) -> None:
    """The relay's sizes are the handshake's own: the whole messages, the early data."""
    server_key = load_private_key(Path(keys.path("server_private")))
    local_key = load_private_key(Path(keys.path("local_private")))
    observer = Observer(static_x25519(server_key))
    early = open_frame(1, b"\x01\x01\x7f\x00\x00\x01\x00\x50")
    client = hs.ClientHandshake(local_key, server_public(Path(keys.path("server_public"))))
    wire = client.create_client_init(early)
    assert observer.init_size(wire[: hs.INIT_HEAD_SIZE]) == len(wire)
    region = observer.early_region(wire)
    assert region is not None and region[1] == len(early)
    peers = {fingerprint_bytes(local_key): hs.AuthorizedPeer("alice", local_key.public_key())}
    server = hs.ServerHandshake(hs.server_secret(server_key), peers)
    assert server.consume_client_init(wire) is not None
    response = server.create_server_response()
    assert observer.response_size(wire, response + b"records") == len(response)


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


def _echo_session(local_port: int, echo_port: int) -> None:
    result = socks_request(local_port, "127.0.0.1", echo_port, timeout=10)
    with result.sock as sock:
        assert result.reply == Reply.SUCCEEDED
        payload = os.urandom(3000)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        echoed, ended = read_to_end(sock, result.rest)
    assert (echoed, ended) == (payload, "eof")


@dataclass
class Recorded:
    server: Program
    config: dict[str, Any]
    echo: CountingEcho
    session: Link  # one whole session: its ClientInit carried the request


PROBE_TIMEOUT = 1.5  # handshake_timeout of the servers the replays and probes meet
EARLY = 0.1  # a close this much before handshake_timeout is "early" (timer granularity)
LATE = 0.5  # ... and this much after it is "late"


def _record(launcher: Launcher, echo: CountingEcho) -> Recorded:
    config = launcher.server_config(handshake_timeout=PROBE_TIMEOUT)
    server = launcher.start("server.py", config, "server_port")
    server.wait_ready()
    relay = Relay(server.port)
    try:
        local = launcher.local(relay.port, resumption_lifetime=0)
        _echo_session(local.port, echo.port)
        assert relay.wait_idle(relay.links, CLOSE_LIMIT)
        assert len(relay.links) == 1 and len(echo.peers) == 1
    finally:
        relay.close()
    return Recorded(server, config, echo, relay.links[0])


@pytest.fixture(scope="module")
def recorded(module_launcher: Launcher) -> Iterator[Recorded]:
    echo = CountingEcho()
    try:
        yield _record(module_launcher, echo)
    finally:
        echo.close()


def _replay(port: int, chunks: list[tuple[float, bytes]], timed: bool) -> tuple[int, bytes, float]:
    """Send a recorded local->server stream to the server: (our port, the answer, when the
    server closed, counted from the connect)."""
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
        answer, _ = read_to_end(sock)
        return source_port, answer, time.monotonic() - started


def _refused_as(server: Program, port: int) -> str | None:
    """The server's reason for refusing the connection from ``port`` (once logged)."""
    wait_for(lambda: handshake_failure(server, port) is not None, 5)
    return handshake_failure(server, port)


REPLAYS = [
    (what, timed) for what in ("whole session", "ClientInit only") for timed in (False, True)
]


def test_replayed_sessions_get_silence_and_open_nothing(recorded: Recorded) -> None:
    """Byte-exact and with the original timing, the whole session or its ClientInit alone."""
    chunks = recorded.session.chunks[L2S]
    connections = len(recorded.echo.peers)

    def replay(case: tuple[str, bool]) -> tuple[int, bytes, float]:
        what, timed = case
        return _replay(
            recorded.server.port, chunks if what == "whole session" else chunks[:1], timed
        )

    with ThreadPoolExecutor(len(REPLAYS)) as pool:
        results = list(pool.map(replay, REPLAYS))
    for case, (port, answer, seconds) in zip(REPLAYS, results, strict=True):
        assert answer == b"", f"the server answered a replayed ClientInit ({case})"
        assert PROBE_TIMEOUT - EARLY <= seconds <= PROBE_TIMEOUT + LATE, (case, seconds)
        assert _refused_as(recorded.server, port) == "ClientInit replayed", case
    time.sleep(0.2)  # a connection to the destination would have been made by now
    assert len(recorded.echo.peers) == connections


def test_replay_after_a_server_restart_is_answered_but_acts_on_nothing(
    module_launcher: Launcher, recorded: Recorded
) -> None:
    """A restart empties the replay cache: within its time window a recorded ClientInit
    opens again and gets a (fresh) ServerResponse. Its early data waits for a record under
    the new session keys, which a recording cannot make: no destination connection."""
    chunks = recorded.session.chunks[L2S]
    assert recorded.server.stop() == 0
    module_launcher.programs.remove(recorded.server)
    again = module_launcher.start("server.py", recorded.config, "server_port")
    again.wait_ready()
    port, answer, _ = _replay(again.port, chunks, timed=False)
    assert answer, "the restarted server did not answer a ClientInit it had not seen"
    assert not recorded.session.sent(S2L).startswith(answer[:32])  # a fresh response
    assert wait_for(lambda: session_end(again, port) is not None, 5)
    assert session_end(again, port) == "record failed authentication"
    # Once seen, it is refused like any replay.
    port, answer, _ = _replay(again.port, chunks[:1], timed=False)
    assert answer == b""
    assert wait_for(lambda: handshake_failure(again, port) == "ClientInit replayed", 5)
    time.sleep(0.2)
    assert len(recorded.echo.peers) == 1  # the recorded session's own connection only


# --------------------------------------------------------------------------- probes


def _key(keys: Keys, name: str) -> RsaKey:
    return load_private_key(Path(keys.path(name)))


def test_a_stranger_gets_no_byte_and_a_close_at_handshake_timeout_whatever_it_sends(
    keys: Keys, key_server: Program, counting_listener: TCPServer
) -> None:
    server = key_server
    local, server_side = (
        _key(keys, "local_private"),
        server_public(Path(keys.path("server_public"))),
    )
    early = open_frame(
        1,
        encode_tunnel_request(Request(CMD_CONNECT, Address("127.0.0.1", counting_listener.port))),
    )
    # One genuine ClientInit first (answered: it proves a key), to replay below.
    genuine = client_init(local, server_side, early)
    with socket.create_connection(("127.0.0.1", server.port), timeout=CLOSE_LIMIT) as sock:
        sock.sendall(genuine)
        assert sock.recv(65536), "the server did not answer a genuine ClientInit"
    # The genuine one's early OPEN is acted on (once): no probe may add a connection.
    assert wait_for(lambda: len(counting_listener.peers) == 1, 5)
    before = rsa_operations(server)
    probes = stranger_probes(keys.dir, counting_listener.port, genuine)
    jobs = [(name, data, fin) for name, data in probes.items() for fin in (False, True)]
    # Each probe from a loopback address of its own: the server rate-limits failure lines
    # per source, and this test reads one line per probe.
    sources = [f"127.0.1.{i + 1}" for i in range(len(jobs))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(
            pool.map(
                lambda job, source: probe(
                    server.port, job[0], job[1], job[2], PROBE_TIMEOUT + 5, source
                ),
                jobs,
                sources,
            )
        )
    print("\n" + probe_table(results))
    for result in results:
        assert result.bytes_back == 0, result
        assert result.ended in ("eof", "reset"), result
        assert PROBE_TIMEOUT - EARLY <= result.seconds <= PROBE_TIMEOUT + LATE, result
    assert rsa_operations(server) == before, "a stranger cost an RSA private-key operation"
    time.sleep(0.2)
    assert len(counting_listener.peers) == 1, "the server acted on a probe's early data"
    log = server.stderr()
    for reason in (
        "not a ClientInit sealed to this server's key",
        "closed before a whole ClientInit",
        "no whole ClientInit in time",
        "ClientInit replayed",
        f"unknown local key {fingerprint(_key(keys, 'other_private'))}",
        "signature does not verify",
        "ClientInit clock differs by -120 s",
        "ClientInit clock differs by +120 s",
    ):
        assert reason in log, f"no {reason!r} in the server log"


# --------------------------------------------------------------------------- strangers


@pytest.fixture(scope="module")
def key_server(module_launcher: Launcher) -> Program:
    """A server for the key tests alone: its RSA count moves only with their handshakes."""
    return module_launcher.server(handshake_timeout=PROBE_TIMEOUT, whitelist=["127.0.0.0/8", "::1"])


def _refused(local_port: int, destination: TCPServer) -> None:
    result = socks_request(local_port, "127.0.0.1", destination.port, timeout=CLOSE_LIMIT)
    with result.sock:
        assert result.raw == GENERAL_FAILURE
        assert closed_without_answer(result.sock)


def test_unauthorized_local_key_is_refused(
    launcher: Launcher, keys: Keys, key_server: Program, counting_listener: TCPServer
) -> None:
    local = launcher.local(
        key_server.port, local_private_key=keys.path("other_private"), handshake_timeout=1
    )
    _refused(local.port, counting_listener)
    other = fingerprint(_key(keys, "other_private"))
    assert wait_for(lambda: f"unknown local key {other}" in key_server.stderr(), 5)
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
    """server.py run with another private key poses as the real server: it cannot even open
    the ClientInit, and stays silent."""
    server, local = launcher.pair(
        server={"server_private_key": keys.path("other_private")},
        local={"handshake_timeout": 1},
    )
    _refused(local.port, counting_listener)
    assert counting_listener.peers == []
    assert wait_for(lambda: "not a ClientInit sealed to this server's key" in server.stderr(), 5)
    assert wait_for(lambda: "closed the handshake without answering" in local.stderr(), 5)


class Impostor(TCPServer):
    """A server that holds the real server's static X25519 key (so it opens the ClientInit
    and seals a ServerResponse) but signs with an RSA key that is not the server's."""

    def __init__(self, secret: hs.ServerSecret, peers: dict[bytes, hs.AuthorizedPeer]) -> None:
        self.after_handshake: list[tuple[bytes, str]] = []
        self._secret = secret
        self._peers = peers
        super().__init__(self._pose)

    def _pose(self, conn: socket.socket, _peer: Any) -> None:
        conn.settimeout(CLOSE_LIMIT)
        handshake = hs.ServerHandshake(self._secret, self._peers)
        init = None
        while init is None:
            data = conn.recv(65536)
            if not data:
                return
            init = handshake.consume_client_init(data)
        conn.sendall(handshake.create_server_response())
        self.after_handshake.append(read_to_end(conn, handshake.trailing_data()))


def test_impostor_signing_with_another_key_gets_no_record(
    launcher: Launcher, keys: Keys, counting_listener: TCPServer
) -> None:
    other, server_key = _key(keys, "other_private"), _key(keys, "server_private")
    local_public = load_public_key(Path(keys.path("local_public")))
    secret = hs.ServerSecret(static_x25519(server_key), lambda m: rsa_sign(other, m))
    peers = {fingerprint_bytes(local_public): hs.AuthorizedPeer("alice", local_public)}
    impostor = Impostor(secret, peers)
    try:
        local = launcher.local(impostor.port, resumption_lifetime=0, handshake_timeout=2)
        _refused(local.port, counting_listener)
        assert wait_for(lambda: len(impostor.after_handshake) >= 1, 5)
        # The local verified the signature, refused, and closed without a record.
        assert impostor.after_handshake[0][0] == b""
        assert "signature does not verify" in local.stderr()
    finally:
        impostor.close()


def _stranger_attempt(port: int, init: bytes, source: str) -> bool:
    """Send a first flight (from ``source``: the server rate-limits failure lines per
    source, and the test counts them); whether the server closed without a byte back."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=CLOSE_LIMIT, source_address=(source, 0)
    ) as sock:
        sock.sendall(init)
        return closed_without_answer(sock)


STRANGERS = 20


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
    # The counter works: a legitimate session costs the server one signature.
    result = socks_request(good.port, "127.0.0.1", counting_listener.port, timeout=CLOSE_LIMIT)
    result.sock.close()
    assert result.reply == Reply.SUCCEEDED
    before = rsa_operations(key_server)
    assert before == start + 1
    local, other = _key(keys, "local_private"), _key(keys, "other_private")
    server = server_public(Path(keys.path("server_public")))
    unknown = key_server.stderr().count("unknown local key")
    forged = key_server.stderr().count("failed: signature does not verify")
    flights = [client_init(other, server) for _ in range(STRANGERS)]
    flights += [forged_client_init(other, local, server) for _ in range(STRANGERS)]
    with ThreadPoolExecutor(len(flights) + 1) as pool:
        whole = pool.submit(_refused, stranger.port, counting_listener)  # a stranger local
        sources = [f"127.0.2.{i + 1}" for i in range(len(flights))]
        assert all(
            pool.map(lambda f, src: _stranger_attempt(key_server.port, f, src), flights, sources)
        )
        whole.result()
    assert rsa_operations(key_server) == before
    assert wait_for(
        lambda: key_server.stderr().count("unknown local key") == unknown + STRANGERS + 1, 5
    )
    assert wait_for(
        lambda: (
            key_server.stderr().count("failed: signature does not verify") == forged + STRANGERS
        ),
        5,
    )
    assert len(counting_listener.peers) == 1  # the legitimate connection only
    print(
        f"\nrsa private-key operations: {start} at start, {before} after one legitimate "
        f"session, {rsa_operations(key_server)} after {2 * STRANGERS + 1} stranger attempts"
    )
