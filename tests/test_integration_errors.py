"""Loopback integration: things going wrong. Config errors, a tampered wire, a lost server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REPO,
    SMALL_SIZE,
    DataFiles,
    HTTPFiles,
    Launcher,
    Program,
    Sink,
    TCPServer,
    access_lines,
    read_to_end,
    set_reset_on_close,
    socks_request,
    wait_for,
)
from utils.socks5 import Reply

GENERAL_FAILURE = b"\x05\x01\x00\x01" + bytes(6)


# --------------------------------------------------------------------------- config errors


@dataclass(frozen=True)
class ConfigCase:
    script: str
    name: str
    config: Path
    wants: tuple[str, ...]  # what the one stderr line must say, besides the file name


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str


def _config_cases(launcher: Launcher, directory: Path) -> list[ConfigCase]:
    cases = []
    for script, config, port_key, key_key in (
        ("server.py", launcher.server_config(), "server_port", "server_private_key"),
        ("local.py", launcher.local_config(9), "local_port", "local_private_key"),
    ):
        stem = Path(script).stem

        def write(name: str, text: str, stem: str = stem) -> Path:
            path = directory / f"{stem}_{name}.json"
            path.write_text(text)
            return path

        good = json.dumps(config, indent=2)
        cases += [
            ConfigCase(
                script,
                "broken-json",
                write("broken", good.replace(",", ",,", 1)),
                ("invalid JSON at line 2",),
            ),
            ConfigCase(
                script,
                "unknown-key",
                write("unknown", json.dumps({**config, "bogus_field": 1})),
                ('field "bogus_field"', "unknown field"),
            ),
            ConfigCase(
                script,
                "missing-key-file",
                write("nokey", json.dumps({**config, key_key: str(directory / "gone.pem")})),
                (f'field "{key_key}"', "gone.pem", "no such file"),
            ),
            ConfigCase(
                script,
                "bad-port-type",
                write("port", json.dumps({**config, port_key: "1080"})),
                (f'field "{port_key}"', "expected an integer", '"1080"'),
            ),
        ]
    return cases


@pytest.fixture(scope="module")
def config_runs(
    module_launcher: Launcher, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[ConfigCase, Finished]]:
    """Every bad-config run, started all at once (they only load and exit)."""
    directory = tmp_path_factory.mktemp("bad-configs")
    cases = _config_cases(module_launcher, directory)
    procs = [
        subprocess.Popen(
            [sys.executable, case.script, "--config", str(case.config)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for case in cases
    ]
    runs = {}
    for case, proc in zip(cases, procs, strict=True):
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        runs[f"{case.script}-{case.name}"] = (
            case,
            Finished(proc.returncode, out.decode(), err.decode()),
        )
    return runs


CONFIG_CASE_IDS = [
    f"{script}-{name}"
    for script in ("server.py", "local.py")
    for name in ("broken-json", "unknown-key", "missing-key-file", "bad-port-type")
]


@pytest.mark.parametrize("case_id", CONFIG_CASE_IDS)
def test_config_error_is_one_line_and_exit_2(
    config_runs: dict[str, tuple[ConfigCase, Finished]], case_id: str
) -> None:
    case, run = config_runs[case_id]
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert run.stderr.endswith("\n")
    line = lines[0]
    assert line.startswith(f"{case.script}: config error: {case.config}: "), line
    for wanted in case.wants:
        assert wanted in line, (wanted, line)


@pytest.mark.parametrize("script", ["server.py", "local.py"])
def test_help_and_version_exit_0(script: str) -> None:
    procs = {
        flag: subprocess.Popen(
            [sys.executable, script, flag],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for flag in ("--help", "--version")
    }
    results = {flag: proc.communicate(timeout=30) for flag, proc in procs.items()}
    assert procs["--help"].returncode == 0
    assert procs["--version"].returncode == 0
    help_out = results["--help"][0].decode()
    assert help_out.startswith(f"usage: {script}")
    assert "--config" in help_out
    assert "--log-level" in help_out
    assert results["--version"][0].decode() == f"{script} 2.0.0\n"
    assert results["--help"][1] == results["--version"][1] == b""


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_with_a_live_tunnel_exits_0(
    launcher: Launcher, echo_server: TCPServer, signum: signal.Signals
) -> None:
    server, local = launcher.pair()
    live = socks_request(local.port, "127.0.0.1", echo_server.port)
    with live.sock:
        assert live.reply == Reply.SUCCEEDED
        live.sock.sendall(b"still here")
        assert live.sock.recv(100) == b"still here"
        for program in (local, server):  # an open, idle tunnel must not hold the exit up
            program.proc.send_signal(signum)
            assert program.proc.wait(10) == 0, program.stderr()
            assert f"{signum.name}: shutting down" in program.stderr()
            program.assert_stops_cleanly()  # exit 0 recorded, and the port is closed


# --------------------------------------------------------------------------- lost server


@pytest.mark.parametrize("how", ["stopped", "never-there"])
def test_general_failure_when_the_server_is_gone(
    launcher: Launcher, echo_server: TCPServer, how: str
) -> None:
    if how == "stopped":
        server, local = launcher.pair()
        # This one works, and leaves a live session behind.
        first = socks_request(local.port, "127.0.0.1", echo_server.port)
        with first.sock:
            assert first.reply == Reply.SUCCEEDED
            first.sock.sendall(b"hello")
            first.sock.shutdown(socket.SHUT_WR)
            assert read_to_end(first.sock, first.rest) == (b"hello", "eof")
        server.assert_stops_cleanly()
        server_port = server.port
    else:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # held, never listening: connecting is refused
        server_port = sock.getsockname()[1]
        local = launcher.local(server_port)
    before = len(echo_server.peers)
    try:
        result = socks_request(local.port, "127.0.0.1", echo_server.port)
        with result.sock:
            assert result.raw == GENERAL_FAILURE
            assert read_to_end(result.sock, result.rest) == (b"", "eof")
    finally:
        if how != "stopped":
            sock.close()
    assert len(echo_server.peers) == before
    assert wait_for(lambda: f"server 127.0.0.1:{server_port} failed" in local.stderr(), 5)
    local.assert_stops_cleanly()


# --------------------------------------------------------------------------- a tampered wire


class FlipRelay:
    """A TCP relay between local and server that can flip one bit of one direction.

    ``arm(direction, offset)`` applies to the next connection: bit 0 of the byte at
    ``offset`` of that direction's stream ("down": server -> local, "up": local -> server)
    is flipped once; everything else, the handshake included, passes untouched.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flips: list[tuple[str, int]] = []  # what was really flipped
        self._armed: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self.server = TCPServer(self._relay)
        self.port = self.server.port

    def arm(self, direction: str, offset: int) -> None:
        with self._lock:
            self._armed = (direction, offset)

    def _relay(self, local: socket.socket, _peer: Any) -> None:
        with self._lock:
            armed, self._armed = self._armed, None
        up_flip = armed[1] if armed and armed[0] == "up" else None
        down_flip = armed[1] if armed and armed[0] == "down" else None
        with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30) as server:
            upstream = threading.Thread(
                target=self._pump, args=(local, server, "up", up_flip), daemon=True
            )
            upstream.start()
            self._pump(server, local, "down", down_flip)
            upstream.join(30)

    def _pump(
        self, src: socket.socket, dst: socket.socket, direction: str, flip: int | None
    ) -> None:
        seen = 0
        try:
            while data := src.recv(65536):
                if flip is not None and seen <= flip < seen + len(data):
                    tampered = bytearray(data)
                    tampered[flip - seen] ^= 0x01
                    data = bytes(tampered)
                    self.flips.append((direction, flip))
                seen += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            # Pass a failure on as a failure: reset both sides, wake the other pump.
            for sock in (src, dst):
                set_reset_on_close(sock)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


