"""SOCKS5 (RFC 1928) and its username/password sub-negotiation (RFC 1929), sans-IO.

Nothing here touches a socket. Functions turn values into bytes and bytes into
values; ``Socks5ServerConnection`` is a small state machine fed with whatever the
SOCKS client sent, in the spirit of h11 and python-socks.

Errors: a client breaking the protocol raises ``Socks5Error`` whose ``reply`` is the
REP code to answer with (None: close without a reply). Parsing what a SOCKS server
or the channel peer sent raises ``ProtocolError``. Misuse by the caller (an
out-of-range length handed to a builder) raises ``ValueError``.
"""

from __future__ import annotations

import enum
import errno
import functools
import hashlib
import hmac
import ipaddress
import socket
from dataclasses import dataclass
from typing import TypeAlias

from utils.errors import ProtocolError, Socks5Error

SOCKS_VERSION = 5
METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NO_ACCEPTABLE = 0xFF
USERPASS_VERSION = 0x01
CMD_CONNECT = 1
CMD_BIND = 2
CMD_UDP_ASSOCIATE = 3
ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

BytesLike: TypeAlias = bytes | bytearray | memoryview

_MAX_DOMAIN_LEN = 255
# ATYP + LEN + 255-byte domain + PORT: the longest encoded address.
_MAX_ADDRESS_LEN = 1 + 1 + _MAX_DOMAIN_LEN + 2


class Reply(enum.IntEnum):
    """RFC 1928 REP codes."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


# --------------------------------------------------------------------------- addresses


_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=1024)  # ipaddress parsing is slow; every connection parses a few
def _parse_ip(host: str) -> _IPAddress | None:
    """The IP address ``host`` spells, or None for a domain name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise Socks5Error(
            f"IPv6 zone index cannot be sent over SOCKS5: {host!r}",
            reply=Reply.ADDRESS_TYPE_NOT_SUPPORTED,
        )
    return ip


@functools.lru_cache(maxsize=1024)  # every connection makes a few Address values
def _canonical_host(host: str) -> str:
    """``host`` as an Address keeps it: canonical IP text, or a name's ASCII (IDNA) form."""
    ip = _parse_ip(host)
    return str(ip) if ip is not None else _domain_to_ascii(host)


@functools.lru_cache(maxsize=1024)
def _ip_text(packed: bytes) -> str:
    """The canonical text of a 4- or 16-byte address."""
    return str(ipaddress.ip_address(packed))


def _check_domain_bytes(raw: bytes) -> None:
    """Reject a wire-form domain name that is empty, too long or not visible ASCII."""
    if not raw:
        raise Socks5Error("empty domain name", reply=Reply.GENERAL_FAILURE)
    if len(raw) > _MAX_DOMAIN_LEN:
        raise Socks5Error(
            f"domain name is {len(raw)} bytes, SOCKS5 allows 255", reply=Reply.GENERAL_FAILURE
        )
    if any(b < 0x21 or b > 0x7E for b in raw):
        raise Socks5Error(
            f"domain name has bytes that are not printable ASCII: {raw[:64]!r}",
            reply=Reply.GENERAL_FAILURE,
        )


def _domain_to_ascii(host: str) -> str:
    """``host`` in its ASCII (IDNA) form, validated."""
    try:
        raw = host.encode("ascii")
    except UnicodeEncodeError:
        try:
            raw = host.encode("idna")
        except UnicodeError as exc:
            raise Socks5Error(
                f"domain name is not valid IDNA: {host[:64]!r}", reply=Reply.GENERAL_FAILURE
            ) from exc
    _check_domain_bytes(raw)
    return raw.decode("ascii")


