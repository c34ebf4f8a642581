"""Plain HTTP proxying (sans-IO): absolute-URI requests in, origin-form requests out.

``GET http://host:port/path HTTP/1.1`` becomes ``GET /path HTTP/1.1`` with ``Host`` set from
the URI and the hop-by-hop headers removed. Bodies (requests and responses) are relayed in
their own framing, byte for byte; ``BodyReader`` only finds where each one ends (RFC 9112
section 6: Content-Length, chunked, or the end of the connection; none for HEAD, 1xx, 204 and
304), so that one client connection can carry several requests.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from utils.errors import ProtocolError
from utils.httpconnect import END_OF_HEAD, MAX_HEAD_SIZE, HttpProxyError, basic_credentials
from utils.socks5 import Address, Reply

#: Never forwarded: they describe one hop (RFC 9110 section 7.6.1), or carry our password.
HOP_BY_HOP = frozenset(
    (
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    )
)
#: RFC 9110 section 9.2.2
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
MAX_LINE = 8 * 1024  # a chunk-size line or a trailer line
_HEX = frozenset("0123456789abcdefABCDEF")
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class Framing(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until close"


@dataclass(frozen=True)
class Body:
    """How a message's body is delimited; ``length`` only for ``Framing.LENGTH``."""

    framing: Framing
    length: int = 0


NO_BODY = Body(Framing.NONE)


@dataclass(frozen=True)
class ForwardRequest:
    """A client's request, ready to go to ``origin``."""

    method: str
    origin: Address
    head: bytes  # the origin-form request head for the origin server
    body: Body
    keep_alive: bool  # the client may send another request on this connection
    credentials: tuple[bytes, bytes] | None

    @property
    def retryable(self) -> bool:
        """Safe to send again if a kept connection failed before any response byte."""
        return self.method in IDEMPOTENT and self.body == NO_BODY


@dataclass(frozen=True)
class ResponseHead:
    status: int
    body: Body
    keep_alive: bool  # the client may reuse its connection after this response

    @property
    def interim(self) -> bool:
        """A 1xx response other than 101: the final response follows it."""
        return 100 <= self.status < 200 and self.status != 101


@dataclass(frozen=True)
class _Head:
    start: str
    headers: list[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.values(name) for t in v.split(",") if t.strip()}


def _split_head(buffer: bytes) -> tuple[_Head, int] | None:
    end = buffer.find(END_OF_HEAD)
    if end < 0:
        if len(buffer) > MAX_HEAD_SIZE:
            raise HttpProxyError(431, "Request Header Fields Too Large", "request head too large")
        return None
    if end > MAX_HEAD_SIZE:
        raise HttpProxyError(431, "Request Header Fields Too Large", "request head too large")
    raw = buffer[:end]
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf or b"\x00" in raw:
        # a bare CR or LF could end a line for the origin but not for us: refuse, never guess
        raise HttpProxyError(400, "Bad Request", "bare CR, LF or NUL in the message head")
    lines = raw.decode("latin-1").split("\r\n")
    return _Head(lines[0], [_header(line) for line in lines[1:]]), end + len(END_OF_HEAD)


def _header(line: str) -> tuple[str, str]:
    name, colon, value = line.partition(":")
    if not colon or not name or not set(name) <= _TOKEN_CHARS:
        raise HttpProxyError(400, "Bad Request", "malformed header line")  # never echo it: secrets
    return name, value.strip(" \t")


def _persistent(version: str, connection: set[str]) -> bool:
    if "close" in connection:
        return False
    return version == "HTTP/1.1" or "keep-alive" in connection


def _content_length(head: _Head) -> int | None:
    values = {v.strip() for value in head.values("content-length") for v in value.split(",")}
    if not values:
        return None
    if len(values) > 1 or not all(v.isdigit() for v in values) or len(min(values)) > 18:
        raise ProtocolError("bad or conflicting Content-Length")
    return int(values.pop())


def _message_body(head: _Head, request: bool) -> Body:
    """RFC 9112 6.3, for a request (no body unless framed) or a response (else until close)."""
    codings = [t.strip().lower() for v in head.values("transfer-encoding") for t in v.split(",")]
    length = _content_length(head)
    if codings:
        if length is not None:
            raise ProtocolError("both Transfer-Encoding and Content-Length")
        if codings[-1] == "chunked":
            return Body(Framing.CHUNKED)
        if request:
            raise ProtocolError("a request body must end with the chunked coding")
        return Body(Framing.UNTIL_CLOSE)
    if length is not None:
        return Body(Framing.LENGTH, length) if length else NO_BODY
    return NO_BODY if request else Body(Framing.UNTIL_CLOSE)


