"""SOCKS4 and SOCKS4a requests and replies (sans-IO), for clients that predate SOCKS5.

Request: ``VN=4 CD DSTPORT(2) DSTIP(4) USERID NUL``; SOCKS4a puts ``0.0.0.x`` (x != 0) in
DSTIP and the host name after the user id: ``HOSTNAME NUL``; the server resolves it.
Reply: ``VN=0 CD DSTPORT(2) DSTIP(4)`` with CD 0x5A (granted) or 0x5B (rejected or failed).
SOCKS4 has no password: the local refuses it when ``auth`` is on.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from utils.errors import ProtocolError
from utils.socks5 import Address

SOCKS4_VERSION = 4
CMD_CONNECT = 1
CMD_BIND = 2
GRANTED = 0x5A
REJECTED = 0x5B
MAX_FIELD = 255  # longest user id or host name we read (without its NUL)

_FIXED = struct.Struct("!BBH4s")


class Socks4Error(ProtocolError):
    """A SOCKS4 request we refuse with CD 0x5B, then close."""


@dataclass(frozen=True)
class Socks4Request:
    command: int
    address: Address
    user_id: bytes


def _field(buf: bytes, start: int, name: str) -> tuple[bytes, int] | None:
    """A NUL-terminated field at ``start`` and the offset after its NUL; None if incomplete."""
    end = buf.find(b"\x00", start, start + MAX_FIELD + 1)
    if end >= 0:
        return buf[start:end], end + 1
    if len(buf) - start > MAX_FIELD:
        raise Socks4Error(f"SOCKS4 {name} longer than {MAX_FIELD} bytes")
    return None


def _is_4a(ip: bytes) -> bool:
    return ip[:3] == b"\x00\x00\x00" and ip[3] != 0


def _address(host: bytes | str, port: int) -> Address:
    try:
        text = host.decode("ascii") if isinstance(host, bytes) else host
        return Address(text, port)
    except (UnicodeDecodeError, ProtocolError):
        raise Socks4Error("SOCKS4a host name is not a valid name") from None


def parse_request(buf: bytes) -> tuple[Socks4Request, int] | None:
    """The request and the bytes it used, or None until it has fully arrived."""
    if len(buf) < _FIXED.size:
        return None
    version, command, port, ip = _FIXED.unpack_from(buf)
    if version != SOCKS4_VERSION:
        raise Socks4Error(f"not a SOCKS4 request (version {version})")
    user = _field(buf, _FIXED.size, "user id")
    if user is None:
        return None
    user_id, offset = user
    if not _is_4a(ip):
        address = Address(str(ipaddress.IPv4Address(ip)), port)
        return Socks4Request(command, address, user_id), offset
    name = _field(buf, offset, "host name")
    if name is None:
        return None
    host, offset = name
    if not host:
        raise Socks4Error("SOCKS4a request without a host name")
    return Socks4Request(command, _address(host, port), user_id), offset


def build_reply(granted: bool, bind: Address | None = None) -> bytes:
    """The 8-byte reply; DSTPORT/DSTIP carry ``bind`` when it is an IPv4 address, else zeros."""
    port, ip = 0, bytes(4)
    if bind is not None and _is_ipv4(bind.host):
        port, ip = bind.port, ipaddress.IPv4Address(bind.host).packed
    return _FIXED.pack(0, GRANTED if granted else REJECTED, port, ip)


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def build_request(command: int, address: Address, user_id: bytes = b"") -> bytes:
    """A client's request (for tests and tools): SOCKS4 for IPv4 addresses, else SOCKS4a."""
    if _is_ipv4(address.host):
        ip = ipaddress.IPv4Address(address.host).packed
        return _FIXED.pack(SOCKS4_VERSION, command, address.port, ip) + user_id + b"\x00"
    head = _FIXED.pack(SOCKS4_VERSION, command, address.port, b"\x00\x00\x00\x01")
    return head + user_id + b"\x00" + address.host.encode("ascii") + b"\x00"


def parse_reply(buf: bytes) -> tuple[bool, Address] | None:
    """(granted, bound address) of a reply, or None until its 8 bytes have arrived."""
    if len(buf) < _FIXED.size:
        return None
    version, code, port, ip = _FIXED.unpack_from(buf)
    if version != 0:
        raise Socks4Error(f"SOCKS4 reply with version {version}")
    return code == GRANTED, Address(str(ipaddress.IPv4Address(ip)), port)
