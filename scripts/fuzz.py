#!/usr/bin/env python3
"""A bounded mutation fuzzer for the real local.py (SOCKS5/HTTP front) and server.py (handshake).

    python3 scripts/fuzz.py [--iterations 100000] [--seed 1928] [--threads 32]

It starts a server.py and two local.py (auth off, auth on) on free 127.0.0.1 ports with
fresh 2048-bit keys (utils/genkey.py; ``--keys DIR`` reuses a folder), handshake_timeout and
idle_timeout 2 s, and destinations limited to two in-process loopback listeners (one closes
at once, one echoes). The inputs grow from valid seeds:

* local.py: SOCKS5 sessions without auth and with RFC 1929 user/pass, CONNECT to IPv4,
  IPv6 and a domain (plus UDP ASSOCIATE and BIND), and HTTP CONNECT requests, with and
  without Proxy-Authorization; a seed goes to the local whose auth setting it fits;
* server.py (protocol v2): a session recorded from a real handshake with it (its
  ClientInit alone, and with its records: replays the server must meet with silence, and
  mutations of them), and fresh, genuine ClientInits made at send time around mutated
  early data (mux frames: OPEN, DATA, EOF), each followed by one record under the session
  keys once the server answers, so that the server parses the early frames.

Each input is a seed changed by one or more of: bit flips, byte insertion or deletion,
truncation, splicing with another seed, a length field set to an edge value, or replaced
with random bytes. ``--iterations`` inputs per target (the local front, the server
handshake) go out on their own connections from ``--threads`` threads, each with a short
client timeout for connect and send; three in four then half-close, the rest keep the
write side open so the program's timeout must end them. A watcher then waits for the
*program* to close every connection (EOF or reset) and fails any still open
handshake_timeout + 3 s after it was opened.

Checks: the programs stay alive, still serve a valid request at the end (SOCKS5 with and
without auth, HTTP CONNECT, a direct handshake with the server), write no "Traceback",
"unexpected error" or "Exception" to stderr, and are back to their baseline file descriptors
and threads (+2) a few seconds after the run. The baseline is taken after a burst of idle
connections that fills the programs' worker pool (utils/workers.py keeps up to 32 idle
threads for 30 s), so a pool at rest is not mistaken for a leak. Input ``i`` of a target is
derived from (seed, target, i) alone, so a run is reproducible whatever the thread
scheduling. One table goes to stdout, its last line a one-line verdict; the exit status is
0 only if every check passed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from Crypto.PublicKey import RSA  # noqa: E402

from utils import handshake as hs  # noqa: E402
from utils.cells import RecordOpener, RecordSealer  # noqa: E402
from utils.channel import Deadline, recv_some  # noqa: E402
from utils.errors import ProtocolError, SockproxyError  # noqa: E402
from utils.keys import load_server_public_key  # noqa: E402
from utils.mux import (  # noqa: E402
    FrameDecoder,
    FrameType,
    data_frames,
    eof_frame,
    open_frame,
    ping_frame,
)
from utils.socks5 import (  # noqa: E402
    CMD_BIND,
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    Address,
    Reply,
    Request,
    build_greeting,
    build_request,
    build_userpass,
    decode_tunnel_reply,
    encode_tunnel_request,
    parse_auth_status,
    parse_method_selection,
    parse_reply,
)

DEFAULT_ITERATIONS = 100_000
DEFAULT_SEED = 1928
DEFAULT_THREADS = 32
HANDSHAKE_TIMEOUT = 2.0  # both programs, for the run
IDLE_TIMEOUT = 1.0  # so tunnels and UDP associations a mutation made valid end soon too
CLOSE_GRACE = 3.0  # a connection open after HANDSHAKE_TIMEOUT + this is a failure
CLIENT_TIMEOUT = 1.0  # the fuzzing client's connect and send
KEEP_OPEN = 0.25  # the share of inputs sent without a half-close
MAX_IN_FLIGHT = 256  # connections waiting for the program to close them, at most
TOLERANCE = 2  # fds and threads allowed above the baseline after the run
SETTLE_TIMEOUT = 10.0  # how long the programs get to return to the baseline
POOL_FILL = 40  # idle connections per program before the baseline (the pool keeps 32)
USER, PASSWORD = "fuzz", "fuzz-password"
STDERR_ALARMS = ("Traceback", "unexpected error", "Exception")

# --------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class Seed:
    """A valid input, where it goes, and where its length-like fields are."""

    name: str
    data: bytes
    target: str  # row name of the program that gets it
    fields: tuple[tuple[int, int], ...] = ()  # (offset, width) of length and port fields
    fresh: bool = False  # data is early frames: a new, genuine ClientInit is made around them


def _socks_request(
    command: int, address: Address, offset: int
) -> tuple[bytes, list[tuple[int, int]]]:
    wire = build_request(Request(command, address))
    fields = [(offset + len(wire) - 2, 2)]  # the port
    if wire[3] == 3:  # a domain: its length byte
        fields.append((offset + 4, 1))
    return wire, fields


def socks_seeds(
    target: str, close_port: int, six_port: int, auth: tuple[str, str] | None
) -> list[Seed]:
    """Whole SOCKS5 sessions: greeting, RFC 1929 if ``auth``, a request, some data."""
    methods = [b"\x02", b"\x00\x02"] if auth else [b"\x00", b"\x00\x02"]
    addresses = [
        Address("127.0.0.1", close_port),
        Address("::1", six_port),
        Address("localhost", close_port),
    ]
    seeds = []
    requests = [(CMD_CONNECT, a) for a in addresses]
    requests += [(CMD_UDP_ASSOCIATE, Address("0.0.0.0", 0)), (CMD_BIND, addresses[0])]
    for index, (command, address) in enumerate(requests):
        greeting = build_greeting(methods[index % len(methods)])
        wire, fields = greeting, [(1, 1)]
        if auth:
            userpass = build_userpass(auth[0].encode(), auth[1].encode())
            fields += [(len(wire) + 1, 1), (len(wire) + 2 + len(auth[0]), 1)]
            wire += userpass
        request, request_fields = _socks_request(command, address, len(wire))
        wire += request + b"GET / HTTP/1.0\r\n\r\n"
        name = f"socks5 {'user/pass' if auth else 'no-auth'} cmd {command} {address}"
        seeds.append(Seed(name, wire, target, tuple(fields + request_fields)))
    return seeds


def http_seeds(
    target: str, close_port: int, six_port: int, auth: tuple[str, str] | None
) -> list[Seed]:
    """HTTP CONNECT heads (with Proxy-Authorization if ``auth``) and a few bytes after."""
    header = ""
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        header = f"Proxy-Authorization: Basic {token}\r\n"
    seeds = []
    for host, port in (("127.0.0.1", close_port), ("[::1]", six_port), ("localhost", close_port)):
        head = (
            f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"User-Agent: fuzz\r\n{header}\r\nhello"
        )
        seeds.append(Seed(f"http connect {host}", head.encode(), target))
    return seeds


def _frame_fields(frames: bytes) -> list[tuple[int, int]]:
    """Offsets of the 2-byte length fields of the mux frames in ``frames``."""
    fields, offset = [], 0
    while offset + 7 <= len(frames):
        fields.append((offset + 5, 2))
        offset += 7 + int.from_bytes(frames[offset + 5 : offset + 7], "big")
    return fields


def run_session(
    port: int, keys: Keys, target: Address, payload: bytes
) -> tuple[bytes, bytes, bytes]:
    """A real session with server.py, as the local runs one: the OPEN rides in the
    ClientInit; the first record (a PING, ``payload``, the EOF) lets the server act on it.
    Returns the ClientInit, the records we sent after it, and what came back on the
    stream before its end."""
    request = encode_tunnel_request(Request(CMD_CONNECT, target))
    client = hs.ClientHandshake(keys.local_private, keys.server)
    init = client.create_client_init(open_frame(1, request))
    deadline = Deadline(10)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(init)
        session = None
        while session is None:
            session = client.consume_server_response(recv_some(sock, deadline, 65536))
        sealer, opener = RecordSealer(session.send), RecordOpener(session.receive)
        first = sealer.seal(ping_frame(b"fuzzseed") + data_frames(1, payload) + eof_frame(1))
        sock.sendall(first)
        received, ended = _stream_until_end(sock, deadline, opener, client.trailing_data())
        end = sealer.seal_end()
        sock.sendall(end)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    if not ended:
        raise RuntimeError("the session's stream did not end")
    return init, first + end, received


def _stream_until_end(
    sock: socket.socket, deadline: Deadline, opener: RecordOpener, pending: bytes
) -> tuple[bytes, bool]:
    """Stream 1's bytes until its EOF or RESET; refused if its REPLY is not "succeeded"."""
    decoder, received = FrameDecoder(), bytearray()
    data = pending
    while True:
        for payload in opener.feed(data) if data else []:
            for frame in decoder.feed(payload):
                if frame.type is FrameType.REPLY:
                    reply, _ = decode_tunnel_reply(frame.body)
                    if reply != Reply.SUCCEEDED:
                        raise RuntimeError(f"the server answered {reply.name}")
                elif frame.type is FrameType.DATA:
                    received += frame.body
                elif frame.type in (FrameType.EOF, FrameType.RESET):
                    return bytes(received), True
        data = recv_some(sock, deadline, 65536)


