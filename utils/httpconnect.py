"""HTTP CONNECT on the SOCKS port (sans-IO), for tools that only know ``https_proxy``.

Only the CONNECT method is served: ``CONNECT host:port HTTP/1.1``, headers, blank line. With
``auth`` on, ``Proxy-Authorization: Basic base64(user:password)`` is required (407 without).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from utils.errors import ProtocolError
from utils.socks5 import Address, Reply

MAX_HEAD_SIZE = 16 * 1024
END_OF_HEAD = b"\r\n\r\n"

_STATUS_FOR_REPLY = {
    Reply.SUCCEEDED: (200, "Connection established"),
    Reply.NOT_ALLOWED: (403, "Forbidden"),
    Reply.TTL_EXPIRED: (504, "Gateway Timeout"),
}


class HttpProxyError(ProtocolError):
    """A CONNECT request we answer with ``status`` and close."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ConnectRequest:
    address: Address
    credentials: tuple[bytes, bytes] | None


def looks_like_http(first_byte: int) -> bool:
    """SOCKS5 starts with 0x05; an HTTP method starts with an ASCII capital letter."""
    return ord("A") <= first_byte <= ord("Z")


def parse_head(buffer: bytes) -> tuple[ConnectRequest, int] | None:
    """The request and the bytes it used, or None until the blank line has arrived."""
    end = buffer.find(END_OF_HEAD)
    if end < 0:
        if len(buffer) > MAX_HEAD_SIZE:
            raise HttpProxyError(431, "Request Header Fields Too Large", "request head too large")
        return None
    lines = buffer[:end].decode("latin-1").split("\r\n")
    method, target = _request_line(lines[0])
    if method != "CONNECT":
        raise HttpProxyError(405, "Method Not Allowed", f"method {method!r} is not CONNECT")
    request = ConnectRequest(_authority(target), _credentials(lines[1:]))
    return request, end + len(END_OF_HEAD)


def _request_line(line: str) -> tuple[str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpProxyError(400, "Bad Request", "malformed request line")
    return parts[0], parts[1]


def _authority(target: str) -> Address:
    """``host:port`` or ``[v6]:port`` -> Address."""
    host, colon, port = target.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise HttpProxyError(400, "Bad Request", "CONNECT target must be host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return Address(host, int(port))
    except (ValueError, ProtocolError):
        raise HttpProxyError(400, "Bad Request", "bad CONNECT target") from None


def _credentials(header_lines: list[str]) -> tuple[bytes, bytes] | None:
    values = []
    for line in header_lines:
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() == "proxy-authorization":
            values.append(value)
    return basic_credentials(values)


def basic_credentials(values: list[str]) -> tuple[bytes, bytes] | None:
    """(user, password) of the first ``Proxy-Authorization`` value if it is Basic, else None."""
    if not values:
        return None
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, _, password = decoded.partition(b":")
    return user, password


def response(status: int, reason: str, *, ask_for_auth: bool = False) -> bytes:
    headers = f"HTTP/1.1 {status} {reason}\r\n"
    if ask_for_auth:
        headers += 'Proxy-Authenticate: Basic realm="sockproxy"\r\n'
    if status != 200:
        headers += "Content-Length: 0\r\nConnection: close\r\n"
    return (headers + "\r\n").encode("ascii")


def status_for_reply(reply: Reply) -> tuple[int, str]:
    """The HTTP status that says what the SOCKS REP code says."""
    return _STATUS_FOR_REPLY.get(reply, (502, "Bad Gateway"))


def response_for_reply(reply: Reply) -> bytes:
    """The HTTP answer that says what the SOCKS REP code says (no body)."""
    return response(*status_for_reply(reply))
