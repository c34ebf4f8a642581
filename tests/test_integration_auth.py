"""Loopback integration: who may connect. RFC 1929 auth, whitelists, the channel's RSA keys.

One server and two locals (auth on, auth off) serve the auth tests; the whitelist and key
tests start their own programs next to them.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import socks

from tests.conftest import (
    DataFiles,
    HTTPFiles,
    Keys,
    Launcher,
    Program,
    TCPServer,
    read_to_end,
    run_curl,
    socks_request,
    wait_for,
)
from utils.keys import fingerprint, load_private_key
from utils.socks5 import (
    Address,
    Request,
    build_greeting,
    build_request,
    build_userpass,
)

USER = "alice"
PASSWORD = "pw-" + secrets.token_hex(12)
WRONG_PASSWORD = "wrong-" + secrets.token_hex(12)
GENERAL_FAILURE = b"\x05\x01\x00\x01" + bytes(6)


@dataclass
class Programs:
    server: Program
    auth_local: Program  # "auth": true
    open_local: Program  # "auth": false


@pytest.fixture(scope="module")
def programs(module_launcher: Launcher) -> Programs:
    server = module_launcher.server(wait=False)
    auth_local = module_launcher.local(
        server.port, wait=False, auth=True, username=USER, password=PASSWORD
    )
    open_local = module_launcher.local(server.port, wait=False, auth=False)
    for program in (server, auth_local, open_local):
        program.wait_ready()
    return Programs(server, auth_local, open_local)


def _assert_closed(sock: socket.socket) -> None:
    """Nothing more comes: EOF or a reset."""
    rest, ended = read_to_end(sock)
    assert rest == b""
    assert ended in ("eof", "reset")


def _assert_refused_at_once(port: int) -> None:
    """A connection that is closed without a single byte of answer to the greeting."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(build_greeting(b"\x00\x02"))
            answer = sock.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
    assert answer == b""


def _no_connection(listener: TCPServer) -> None:
    time.sleep(0.3)
    assert listener.peers == []


# --------------------------------------------------------------------------- RFC 1929


@pytest.mark.parametrize(
    ("option", "host"), [("--socks5-hostname", "localhost"), ("--socks5", "127.0.0.1")]
)
def test_curl_with_right_credentials(
    programs: Programs,
    http_files: HTTPFiles,
    data_files: DataFiles,
    tmp_path: Path,
    option: str,
    host: str,
) -> None:
    out = tmp_path / "small.out"
    done = run_curl(
        option,
        f"127.0.0.1:{programs.auth_local.port}",
        "--proxy-user",
        f"{USER}:{PASSWORD}",
        f"http://{host}:{http_files.port}/small.bin",
        "-o",
        str(out),
    )
    assert done.returncode == 0, done.stderr.decode()
    assert out.read_bytes() == data_files.small


def test_pysocks_with_right_credentials(programs: Programs, echo_server: TCPServer) -> None:
    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", programs.auth_local.port, True, USER, PASSWORD)
    sock.settimeout(10)
    payload = os.urandom(50_000)
    with sock:
        sock.connect(("127.0.0.1", echo_server.port))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        echoed, ended = read_to_end(sock)
    assert (echoed, ended) == (payload, "eof")


def test_pysocks_with_wrong_password(programs: Programs, echo_server: TCPServer) -> None:
    before = len(echo_server.peers)
    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS5, "127.0.0.1", programs.auth_local.port, True, USER, WRONG_PASSWORD)
    sock.settimeout(10)
    with sock, pytest.raises(socks.ProxyError, match="authentication failed"):
        sock.connect(("127.0.0.1", echo_server.port))
    time.sleep(0.2)
    assert len(echo_server.peers) == before


def test_raw_wrong_password_gets_failure_status_and_close(
    programs: Programs, echo_server: TCPServer
) -> None:
    with socket.create_connection(("127.0.0.1", programs.auth_local.port), timeout=10) as sock:
        sock.sendall(build_greeting(b"\x02"))
        assert sock.recv(2) == b"\x05\x02"
        sock.sendall(build_userpass(USER.encode(), WRONG_PASSWORD.encode()))
        status = sock.recv(2)
        assert len(status) == 2
        assert status[0] == 0x01  # RFC 1929 VER
        assert status[1] != 0x00  # failure
        # The connection is over: a request sent now is never answered.
        try:
            sock.sendall(build_request(Request(1, Address("127.0.0.1", echo_server.port))))
        except (BrokenPipeError, ConnectionResetError):
            pass
        _assert_closed(sock)


def test_raw_wrong_username_gets_failure_status(programs: Programs) -> None:
    with socket.create_connection(("127.0.0.1", programs.auth_local.port), timeout=10) as sock:
        sock.sendall(build_greeting(b"\x02"))
        assert sock.recv(2) == b"\x05\x02"
        sock.sendall(build_userpass(b"mallory", PASSWORD.encode()))
        assert sock.recv(2) == b"\x01\x01"
        _assert_closed(sock)


def test_curl_with_wrong_password_exits_97(programs: Programs, http_files: HTTPFiles) -> None:
    done = run_curl(
        "--socks5-hostname",
        f"127.0.0.1:{programs.auth_local.port}",
        "--proxy-user",
        f"{USER}:{WRONG_PASSWORD}",
        f"http://localhost:{http_files.port}/small.bin",
        "-o",
        os.devnull,
    )
    assert done.returncode == 97, done.stderr.decode()