def server_seeds(target: str, port: int, keys: Keys, close_port: int) -> list[Seed]:
    """A recorded session (its ClientInit, alone or with its records: replays, then
    mutations of them), and fresh ClientInits around mutated early frames."""
    init, records, _ = run_session(port, keys, Address("127.0.0.1", close_port), b"ping")
    request = encode_tunnel_request(Request(CMD_CONNECT, Address("127.0.0.1", close_port)))
    early = open_frame(1, request) + data_frames(1, b"GET / HTTP/1.0\r\n\r\n") + eof_frame(1)
    return [
        Seed("server recorded session", init + records, target),
        Seed("server recorded ClientInit", init, target),
        Seed("server fresh ClientInit", early, target, tuple(_frame_fields(early)), fresh=True),
    ]


# --------------------------------------------------------------------------- mutations

_EDGES_1 = (0, 1, 2, 0x7F, 0x80, 0xFE, 0xFF)
_EDGES_2 = (0, 1, 2, 0xFF, 0x100, 0x1000, 0x1001, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)


def _flip(rng: random.Random, data: bytearray, _seed: Seed, _seeds: list[Seed]) -> bytearray:
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return data


def _insert(rng: random.Random, data: bytearray, _seed: Seed, _seeds: list[Seed]) -> bytearray:
    position = rng.randint(0, len(data))
    if rng.random() < 0.5:
        junk = rng.randbytes(rng.randint(1, 16))
    else:
        junk = bytes([rng.choice(_EDGES_1)]) * rng.randint(1, 64)
    data[position:position] = junk
    return data