@dataclass(frozen=True)
class Address:
    """A SOCKS5 address: IPv4 text, IPv6 text (no brackets) or a domain name, and a port.

    The host is normalised on construction: IP addresses to their canonical text
    (``"::0001"`` -> ``"::1"``), domain names to their ASCII (IDNA) form, so two
    equal addresses encode to the same bytes and decoding gives back an equal value.
    """

    host: str
    port: int

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not 0 <= self.port <= 0xFFFF:
            raise Socks5Error(f"port out of range: {self.port!r}", reply=Reply.GENERAL_FAILURE)
        object.__setattr__(self, "host", _canonical_host(self.host))

    @property
    def atyp(self) -> int:
        """ATYP_IPV4, ATYP_IPV6 or ATYP_DOMAIN."""
        ip = _parse_ip(self.host)
        if ip is None:
            return ATYP_DOMAIN
        return ATYP_IPV4 if ip.version == 4 else ATYP_IPV6

    def __str__(self) -> str:
        if self.atyp == ATYP_IPV6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


_UNSPECIFIED = Address("0.0.0.0", 0)


def encode_address(addr: Address) -> bytes:
    """ATYP + ADDR + PORT as in RFC 1928 section 4."""
    port = addr.port.to_bytes(2, "big")
    ip = _parse_ip(addr.host)
    if ip is None:
        raw = addr.host.encode("ascii")
        return bytes((ATYP_DOMAIN, len(raw))) + raw + port
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((atyp,)) + ip.packed + port


def decode_address(buf: BytesLike, offset: int = 0) -> tuple[Address, int] | None:
    """Decode ATYP + ADDR + PORT at ``offset``: (address, end offset), or None if incomplete.

    Raises Socks5Error: reply ADDRESS_TYPE_NOT_SUPPORTED for an unknown ATYP,
    GENERAL_FAILURE for an empty or non-ASCII domain name.
    """
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    data = bytes(buf[offset : offset + _MAX_ADDRESS_LEN])
    if not data:
        return None
    atyp = data[0]
    if atyp == ATYP_IPV4:
        start, length = 1, 4
    elif atyp == ATYP_IPV6:
        start, length = 1, 16
    elif atyp == ATYP_DOMAIN:
        if len(data) < 2:
            return None
        start, length = 2, data[1]
        if length == 0:
            raise Socks5Error("zero-length domain name", reply=Reply.GENERAL_FAILURE)
    else:
        raise Socks5Error(
            f"unknown address type {atyp:#04x}", reply=Reply.ADDRESS_TYPE_NOT_SUPPORTED
        )
    end = start + length + 2
    if len(data) < end:
        return None
    raw = data[start : start + length]
    port = int.from_bytes(data[start + length : end], "big")
    if atyp == ATYP_DOMAIN:
        _check_domain_bytes(raw)
        host = raw.decode("ascii")
    else:
        host = _ip_text(raw)
    return Address(host, port), offset + end


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    """A SOCKS5 request: CMD and destination. ``command`` is any byte; only 1..3 are defined."""

    command: int
    address: Address

    def __post_init__(self) -> None:
        if not 0 <= self.command <= 0xFF:
            raise ValueError(f"command out of range: {self.command}")


def _to_reply(code: Reply | int) -> Reply:
    try:
        return Reply(code)
    except ValueError:
        raise ValueError(f"not a SOCKS5 reply code: {code!r}") from None


# --------------------------------------------------------------- the channel messages


def encode_tunnel_request(req: Request) -> bytes:
    """What the local sends the server in the channel: CMD + ATYP + ADDR + PORT."""
    return bytes((req.command,)) + encode_address(req.address)


def decode_tunnel_request(data: bytes) -> Request:
    """Inverse of encode_tunnel_request; ``data`` must be exactly one message."""
    if not data:
        raise ProtocolError("empty tunnel request")
    result = decode_address(data, 1)
    if result is None:
        raise ProtocolError("truncated tunnel request")
    address, end = result
    if end != len(data):
        raise ProtocolError(f"{len(data) - end} trailing bytes after the tunnel request")
    return Request(data[0], address)


def encode_tunnel_reply(reply: Reply | int, bind: Address) -> bytes:
    """The server's answer in the channel: REP + ATYP + ADDR + PORT."""
    return bytes((_to_reply(reply),)) + encode_address(bind)


