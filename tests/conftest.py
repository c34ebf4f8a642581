"""Shared fixtures of the loopback integration tests (tests/test_integration*.py).

The real ``server.py`` and ``local.py`` run as subprocesses with keys made by the real
``utils/genkey.py``; destinations are in-test threads on 127.0.0.1 / [::1] free ports.
Nothing here touches another address or resolves a name other than ``localhost``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from utils.handshake import SessionKeys
from utils.session import Session, Stream
from utils.socks5 import (
    CMD_CONNECT,
    METHOD_NO_AUTH,
    METHOD_USERPASS,
    Address,
    Reply,
    Request,
    build_greeting,
    build_request,
    build_userpass,
    parse_auth_status,
    parse_method_selection,
    parse_reply,
)

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
SOCKET_TIMEOUT = 30.0
SMALL_SIZE = 1_000_000
BIG_SIZE = 50 * 1024 * 1024
SINK_KEEP = 4 * 1024 * 1024  # the sink keeps at most this many bytes for prefix checks


# --------------------------------------------------------------------------- in-process sessions


class Sessions:
    """Two sessions over a socketpair with their readers running (keys without a handshake):
    ``stream_pair()`` gives the two ends of a new stream, for tests of what runs on one."""

    def __init__(self) -> None:
        self._socks = socket.socketpair()
        forward, backward = os.urandom(32), os.urandom(32)
        self.near = Session(self._socks[0], SessionKeys(send=forward, receive=backward))
        self.far = Session(self._socks[1], SessionKeys(send=backward, receive=forward))
        self._readers = [
            threading.Thread(target=session.read_loop, daemon=True)
            for session in (self.near, self.far)
        ]
        for reader in self._readers:
            reader.start()
        self._last_id = 0

    def stream_pair(self) -> tuple[Stream, Stream]:
        self._last_id += 1
        return self.near.add(self._last_id), self.far.add(self._last_id)

    def close(self) -> None:
        for session in (self.near, self.far):
            session.close("test over")
        for reader in self._readers:
            reader.join(5)
        for sock in self._socks:
            sock.close()


@pytest.fixture
def sessions() -> Iterator[Sessions]:
    pair = Sessions()
    yield pair
    pair.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Both ends of a loopback TCP connection (a socketpair cannot show a reset)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname()[:2], timeout=SOCKET_TIMEOUT)
        far, _ = listener.accept()
    far.settimeout(SOCKET_TIMEOUT)
    return near, far


# --------------------------------------------------------------------------- small helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (bind to port 0, read it, close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def sha256(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def set_reset_on_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def clean_env() -> dict[str, str]:
    """The environment without proxy variables, so curl uses only what a test gives it."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Keys:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / f"{name}.pem")


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """local/server pairs plus an unrelated 'other' pair, made by the real genkey.py."""
    directory = tmp_path_factory.mktemp("keys") / "keys"
    base = [sys.executable, "utils/genkey.py", "--dir", str(directory), "--bits", "2048"]
    runs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for cmd in (base, [*base, "--name", "other"])
    ]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err.decode()
        assert b"wrote" in out
    for name in ("local", "server", "other"):
        for part in ("private", "public"):
            assert (directory / f"{name}_{part}.pem").is_file()
    return Keys(directory)


# --------------------------------------------------------------------------- the programs