def test_curl_without_credentials_exits_97(programs: Programs, http_files: HTTPFiles) -> None:
    done = run_curl(
        "--socks5-hostname",
        f"127.0.0.1:{programs.auth_local.port}",
        f"http://localhost:{http_files.port}/small.bin",
        "-o",
        os.devnull,
    )
    assert done.returncode == 97, done.stderr.decode()


def test_auth_required_but_only_no_auth_offered(programs: Programs) -> None:
    with socket.create_connection(("127.0.0.1", programs.auth_local.port), timeout=10) as sock:
        sock.sendall(build_greeting(b"\x00"))
        assert sock.recv(2) == b"\x05\xff"
        _assert_closed(sock)


def test_auth_off_but_only_userpass_offered(programs: Programs) -> None:
    with socket.create_connection(("127.0.0.1", programs.open_local.port), timeout=10) as sock:
        sock.sendall(build_greeting(b"\x02"))
        assert sock.recv(2) == b"\x05\xff"
        _assert_closed(sock)


def test_auth_off_works_without_credentials(programs: Programs, echo_server: TCPServer) -> None:
    result = socks_request(programs.open_local.port, "127.0.0.1", echo_server.port)
    with result.sock:
        assert result.raw[:4] == b"\x05\x00\x00\x01"
        result.sock.sendall(b"ping")
        result.sock.shutdown(socket.SHUT_WR)
        assert read_to_end(result.sock, result.rest) == (b"ping", "eof")


# --------------------------------------------------------------------------- whitelists


def test_local_whitelist_refuses_before_the_greeting(
    launcher: Launcher, programs: Programs
) -> None:
    local = launcher.local(programs.server.port, whitelist=["10.0.0.0/8"])
    _assert_refused_at_once(local.port)
    assert wait_for(lambda: "not on the whitelist" in local.stderr(), 5)
    local.assert_stops_cleanly()


def test_server_whitelist_refusal_is_general_failure(
    launcher: Launcher, counting_listener: TCPServer
) -> None:
    server, local = launcher.pair(server={"whitelist": ["10.0.0.0/8"]})
    result = socks_request(local.port, "127.0.0.1", counting_listener.port)
    with result.sock:
        assert result.raw == GENERAL_FAILURE
        _assert_closed(result.sock)
    _no_connection(counting_listener)
    assert "not on the whitelist" in server.stderr()
    local.assert_stops_cleanly()
    server.assert_stops_cleanly()


# --------------------------------------------------------------------------- channel keys


def test_server_refuses_an_unknown_local_key(
    launcher: Launcher, keys: Keys, programs: Programs, counting_listener: TCPServer
) -> None:
    local = launcher.local(
        programs.server.port, local_private_key=keys.path("other_private"), handshake_timeout=2
    )
    result = socks_request(local.port, "127.0.0.1", counting_listener.port)
    with result.sock:
        assert result.raw == GENERAL_FAILURE
        _assert_closed(result.sock)
    _no_connection(counting_listener)
    other = fingerprint(load_private_key(Path(keys.path("other_private"))))
    assert wait_for(lambda: f"unknown local key {other}" in programs.server.stderr(), 15)
    assert "authorized_keys" in programs.server.stderr()
    assert wait_for(lambda: "closed the handshake without answering" in local.stderr(), 15)
    assert other in local.stderr()  # the local names its own key, in genkey's format
    local.assert_stops_cleanly()


@pytest.mark.parametrize("variant", ["local-trusts-other-key", "impostor-server"])
def test_local_refuses_a_server_with_the_wrong_key(
    launcher: Launcher, keys: Keys, counting_listener: TCPServer, variant: str
) -> None:
    if variant == "local-trusts-other-key":
        server, local = launcher.pair(
            local={"server_public_key": keys.path("other_public"), "handshake_timeout": 2}
        )
    else:  # a server holding another private key poses as the real one
        server, local = launcher.pair(
            server={"server_private_key": keys.path("other_private")},
            local={"handshake_timeout": 2},
        )
    result = socks_request(local.port, "127.0.0.1", counting_listener.port)
    with result.sock:
        assert result.raw == GENERAL_FAILURE
        _assert_closed(result.sock)
    _no_connection(counting_listener)
    # The ClientInit is sealed to another key: the server cannot open it and stays silent.
    assert wait_for(lambda: "not a ClientInit sealed to this server's key" in server.stderr(), 15)
    assert wait_for(lambda: "closed the handshake without answering" in local.stderr(), 15)
    assert "server_public_key is not that server's key" in local.stderr()
    local.assert_stops_cleanly()
    server.assert_stops_cleanly()


# --------------------------------------------------------------------------- secrets


def test_password_never_in_any_log(programs: Programs) -> None:
    """Runs last in this module: every auth test above has logged by now (DEBUG level)."""
    logs = {
        "server": programs.server.stderr(),
        "auth_local": programs.auth_local.stderr(),
        "open_local": programs.open_local.stderr(),
    }
    assert "sockproxy.access" in logs["auth_local"]  # the logs are really there
    for name, text in logs.items():
        for line in text.splitlines():
            assert PASSWORD not in line, f"{name} logged the password: {line}"
            assert WRONG_PASSWORD not in line, f"{name} logged a tried password: {line}"