def _delete(rng: random.Random, data: bytearray, _seed: Seed, _seeds: list[Seed]) -> bytearray:
    if data:
        start = rng.randrange(len(data))
        del data[start : start + rng.randint(1, 16)]
    return data


def _truncate(rng: random.Random, data: bytearray, _seed: Seed, _seeds: list[Seed]) -> bytearray:
    return data[: rng.randint(0, len(data))]


def _splice(rng: random.Random, data: bytearray, _seed: Seed, seeds: list[Seed]) -> bytearray:
    other = rng.choice(seeds).data
    return data[: rng.randint(0, len(data))] + other[rng.randint(0, len(other)) :]


def _length(rng: random.Random, data: bytearray, seed: Seed, _seeds: list[Seed]) -> bytearray:
    """A length (or port) field set to an edge value or a random one."""
    if seed.fields and rng.random() < 0.8:
        offset, width = rng.choice(seed.fields)
    else:
        offset, width = rng.randrange(max(len(data), 1)), rng.choice((1, 2))
    edges = _EDGES_1 if width == 1 else _EDGES_2
    value = rng.choice(edges) if rng.random() < 0.7 else rng.randrange(256**width)
    data[offset : offset + width] = value.to_bytes(width, "big")
    return data


def _random(rng: random.Random, data: bytearray, _seed: Seed, _seeds: list[Seed]) -> bytearray:
    junk = bytearray(rng.randbytes(rng.randint(0, 512)))
    if junk and data and rng.random() < 0.5:
        junk[0] = data[0]  # keep the first byte: SOCKS5, HTTP or a plausible length
    return junk


