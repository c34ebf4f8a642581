"""server/destinations.py: one resolve-and-check for TCP, HTTP CONNECT and UDP (issue 12, 1-2).

The bypass table drives the real programs on loopback: with ``destination_deny`` covering
127.0.0.0/8 and ::1, no spelling of "this host" may reach a destination listening on
127.0.0.1, through SOCKS5 CONNECT, HTTP CONNECT or UDP ASSOCIATE.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.destinations import Destinations, _proc_ipv4, _proc_ipv6, own_addresses, warn_if_exposed
from tests.conftest import (
    SOCKET_TIMEOUT,
    Keys,
    Launcher,
    Program,
    TCPServer,
    send_raw_request,
    socks_handshake,
    socks_request,
    wait_for,
)
from tests.test_features import UDPServer, _associate, _reverse
from utils.config import IPAddress, ServerConfig, kernel_view, load_server_config
from utils.socks5 import Address, Reply
from utils.udp import build_socks_datagram

ip = ipaddress.ip_address
DENY_LOOPBACK = ["127.0.0.0/8", "[::1]/128"]

# Every way the review reached 127.0.0.1 past DENY_LOOPBACK, plus neighbours:
# (how the test sends it, the host text)
IP_SPELLINGS = ["0.0.0.0", "::", "::ffff:0.0.0.0", "::ffff:127.0.0.1", "::127.0.0.1", "::7f00:2"]
NAME_SPELLINGS = ["0", "0.0.0.0", "127.1", "0x7f000001"]  # sent as ATYP 3 (domain) names


# --------------------------------------------------------------------------- the rule function


@pytest.mark.parametrize(
    ("given", "seen"),
    [
        ("0.0.0.0", "127.0.0.1"),
        ("::", "::1"),
        ("::ffff:0.0.0.0", "127.0.0.1"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("::127.0.0.1", "127.0.0.1"),  # IPv4-compatible
        ("::0.0.0.2", "0.0.0.2"),
        ("::1", "::1"),  # loopback, not the IPv4-compatible 0.0.0.1
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_kernel_view(given: str, seen: str) -> None:
    assert kernel_view(ip(given)) == ip(seen)


def _config(tmp_path: Path, keys_dir: Path, **fields: object) -> ServerConfig:
    data = {
        "server_address": "127.0.0.1",
        "server_port": 9,
        "whitelist": ["127.0.0.1"],
        "local_public_key": str(keys_dir / "local_public.pem"),
        "server_private_key": str(keys_dir / "server_private.pem"),
        **fields,
    }
    path = tmp_path / "server.json"
    path.write_text(json.dumps(data))
    return load_server_config(path)


@pytest.fixture
def keys_dir(keys: Keys) -> Path:
    return keys.dir


def test_every_spelling_of_this_host_is_denied(tmp_path: Path, keys_dir: Path) -> None:
    config = _config(tmp_path, keys_dir, destination_deny=DENY_LOOPBACK)
    destinations = Destinations(config)
    for text in IP_SPELLINGS:
        assert destinations.resolve(Address(text, 80), socket.SOCK_STREAM) == Reply.NOT_ALLOWED
    for name in NAME_SPELLINGS:
        assert destinations.resolve(Address(name, 80), socket.SOCK_DGRAM) == Reply.NOT_ALLOWED
    allowed = destinations.resolve(Address("192.0.2.1", 80), socket.SOCK_STREAM)
    assert allowed == [(socket.AF_INET, ("192.0.2.1", 80))]


def test_allow_list_sees_the_kernel_view(tmp_path: Path, keys_dir: Path) -> None:
    config = _config(tmp_path, keys_dir, destination_allow=["192.0.2.0/24"])
    destinations = Destinations(config)
    assert destinations.allowed(ip("::ffff:192.0.2.5"), 1)
    assert destinations.allowed(ip("::192.0.2.5"), 1)
    assert not destinations.allowed(ip("0.0.0.0"), 1)
    assert not destinations.allowed(ip("::"), 1)


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b:1::7f00:1",  # local-use NAT64
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "::ffff:0:7f00:1",  # SIIT IPv4-translated
        "fec0::1",  # site-local
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "::a00:1",  # IPv4-compatible 10.0.0.1
        "0.0.0.0",
        "::",
    ],
)
def test_block_private_destinations_covers_translation_ranges(
    tmp_path: Path, keys_dir: Path, address: str
) -> None:
    config = _config(tmp_path, keys_dir, block_private_destinations=True)
    destinations = Destinations(config, read_own=frozenset)
    assert not destinations.allowed(ip(address), 443)
    assert destinations.allowed(ip("2001:4860::1"), 443)  # a public address still passes


def test_block_private_destinations_refuses_the_servers_own_addresses(
    tmp_path: Path, keys_dir: Path
) -> None:
    own: set[IPAddress] = {ip("198.51.100.7"), ip("2001:db8::7")}  # "public" for the test
    config = _config(tmp_path, keys_dir, block_private_destinations=True)
    destinations = Destinations(config, read_own=lambda: frozenset(own))
    for text in ("198.51.100.7", "::ffff:198.51.100.7", "::198.51.100.7", "2001:db8::7"):
        assert not destinations.allowed(ip(text), 22), text
    assert destinations.allowed(ip("198.51.100.8"), 22)
    own.add(ip("198.51.100.8"))  # an address added to an interface: seen after SIGHUP
    assert destinations.allowed(ip("198.51.100.8"), 22)
    destinations.refresh()
    assert not destinations.allowed(ip("198.51.100.8"), 22)
    plain = Destinations(_config(tmp_path, keys_dir), read_own=lambda: frozenset(own))
    assert plain.allowed(ip("198.51.100.7"), 22)  # without block_private: not refused


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 203.0.113.9
        /32 host LOCAL
     |-- 203.0.113.0
        /24 link UNICAST
"""
IF_INET6 = (
    "00000000000000000000000000000001 01 80 10 80       lo\n"
    "20010db8000000000000000000000009 02 40 00 00     eth0\n"
)