def decode_tunnel_reply(data: bytes) -> tuple[Reply, Address]:
    """Inverse of encode_tunnel_reply; ``data`` must be exactly one message."""
    if not data:
        raise ProtocolError("empty tunnel reply")
    try:
        reply = Reply(data[0])
    except ValueError:
        raise ProtocolError(f"unknown reply code {data[0]:#04x} in tunnel reply") from None
    result = decode_address(data, 1)
    if result is None:
        raise ProtocolError("truncated tunnel reply")
    address, end = result
    if end != len(data):
        raise ProtocolError(f"{len(data) - end} trailing bytes after the tunnel reply")
    return reply, address


# ------------------------------------------------------------------------ server side


def method_selection(method: int) -> bytes:
    """METHOD selection message: VER + METHOD."""
    return bytes((SOCKS_VERSION, method))


def auth_status(ok: bool) -> bytes:
    """RFC 1929 status: VER 0x01 + STATUS (0x00 success, 0x01 failure)."""
    return bytes((USERPASS_VERSION, 0x00 if ok else 0x01))


def build_reply(reply: Reply | int, bind: Address | None = None) -> bytes:
    """Reply to a request: VER + REP + RSV + BND.ADDR + BND.PORT (None: 0.0.0.0:0)."""
    address = _UNSPECIFIED if bind is None else bind
    return bytes((SOCKS_VERSION, _to_reply(reply), 0x00)) + encode_address(address)


def credentials_match(
    expected_user: bytes, expected_password: bytes, user: bytes, password: bytes
) -> bool:
    """Compare both fields in constant time; both comparisons always run.

    Digests are compared, not the fields: compare_digest returns early on a length
    mismatch, which would tell an attacker how long the password is.
    """
    user_ok = hmac.compare_digest(_digest(expected_user), _digest(user))
    password_ok = hmac.compare_digest(_digest(expected_password), _digest(password))
    return user_ok & password_ok


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


@dataclass(frozen=True)
class NeedData:
    """The buffer does not hold a whole message yet: call receive_data."""


@dataclass(frozen=True)
class Greeting:
    """The client's version identifier / method selection message."""

    methods: bytes


@dataclass(frozen=True)
class Credentials:
    """The RFC 1929 username/password request."""

    username: bytes
    password: bytes


@dataclass(frozen=True)
class RequestReceived:
    """The SOCKS request; negotiation is over, the rest is trailing_data()."""

    request: Request


Event: TypeAlias = NeedData | Greeting | Credentials | RequestReceived


class _State(enum.Enum):
    GREETING = enum.auto()
    AUTH = enum.auto()
    REQUEST = enum.auto()
    NO_METHOD = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