Mutator = Callable[[random.Random, bytearray, Seed, list[Seed]], bytearray]
MUTATORS: tuple[tuple[str, Mutator, int], ...] = (
    ("flip", _flip, 5),
    ("insert", _insert, 3),
    ("delete", _delete, 3),
    ("truncate", _truncate, 3),
    ("splice", _splice, 2),
    ("length", _length, 4),
    ("random", _random, 1),
)
_NAMES = [name for name, _, weight in MUTATORS for _ in range(weight)]
_BY_NAME = {name: mutator for name, mutator, _ in MUTATORS}


@dataclass(frozen=True)
class FuzzInput:
    target: str
    data: bytes
    keep_open: bool
    how: str  # the seed and the mutations, for the failure report
    fresh: bool = False  # data is early frames for a new, genuine ClientInit (Seed.fresh)


def make_input(run_seed: int, front: str, index: int, seeds: list[Seed]) -> FuzzInput:
    """Input ``index`` of ``front``: a function of (run_seed, front, index) alone."""
    rng = random.Random(f"{run_seed}/{front}/{index}")
    seed = rng.choice(seeds)
    data = bytearray(seed.data)
    steps = []
    if rng.random() >= 0.02:  # a few seeds go out intact: the valid paths stay covered
        for _ in range(1 if rng.random() < 0.6 else rng.randint(2, 5)):
            name = rng.choice(_NAMES)
            data = _BY_NAME[name](rng, data, seed, seeds)
            steps.append(name)
    # A session that authenticated waits for its local up to the session timeout: fresh
    # ClientInits are always followed by a half-close.
    keep_open = rng.random() < KEEP_OPEN and not seed.fresh
    kept = " (kept open)" if keep_open else ""
    how = f"{front} #{index}: {seed.name} + {'/'.join(steps) or 'intact'}{kept}"
    return FuzzInput(seed.target, bytes(data[: hs.MAX_EARLY_DATA]), keep_open, how, seed.fresh)


# --------------------------------------------------------------------------- the programs


@dataclass(frozen=True)
class Keys:
    dir: Path
    local_private: RSA.RsaKey
    server: hs.ServerPublic


def load_keys(directory: Path) -> Keys:
    local = RSA.import_key((directory / "local_private.pem").read_bytes())
    server = hs.ServerPublic(*load_server_public_key(directory / "server_public.pem"))
    return Keys(directory, local, server)


def make_keys(directory: Path) -> Keys:
    command = [sys.executable, "utils/genkey.py", "--dir", str(directory), "--bits", "2048"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=120)
    return load_keys(directory)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Program:
    """One server.py or local.py subprocess, its stderr in a file."""

    def __init__(self, name: str, script: str, config: dict[str, Any], port: int, workdir: Path):
        self.name = name
        self.port = port
        slug = re.sub(r"[^a-z]+", "_", name.lower()).strip("_")
        path = workdir / f"{slug}.json"
        path.write_text(json.dumps(config, indent=2))
        self.stderr_path = workdir / f"{slug}.stderr"
        env = dict(os.environ, RES_OPTIONS="timeout:1 attempts:1")  # fuzzed names: fail fast
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, script, "--config", str(path)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
            )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited at start:\n{self.stderr()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} not listening after {timeout}s")

    def stop(self) -> int | None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def stats(self) -> tuple[int, int]:
        """(open file descriptors, threads) from /proc."""
        fds = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        found = re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)
        return fds, int(found.group(1)) if found else 0

    def alarms(self) -> list[str]:
        return [
            line for line in self.stderr().splitlines() if any(a in line for a in STDERR_ALARMS)
        ]


class Destination:
    """A loopback listener in a thread: ``echo`` echoes, else it closes each connection."""

    def __init__(self, host: str, echo: bool) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(1024)
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self._echo = echo
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            if self._echo:
                threading.Thread(target=self._serve_echo, args=(conn,), daemon=True).start()
            else:
                conn.close()

    @staticmethod
    def _serve_echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


# --------------------------------------------------------------------------- the watcher


@dataclass
class Row:
    """One program's figures."""

    name: str
    program: Program
    inputs: int = 0
    closed: int = 0
    still_open: int = 0
    connect_errors: int = 0
    max_close: float = 0.0
    slowest: str = ""  # the input that took max_close
    crashes: int = 0
    tracebacks: int = 0
    before: tuple[int, int] = (0, 0)
    after: tuple[int, int] = (0, 0)
    examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, text: str) -> None:
        with self.lock:
            if len(self.examples) < 5:
                self.examples.append(text)


