"""What users of ssh -D and shadowsocks expect next, driven by real clients on loopback:
UDP ASSOCIATE, HTTP CONNECT, many users, destination rules, IPv6 listening."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import socks

from tests.conftest import (
    SOCKET_TIMEOUT,
    DataFiles,
    HTTPFiles,
    Launcher,
    Program,
    TCPServer,
    access_lines,
    read_to_end,
    run_curl,
    socks_handshake,
    socks_request,
    wait_for,
)
from utils.socks5 import CMD_UDP_ASSOCIATE, Address, Reply, Request, build_request, parse_reply
from utils.udp import build_socks_datagram, parse_socks_datagram


class UDPServer:
    """Answers each datagram with ``answer(data)``; counts what it saw."""

    def __init__(self, host: str, answer: object) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.host = host
        self.received: list[bytes] = []
        self._answer = answer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.received.append(data)
            self.sock.sendto(self._answer(data), peer)  # type: ignore[operator]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _reverse(data: bytes) -> bytes:
    return data[::-1]


def _dns_answer(query: bytes) -> bytes:
    """A DNS-style response: same id, QR bit set, one A record 192.0.2.1 for the question."""
    ident, _flags, qdcount = struct.unpack(">HHH", query[:6])
    question = query[12:]
    header = struct.pack(">HHHHHH", ident, 0x8180, qdcount, 1, 0, 0)
    record = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 1])
    return header + question + record


def _dns_query(ident: int, name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + struct.pack(">HH", 1, 1)


@pytest.fixture(scope="module")
def pair(module_launcher: Launcher) -> tuple[Program, Program]:
    return module_launcher.pair()


@pytest.fixture
def udp_echo() -> Iterator[UDPServer]:
    server = UDPServer("127.0.0.1", _reverse)
    yield server
    server.close()


@pytest.fixture
def udp6_echo() -> Iterator[UDPServer]:
    try:
        server = UDPServer("::1", _reverse)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    yield server
    server.close()


def _pysocks_udp(port: int) -> socks.socksocket:
    client = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    client.set_proxy(socks.SOCKS5, "127.0.0.1", port)
    client.settimeout(SOCKET_TIMEOUT)
    return client


# --------------------------------------------------------------------------- UDP ASSOCIATE


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_udp_echo_through_pysocks(
    pair: tuple[Program, Program], udp_echo: UDPServer, udp6_echo: UDPServer, family: str
) -> None:
    target = udp_echo if family == "ipv4" else udp6_echo
    client = _pysocks_udp(pair[1].port)
    try:
        for size in (1, 512, 1400, 8000, 60000):
            payload = os.urandom(size)
            client.sendto(payload, (target.host, target.port))
            data, _ = client.recvfrom(65535)
            assert data == payload[::-1]
    finally:
        client.close()


def test_udp_dns_style_request_response(pair: tuple[Program, Program]) -> None:
    dns = UDPServer("127.0.0.1", _dns_answer)
    client = _pysocks_udp(pair[1].port)
    try:
        for ident in (0x1234, 0xBEEF):
            client.sendto(_dns_query(ident, "example.test"), ("127.0.0.1", dns.port))
            answer, _ = client.recvfrom(512)
            assert struct.unpack(">H", answer[:2])[0] == ident
            assert answer[2] & 0x80  # a response
            assert answer.endswith(bytes([192, 0, 2, 1]))
    finally:
        client.close()
        dns.close()


def _associate(port: int) -> tuple[socket.socket, Address]:
    control = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    socks_handshake(control)
    control.sendall(build_request(_udp_request()))
    reply = control.recv(64)
    parsed = parse_reply(reply)
    assert parsed is not None and parsed[0] == Reply.SUCCEEDED
    return control, parsed[1]


def _udp_request() -> Request:
    return Request(CMD_UDP_ASSOCIATE, Address("0.0.0.0", 0))


def test_udp_from_other_addresses_and_fragments_are_dropped(
    pair: tuple[Program, Program], udp_echo: UDPServer
) -> None:
    control, relay = _associate(pair[1].port)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(SOCKET_TIMEOUT)
    stranger.settimeout(1.0)
    target = Address("127.0.0.1", udp_echo.port)
    try:
        client.sendto(build_socks_datagram(target, b"mine"), (relay.host, relay.port))
        assert parse_socks_datagram(client.recvfrom(65535)[0])[1] == b"enim"
        # Another port on the same host is not the client: dropped.
        stranger.sendto(build_socks_datagram(target, b"theirs"), (relay.host, relay.port))
        with pytest.raises(TimeoutError):
            stranger.recvfrom(65535)
        # A fragment (FRAG=1) is dropped; the next whole datagram still works.
        fragment = b"\x00\x00\x01" + build_socks_datagram(target, b"frag")[3:]
        client.sendto(fragment, (relay.host, relay.port))
        client.sendto(build_socks_datagram(target, b"after"), (relay.host, relay.port))
        assert parse_socks_datagram(client.recvfrom(65535)[0])[1] == b"retfa"
        assert b"theirs" not in udp_echo.received and b"frag" not in udp_echo.received
    finally:
        control.close()
        client.close()
        stranger.close()


def test_udp_association_ends_with_its_tcp_connection(
    pair: tuple[Program, Program], udp_echo: UDPServer
) -> None:
    control, relay = _associate(pair[1].port)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(1.0)
    target = Address("127.0.0.1", udp_echo.port)
    try:
        client.sendto(build_socks_datagram(target, b"one"), (relay.host, relay.port))
        assert client.recvfrom(65535)[0].endswith(b"eno")
        control.close()
        # The relay port is closed within the poll interval: later datagrams go nowhere.
        assert wait_for(lambda: _relay_closed(client, relay, target), timeout=5)
    finally:
        client.close()


def _relay_closed(client: socket.socket, relay: Address, target: Address) -> bool:
    try:
        client.sendto(build_socks_datagram(target, b"late"), (relay.host, relay.port))
        client.recvfrom(65535)
    except (TimeoutError, ConnectionRefusedError):
        return True
    return False


# --------------------------------------------------------------------------- idle timeout


@pytest.mark.parametrize("kind", ["tcp", "udp"])
@pytest.mark.parametrize("side", ["local", "server"])
def test_an_idle_tunnel_is_cut_alike_for_tcp_and_udp(
    launcher: Launcher, echo_server: TCPServer, udp_echo: UDPServer, kind: str, side: str
) -> None:
    """Nothing moves for the idle_timeout of one side: that side logs "aborted: idle
    timeout", the other an abort, and the client's TCP connection (the relayed one, or the
    control connection of the association) gets a reset, never a clean-looking end."""
    short, long = {"idle_timeout": 1}, {"idle_timeout": 60}
    server, local = launcher.pair(
        server=short if side == "server" else long, local=short if side == "local" else long
    )
    sock = _one_exchange(kind, local.port, echo_server, udp_echo)
    quiet_since = time.monotonic()
    with sock:
        sock.settimeout(10)
        assert read_to_end(sock)[1] == "reset"
    assert time.monotonic() - quiet_since < 1 + 3  # the timeout, then a poll interval and slack
    idle, other = (local, server) if side == "local" else (server, local)
    assert wait_for(lambda: _logged(idle, "outcome=aborted: idle timeout"), 5), idle.stderr()
    assert wait_for(lambda: _logged(other, "outcome=aborted: "), 5), other.stderr()


def _one_exchange(
    kind: str, port: int, echo_server: TCPServer, udp_echo: UDPServer
) -> socket.socket:
    """A tunnel of ``kind`` that has carried one message each way; its TCP socket."""
    if kind == "tcp":
        result = socks_request(port, "127.0.0.1", echo_server.port)
        result.sock.sendall(b"ping")
        assert result.sock.recv(4) == b"ping"
        return result.sock
    control, relay = _associate(port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(SOCKET_TIMEOUT)
        datagram = build_socks_datagram(Address("127.0.0.1", udp_echo.port), b"ping")
        client.sendto(datagram, (relay.host, relay.port))
        assert client.recvfrom(65535)[0].endswith(b"gnip")
    return control


def _logged(program: Program, text: str) -> bool:
    return any(text in line for line in access_lines(program.stderr()))


# --------------------------------------------------------------------------- HTTP CONNECT


def test_curl_https_proxy_style_connect(
    pair: tuple[Program, Program], http_files: HTTPFiles, data_files: DataFiles
) -> None:
    url = f"http://127.0.0.1:{http_files.port}/small.bin"
    result = run_curl("--proxytunnel", "-x", f"http://127.0.0.1:{pair[1].port}", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data_files.small


def test_http_connect_with_auth(
    launcher: Launcher, http_files: HTTPFiles, data_files: DataFiles
) -> None:
    _, local = launcher.pair(local={"auth": True, "username": "alice", "password": "s3cret-pw"})
    url = f"http://127.0.0.1:{http_files.port}/small.bin"
    proxy = f"http://127.0.0.1:{local.port}"
    good = run_curl("--proxytunnel", "-x", proxy, "--proxy-user", "alice:s3cret-pw", url)
    assert good.returncode == 0, good.stderr
    assert good.stdout == data_files.small
    bad = run_curl("--proxytunnel", "-x", proxy, "--proxy-user", "alice:wrong", "-v", url)
    assert bad.returncode != 0
    assert b"407" in bad.stderr
    assert "s3cret-pw" not in local.stderr()


def test_http_connect_refusal_is_an_http_status(pair: tuple[Program, Program]) -> None:
    with socket.create_connection(("127.0.0.1", pair[1].port), timeout=SOCKET_TIMEOUT) as sock:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer, _ = read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 502 ")
    # A one-line body names the failure (issue 9: no empty 502 that leaves the user guessing).
    assert answer.endswith(b"\r\n\r\nthe sockproxy server could not connect: connection refused\n")


# --------------------------------------------------------------------------- many users


def test_authorized_keys_name_who_connected(
    launcher: Launcher, http_files: HTTPFiles, data_files: DataFiles
) -> None:
    keys = launcher.keys
    server = launcher.server(
        local_public_key=None,
        authorized_keys=[
            {"name": "alice", "public_key": keys.path("local_public")},
            keys.path("other_public"),
        ],
    )
    alice = launcher.local(server.port)
    other = launcher.local(server.port, local_private_key=keys.path("other_private"))
    url = f"http://127.0.0.1:{http_files.port}/small.bin"
    for local in (alice, other):
        result = run_curl("--socks5", f"127.0.0.1:{local.port}", url)
        assert result.returncode == 0, result.stderr
        assert result.stdout == data_files.small

    def both_named() -> bool:
        lines = access_lines(server.stderr())  # written as each connection ends
        return any("(alice)" in line for line in lines) and any(
            "(other_public)" in line for line in lines
        )

    assert wait_for(both_named, timeout=10), server.stderr()


# --------------------------------------------------------------------------- destination rules


def test_destination_allow_list_and_private_blocking(
    launcher: Launcher, http_files: HTTPFiles, data_files: DataFiles
) -> None:
    _, allowed = launcher.pair(server={"destination_allow": [f"127.0.0.1/32:{http_files.port}"]})
    ok = socks_request(allowed.port, "127.0.0.1", http_files.port)
    ok.sock.close()
    denied = socks_request(allowed.port, "127.0.0.1", http_files.port + 1)
    denied.sock.close()
    assert (ok.reply, denied.reply) == (Reply.SUCCEEDED, Reply.NOT_ALLOWED)

    server, blocked = launcher.pair(server={"block_private_destinations": True})
    for host in ("127.0.0.1", "localhost", "::1"):  # names are resolved first: no DNS bypass
        result = socks_request(blocked.port, host, http_files.port)
        result.sock.close()
        assert result.reply == Reply.NOT_ALLOWED, host
    assert "denied by the rules" in server.stderr()


# --------------------------------------------------------------------------- IPv6 listening


def test_both_programs_listen_on_ipv6(
    launcher: Launcher, http_files: HTTPFiles, data_files: DataFiles
) -> None:
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"no IPv6: {exc}")
    server = launcher.start(
        "server.py", launcher.server_config(server_address="::1"), "server_port"
    )
    local = launcher.start(
        "local.py",
        launcher.local_config(server.port, server_address="::1", local_address="::"),
        "local_port",
    )
    assert wait_for(lambda: _accepts("::1", local.port) and _accepts("::1", server.port), 10)
    url = f"http://127.0.0.1:{http_files.port}/small.bin"
    for proxy in (f"[::1]:{local.port}", f"127.0.0.1:{local.port}"):  # "::" is dual-stack
        result = run_curl("--socks5-hostname", proxy, url)
        assert result.returncode == 0, result.stderr
        assert result.stdout == data_files.small


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- tunnels


def _hold(conn: socket.socket, _peer: object) -> None:
    """A 'server' that accepts and never says a word."""
    conn.recv(1 << 16)


def test_failover_past_a_server_that_accepts_but_never_speaks(
    launcher: Launcher, echo_server: TCPServer
) -> None:
    mute = TCPServer(_hold)
    try:
        real = launcher.server()
        servers = [
            {"server_address": "127.0.0.1", "server_port": port, "server_public_key": key}
            for port, key in (
                (mute.port, launcher.keys.path("server_public")),
                (real.port, launcher.keys.path("server_public")),
            )
        ]
        config = launcher.local_config(real.port, servers=servers, handshake_timeout=4)
        for single in ("server_address", "server_port", "server_public_key"):
            del config[single]
        local = launcher.start("local.py", config, "local_port")
        local.wait_ready()
        result = socks_request(local.port, "127.0.0.1", echo_server.port)
        result.sock.close()
        assert result.reply == Reply.SUCCEEDED  # the mute server did not use up all the time
        assert mute.peers, "the first server was tried"
    finally:
        mute.close()


def test_local_copes_with_a_server_that_has_resumption_off(
    launcher: Launcher, echo_server: TCPServer
) -> None:
    _, local = launcher.pair(server={"resumption_lifetime": 0})
    results: list[Reply] = []

    def one() -> None:
        result = socks_request(local.port, "127.0.0.1", echo_server.port)
        result.sock.close()
        results.append(result.reply)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for _ in range(3):
        one()
    assert results == [Reply.SUCCEEDED] * 9