# --------------------------------------------------------------------------- requests


def _request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or not parts[0]:
        raise HttpProxyError(400, "Bad Request", "malformed request line")
    if not set(parts[0]) <= _TOKEN_CHARS:
        raise HttpProxyError(400, "Bad Request", "malformed request method")
    return parts[0], parts[1], parts[2]


def _origin(target: str) -> tuple[Address, str, str]:
    """``http://host[:port]/path?q`` -> (origin, authority, path); errors say what to do."""
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise HttpProxyError(
            400, "Bad Request", "this is a proxy: send absolute URIs (http://host/path) or CONNECT"
        )
    if scheme.lower() == "https":
        raise HttpProxyError(
            400, "Bad Request", "https:// goes through CONNECT: set https_proxy to this proxy"
        )
    if scheme.lower() != "http":
        shown = f"{scheme}://" if scheme.isalnum() and len(scheme) <= 10 else "other schemes"
        raise HttpProxyError(400, "Bad Request", f"only http:// URIs are forwarded, not {shown}")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if not path.startswith("/"):
        path = "/" + path
    return _authority_address(authority), authority, path


def _authority_address(authority: str) -> Address:
    if "@" in authority or not authority:
        raise HttpProxyError(400, "Bad Request", "the URI needs a host and no user name")
    host, port = authority, "80"
    if authority.startswith("["):
        host, bracket, tail = authority[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise HttpProxyError(400, "Bad Request", "malformed IPv6 host in the URI")
        port = tail[1:] or "80"
    elif ":" in authority:
        host, _, port = authority.rpartition(":")
        port = port or "80"
    if not port.isdigit() or len(port) > 5 or not host:
        raise HttpProxyError(400, "Bad Request", "malformed host or port in the URI")
    try:
        return Address(host.lower(), int(port))  # names are case-insensitive
    except (ValueError, ProtocolError):
        raise HttpProxyError(400, "Bad Request", "malformed host or port in the URI") from None


def _forwarded_headers(head: _Head, authority: str) -> list[tuple[str, str]]:
    """End-to-end headers only, with ``Host`` replaced by the URI's authority (RFC 9112 3.2.2)."""
    dropped = HOP_BY_HOP | head.tokens("connection") | head.tokens("proxy-connection") | {"host"}
    kept = [(name, value) for name, value in head.headers if name.lower() not in dropped]
    return [("Host", authority), *kept]


def parse_request(buffer: bytes) -> tuple[ForwardRequest, int] | None:
    """The request and the bytes its head used, or None until the blank line has arrived."""
    split = _split_head(buffer)
    if split is None:
        return None
    head, used = split
    method, target, version = _request_line(head.start)
    origin, authority, path = _origin(target)
    try:
        body = _message_body(head, request=True)
    except ProtocolError as exc:
        raise HttpProxyError(400, "Bad Request", str(exc)) from None
    lines = [f"{method} {path} {version}"]
    lines += [f"{name}: {value}" for name, value in _forwarded_headers(head, authority)]
    connection = head.tokens("connection") | head.tokens("proxy-connection")
    request = ForwardRequest(
        method=method,
        origin=origin,
        head=("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"),
        body=body,
        keep_alive=_persistent(version, connection),
        credentials=basic_credentials(head.values("proxy-authorization")),
    )
    return request, used


def is_connect(buffer: bytes) -> bool:
    """Does this request head (or its first bytes) start with ``CONNECT ``?"""
    return buffer.startswith(b"CONNECT ")


# --------------------------------------------------------------------------- responses


def parse_response(buffer: bytes, method: str) -> tuple[ResponseHead, int] | None:
    """The response head to a ``method`` request and its size, or None until it has arrived.

    Raises ProtocolError for anything that is not an HTTP/1.x response head.
    """
    try:
        split = _split_head(buffer)
    except HttpProxyError as exc:
        raise ProtocolError(f"response: {exc}") from None
    if split is None:
        return None
    head, used = split
    version, _, rest = head.start.partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise ProtocolError("the origin's answer is not an HTTP/1.x response")
    status = int(code)
    no_body = method == "HEAD" or 100 <= status < 200 or status in (204, 304)
    body = NO_BODY if no_body else _message_body(head, request=False)
    keep_alive = _persistent(version, head.tokens("connection"))
    return ResponseHead(status, body, keep_alive and body.framing != Framing.UNTIL_CLOSE), used


# --------------------------------------------------------------------------- bodies


class _Chunk(enum.Enum):
    SIZE = "size"
    DATA = "data"
    DATA_END = "data end"
    TRAILER = "trailer"


class BodyReader:
    """Finds the end of one body in the bytes that follow its head.

    ``feed(data)`` returns ``(body_part, rest)``: the bytes of ``data`` that belong to the body
    and those after its end (the next message). ``done`` once the end has been seen; a body
    delimited by the end of the connection is done only at ``feed_eof()``.
    """

    def __init__(self, body: Body) -> None:
        self.framing = body.framing
        self.done = body.framing == Framing.NONE or body == Body(Framing.LENGTH, 0)
        self._left = body.length  # LENGTH: bytes left; CHUNKED: bytes left in this chunk
        self._state = _Chunk.SIZE
        self._line = b""

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        if self.done:
            return b"", data
        if self.framing == Framing.UNTIL_CLOSE:
            return data, b""
        if self.framing == Framing.LENGTH:
            take = min(self._left, len(data))
            self._left -= take
            self.done = self._left == 0
            return data[:take], data[take:]
        end = self._chunked(data)
        return data[:end], data[end:]

    def feed_eof(self) -> None:
        """The connection ended: fine for an until-close body, else the body was cut off."""
        if self.done:
            return
        if self.framing != Framing.UNTIL_CLOSE:
            raise ProtocolError("the message body was cut off")
        self.done = True

    def _chunked(self, data: bytes) -> int:
        offset = 0
        while offset < len(data) and not self.done:
            if self._state == _Chunk.DATA:
                take = min(self._left, len(data) - offset)
                self._left -= take
                offset += take
                if self._left == 0:
                    self._state = _Chunk.DATA_END
                continue
            line, offset = self._read_line(data, offset)
            if line is not None:
                self._on_line(line)
        return offset

    def _read_line(self, data: bytes, offset: int) -> tuple[bytes | None, int]:
        newline = data.find(b"\n", offset)
        if newline < 0:
            self._line += data[offset:]
            if len(self._line) > MAX_LINE:
                raise ProtocolError("chunked body: line too long")
            return None, len(data)
        line, self._line = self._line + data[offset:newline], b""
        if len(line) > MAX_LINE:
            raise ProtocolError("chunked body: line too long")
        return line.removesuffix(b"\r"), newline + 1

    def _on_line(self, line: bytes) -> None:
        if self._state == _Chunk.SIZE:
            self._left = _chunk_size(line)
            self._state = _Chunk.DATA if self._left else _Chunk.TRAILER
        elif self._state == _Chunk.DATA_END:
            if line:
                raise ProtocolError("chunked body: no CRLF after the chunk data")
            self._state = _Chunk.SIZE
        elif not line:  # TRAILER: the blank line ends the message
            self.done = True


def _chunk_size(line: bytes) -> int:
    size = line.split(b";", 1)[0].strip(b" \t").decode("latin-1")
    if not size or len(size) > 15 or not set(size) <= _HEX:
        raise ProtocolError("chunked body: bad chunk size")
    return int(size, 16)


# --------------------------------------------------------------------------- our answers

_FAILED_REPLIES = {
    Reply.NOT_ALLOWED: (403, "Forbidden", "the sockproxy server does not allow {}"),
    Reply.NETWORK_UNREACHABLE: (502, "Bad Gateway", "network unreachable for {}"),
    Reply.HOST_UNREACHABLE: (502, "Bad Gateway", "cannot resolve or reach {}"),
    Reply.CONNECTION_REFUSED: (502, "Bad Gateway", "{} refused the connection"),
    Reply.TTL_EXPIRED: (504, "Gateway Timeout", "timed out connecting to {}"),
}


def reply_failure(reply: Reply, target: str) -> HttpProxyError:
    """The HTTP status and one-line text for a tunnel that failed with ``reply``."""
    status, reason, text = _FAILED_REPLIES.get(
        reply, (502, "Bad Gateway", "the sockproxy server could not connect to {}")
    )
    return HttpProxyError(status, reason, text.format(target))


def error_response(status: int, reason: str, text: str, ask_for_auth: bool = False) -> bytes:
    """A complete response with a one-line text body; the connection closes after it."""
    body = (text + "\n").encode("utf-8")
    head = f"HTTP/1.1 {status} {reason}\r\n"
    if ask_for_auth:
        head += 'Proxy-Authenticate: Basic realm="sockproxy"\r\n'
    head += (
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
