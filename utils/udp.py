"""UDP ASSOCIATE datagrams (sans-IO): the SOCKS5 UDP header and their framing in the channel.

Between the client and the local, datagrams carry the RFC 1928 section 7 header::

    RSV (2) = 0 | FRAG (1) | ATYP | DST.ADDR | DST.PORT | DATA

Fragments (FRAG != 0) are refused, as RFC 1928 allows. Inside the channel each datagram is
``LENGTH (2) | ATYP | ADDR | PORT | DATA`` (LENGTH counts what follows), so datagram
boundaries survive the byte stream of records: towards the server ADDR is the destination,
back from it the source.
"""

from __future__ import annotations

import ipaddress
import struct

from utils.errors import ProtocolError, Socks5Error
from utils.socks5 import Address, decode_address, encode_address

MAX_DATAGRAM = 65535
_LENGTH = struct.Struct(">H")


def parse_socks_datagram(data: bytes) -> tuple[Address, bytes]:
    """A client's datagram: (destination, payload); Socks5Error if malformed or a fragment."""
    if len(data) < 4 or data[0] or data[1]:
        raise Socks5Error("malformed UDP request header")
    if data[2]:
        raise Socks5Error("UDP fragments are not supported")
    decoded = decode_address(data, 3)
    if decoded is None:
        raise Socks5Error("truncated UDP request header")
    address, end = decoded
    return address, data[end:]


def build_socks_datagram(source: Address, payload: bytes) -> bytes:
    """A datagram for the client: header naming where the payload came from, then payload."""
    return b"\x00\x00\x00" + encode_address(source) + payload


def encode_channel_datagram(address: Address, payload: bytes) -> bytes:
    body = encode_address(address) + payload
    if len(body) > MAX_DATAGRAM:
        raise ValueError("datagram too large")
    return _LENGTH.pack(len(body)) + body


class DatagramDecoder:
    """Splits the channel's byte stream back into (address, payload) datagrams."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Address, bytes]]:
        self._buffer += data
        datagrams = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_LENGTH.size : end])
            del self._buffer[:end]
            decoded = decode_address(body)
            if decoded is None:
                raise ProtocolError("datagram shorter than its address")
            address, used = decoded
            datagrams.append((address, body[used:]))
        return datagrams


def plain_ip(host: str) -> str:
    """``::ffff:1.2.3.4`` -> ``1.2.3.4`` (dual-stack sockets report IPv4 peers that way)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