class Socks5ServerConnection:
    """The server half of a SOCKS5 negotiation: greeting -> (auth) -> request -> done.

    Feed bytes with receive_data, pull events with next_event until NeedData. After
    Greeting the caller answers method_selection(choose_method(methods)); if it chose
    METHOD_NO_ACCEPTABLE the next next_event raises. After Credentials the caller
    checks them (credentials_match) and answers auth_status. After RequestReceived
    the caller answers build_reply; bytes the client sent beyond the request are in
    trailing_data(). A Socks5Error leaves the connection failed for good.
    """

    def __init__(self, require_auth: bool) -> None:
        self.require_auth = require_auth
        self._buf = bytearray()
        self._state = _State.GREETING

    @property
    def done(self) -> bool:
        """True once RequestReceived has been returned."""
        return self._state is _State.DONE

    def receive_data(self, data: BytesLike) -> None:
        """Append bytes received from the client."""
        self._buf += data

    def trailing_data(self) -> bytes:
        """Bytes received after the request (empty until the request is parsed)."""
        return bytes(self._buf) if self._state is _State.DONE else b""

    def choose_method(self, methods: bytes) -> int:
        """The method to select among those offered, or METHOD_NO_ACCEPTABLE."""
        wanted = METHOD_USERPASS if self.require_auth else METHOD_NO_AUTH
        return wanted if wanted in methods else METHOD_NO_ACCEPTABLE

    def next_event(self) -> Event:
        """Parse the next message from the buffer, or NeedData."""
        if self._state is _State.DONE:
            raise RuntimeError("SOCKS5 negotiation is over; use trailing_data()")
        if self._state is _State.FAILED:
            raise Socks5Error("SOCKS5 negotiation already failed", reply=None)
        try:
            return self._next_event()
        except Socks5Error:
            self._state = _State.FAILED
            raise

    def _next_event(self) -> Event:
        if self._state is _State.NO_METHOD:
            raise Socks5Error("client offered no acceptable authentication method", reply=None)
        if self._state is _State.GREETING:
            return self._parse_greeting()
        if self._state is _State.AUTH:
            return self._parse_credentials()
        return self._parse_request()

    def _parse_greeting(self) -> Event:
        buf = self._buf
        if not buf:
            return NeedData()
        if buf[0] != SOCKS_VERSION:
            raise Socks5Error(f"greeting: unsupported SOCKS version {buf[0]}", reply=None)
        if len(buf) < 2:
            return NeedData()
        count = buf[1]
        if count == 0:
            raise Socks5Error("greeting: NMETHODS is 0", reply=None)
        end = 2 + count
        if len(buf) < end:
            return NeedData()
        methods = bytes(buf[2:end])
        del buf[:end]
        if self.choose_method(methods) == METHOD_NO_ACCEPTABLE:
            self._state = _State.NO_METHOD
        else:
            self._state = _State.AUTH if self.require_auth else _State.REQUEST
        return Greeting(methods)

    def _parse_credentials(self) -> Event:
        buf = self._buf
        if not buf:
            return NeedData()
        if buf[0] != USERPASS_VERSION:
            raise Socks5Error(f"auth: unsupported sub-negotiation version {buf[0]}", reply=None)
        if len(buf) < 2:
            return NeedData()
        ulen = buf[1]
        if ulen == 0:
            raise Socks5Error("auth: empty username", reply=None)
        if len(buf) < 3 + ulen:
            return NeedData()
        plen = buf[2 + ulen]
        if plen == 0:
            raise Socks5Error("auth: empty password", reply=None)
        end = 3 + ulen + plen
        if len(buf) < end:
            return NeedData()
        username = bytes(buf[2 : 2 + ulen])
        password = bytes(buf[3 + ulen : end])
        del buf[:end]
        self._state = _State.REQUEST
        return Credentials(username, password)

    def _parse_request(self) -> Event:
        buf = self._buf
        if not buf:
            return NeedData()
        if buf[0] != SOCKS_VERSION:
            raise Socks5Error(
                f"request: unsupported SOCKS version {buf[0]}", reply=Reply.GENERAL_FAILURE
            )
        if len(buf) < 3:
            return NeedData()
        if buf[2] != 0x00:
            raise Socks5Error(
                f"request: reserved byte is {buf[2]:#04x}", reply=Reply.GENERAL_FAILURE
            )
        result = decode_address(buf, 3)
        if result is None:
            return NeedData()
        address, end = result
        command = buf[1]
        del buf[:end]
        self._state = _State.DONE
        return RequestReceived(Request(command, address))

    # The builders, also reachable from an instance.
    @staticmethod
    def method_selection(method: int) -> bytes:
        """See the module-level method_selection."""
        return method_selection(method)

    @staticmethod
    def auth_status(ok: bool) -> bytes:
        """See the module-level auth_status."""
        return auth_status(ok)

    @staticmethod
    def build_reply(reply: Reply | int, bind: Address | None = None) -> bytes:
        """See the module-level build_reply."""
        return build_reply(reply, bind)

    @staticmethod
    def credentials_match(
        expected_user: bytes, expected_password: bytes, user: bytes, password: bytes
    ) -> bool:
        """See the module-level credentials_match."""
        return credentials_match(expected_user, expected_password, user, password)


# ------------------------------------------------------------------------ client side