def test_own_addresses_are_read_from_proc_text() -> None:
    assert list(_proc_ipv4(FIB_TRIE)) == [ip("127.0.0.1"), ip("203.0.113.9")]
    assert list(_proc_ipv6(IF_INET6)) == [ip("::1"), ip("2001:db8::9")]


def test_own_addresses_of_this_host_include_loopback() -> None:
    found = own_addresses()
    assert ip("127.0.0.1") in found
    if Path("/proc/net/if_inet6").read_text().strip():
        assert ip("::1") in found


def test_exposed_server_without_rules_warns_once(
    tmp_path: Path, keys_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sockproxy.server"):
        warn_if_exposed(_config(tmp_path, keys_dir, server_address="0.0.0.0"))
        warn_if_exposed(_config(tmp_path, keys_dir))  # loopback
        ruled = _config(tmp_path, keys_dir, server_address="::", block_private_destinations=True)
        warn_if_exposed(ruled)
        denied = _config(tmp_path, keys_dir, server_address="::", destination_deny=["10.0.0.0/8"])
        warn_if_exposed(denied)
    assert len(caplog.records) == 1
    assert "0.0.0.0" in caplog.records[0].getMessage()
    assert "block_private_destinations" in caplog.records[0].getMessage()


# --------------------------------------------------------------------------- the real programs


@pytest.fixture(scope="module")
def denying_pair(module_launcher: Launcher) -> tuple[Program, Program]:
    return module_launcher.pair(server={"destination_deny": DENY_LOOPBACK})


@pytest.fixture
def listener() -> Iterator[TCPServer]:
    """A destination on 127.0.0.1 that counts who reached it."""
    server = TCPServer(lambda conn, _peer: conn.close())
    yield server
    server.close()


def _raw_domain_request(port: int, name: str, dport: int) -> Reply:
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    try:
        socks_handshake(sock)
        raw = name.encode()
        request = b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + struct.pack(">H", dport)
        return send_raw_request(sock, request).reply
    finally:
        sock.close()


def test_socks5_connect_bypass_table(
    denying_pair: tuple[Program, Program], listener: TCPServer
) -> None:
    local = denying_pair[1]
    replies = {}
    for text in IP_SPELLINGS:
        result = socks_request(local.port, text, listener.port)
        result.sock.close()
        replies[text] = result.reply
    for name in NAME_SPELLINGS:
        replies[f"name {name}"] = _raw_domain_request(local.port, name, listener.port)
    assert replies == {key: Reply.NOT_ALLOWED for key in replies}
    assert listener.peers == []


@pytest.mark.parametrize("authority", ["0.0.0.0", "[::]", "[::ffff:0.0.0.0]", "0", "[::127.0.0.1]"])
def test_http_connect_bypass_table(
    denying_pair: tuple[Program, Program], listener: TCPServer, authority: str
) -> None:
    with socket.create_connection(("127.0.0.1", denying_pair[1].port), timeout=10) as sock:
        sock.sendall(f"CONNECT {authority}:{listener.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(200).startswith(b"HTTP/1.1 403 ")
    assert listener.peers == []


def test_udp_bypass_table(denying_pair: tuple[Program, Program]) -> None:
    server, local = denying_pair
    echo = UDPServer("127.0.0.1", _reverse)
    control, relay = _associate(local.port)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    before = server.stderr().count("denied by the rules")
    spellings = IP_SPELLINGS + NAME_SPELLINGS
    try:
        for text in spellings:
            datagram = build_socks_datagram(Address(text, echo.port), text.encode())
            client.sendto(datagram, (relay.host, relay.port))

        def all_handled() -> bool:
            denied = server.stderr().count("denied by the rules") - before
            return bool(echo.received) or denied >= len(spellings)

        assert wait_for(all_handled, timeout=10), server.stderr()[-2000:]
        assert echo.received == []
    finally:
        control.close()
        client.close()
        echo.close()
