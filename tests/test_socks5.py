"""Tests of utils/socks5.py: RFC 1928/1929 vectors, error paths, properties."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.provisional import domains

from utils.errors import ProtocolError, Socks5Error
from utils.socks5 import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    CMD_BIND,
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    METHOD_NO_ACCEPTABLE,
    METHOD_NO_AUTH,
    METHOD_USERPASS,
    Address,
    Credentials,
    Event,
    Greeting,
    NeedData,
    Reply,
    Request,
    RequestReceived,
    Socks5ServerConnection,
    auth_status,
    build_greeting,
    build_reply,
    build_request,
    build_userpass,
    credentials_match,
    decode_address,
    decode_tunnel_reply,
    decode_tunnel_request,
    encode_address,
    encode_tunnel_reply,
    encode_tunnel_request,
    method_selection,
    parse_auth_status,
    parse_method_selection,
    parse_reply,
    reply_for_error,
)

CONNECT_IPV4 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
CONNECT_DOMAIN = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
CONNECT_IPV6 = b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x1f\x90"


def drain(conn: Socks5ServerConnection) -> list[Event]:
    """Every event available now, stopping after NeedData or RequestReceived."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            return events
        events.append(event)
        if isinstance(event, RequestReceived):
            return events


def feed(conn: Socks5ServerConnection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return drain(conn)


def expect_error(conn: Socks5ServerConnection, data: bytes) -> Socks5Error:
    conn.receive_data(data)
    with pytest.raises(Socks5Error) as info:
        drain(conn)
    return info.value


# ----------------------------------------------------------------------- constants


def test_constants_match_the_rfcs() -> None:
    assert (METHOD_NO_AUTH, METHOD_USERPASS, METHOD_NO_ACCEPTABLE) == (0x00, 0x02, 0xFF)
    assert (CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE) == (1, 2, 3)
    assert (ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6) == (1, 3, 4)
    assert [r.value for r in Reply] == list(range(9))
    assert int(Reply.CONNECTION_REFUSED) == 5
    assert int(Reply.ADDRESS_TYPE_NOT_SUPPORTED) == 8


# ------------------------------------------------------------------------- Address


@pytest.mark.parametrize(
    ("host", "atyp", "text"),
    [
        ("127.0.0.1", ATYP_IPV4, "127.0.0.1:80"),
        ("::1", ATYP_IPV6, "[::1]:80"),
        ("example.com", ATYP_DOMAIN, "example.com:80"),
    ],
)
def test_address_atyp_and_str(host: str, atyp: int, text: str) -> None:
    addr = Address(host, 80)
    assert addr.atyp == atyp
    assert str(addr) == text


def test_address_normalises_hosts() -> None:
    assert Address("::0001", 1).host == "::1"
    assert Address("2001:DB8::1", 1).host == "2001:db8::1"
    assert Address("bücher.de", 1).host == "xn--bcher-kva.de"
    assert Address("Example.COM", 1).host == "Example.COM"  # ASCII names kept as given


@pytest.mark.parametrize("port", [-1, 65536, 1 << 20])
def test_address_port_out_of_range(port: int) -> None:
    with pytest.raises(Socks5Error) as info:
        Address("example.com", port)
    assert info.value.reply == Reply.GENERAL_FAILURE


def test_address_port_bounds_accepted() -> None:
    assert Address("1.2.3.4", 0).port == 0
    assert Address("1.2.3.4", 65535).port == 65535


@pytest.mark.parametrize(
    "host",
    ["", "a" * 256, "bad host", "nul\x00host", "tab\tname", "x" * 64 + "ü.com", "a..ü"],
)
def test_address_bad_domain(host: str) -> None:
    with pytest.raises(Socks5Error) as info:
        Address(host, 80)
    assert info.value.reply == Reply.GENERAL_FAILURE


def test_address_longest_domain_accepted() -> None:
    name = ".".join(["a" * 63] * 4)[:255]
    assert len(name) == 255
    assert Address(name, 1).atyp == ATYP_DOMAIN


def test_address_ipv6_zone_not_supported() -> None:
    with pytest.raises(Socks5Error) as info:
        Address("fe80::1%eth0", 80)
    assert info.value.reply == Reply.ADDRESS_TYPE_NOT_SUPPORTED


# -------------------------------------------------------- encode / decode address


@pytest.mark.parametrize(
    ("addr", "wire"),
    [
        (Address("127.0.0.1", 80), b"\x01\x7f\x00\x00\x01\x00\x50"),
        (Address("example.com", 443), b"\x03\x0bexample.com\x01\xbb"),
        (Address("::1", 8080), b"\x04" + b"\x00" * 15 + b"\x01\x1f\x90"),
        (Address("0.0.0.0", 0), b"\x01\x00\x00\x00\x00\x00\x00"),
    ],
)
def test_address_vectors(addr: Address, wire: bytes) -> None:
    assert encode_address(addr) == wire
    assert decode_address(wire) == (addr, len(wire))
    assert decode_address(b"junk" + wire + b"more", 4) == (addr, 4 + len(wire))
    assert decode_address(memoryview(wire)) == (addr, len(wire))
    assert decode_address(bytearray(wire)) == (addr, len(wire))
    for cut in range(len(wire)):
        assert decode_address(wire[:cut]) is None


@pytest.mark.parametrize("atyp", [0, 2, 5, 0xFF])
def test_decode_unknown_atyp(atyp: int) -> None:
    with pytest.raises(Socks5Error) as info:
        decode_address(bytes((atyp,)) + b"\x00" * 20)
    assert info.value.reply == Reply.ADDRESS_TYPE_NOT_SUPPORTED


@pytest.mark.parametrize("wire", [b"\x03\x00\x00\x50", b"\x03\x00"])
def test_decode_zero_length_domain(wire: bytes) -> None:
    """Rejected at once, without waiting for the port bytes."""
    with pytest.raises(Socks5Error) as info:
        decode_address(wire)
    assert info.value.reply == Reply.GENERAL_FAILURE


@pytest.mark.parametrize("name", [b"a\x00b", b"a b", b"caf\xc3\xa9", b"\x7f", b"x\r\ny"])
def test_decode_domain_not_printable_ascii(name: bytes) -> None:
    with pytest.raises(Socks5Error) as info:
        decode_address(bytes((ATYP_DOMAIN, len(name))) + name + b"\x00\x50")
    assert info.value.reply == Reply.GENERAL_FAILURE


def test_decode_negative_offset() -> None:
    with pytest.raises(ValueError, match="negative"):
        decode_address(b"\x01\x7f\x00\x00\x01\x00\x50", -1)


def test_decode_offset_past_end_needs_data() -> None:
    assert decode_address(b"\x01", 5) is None


# -------------------------------------------------------------- channel messages


def test_tunnel_request_vector() -> None:
    req = Request(CMD_CONNECT, Address("example.com", 443))
    wire = b"\x01\x03\x0bexample.com\x01\xbb"
    assert encode_tunnel_request(req) == wire
    assert decode_tunnel_request(wire) == req


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01", b"\x01\x01\x7f\x00\x00", b"\x01\x01\x7f\x00\x00\x01\x00\x50\x00"],
)
def test_tunnel_request_not_exact(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_tunnel_request(data)


def test_tunnel_request_unknown_atyp_keeps_reply() -> None:
    with pytest.raises(Socks5Error) as info:
        decode_tunnel_request(b"\x01\x09\x00")
    assert info.value.reply == Reply.ADDRESS_TYPE_NOT_SUPPORTED


def test_tunnel_reply_vector() -> None:
    wire = b"\x05\x01\x7f\x00\x00\x01\x00\x50"
    assert encode_tunnel_reply(Reply.CONNECTION_REFUSED, Address("127.0.0.1", 80)) == wire
    assert encode_tunnel_reply(5, Address("127.0.0.1", 80)) == wire
    assert decode_tunnel_reply(wire) == (Reply.CONNECTION_REFUSED, Address("127.0.0.1", 80))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x09\x01\x7f\x00\x00\x01\x00\x50",
        b"\xff\x01\x7f\x00\x00\x01\x00\x50",
        b"\x00\x01\x7f\x00\x00\x01\x00",
        b"\x00\x01\x7f\x00\x00\x01\x00\x50\x00",
    ],
)
def test_tunnel_reply_bad(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_tunnel_reply(data)


def test_encode_unknown_reply_code_is_a_bug() -> None:
    with pytest.raises(ValueError, match="reply code"):
        encode_tunnel_reply(9, Address("0.0.0.0", 0))
    with pytest.raises(ValueError, match="reply code"):
        build_reply(256)


def test_request_command_must_be_a_byte() -> None:
    with pytest.raises(ValueError, match="command"):
        Request(256, Address("0.0.0.0", 0))


# ----------------------------------------------------------------- server builders


def test_server_builders() -> None:
    assert method_selection(METHOD_NO_AUTH) == b"\x05\x00"
    assert method_selection(METHOD_NO_ACCEPTABLE) == b"\x05\xff"
    assert auth_status(True) == b"\x01\x00"
    assert auth_status(False) == b"\x01\x01"
    assert build_reply(Reply.SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert (
        build_reply(Reply.SUCCEEDED, Address("10.0.0.2", 4242))
        == b"\x05\x00\x00\x01\x0a\x00\x00\x02\x10\x92"
    )
    assert build_reply(Reply.COMMAND_NOT_SUPPORTED)[:3] == b"\x05\x07\x00"
    conn = Socks5ServerConnection(require_auth=False)
    assert conn.method_selection(METHOD_USERPASS) == b"\x05\x02"
    assert conn.auth_status(False) == b"\x01\x01"
    assert conn.build_reply(Reply.NOT_ALLOWED) == build_reply(Reply.NOT_ALLOWED)
    assert conn.credentials_match(b"u", b"p", b"u", b"p")


@pytest.mark.parametrize(
    ("require_auth", "offered", "chosen"),
    [
        (False, b"\x00", METHOD_NO_AUTH),
        (False, b"\x02\x00", METHOD_NO_AUTH),
        (False, b"\x02", METHOD_NO_ACCEPTABLE),
        (True, b"\x00\x02", METHOD_USERPASS),
        (True, b"\x00", METHOD_NO_ACCEPTABLE),
        (True, b"\x01\x03\x80", METHOD_NO_ACCEPTABLE),
    ],
)
def test_choose_method(require_auth: bool, offered: bytes, chosen: int) -> None:
    assert Socks5ServerConnection(require_auth).choose_method(offered) == chosen


@pytest.mark.parametrize(
    ("user", "password", "ok"),
    [
        (b"user", b"pass", True),
        (b"user", b"wrong", False),
        (b"wrong", b"pass", False),
        (b"use", b"pass", False),
        (b"user", b"passs", False),
        (b"", b"", False),
    ],
)
def test_credentials_match(user: bytes, password: bytes, ok: bool) -> None:
    assert credentials_match(b"user", b"pass", user, password) is ok


# ----------------------------------------------------------------- server state machine


def test_session_without_auth() -> None:
    conn = Socks5ServerConnection(require_auth=False)
    assert conn.next_event() == NeedData()
    assert feed(conn, b"\x05\x01\x00") == [Greeting(b"\x00")]
    assert conn.choose_method(b"\x00") == METHOD_NO_AUTH
    assert conn.trailing_data() == b""
    conn.receive_data(CONNECT_IPV4)
    assert drain(conn) == [RequestReceived(Request(CMD_CONNECT, Address("127.0.0.1", 80)))]
    assert conn.done
    assert conn.trailing_data() == b""


def test_session_with_auth_rfc1929_vector() -> None:
    conn = Socks5ServerConnection(require_auth=True)
    assert feed(conn, b"\x05\x02\x00\x02") == [Greeting(b"\x00\x02")]
    assert feed(conn, b"\x01\x04user\x04pass") == [Credentials(b"user", b"pass")]
    assert feed(conn, CONNECT_DOMAIN) == [
        RequestReceived(Request(CMD_CONNECT, Address("example.com", 443)))
    ]


def test_pipelined_session_keeps_trailing_data() -> None:
    conn = Socks5ServerConnection(require_auth=True)
    data = b"\x05\x01\x02" + b"\x01\x01u\x01p" + CONNECT_IPV6 + b"GET / HTTP/1.1\r\n"
    assert feed(conn, data) == [
        Greeting(b"\x02"),
        Credentials(b"u", b"p"),
        RequestReceived(Request(CMD_CONNECT, Address("::1", 8080))),
    ]
    assert conn.trailing_data() == b"GET / HTTP/1.1\r\n"
    conn.receive_data(b"Host: x\r\n")
    assert conn.trailing_data() == b"GET / HTTP/1.1\r\nHost: x\r\n"
    with pytest.raises(RuntimeError):
        conn.next_event()


@pytest.mark.parametrize("command", [CMD_BIND, CMD_UDP_ASSOCIATE, 0, 9, 0xFF])
def test_other_commands_are_returned(command: int) -> None:
    conn = Socks5ServerConnection(require_auth=False)
    request = b"\x05" + bytes((command,)) + CONNECT_IPV4[2:]
    events = feed(conn, b"\x05\x01\x00" + request)
    assert events[-1] == RequestReceived(Request(command, Address("127.0.0.1", 80)))


def test_no_acceptable_method_then_fails() -> None:
    conn = Socks5ServerConnection(require_auth=True)
    conn.receive_data(b"\x05\x01\x00")
    assert conn.next_event() == Greeting(b"\x00")
    assert conn.choose_method(b"\x00") == METHOD_NO_ACCEPTABLE
    # The caller answers 0xFF and closes; going on anyway is refused.
    err = expect_error(conn, b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
    assert err.reply is None


@pytest.mark.parametrize(
    "data",
    [b"\x04\x01\x00", b"\x04", b"\x00", b"\x05\x00", b"\x05\x00\x00", b"GET / HTTP/1.1\r\n"],
)
def test_bad_greeting_closes_without_reply(data: bytes) -> None:
    err = expect_error(Socks5ServerConnection(require_auth=False), data)
    assert err.reply is None


@pytest.mark.parametrize(
    "data",
    [
        b"\x05\x04user\x04pass",  # SOCKS version where the RFC 1929 version belongs
        b"\x00\x04user\x04pass",
        b"\x02",
        b"\x01\x00\x04pass",  # ULEN 0
        b"\x01\x04user\x00",  # PLEN 0
    ],
)
def test_bad_credentials_close_without_reply(data: bytes) -> None:
    conn = Socks5ServerConnection(require_auth=True)
    assert feed(conn, b"\x05\x01\x02") == [Greeting(b"\x02")]
    err = expect_error(conn, data)
    assert err.reply is None


def test_userpass_version_one_is_accepted() -> None:
    """0x01 is the right RFC 1929 version (the code we replace rejected it)."""
    conn = Socks5ServerConnection(require_auth=True)
    assert feed(conn, b"\x05\x01\x02\x01\x01a\x01b") == [Greeting(b"\x02"), Credentials(b"a", b"b")]


@pytest.mark.parametrize(
    ("request_bytes", "reply"),
    [
        (b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", Reply.GENERAL_FAILURE),  # VER 4
        (b"\x01", Reply.GENERAL_FAILURE),  # RFC 1929 bytes sent without auth
        (b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", Reply.GENERAL_FAILURE),  # RSV 1
        (b"\x05\x01\xff", Reply.GENERAL_FAILURE),  # RSV checked as soon as it arrives
        (b"\x05\x01\x00\x02\x7f\x00\x00\x01\x00\x50", Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x00", Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x03\x00\x00\x50", Reply.GENERAL_FAILURE),  # empty domain
        (b"\x05\x01\x00\x03\x03a\x00b\x00\x50", Reply.GENERAL_FAILURE),  # NUL in domain
    ],
)
def test_bad_request(request_bytes: bytes, reply: Reply) -> None:
    conn = Socks5ServerConnection(require_auth=False)
    assert feed(conn, b"\x05\x01\x00") == [Greeting(b"\x00")]
    err = expect_error(conn, request_bytes)
    assert err.reply == reply


def test_failure_is_sticky() -> None:
    conn = Socks5ServerConnection(require_auth=False)
    expect_error(conn, b"\x04")
    conn.receive_data(b"\x05\x01\x00")
    with pytest.raises(Socks5Error):
        conn.next_event()


# --------------------------------------------------------------------- client side


def test_client_builders_vectors() -> None:
    assert build_greeting(b"\x00") == b"\x05\x01\x00"
    assert build_greeting(b"\x00\x02") == b"\x05\x02\x00\x02"
    assert build_userpass(b"user", b"pass") == b"\x01\x04user\x04pass"
    assert build_request(Request(CMD_CONNECT, Address("127.0.0.1", 80))) == CONNECT_IPV4
    assert build_request(Request(CMD_CONNECT, Address("example.com", 443))) == CONNECT_DOMAIN
    assert build_request(Request(CMD_CONNECT, Address("::1", 8080))) == CONNECT_IPV6


@pytest.mark.parametrize(
    ("user", "password"), [(b"", b"p"), (b"u", b""), (b"u" * 256, b"p"), (b"u", b"p" * 256)]
)
def test_build_userpass_lengths(user: bytes, password: bytes) -> None:
    with pytest.raises(ValueError, match=r"1\.\.255"):
        build_userpass(user, password)


def test_build_greeting_lengths() -> None:
    with pytest.raises(ValueError, match=r"1\.\.255"):
        build_greeting(b"")
    with pytest.raises(ValueError, match=r"1\.\.255"):
        build_greeting(bytes(256))


def test_parse_method_selection() -> None:
    assert parse_method_selection(b"") is None
    assert parse_method_selection(b"\x05") is None
    assert parse_method_selection(b"\x05\x02") == METHOD_USERPASS
    assert parse_method_selection(b"\x05\xff") == METHOD_NO_ACCEPTABLE
    with pytest.raises(ProtocolError):
        parse_method_selection(b"\x04")


def test_parse_auth_status() -> None:
    assert parse_auth_status(b"\x01") is None
    assert parse_auth_status(b"\x01\x00") is True
    assert parse_auth_status(b"\x01\x01") is False
    assert parse_auth_status(b"\x01\xff") is False
    with pytest.raises(ProtocolError):
        parse_auth_status(b"\x05\x00")


def test_parse_reply_vectors() -> None:
    ok = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"
    assert parse_reply(ok + b"extra") == (Reply.SUCCEEDED, Address("127.0.0.1", 1080), len(ok))
    refused = b"\x05\x05\x00\x03\x09localhost\x00\x00"
    assert len(refused) == 16
    assert parse_reply(refused) == (Reply.CONNECTION_REFUSED, Address("localhost", 0), 16)
    for cut in range(len(ok)):
        assert parse_reply(ok[:cut]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"\x04\x00\x00\x01\x7f\x00\x00\x01\x04\x38",
        b"\x05\x09",
        b"\x05\x00\x01",
        b"\x05\x00\x00\x07\x00",
        b"\x05\x00\x00\x03\x00\x00\x00",
    ],
)
def test_parse_reply_garbage(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_reply(data)
    assert not isinstance(info.value, Socks5Error)


# ------------------------------------------------------------------- reply_for_error


@pytest.mark.parametrize(
    ("exc", "reply"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Reply.CONNECTION_REFUSED),
        (OSError(errno.ECONNREFUSED, "refused"), Reply.CONNECTION_REFUSED),
        (OSError(errno.ENETUNREACH, "x"), Reply.NETWORK_UNREACHABLE),
        (OSError(errno.ENETDOWN, "x"), Reply.NETWORK_UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "x"), Reply.HOST_UNREACHABLE),
        (OSError(errno.EHOSTDOWN, "x"), Reply.HOST_UNREACHABLE),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), Reply.HOST_UNREACHABLE),
        # an EAI_* code that collides with an errno value is still a resolution failure
        (socket.gaierror(errno.ECONNREFUSED, "x"), Reply.HOST_UNREACHABLE),
        (TimeoutError(), Reply.TTL_EXPIRED),
        (socket.timeout("timed out"), Reply.TTL_EXPIRED),  # noqa: UP041,
        (OSError(errno.ETIMEDOUT, "x"), Reply.TTL_EXPIRED),
        (OSError(errno.EACCES, "x"), Reply.NOT_ALLOWED),
        (PermissionError(errno.EPERM, "x"), Reply.NOT_ALLOWED),
        (OSError(errno.EAFNOSUPPORT, "x"), Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (OSError(errno.ECONNRESET, "x"), Reply.GENERAL_FAILURE),
        (OSError("no errno"), Reply.GENERAL_FAILURE),
        (ValueError("x"), Reply.GENERAL_FAILURE),
        (Socks5Error("x", reply=Reply.NOT_ALLOWED), Reply.NOT_ALLOWED),
        (Socks5Error("x", reply=None), Reply.GENERAL_FAILURE),
        (Socks5Error("x", reply=99), Reply.GENERAL_FAILURE),
    ],
)
def test_reply_for_error(exc: BaseException, reply: Reply) -> None:
    assert reply_for_error(exc) is reply


# ---------------------------------------------------------------------- properties

ipv4_hosts = st.ip_addresses(v=4).map(str)
ipv6_hosts = st.ip_addresses(v=6).map(str)
visible_ascii = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
ascii_names = st.text(visible_ascii, min_size=1, max_size=255)
ldh_names = (
    st.lists(
        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True), min_size=1, max_size=5
    )
    .map(".".join)
    .filter(lambda name: len(name) <= 255)
)


def _idna_ok(name: str) -> bool:
    try:
        name.encode("idna")
    except UnicodeError:
        return False
    return True


idn_names = (
    st.text(st.sampled_from("abcnxyz0123-äöüßéñ日本中文"), min_size=1, max_size=20)
    .map(lambda label: label + ".example")
    .filter(_idna_ok)
)
hosts = st.one_of(ipv4_hosts, ipv6_hosts, ldh_names, ascii_names, idn_names)
ports = st.integers(min_value=0, max_value=65535)
addresses = st.builds(Address, hosts, ports)
commands = st.integers(min_value=0, max_value=255)
requests = st.builds(Request, commands, addresses)


@settings(max_examples=300)
@given(addresses, st.binary(max_size=8), st.binary(max_size=8))
def test_address_round_trip(addr: Address, before: bytes, after: bytes) -> None:
    wire = encode_address(addr)
    assert decode_address(before + wire + after, len(before)) == (addr, len(before) + len(wire))
    assert Address(addr.host, addr.port) == addr  # normalisation is idempotent
    for cut in range(len(wire)):
        assert decode_address(wire[:cut]) is None


@given(ipv4_hosts, ports)
def test_ipv4_encodes_as_ipv4(host: str, port: int) -> None:
    wire = encode_address(Address(host, port))
    assert wire == b"\x01" + ipaddress.IPv4Address(host).packed + port.to_bytes(2, "big")


@given(ipv6_hosts, ports)
def test_ipv6_encodes_as_ipv6(host: str, port: int) -> None:
    wire = encode_address(Address(host, port))
    assert wire == b"\x04" + ipaddress.IPv6Address(host).packed + port.to_bytes(2, "big")


@settings(suppress_health_check=[HealthCheck.too_slow])  # domains() loads the TLD list
@given(domains(), ports)
def test_domain_encodes_as_domain(host: str, port: int) -> None:
    wire = encode_address(Address(host, port))
    assert wire == b"\x03" + bytes((len(host),)) + host.encode("ascii") + port.to_bytes(2, "big")


@given(requests)
def test_tunnel_request_round_trip(req: Request) -> None:
    assert decode_tunnel_request(encode_tunnel_request(req)) == req


@given(st.sampled_from(Reply), addresses)
def test_tunnel_reply_round_trip(reply: Reply, bind: Address) -> None:
    assert decode_tunnel_reply(encode_tunnel_reply(reply, bind)) == (reply, bind)


@given(st.sampled_from(Reply), addresses, st.binary(max_size=8))
def test_reply_round_trip(reply: Reply, bind: Address, after: bytes) -> None:
    wire = build_reply(reply, bind)
    assert parse_reply(wire + after) == (reply, bind, len(wire))


@st.composite
def sessions(draw: st.DrawFn) -> tuple[bool, bytes, list[Event], bytes]:
    """(require_auth, client bytes, expected events, trailing bytes)."""
    require_auth = draw(st.booleans())
    wanted = METHOD_USERPASS if require_auth else METHOD_NO_AUTH
    others = draw(st.lists(st.integers(0, 255).filter(lambda m: m != wanted), max_size=10))
    methods = draw(st.permutations([wanted, *others]))
    events: list[Event] = [Greeting(bytes(methods))]
    data = build_greeting(bytes(methods))
    if require_auth:
        user = draw(st.binary(min_size=1, max_size=255))
        password = draw(st.binary(min_size=1, max_size=255))
        data += build_userpass(user, password)
        events.append(Credentials(user, password))
    request = draw(requests)
    data += build_request(request)
    events.append(RequestReceived(request))
    trailing = draw(st.binary(max_size=64))
    return require_auth, data + trailing, events, trailing


@settings(deadline=None)
@given(sessions(), st.data())
def test_session_split_anywhere(
    session: tuple[bool, bytes, list[Event], bytes], data: st.DataObject
) -> None:
    require_auth, wire, expected, trailing = session
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    conn = Socks5ServerConnection(require_auth)
    events: list[Event] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        if not conn.done:
            events.extend(drain(conn))
    assert events == expected
    assert conn.done
    assert conn.trailing_data() == trailing


@given(st.booleans(), st.lists(st.binary(max_size=40), max_size=8))
def test_random_bytes_only_raise_socks5_error(require_auth: bool, chunks: list[bytes]) -> None:
    conn = Socks5ServerConnection(require_auth)
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            drain(conn)
            if conn.done:
                break
    except Socks5Error:
        pass


@given(st.booleans(), st.binary(max_size=40))
def test_random_bytes_after_valid_prefix(require_auth: bool, junk: bytes) -> None:
    conn = Socks5ServerConnection(require_auth)
    prefix = b"\x05\x01\x02\x01\x01u\x01p" if require_auth else b"\x05\x01\x00"
    with contextlib.suppress(Socks5Error):
        feed(conn, prefix + junk)


@given(st.binary(max_size=300), st.integers(0, 8))
def test_random_bytes_decoders(data: bytes, offset: int) -> None:
    parsers: list[Callable[[], object]] = [
        lambda: decode_address(data, offset),
        lambda: decode_tunnel_request(data),
        lambda: decode_tunnel_reply(data),
        lambda: parse_method_selection(data),
        lambda: parse_auth_status(data),
        lambda: parse_reply(data),
    ]
    for parse in parsers:
        with contextlib.suppress(ProtocolError):
            parse()