def _length_prefixed(field: bytes, name: str) -> bytes:
    if not 1 <= len(field) <= 255:
        raise ValueError(f"{name} must be 1..255 bytes, got {len(field)}")
    return bytes((len(field),)) + field


def build_greeting(methods: bytes) -> bytes:
    """VER + NMETHODS + METHODS."""
    return bytes((SOCKS_VERSION,)) + _length_prefixed(methods, "methods")


def parse_method_selection(buf: BytesLike) -> int | None:
    """The METHOD the server chose (2 bytes consumed), or None if incomplete."""
    if len(buf) >= 1 and buf[0] != SOCKS_VERSION:
        raise ProtocolError(f"method selection: bad version {buf[0]}")
    if len(buf) < 2:
        return None
    return int(buf[1])


def build_userpass(user: bytes, password: bytes) -> bytes:
    """RFC 1929 request: VER 0x01 + ULEN + UNAME + PLEN + PASSWD."""
    return (
        bytes((USERPASS_VERSION,))
        + _length_prefixed(user, "username")
        + _length_prefixed(password, "password")
    )


def parse_auth_status(buf: BytesLike) -> bool | None:
    """True if the RFC 1929 status is success (2 bytes consumed), None if incomplete."""
    if len(buf) >= 1 and buf[0] != USERPASS_VERSION:
        raise ProtocolError(f"auth status: bad version {buf[0]}")
    if len(buf) < 2:
        return None
    return buf[1] == 0x00


def build_request(req: Request) -> bytes:
    """VER + CMD + RSV + ATYP + DST.ADDR + DST.PORT."""
    return bytes((SOCKS_VERSION, req.command, 0x00)) + encode_address(req.address)


def parse_reply(buf: BytesLike) -> tuple[Reply, Address, int] | None:
    """(reply, bind address, bytes consumed), or None if incomplete."""
    if len(buf) >= 1 and buf[0] != SOCKS_VERSION:
        raise ProtocolError(f"reply: bad version {buf[0]}")
    if len(buf) < 2:
        return None
    try:
        reply = Reply(buf[1])
    except ValueError:
        raise ProtocolError(f"reply: unknown reply code {buf[1]:#04x}") from None
    if len(buf) < 3:
        return None
    if buf[2] != 0x00:
        raise ProtocolError(f"reply: reserved byte is {buf[2]:#04x}")
    try:
        result = decode_address(buf, 3)
    except Socks5Error as exc:
        raise ProtocolError(f"reply: {exc}") from exc
    if result is None:
        return None
    address, end = result
    return reply, address, end


# ------------------------------------------------------------------------ error codes


_ERRNO_REPLIES: dict[int, Reply] = {
    errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
    errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Reply.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Reply.HOST_UNREACHABLE,
    errno.ETIMEDOUT: Reply.TTL_EXPIRED,
    errno.EACCES: Reply.NOT_ALLOWED,
    errno.EPERM: Reply.NOT_ALLOWED,
    errno.EAFNOSUPPORT: Reply.ADDRESS_TYPE_NOT_SUPPORTED,
}


def _reply_for_socks5_error(exc: Socks5Error) -> Reply:
    try:
        return Reply(exc.reply if exc.reply is not None else Reply.GENERAL_FAILURE)
    except ValueError:
        return Reply.GENERAL_FAILURE


def reply_for_error(exc: BaseException) -> Reply:
    """The REP code that best describes why connecting to the destination failed.

    A Socks5Error maps to its own ``reply`` (GENERAL_FAILURE when None).
    """
    if isinstance(exc, Socks5Error):
        return _reply_for_socks5_error(exc)
    if isinstance(exc, ConnectionRefusedError):
        return Reply.CONNECTION_REFUSED
    # gaierror/herror carry EAI_* / h_errno codes, not errno: test them first.
    if isinstance(exc, socket.gaierror | socket.herror):
        return Reply.HOST_UNREACHABLE
    if isinstance(exc, TimeoutError):
        return Reply.TTL_EXPIRED
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_REPLIES.get(exc.errno, Reply.GENERAL_FAILURE)
    return Reply.GENERAL_FAILURE
