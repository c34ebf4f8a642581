"""Hardening: exhaustion attacks and faults against the real local.py and server.py.

Slowloris at both programs, max_connections floods, kill -9 of the server, a destination
or a client mid-transfer, a destination that never reads, failover between two servers,
SIGHUP key reloads, SIGUSR1 live tables, and private key files (modes, passphrases).
The scenarios live in tests/faults_support.py (scripts/harden.py runs them bigger); here
each one runs once, at a size that keeps this file well under 90 s on two cores.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Keys,
    Launcher,
    Sink,
    SocksRefused,
    TCPServer,
    free_port,
    read_to_end,
    set_reset_on_close,
    socks_request,
    wait_for,
)
from tests.faults_support import (
    IO_TIMEOUT,
    Accounting,
    Echo,
    EndlessDownload,
    Pusher,
    Source,
    Wiretap,
    download,
    failover_scenario,
    flood_scenario,
    kill9,
    kill_client_scenario,
    kill_destination_scenario,
    kill_server_scenario,
    pattern_at,
    raise_nofile,
    raw_handshake,
    run_to_exit,
    sessions_opened,
    slowloris_scenario,
    start_with_args,
    stuck_destination_scenario,
)
from utils.handshake import ServerPublic
from utils.keys import (
    fingerprint_bytes,
    generate_pair,
    load_private_key,
    load_public_key,
    load_server_public_key,
    write_pair,
)
from utils.socks4 import CMD_CONNECT as SOCKS4_CONNECT
from utils.socks4 import build_request as build_socks4_request
from utils.socks5 import CMD_CONNECT, CMD_UDP_ASSOCIATE, Address, Reply, build_greeting

SLOWLORIS_CONNECTIONS = 200
GENERAL_FAILURE = b"\x05\x01\x00\x01" + bytes(6)


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    server = Source()
    yield server
    server.close()


@pytest.fixture
def echo() -> Iterator[TCPServer]:
    server = Echo()
    yield server
    server.close()


# --------------------------------------------------------------------------- exhaustion


@pytest.mark.parametrize("target", ["local", "server"])
def test_slowloris_is_cut_at_handshake_timeout_while_a_client_keeps_full_speed(
    launcher: Launcher, source: Source, target: str
) -> None:
    reason = raise_nofile(4 * SLOWLORIS_CONNECTIONS + 512)
    if reason:
        pytest.skip(reason)
    report = slowloris_scenario(launcher, source, target, SLOWLORIS_CONNECTIONS)
    assert not report.problems(), report.outcome()
    lifetimes = report.lifetimes
    assert len(lifetimes) == SLOWLORIS_CONNECTIONS
    assert min(lifetimes) >= 1.95 and max(lifetimes) <= 4.0, report.outcome()
    assert {v.how for v in report.victims} <= {"eof", "reset"}
    # Neither program says a word to a first message that does not complete.
    assert {v.received for v in report.victims} == {0}
    assert report.during and all(d.ok for d in report.during)
    assert report.attack_speed >= report.baseline_speed / 5, report.outcome()


@pytest.mark.parametrize("target", ["local", "server"])
def test_max_connections_refuses_at_once_and_stays_responsive(
    launcher: Launcher, source: Source, target: str
) -> None:
    report = flood_scenario(launcher, source, target, limit=20, attempts=200)
    assert not report.problems(), report.outcome()
    assert report.held == 20
    assert report.refused == 200
    assert report.works_after.ok
    assert report.rss_after_kb - report.rss_before_kb < 16 * 1024


EARLY_END_ROUNDS = 10


def test_connections_that_end_early_leave_no_fd_or_thread_behind(
    launcher: Launcher, echo: TCPServer
) -> None:
    """Refusals, failures and aborts of each kind, many times over, through both programs:
    every socket they opened for them is closed (fds and threads back to the baseline)."""
    server, local = launcher.pair(server={"destination_deny": ["127.0.0.2/32"]})
    ends = _early_ends(local.port, free_port(), echo.port)
    for end in ends:  # once first: lazy imports and pooled threads belong to the baseline
        end()
    accounting = Accounting()
    accounting.start_all({"local": local, "server": server})
    for _ in range(EARLY_END_ROUNDS):
        for end in ends:
            end()
    for label, program in (("local", local), ("server", server)):
        accounting.finish(label, program)
    assert not accounting.problems(), accounting.column("fds")


def _early_ends(port: int, closed_port: int, echo_port: int) -> list[Callable[[], None]]:
    """Each way a client connection through the local can end early, as a call that makes
    one such connection and checks how it ended."""

    def refused(host: str, dport: int, reply: Reply, command: int = CMD_CONNECT) -> None:
        result = socks_request(port, host, dport, command)
        with result.sock:
            assert result.reply == reply
            assert read_to_end(result.sock, result.rest) == (b"", "eof")

    def raw(message: bytes, answer: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(message)
            data, ended = read_to_end(sock)
            assert data.startswith(answer) and ended == "eof", (data, ended)

    http_connect = f"CONNECT 127.0.0.1:{closed_port} HTTP/1.1\r\n\r\n".encode()
    socks4 = build_socks4_request(SOCKS4_CONNECT, Address("127.0.0.1", closed_port))
    return [
        functools.partial(refused, "127.0.0.1", closed_port, Reply.CONNECTION_REFUSED),
        functools.partial(refused, "127.0.0.2", echo_port, Reply.NOT_ALLOWED),
        functools.partial(refused, "127.0.0.1", echo_port, Reply.COMMAND_NOT_SUPPORTED, 2),
        functools.partial(_gone_before_the_greeting, port),
        functools.partial(raw, build_greeting(b"\x02"), b"\x05\xff"),  # no acceptable method
        functools.partial(raw, http_connect, b"HTTP/1.1 502 "),
        functools.partial(raw, socks4, b"\x00\x5b"),
        functools.partial(_udp_association, port),
        functools.partial(_relay, port, echo_port, reset=True),
        functools.partial(_relay, port, echo_port, reset=False),
    ]


def _gone_before_the_greeting(port: int) -> None:
    socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT).close()


def _udp_association(port: int) -> None:
    """A UDP association that its client ends at once (by closing its TCP connection)."""
    result = socks_request(port, "0.0.0.0", 0, CMD_UDP_ASSOCIATE)
    with result.sock:
        assert result.reply == Reply.SUCCEEDED


def _relay(port: int, echo_port: int, reset: bool) -> None:
    """A relayed echo that the client ends with a reset (an aborted relay) or a half-close."""
    result = socks_request(port, "127.0.0.1", echo_port)
    with result.sock as sock:
        assert result.reply == Reply.SUCCEEDED
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        if reset:
            set_reset_on_close(sock)
        else:
            sock.shutdown(socket.SHUT_WR)
            assert read_to_end(sock) == (b"", "eof")


# --------------------------------------------------------------------------- kill -9


def test_kill9_server_resets_every_stream_and_a_restart_takes_over(
    launcher: Launcher, source: Source
) -> None:
    report = kill_server_scenario(launcher, source)
    assert not report.problems(), report.outcome()
    assert report.ended == "reset"
    assert report.detect_seconds < 2.0
    assert report.corrupted == 0


def test_kill9_destination_closes_the_client(launcher: Launcher, source: Source) -> None:
    report = kill_destination_scenario(launcher, source)
    assert not report.problems(), report.outcome()
    assert report.ended in ("eof", "reset")
    assert report.detect_seconds < 2.0
    assert report.bad_bytes == 0


def test_kill9_client_tears_down_the_destination_side(launcher: Launcher, source: Source) -> None:
    report = kill_client_scenario(launcher, source)
    assert not report.problems(), report.outcome()
    assert report.detect_seconds < 5.0


def test_stuck_destination_does_not_stall_others_and_idles_out(
    launcher: Launcher, source: Source
) -> None:
    report = stuck_destination_scenario(launcher, source, idle_timeout=3.0)
    assert not report.problems(), report.outcome()
    assert report.ended == "reset"
    assert report.detect_seconds <= 3.0 + 4.0


# SIGTERM aborts live tunnels (utils/cli.py serve -> ProxyServer.abort_all): a cut-off
# stream must end in a reset, never in a clean-looking EOF.


def test_sigterm_local_mid_download_resets_the_client(launcher: Launcher, source: Source) -> None:
    _server, local = launcher.pair()
    transfer = EndlessDownload(local.port, source.port)
    assert transfer.wait_received(2 << 20)
    assert local.stop() == 0
    transfer.join(10)
    assert transfer.checker.corrupted == 0
    assert transfer.ended == "reset", "the client saw a clean end of an endless stream"


def test_sigterm_server_mid_upload_resets_the_destination(launcher: Launcher, sink: Sink) -> None:
    server, local = launcher.pair()
    pusher = Pusher(local.port, sink.port)
    assert wait_for(lambda: pusher.pushed > 4 << 20, 10)
    assert server.stop() == 0
    pusher.join(10)
    assert pusher.ended == "reset"  # the client is told...
    got = sink.result_for(pusher.bind)
    assert got.ended == "reset", f"the destination saw a clean EOF after {got.length} bytes"


# --------------------------------------------------------------------------- failover


def test_failover_to_the_second_server_and_back_after_the_backoff(
    launcher: Launcher, source: Source
) -> None:
    report = failover_scenario(launcher, source)
    assert not report.problems(), report.outcome()
    assert len(report.downloads) == 4


# --------------------------------------------------------------------------- SIGHUP


def _authorized(keys: Keys, *names: str, alice_key: str = "local_public") -> list[Any]:
    paths = {"alice": keys.path(alice_key), "bob": keys.path("other_public")}
    return [{"name": name, "public_key": paths[name]} for name in names]


def _rewrite_keys(config_path: Path, entries: list[Any]) -> None:
    config = json.loads(config_path.read_text())
    config["authorized_keys"] = entries
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2))
    tmp.replace(config_path)


def _sighup(program: Any, loaded: int) -> None:
    """SIGHUP and wait for the reload line (one more than before)."""
    text = f"SIGHUP: {loaded} authorized key(s) loaded"
    before = program.stderr().count("SIGHUP: ")
    program.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: program.stderr().count("SIGHUP: ") > before, 5), program.stderr()
    assert program.stderr().rsplit("SIGHUP: ", 1)[-1].startswith(text[len("SIGHUP: ") :])


def _echo_once(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        data = sock.recv(65536)
        if not data:
            break
        got += data
    return got


def _server_public(keys: Keys) -> ServerPublic:
    return ServerPublic(*load_server_public_key(Path(keys.path("server_public"))))


def test_sighup_ends_the_sessions_of_a_removed_key_and_refuses_it(
    launcher: Launcher, keys: Keys, echo: TCPServer
) -> None:
    server = launcher.server(
        local_public_key=None,
        authorized_keys=_authorized(keys, "alice", "bob"),
        handshake_timeout=1.5,
    )
    alice = launcher.local(server.port, handshake_timeout=2)
    bob = launcher.local(server.port, local_private_key=keys.path("other_private"))
    identity = load_private_key(Path(keys.path("local_private")))
    assert raw_handshake(server.port, identity, _server_public(keys)) is not None

    live = socks_request(alice.port, "127.0.0.1", echo.port)
    other = socks_request(bob.port, "127.0.0.1", echo.port)
    with live.sock, other.sock:
        assert live.reply == other.reply == Reply.SUCCEEDED
        assert _echo_once(live.sock, b"before") == b"before"
        assert _echo_once(other.sock, b"bob") == b"bob"
        _rewrite_keys(server.config, _authorized(keys, "bob"))
        _sighup(server, 1)
        mark = len(server.stderr())
        # alice's session ended at once: her live connection is reset, not closed cleanly.
        live.sock.settimeout(5)
        assert read_to_end(live.sock) == (b"", "reset")
        refused = socks_request(alice.port, "127.0.0.1", echo.port)
        with refused.sock:
            assert refused.raw == GENERAL_FAILURE
        assert "unknown local key" in server.stderr()[mark:]  # her local tried a new session
        assert raw_handshake(server.port, identity, _server_public(keys)) is None
        # bob's session, live connection included, carries on.
        assert _echo_once(other.sock, b"after the reload") == b"after the reload"
        other.sock.shutdown(socket.SHUT_WR)
        assert read_to_end(other.sock) == (b"", "eof")

    _rewrite_keys(server.config, _authorized(keys, "alice", "bob"))
    _sighup(server, 2)
    again = socks_request(alice.port, "127.0.0.1", echo.port)
    with again.sock:
        assert again.reply == Reply.SUCCEEDED
        assert _echo_once(again.sock, b"back") == b"back"


def test_sighup_key_rotation_refuses_the_old_key_and_ends_its_session(
    launcher: Launcher, keys: Keys, tmp_path: Path, echo: TCPServer
) -> None:
    new_key = generate_pair(2048)
    write_pair(tmp_path, "alice_new", new_key, force=False)
    server = launcher.server(
        local_public_key=None, authorized_keys=_authorized(keys, "alice"), handshake_timeout=1.5
    )
    stolen = launcher.local(server.port)  # the old key, in a thief's hands
    live = socks_request(stolen.port, "127.0.0.1", echo.port)
    with live.sock:
        assert _echo_once(live.sock, b"stolen") == b"stolen"
        entries = [{"name": "alice", "public_key": str(tmp_path / "alice_new_public.pem")}]
        _rewrite_keys(server.config, entries)
        _sighup(server, 1)
        live.sock.settimeout(5)
        assert read_to_end(live.sock) == (b"", "reset")  # the thief's session is over
    old_key = load_private_key(Path(keys.path("local_private")))
    assert raw_handshake(server.port, old_key, _server_public(keys)) is None
    assert raw_handshake(server.port, new_key, _server_public(keys)) is not None


# --------------------------------------------------------------------------- restarts


@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
def test_server_restart_under_an_idle_session_fails_no_request(
    launcher: Launcher, source: Source, how: str
) -> None:
    """Honest mode: the local notices the dead session (or learns it from the first stream
    it opens there) and asks again on a fresh session; no client sees a failure."""
    config = launcher.server_config()
    server = launcher.start("server.py", config, "server_port")
    server.wait_ready()
    local = launcher.local(server.port)
    assert download(local.port, source.port, 100_000).ok  # a live session, idle now
    if how == "SIGTERM":
        assert server.stop() == 0
        launcher.programs.remove(server)
    else:
        kill9(launcher, server)
    restarted = launcher.start("server.py", config, "server_port")
    restarted.wait_ready()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: download(local.port, source.port, 100_000), range(8)))
    assert all(got.ok for got in results), [str(got) for got in results if not got.ok]
    assert sessions_opened(restarted) == 1  # one fresh session took them all


# --------------------------------------------------------------------------- SIGUSR1


def test_sigusr1_logs_live_connections_with_client_target_and_bytes(
    launcher: Launcher, source: Source
) -> None:
    server, local = launcher.pair()
    transfer = EndlessDownload(local.port, source.port)
    try:
        assert transfer.wait_received(2 << 20)
        for program in (local, server):
            program.proc.send_signal(signal.SIGUSR1)
        client = rf"127\.0\.0\.1:{transfer.client_port}"
        target = rf"127\.0\.0\.1:{source.port}"
        local_live = re.compile(rf"live: {client} -> {target} up=(\d+) down=(\d+) ")
        server_live = re.compile(rf"live: \S+ \(local_public\) -> {target} up=8 down=")
        assert wait_for(lambda: bool(local_live.search(local.stderr())), 5), local.stderr()
        match = local_live.search(local.stderr())
        assert match is not None
        assert int(match[1]) == 8  # the size header we sent
        assert int(match[2]) >= 2 << 20
        assert wait_for(lambda: bool(server_live.search(server.stderr())), 5), server.stderr()
        assert re.search(r"1 live connection\(s\), up=8 down=\d+ bytes", local.stderr())
    finally:
        transfer.stop()
    assert transfer.ended == "stopped"
    assert transfer.checker.corrupted == 0


# --------------------------------------------------------------------------- key files


@pytest.mark.parametrize("script", ["local.py", "server.py"])
def test_group_readable_private_key_exits_2_with_one_line(
    launcher: Launcher, keys: Keys, tmp_path: Path, script: str
) -> None:
    name = "local_private" if script == "local.py" else "server_private"
    exposed = tmp_path / f"{name}.pem"
    shutil.copyfile(keys.path(name), exposed)
    exposed.chmod(0o640)
    if script == "local.py":
        config = launcher.local_config(9, local_private_key=str(exposed))
    else:
        config = launcher.server_config(server_private_key=str(exposed))
    path = launcher.write_config(Path(script).stem, config)
    done = run_to_exit(script, path, [], dict(os.environ))
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert str(exposed) in lines[0]
    assert "readable by group/others" in lines[0]
    assert "chmod 600" in lines[0]


def test_passphrase_protected_keys_and_no_secret_in_any_log(
    launcher: Launcher, keys: Keys, tmp_path: Path, echo: TCPServer
) -> None:
    passphrase = "pp-" + secrets.token_hex(12)
    wrong = "wrong-" + secrets.token_hex(12)
    password = "pw-" + secrets.token_hex(12)
    for name in ("local", "server"):
        key = load_private_key(Path(keys.path(f"{name}_private")))
        write_pair(tmp_path, f"{name}_locked", key, force=False, passphrase=passphrase.encode())
    locked = {name: str(tmp_path / f"{name}_locked_private.pem") for name in ("local", "server")}
    env = dict(os.environ, SOCKPROXY_PASSPHRASE=passphrase, SOCKPROXY_WRONG=wrong)
    right_args = ["--passphrase-env", "SOCKPROXY_PASSPHRASE"]
    server_config = launcher.server_config(server_private_key=locked["server"])
    local_config = launcher.local_config(
        server_config["server_port"],
        local_private_key=locked["local"],
        auth=True,
        username="alice",
        password=password,
    )
    texts: list[str] = []
    # Wrong passphrase, and none at all: exit 2 with one line (the four runs side by side).
    runs = []
    for script, config, key_path in (
        ("server.py", server_config, locked["server"]),
        ("local.py", local_config, locked["local"]),
    ):
        path = launcher.write_config(Path(script).stem, config)
        runs += [
            (script, path, ["--passphrase-env", "SOCKPROXY_WRONG"], "wrong passphrase", key_path),
            (script, path, [], "a passphrase is required", key_path),
        ]
    with ThreadPoolExecutor(len(runs)) as pool:
        done_runs = list(pool.map(lambda run: run_to_exit(run[0], run[1], run[2], env), runs))
    for (_, _, _, wants, key_path), done in zip(runs, done_runs, strict=True):
        texts.append(done.stderr)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert key_path in done.stderr and wants in done.stderr
    # The right passphrase: both run, and a request with the SOCKS password works.
    server = start_with_args(launcher, "server.py", server_config, "server_port", right_args, env)
    local = start_with_args(launcher, "local.py", local_config, "local_port", right_args, env)
    server.wait_ready()
    local.wait_ready()
    result = socks_request(local.port, "127.0.0.1", echo.port, auth=("alice", password))
    with result.sock:
        assert result.reply == Reply.SUCCEEDED
        assert _echo_once(result.sock, b"locked keys") == b"locked keys"
        for program in (local, server):
            program.proc.send_signal(signal.SIGUSR1)
        assert wait_for(lambda: "live: " in local.stderr() and "live: " in server.stderr(), 5)
    with pytest.raises(SocksRefused):
        socks_request(local.port, "127.0.0.1", echo.port, auth=("alice", wrong))
    with pytest.raises(SocksRefused):  # no credentials offered
        socks_request(local.port, "127.0.0.1", echo.port)
    for program in (local, server):
        assert program.stop() == 0
        texts.append(program.stderr())
    assert "sockproxy.access" in texts[-2]
    for text in texts:
        for line in text.splitlines():
            for secret in (passphrase, wrong, password):
                assert secret not in line, f"a secret in a log line: {line}"


# --------------------------------------------------------------------------- what a wiretap sees


def _windows(data: bytes, size: int = 12) -> set[bytes]:
    return {data[i : i + size] for i in range(len(data) - size + 1)}


def test_wiretap_sees_no_payload_target_password_or_identity(
    launcher: Launcher, keys: Keys, source: Source
) -> None:
    """What docs/SECURITY.md says an observer between local and server gets, and not."""
    password = "pw-" + secrets.token_hex(12)
    server = launcher.server()
    tap = Wiretap(server.port)
    try:
        local = launcher.local(tap.port, auth=True, username="alice", password=password)
        single = launcher.local(tap.port, resumption_lifetime=0)  # a session per connection
        size = 1 << 20
        for _ in range(3):
            got = download(local.port, source.port, size, "localhost", ("alice", password))
            assert got.ok, got
        for _ in range(2):
            assert download(single.port, source.port, 1000).ok
    finally:
        tap.close()
    # The first local's three downloads share one session (one TCP connection to the
    # server); the second local's two have one each.
    assert len(tap.links) == 3
    wire = b"".join(bytes(up) + bytes(down) for up, down in tap.links)
    # Hidden: the payload, the target name and port, the SOCKS credentials...
    for offset in range(0, size - 32, 4099):
        assert pattern_at(offset, 32) not in wire
    target = f"localhost:{source.port}".encode()
    for secret in (b"localhost", target, password.encode(), b"alice"):
        assert secret not in wire
    # ...and who connects: no key fingerprint, no static key in the clear.
    for name in ("local_public", "server_public"):
        assert fingerprint_bytes(load_public_key(Path(keys.path(name)))) not in wire
    assert load_server_public_key(Path(keys.path("server_public")))[1] not in wire
    # No byte string is shared between the first bytes of two sessions, either direction.
    starts = [(bytes(up[:512]), bytes(down[:512])) for up, down in tap.links]
    for i, first in enumerate(starts):
        for second in starts[i + 1 :]:
            for a, b in zip(first, second, strict=True):
                assert not _windows(a) & _windows(b)
    # The sizes show: 3 MiB of payload costs 64/50 of it in cells, plus the records.
    down_bytes = len(tap.links[0][1])
    assert 3 * size * 64 / 50 < down_bytes < 3 * size * 64 / 50 * 1.01 + 8192