class Program:
    """One running server.py or local.py, its stderr in a file."""

    def __init__(self, script: str, config: Path, port: int, stderr_path: Path) -> None:
        self.script = script
        self.config = config
        self.port = port
        self.stderr_path = stderr_path
        self.returncode: int | None = None
        with open(stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, script, "--config", str(config), "--log-level", "DEBUG"],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll a TCP connect to the port; fail with the stderr if the process exits first."""
        end = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                pytest.fail(f"{self.script} exited early with {code}:\n{self.stderr()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > end:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
                pytest.fail(f"{self.script} not listening after {timeout}s:\n{self.stderr()}")
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, wait; kill if it hangs (and fail). Returns the exit code."""
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
            self.returncode = -9
            pytest.fail(f"{self.script} ignored SIGTERM for {STOP_TIMEOUT}s:\n{self.stderr()}")
        return self.returncode

    def stop_problem(self) -> str | None:
        """Stop it; what is wrong with how it stopped (None: exit 0 and the port is closed)."""
        code = self.stop()
        if code != 0:
            return f"{self.script} exited with {code}:\n{self.stderr()}"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
        except OSError:
            return None
        return f"{self.script} exited 0 but something still accepts on port {self.port}"

    def assert_stops_cleanly(self) -> None:
        """SIGTERM: exit code 0, and the listener is closed."""
        problem = self.stop_problem()
        assert problem is None, problem


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; an override of None removes the key."""
    result = dict(base)
    for key, value in overrides.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


class Launcher:
    """Writes configs with free ports into a tmp dir, starts programs, stops them all."""

    def __init__(self, keys: Keys, directory: Path) -> None:
        self.keys = keys
        self.dir = directory
        self.programs: list[Program] = []
        self._count = 0

    def write_config(self, name: str, config: dict[str, Any]) -> Path:
        self._count += 1
        path = self.dir / f"{self._count:02d}_{name}.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def server_config(self, **overrides: Any) -> dict[str, Any]:
        base = {
            "server_address": "127.0.0.1",
            "server_port": free_port(),
            "whitelist": ["127.0.0.1", "::1"],
            "local_public_key": self.keys.path("local_public"),
            "server_private_key": self.keys.path("server_private"),
            "handshake_timeout": 10,
            "connect_timeout": 5,
            "idle_timeout": 60,
        }
        return _merge(base, overrides)

    def local_config(self, server_port: int, **overrides: Any) -> dict[str, Any]:
        base = {
            "local_address": "127.0.0.1",
            "local_port": free_port(),
            "whitelist": ["127.0.0.1", "::1"],
            "server_address": "127.0.0.1",
            "server_port": server_port,
            "server_public_key": self.keys.path("server_public"),
            "local_private_key": self.keys.path("local_private"),
            "handshake_timeout": 10,
            "connect_timeout": 5,
            "idle_timeout": 60,
        }
        return _merge(base, overrides)

    def start(self, script: str, config: dict[str, Any], port_key: str) -> Program:
        name = Path(script).stem
        path = self.write_config(name, config)
        program = Program(script, path, config[port_key], path.with_suffix(".stderr"))
        self.programs.append(program)
        return program

    def server(self, wait: bool = True, **overrides: Any) -> Program:
        program = self.start("server.py", self.server_config(**overrides), "server_port")
        if wait:
            program.wait_ready()
        return program

    def local(self, server_port: int, wait: bool = True, **overrides: Any) -> Program:
        config = self.local_config(server_port, **overrides)
        program = self.start("local.py", config, "local_port")
        if wait:
            program.wait_ready()
        return program

    def pair(
        self, server: dict[str, Any] | None = None, local: dict[str, Any] | None = None
    ) -> tuple[Program, Program]:
        """A server and a local that uses it, started together."""
        srv = self.server(wait=False, **(server or {}))
        loc = self.local(srv.port, wait=False, **(local or {}))
        srv.wait_ready()
        loc.wait_ready()
        return srv, loc

    def stop_all(self) -> None:
        """Stop everything (locals first); every program must exit 0 on SIGTERM."""
        problems = [
            program.stop_problem()
            for program in sorted(self.programs, key=lambda p: p.script != "local.py")
        ]
        self.programs.clear()
        failures = [problem for problem in problems if problem is not None]
        assert not failures, "\n".join(failures)


@pytest.fixture
def launcher(keys: Keys, tmp_path: Path) -> Iterator[Launcher]:
    launch = Launcher(keys, tmp_path)
    try:
        yield launch
    finally:
        launch.stop_all()


@pytest.fixture(scope="module")
def module_launcher(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    launch = Launcher(keys, tmp_path_factory.mktemp("programs"))
    try:
        yield launch
    finally:
        launch.stop_all()


# --------------------------------------------------------------------------- data files


@dataclass(frozen=True)
class DataFiles:
    dir: Path
    small: bytes
    big_sha256: str

    @property
    def big_path(self) -> Path:
        return self.dir / "big.bin"


@pytest.fixture(scope="session")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> DataFiles:
    """A served folder with small.bin (1 MB) and big.bin (50 MB) of random bytes."""
    directory = tmp_path_factory.mktemp("www")
    small = os.urandom(SMALL_SIZE)
    (directory / "small.bin").write_bytes(small)
    digest = hashlib.sha256()
    with open(directory / "big.bin", "wb") as out:
        for _ in range(BIG_SIZE // (1 << 20)):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            out.write(chunk)
    return DataFiles(directory, small, digest.hexdigest())


# --------------------------------------------------------------------------- destinations


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    timeout = SOCKET_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HTTP6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@dataclass
class HTTPFiles:
    server: http.server.ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


def _start_http(directory: Path, host: str) -> HTTPFiles:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    cls = _HTTP6Server if ":" in host else http.server.ThreadingHTTPServer
    server = cls((host, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    return HTTPFiles(server, thread)


def _stop_http(files: HTTPFiles) -> None:
    files.server.shutdown()
    files.server.server_close()
    files.thread.join(5)


@pytest.fixture(scope="session")
def http_files(data_files: DataFiles) -> Iterator[HTTPFiles]:
    files = _start_http(data_files.dir, "127.0.0.1")
    yield files
    _stop_http(files)


@pytest.fixture(scope="session")
def http6_files(data_files: DataFiles) -> Iterator[HTTPFiles]:
    try:
        files = _start_http(data_files.dir, "::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    yield files
    _stop_http(files)


class TCPServer:
    """An accept loop in a thread; each connection runs ``handle`` in its own thread."""

    def __init__(
        self,
        handle: Callable[[socket.socket, Any], object],
        host: str = "127.0.0.1",
        backlog: int = 128,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(backlog)
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.peers: list[Any] = []
        self._handle = handle
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer)
            conn.settimeout(SOCKET_TIMEOUT)
            thread = threading.Thread(target=self._run, args=(conn, peer), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket, peer: Any) -> None:
        with conn:
            try:
                self._handle(conn, peer)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()
        for thread in self._threads:
            thread.join(5)


def _echo(conn: socket.socket, _peer: Any) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


@dataclass
class SinkResult:
    """What the sink got on one connection and how that connection ended."""

    length: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    head: bytearray = field(default_factory=bytearray)
    ended: str = ""  # "eof", "reset" or "timeout"

    @property
    def sha256(self) -> str:
        return str(self.digest.hexdigest())


class Sink(TCPServer):
    """Reads to EOF, then answers b"<length> <sha256 hex>\\n" and closes."""

    def __init__(self) -> None:
        self.results: dict[Any, SinkResult] = {}
        super().__init__(self._sink)

    def _sink(self, conn: socket.socket, peer: Any) -> None:
        result = self.results[peer[:2]] = SinkResult()  # a reused port starts afresh
        try:
            while data := conn.recv(262144):
                result.length += len(data)
                result.digest.update(data)
                if len(result.head) < SINK_KEEP:
                    result.head += data[: SINK_KEEP - len(result.head)]
        except ConnectionResetError:
            result.ended = "reset"
            return
        except TimeoutError:
            result.ended = "timeout"
            return
        result.ended = "eof"
        conn.sendall(f"{result.length} {result.sha256}\n".encode())
        conn.shutdown(socket.SHUT_WR)

    def result_for(self, peer: tuple[str, int], timeout: float = 15.0) -> SinkResult:
        """The finished result of the connection from ``peer`` (a SOCKS reply's BND)."""
        ok = wait_for(lambda: bool(peer in self.results and self.results[peer].ended), timeout)
        assert ok, f"the sink saw no finished connection from {peer}; saw {list(self.results)}"
        return self.results[peer]


@pytest.fixture(scope="session")
def echo_server() -> Iterator[TCPServer]:
    server = TCPServer(_echo)
    yield server
    server.close()


@pytest.fixture(scope="session")
def echo6_server() -> Iterator[TCPServer]:
    try:
        server = TCPServer(_echo, host="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    yield server
    server.close()


@pytest.fixture(scope="session")
def sink() -> Iterator[Sink]:
    server = Sink()
    yield server
    server.close()


def _close_at_once(conn: socket.socket, _peer: Any) -> None:
    conn.close()


@pytest.fixture
def counting_listener() -> Iterator[TCPServer]:
    """A destination that only counts the connections it gets (``len(peers)``)."""
    server = TCPServer(_close_at_once)
    yield server
    server.close()


# --------------------------------------------------------------------------- SOCKS5 client


class SocksRefused(Exception):
    """The SOCKS server refused before the request (method 0xFF or auth failure)."""


def recv_parsed(sock: socket.socket, buf: bytearray, parse: Callable[[bytearray], Any]) -> Any:
    """Receive into ``buf`` until ``parse`` returns a value; EOFError if the peer closes."""
    while True:
        value = parse(buf)
        if value is not None:
            return value
        data = sock.recv(4096)
        if not data:
            raise EOFError(f"peer closed after {bytes(buf)!r}")
        buf += data


def socks_handshake(
    sock: socket.socket,
    methods: bytes = bytes((METHOD_NO_AUTH,)),
    auth: tuple[str, str] | None = None,
) -> int:
    """Greeting (and RFC 1929 if ``auth``); returns the chosen method."""
    buf = bytearray()
    sock.sendall(build_greeting(methods))
    method: int = recv_parsed(sock, buf, parse_method_selection)
    del buf[:2]
    if method == METHOD_USERPASS and auth is not None:
        sock.sendall(build_userpass(auth[0].encode(), auth[1].encode()))
        ok = recv_parsed(sock, buf, parse_auth_status)
        del buf[:2]
        if not ok:
            raise SocksRefused("auth failed")
    assert not buf, f"unexpected bytes after the negotiation: {bytes(buf)!r}"
    return method


@dataclass
class SocksResult:
    sock: socket.socket
    reply: Reply
    bind: Address
    raw: bytes  # the whole reply message as received
    rest: bytes  # bytes received right after the reply


def socks_request(
    port: int,
    host: str,
    dport: int,
    command: int = CMD_CONNECT,
    auth: tuple[str, str] | None = None,
    timeout: float = SOCKET_TIMEOUT,
) -> SocksResult:
    """Connect to a local at ``port``, negotiate, send one request, parse the reply."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        methods = bytes((METHOD_USERPASS,)) if auth else bytes((METHOD_NO_AUTH,))
        method = socks_handshake(sock, methods, auth)
        if method == 0xFF:
            raise SocksRefused("no acceptable method")
        sock.sendall(build_request(Request(command, Address(host, dport))))
        result = send_raw_request(sock, b"")
    except BaseException:
        sock.close()
        raise
    return result


def send_raw_request(sock: socket.socket, request: bytes) -> SocksResult:
    """Send ``request`` (may be empty if already sent) and parse the reply."""
    if request:
        sock.sendall(request)
    buf = bytearray()
    reply, bind, end = recv_parsed(sock, buf, parse_reply)
    return SocksResult(sock, reply, bind, bytes(buf[:end]), bytes(buf[end:]))


def read_to_end(sock: socket.socket, first: bytes = b"") -> tuple[bytes, str]:
    """Everything until EOF or reset, and how it ended ("eof", "reset" or "timeout")."""
    chunks = [first]
    try:
        while data := sock.recv(262144):
            chunks.append(data)
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    except TimeoutError:
        return b"".join(chunks), "timeout"
    return b"".join(chunks), "eof"


def run_curl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "60", *args],
        capture_output=True,
        timeout=timeout,
        env=clean_env(),
        check=False,
    )


def access_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " INFO sockproxy.access: " in line]