@dataclass
class _Watched:
    sock: socket.socket
    row: Row
    opened: float
    how: str


class Watcher:
    """Waits, on one thread, for the programs to close the fuzzing connections."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self._selector = selectors.DefaultSelector()
        self._incoming: list[_Watched] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watched: dict[int, _Watched] = {}
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, row: Row, opened: float, how: str) -> None:
        with self._lock:
            self._incoming.append(_Watched(sock, row, opened, how))

    def closed_now(self, row: Row, opened: float) -> None:
        """The program closed while we were still sending."""
        with row.lock:
            row.closed += 1
            row.max_close = max(row.max_close, time.monotonic() - opened)

    def _loop(self) -> None:
        buffer = bytearray(65536)
        while not self._stop.is_set() or self._watched or self._incoming:
            with self._lock:
                incoming, self._incoming = self._incoming, []
            for item in incoming:
                item.sock.setblocking(False)
                self._watched[item.sock.fileno()] = item
                self._selector.register(item.sock, selectors.EVENT_READ)
            for key, _ in self._selector.select(0.05):
                item = self._watched[key.fd]
                try:
                    if item.sock.recv_into(buffer):
                        continue  # an answer: read on until the close
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    pass  # a reset: closed by the program too
                self._finish(item, closed=True)
            now = time.monotonic()
            for item in [w for w in self._watched.values() if now - w.opened > self.limit]:
                self._finish(item, closed=False)

    def _finish(self, item: _Watched, closed: bool) -> None:
        elapsed = time.monotonic() - item.opened
        with item.row.lock:
            if closed:
                item.row.closed += 1
                if elapsed > item.row.max_close:
                    item.row.max_close, item.row.slowest = elapsed, item.how
            else:
                item.row.still_open += 1
        if not closed:
            item.row.note(f"still open after {elapsed:.1f}s: {item.how}")
        del self._watched[item.sock.fileno()]
        self._selector.unregister(item.sock)
        item.sock.close()
        self.slots.release()

    def drain(self, timeout: float) -> None:
        """Stop taking work; wait until every connection was closed or timed out."""
        self._stop.set()
        self._thread.join(timeout)


# --------------------------------------------------------------------------- sending


def fresh_session_start(item: FuzzInput, keys: Keys, sock: socket.socket) -> None:
    """A genuine ClientInit around the mutated early frames (its randomness from the input,
    its clock now), then, once the server answers, one record under the session keys (a
    PING): the server acts on early data only after such a record (server/replay.py)."""
    client = hs.ClientHandshake(
        keys.local_private, keys.server, rng=random.Random(item.how).randbytes
    )
    sock.sendall(client.create_client_init(item.data))
    deadline = Deadline(HANDSHAKE_TIMEOUT)
    try:
        session = None
        while session is None:
            session = client.consume_server_response(recv_some(sock, deadline, 65536))
    except (OSError, SockproxyError):
        return  # refused: the watcher sees the close
    sock.sendall(RecordSealer(session.send).seal(ping_frame(b"fuzzping")))


def send_input(item: FuzzInput, row: Row, watcher: Watcher, keys: Keys | None = None) -> None:
    watcher.slots.acquire()
    opened = time.monotonic()
    try:
        sock = socket.create_connection(("127.0.0.1", row.program.port), timeout=CLIENT_TIMEOUT)
    except OSError as exc:
        watcher.slots.release()
        with row.lock:
            row.connect_errors += 1
        row.note(f"connect failed ({exc}): {item.how}")
        return
    try:
        if item.fresh and keys is not None:
            fresh_session_start(item, keys, sock)
        else:
            sock.sendall(item.data)
        if not item.keep_open:
            sock.shutdown(socket.SHUT_WR)
    except (ConnectionResetError, BrokenPipeError):
        watcher.closed_now(row, opened)  # it hung up before reading it all
        sock.close()
        watcher.slots.release()
        return
    except OSError:
        pass  # a send timeout: the program does not read; it must still close
    watcher.watch(sock, row, opened, item.how)


def fuzz_front(
    front: str,
    seeds: list[Seed],
    rows: dict[str, Row],
    options: Options,
    watcher: Watcher,
    programs_alive: Callable[[], bool],
    keys: Keys | None = None,
) -> None:
    """``options.iterations`` inputs to one front from ``options.threads`` threads."""
    counter = iter(range(options.iterations))
    lock = threading.Lock()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            with lock:
                index = next(counter, None)
            if index is None:
                return
            if index % 200 == 0 and not programs_alive():
                stop.set()
                return
            item = make_input(options.seed, front, index, seeds)
            row = rows[item.target]
            with row.lock:
                row.inputs += 1
            send_input(item, row, watcher, keys)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(options.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# --------------------------------------------------------------------------- valid requests


def _recv_until(sock: socket.socket, parse: Callable[[bytearray], Any]) -> tuple[Any, bytearray]:
    buf = bytearray()
    while (value := parse(buf)) is None:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"closed after {bytes(buf)!r}")
        buf += data
    return value, buf


def _echo_round_trip(sock: socket.socket, rest: bytes) -> None:
    sock.sendall(b"ping")
    got = rest
    while len(got) < 4:
        data = sock.recv(4096)
        if not data:
            break
        got += data
    if got != b"ping":
        raise RuntimeError(f"echo answered {got!r}")


def probe_socks(port: int, echo_port: int, auth: tuple[str, str] | None) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(build_greeting(b"\x02" if auth else b"\x00"))
        method, buf = _recv_until(sock, parse_method_selection)
        if method != (2 if auth else 0):
            raise RuntimeError(f"method {method}")
        if auth:
            sock.sendall(build_userpass(auth[0].encode(), auth[1].encode()))
            ok, buf = _recv_until(sock, parse_auth_status)
            if not ok:
                raise RuntimeError("credentials refused")
        sock.sendall(build_request(Request(CMD_CONNECT, Address("127.0.0.1", echo_port))))
        (reply, _, used), buf = _recv_until(sock, parse_reply)
        if reply != Reply.SUCCEEDED:
            raise RuntimeError(f"reply {reply.name}")
        _echo_round_trip(sock, bytes(buf[used:]))


def probe_http(port: int, echo_port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\n\r\n".encode())

        def head(buf: bytearray) -> int | None:
            end = buf.find(b"\r\n\r\n")
            return None if end < 0 else end + 4

        used, buf = _recv_until(sock, head)
        if not buf.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"answer {bytes(buf[:40])!r}")
        _echo_round_trip(sock, bytes(buf[used:]))


def probe_server(port: int, keys: Keys, echo_port: int) -> None:
    """A direct session with server.py: the request in the ClientInit, an echo through it."""
    _, _, echoed = run_session(port, keys, Address("127.0.0.1", echo_port), b"ping")
    if echoed != b"ping":
        raise RuntimeError(f"echo through the session answered {echoed!r}")


# --------------------------------------------------------------------------- the run


@dataclass
class Options:
    iterations: int = DEFAULT_ITERATIONS
    seed: int = DEFAULT_SEED
    threads: int = DEFAULT_THREADS
    keys_dir: Path | None = None
    workdir: Path | None = None


@dataclass
class Report:
    rows: list[Row]
    problems: list[str]
    seconds: float
    options: Options

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        headers = (
            "target",
            "inputs sent",
            "closed by program",
            "max time to close",
            "crashes",
            "tracebacks",
            "fds before/after",
            "threads before/after",
        )
        lines = [
            (
                row.name,
                str(row.inputs),
                str(row.closed),
                f"{row.max_close:.2f}s",
                str(row.crashes),
                str(row.tracebacks),
                f"{row.before[0]}/{row.after[0]}",
                f"{row.before[1]}/{row.after[1]}",
            )
            for row in self.rows
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]

        def fmt(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        return "\n".join([fmt(headers), fmt(tuple("-" * w for w in widths)), *map(fmt, lines)])

    def verdict(self) -> str:
        inputs = sum(row.inputs for row in self.rows)
        figures = (
            f"{inputs} inputs to {len(self.rows)} programs, seed {self.options.seed}, "
            f"{self.options.threads} threads, {self.seconds:.1f}s"
        )
        if self.ok:
            return f"fuzz: PASS ({figures})"
        return f"fuzz: FAIL ({figures}): {'; '.join(self.problems)}"


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    path = Path(tempfile.mkdtemp(prefix="sockproxy-fuzz-"))
    yield path  # removed by run() only when everything passed


def _fill_pool(programs: list[Program]) -> None:
    """Hold POOL_FILL idle connections to each program at once, then let them go."""
    socks = [
        socket.create_connection(("127.0.0.1", p.port), timeout=5)
        for p in programs
        for _ in range(POOL_FILL)
    ]
    time.sleep(0.5)
    for sock in socks:
        sock.close()


def _quiet_stats(program: Program, timeout: float = 5.0) -> tuple[int, int]:
    """Stats once two readings 0.3 s apart agree (the last connections wound down)."""
    end = time.monotonic() + timeout
    last = program.stats()
    while time.monotonic() < end:
        time.sleep(0.3)
        now = program.stats()
        if now == last:
            return now
        last = now
    return last


def _settle(program: Program, before: tuple[int, int]) -> tuple[int, int]:
    """Stats once back at the baseline, or the last reading after SETTLE_TIMEOUT."""
    end = time.monotonic() + SETTLE_TIMEOUT
    while True:
        now = program.stats()
        if (now[0] <= before[0] and now[1] <= before[1]) or time.monotonic() > end:
            return now
        time.sleep(0.2)


def raise_fd_limit(wanted: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def run(options: Options) -> Report:
    """Start the programs, fuzz both fronts, check everything, stop the programs."""
    raise_fd_limit()
    started = time.monotonic()
    problems: list[str] = []
    close_dest = Destination("127.0.0.1", echo=False)
    echo_dest = Destination("127.0.0.1", echo=True)
    programs: list[Program] = []
    with _workdir(options.workdir) as workdir:
        try:
            keys = load_keys(options.keys_dir) if options.keys_dir else make_keys(workdir / "keys")
            rows = _start(keys, workdir, close_dest.port, echo_dest.port, programs)
            # The IPv6 seeds name [::1] on the close port's number: nothing listens there
            # (we listen on 127.0.0.1 only), so the server's connect is refused at once.
            ports = (close_dest.port, close_dest.port, echo_dest.port)
            report = _fuzz_and_check(options, keys, rows, ports, problems)
        except Exception as exc:  # noqa: BLE001  (any failure of the run is a finding)
            problems.append(f"the run failed: {type(exc).__name__}: {exc}")
            report = Report([], problems, 0.0, options)
        finally:
            for program in programs:
                code = program.stop()
                if code not in (0, None) and report.rows:
                    problems.append(f"{program.name} exited {code} on SIGTERM")
            close_dest.close()
            echo_dest.close()
        report.seconds = time.monotonic() - started
        if report.ok and options.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not report.ok:
            problems.append(f"logs kept in {workdir}")
    return report


def _start(
    keys: Keys,
    workdir: Path,
    close_port: int,
    echo_port: int,
    programs: list[Program],
) -> dict[str, Row]:
    allow = [f"127.0.0.1/32:{close_port}", f"127.0.0.1/32:{echo_port}", f"[::1]/128:{close_port}"]
    common = {
        "whitelist": ["127.0.0.1"],
        "handshake_timeout": HANDSHAKE_TIMEOUT,
        "connect_timeout": 1,
        "idle_timeout": IDLE_TIMEOUT,
        "max_connections": 4096,
    }
    server_port = free_port()
    server = Program(
        "server.py",
        "server.py",
        {
            "server_address": "127.0.0.1",
            "server_port": server_port,
            "local_public_key": str(keys.dir / "local_public.pem"),
            "server_private_key": str(keys.dir / "server_private.pem"),
            "destination_allow": allow,
            **common,
        },
        server_port,
        workdir,
    )
    programs.append(server)
    for name, auth in (("local.py (auth off)", False), ("local.py (auth on)", True)):
        port = free_port()
        config: dict[str, Any] = {
            "local_address": "127.0.0.1",
            "local_port": port,
            "server_address": "127.0.0.1",
            "server_port": server_port,
            "server_public_key": str(keys.dir / "server_public.pem"),
            "local_private_key": str(keys.dir / "local_private.pem"),
            "auth": auth,
            **common,
        }
        if auth:
            config.update(username=USER, password=PASSWORD)
        programs.append(Program(name, "local.py", config, port, workdir))
    for program in programs:
        program.wait_ready()
    return {program.name: Row(program.name, program) for program in programs}


def _fuzz_and_check(
    options: Options,
    keys: Keys,
    rows: dict[str, Row],
    ports: tuple[int, int, int],
    problems: list[str],
) -> Report:
    close_port, six_port, echo_port = ports
    server, open_local, auth_local = rows.values()
    credentials = (USER, PASSWORD)
    local_seeds = (
        socks_seeds(open_local.name, close_port, six_port, None)
        + http_seeds(open_local.name, close_port, six_port, None)
        + socks_seeds(auth_local.name, close_port, six_port, credentials)
        + http_seeds(auth_local.name, close_port, six_port, credentials)
    )
    handshake_seeds = server_seeds(server.name, server.program.port, keys, close_port)
    _probe_all(rows, keys, echo_port, problems, "before the run")
    programs = [row.program for row in rows.values()]
    _fill_pool(programs)
    for row in rows.values():
        row.before = _quiet_stats(row.program)

    def alive() -> bool:
        return all(p.alive for p in programs)

    watcher = Watcher(HANDSHAKE_TIMEOUT + CLOSE_GRACE)
    fuzz_front("local", local_seeds, rows, options, watcher, alive)
    fuzz_front("server", handshake_seeds, rows, options, watcher, alive, keys)
    watcher.drain(HANDSHAKE_TIMEOUT + CLOSE_GRACE + 10)
    for row in rows.values():
        if not row.program.alive:
            row.crashes = 1
            problems.append(f"{row.name} died (exit {row.program.proc.returncode})")
    if alive():
        _probe_all(rows, keys, echo_port, problems, "after the run")
    for row in rows.values():
        if row.program.alive:
            row.after = _settle(row.program, row.before)
            if row.after[0] > row.before[0] + TOLERANCE:
                problems.append(f"{row.name}: fds {row.before[0]} -> {row.after[0]}")
            if row.after[1] > row.before[1] + TOLERANCE:
                problems.append(f"{row.name}: threads {row.before[1]} -> {row.after[1]}")
        alarms = row.program.alarms()
        row.tracebacks = len(alarms)
        if alarms:
            problems.append(f"{row.name} stderr: {alarms[0][:200]}")
        if row.closed != row.inputs:
            problems.append(
                f"{row.name}: {row.inputs - row.closed} of {row.inputs} connections not closed "
                f"by the program ({row.still_open} still open, {row.connect_errors} refused): "
                + " | ".join(row.examples)
            )
    return Report(list(rows.values()), problems, 0.0, options)


def _probe_all(
    rows: dict[str, Row], keys: Keys, echo_port: int, problems: list[str], when: str
) -> None:
    server, open_local, auth_local = rows.values()
    probes: list[tuple[str, Callable[[], None]]] = [
        (open_local.name, lambda: probe_socks(open_local.program.port, echo_port, None)),
        (open_local.name, lambda: probe_http(open_local.program.port, echo_port)),
        (
            auth_local.name,
            lambda: probe_socks(auth_local.program.port, echo_port, (USER, PASSWORD)),
        ),
        (server.name, lambda: probe_server(server.program.port, keys, echo_port)),
    ]
    for name, probe in probes:
        try:
            probe()
        except (OSError, ProtocolError, RuntimeError) as exc:
            problems.append(f"{name}: a valid request failed {when}: {type(exc).__name__}: {exc}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuzz.py", description=(__doc__ or "").split("\n\n", maxsplit=1)[0]
    )
    parser.add_argument(
        "--iterations", type=int, default=DEFAULT_ITERATIONS, help="inputs per target"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="run seed (reproducible)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="sending threads")
    parser.add_argument("--keys", type=Path, help="reuse the key pairs in this folder")
    parser.add_argument("--workdir", type=Path, help="configs and logs here (kept)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = Options(args.iterations, args.seed, args.threads, args.keys, args.workdir)
    report = run(options)
    if report.rows:
        print(report.table())
        for row in report.rows:
            print(f"slowest close, {row.name}: {row.max_close:.2f}s: {row.slowest}")
    for problem in report.problems:
        print(f"problem: {problem}")
    print(report.verdict())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