@dataclass
class Tampered:
    server: Program
    local: Program
    relay: FlipRelay


@pytest.fixture(scope="module")
def tampered(module_launcher: Launcher) -> Iterator[Tampered]:
    server = module_launcher.server()
    relay = FlipRelay(server.port)
    try:
        # One session per connection, so that "the next connection" is a TCP connection
        # of its own through the relay and the offsets count from its first byte.
        local = module_launcher.local(relay.port, resumption_lifetime=0)
        yield Tampered(server, local, relay)
    finally:
        relay.close()


def _download(local_port: int, http_port: int) -> tuple[Reply, bytes, str]:
    """GET /small.bin through a raw SOCKS client: reply, everything received, how it ended."""
    result = socks_request(local_port, "127.0.0.1", http_port)
    with result.sock:
        if result.reply != Reply.SUCCEEDED:
            return result.reply, b"", "refused"
        result.sock.sendall(b"GET /small.bin HTTP/1.0\r\nHost: test\r\n\r\n")
        data, ended = read_to_end(result.sock, result.rest)
    return result.reply, data, ended


def _body(response: bytes) -> bytes | None:
    """The body of an HTTP response, or None if the headers did not arrive completely."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return None
    assert head.startswith(b"HTTP/1.0 200 OK\r\n"), head[:100]
    assert f"Content-Length: {SMALL_SIZE}\r\n".encode() in head + b"\r\n"
    return body


def test_relay_alone_is_transparent(
    tampered: Tampered, http_files: HTTPFiles, data_files: DataFiles
) -> None:
    """The control experiment: without a flip the same path delivers the whole file."""
    reply, data, ended = _download(tampered.local.port, http_files.port)
    assert (reply, ended) == (Reply.SUCCEEDED, "eof")
    assert _body(data) == data_files.small


@pytest.mark.parametrize("offset", [2_500, 300_000, 1_200_000])
def test_flipped_bit_server_to_local_never_delivers_a_wrong_byte(
    tampered: Tampered, http_files: HTTPFiles, data_files: DataFiles, offset: int
) -> None:
    aborted_before = tampered.local.stderr().count("outcome=aborted")
    tampered.relay.arm("down", offset)
    reply, data, ended = _download(tampered.local.port, http_files.port)
    assert tampered.relay.flips[-1] == ("down", offset)
    assert reply == Reply.SUCCEEDED
    body = _body(data)
    if body is None:  # cut off inside the headers: what came must still be the real start
        assert b"HTTP/1.0 200 OK\r\n".startswith(data[:17])
    else:
        assert len(body) < SMALL_SIZE  # never the full length ...
        assert body == data_files.small[: len(body)]  # ... and never a wrong byte
    assert ended == "reset"  # a cut-off transfer must not look like a clean end
    assert wait_for(lambda: tampered.local.stderr().count("outcome=aborted") > aborted_before, 5)


@pytest.mark.parametrize("offset", [2_500, 300_000, 1_200_000])
def test_flipped_bit_local_to_server_never_reaches_the_destination(
    tampered: Tampered, sink: Sink, offset: int
) -> None:
    payload = os.urandom(SMALL_SIZE)
    tampered.relay.arm("up", offset)
    result = socks_request(tampered.local.port, "127.0.0.1", sink.port)
    assert result.reply == Reply.SUCCEEDED
    with result.sock:
        try:
            result.sock.sendall(payload)
            result.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may already have cut us off
        answer, ended = read_to_end(result.sock, result.rest)
    assert tampered.relay.flips[-1] == ("up", offset)
    got = sink.result_for((result.bind.host, result.bind.port))
    assert got.ended == "reset", got.ended  # never a clean end ...
    assert got.length < SMALL_SIZE  # ... nor the full length ...
    assert bytes(got.head) == payload[: got.length]  # ... and never a wrong byte
    assert answer == b""  # so the sink never answered
    assert ended in ("reset", "eof")
    assert wait_for(
        lambda: any("outcome=aborted" in line for line in access_lines(tampered.server.stderr())),
        5,
    )
