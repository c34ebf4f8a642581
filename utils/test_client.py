"""Fetch an http:// URL through a SOCKS5 proxy and print what came back.

    python3 utils/test_client.py [--proxy 127.0.0.1:1080] [--user U --password P]
                                 [--timeout 10] URL

The URL's host goes to the proxy unresolved (ATYP domain) unless it is an IP
literal (``http://[::1]:8080/`` works). Sends a plain HTTP/1.1 GET with
``Connection: close``, reads the response to EOF, prints the status line and the
size of the body (chunked bodies are decoded). With --user/--password only the
username/password method is offered, so a proxy that skips authentication is
reported rather than silently used.

Exit status 0 on success; 1 with one line on stderr otherwise.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import quote, urlsplit

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from utils.errors import ProtocolError, SockproxyError  # noqa: E402
from utils.platform_support import wait_readable  # noqa: E402
from utils.socks5 import (  # noqa: E402
    CMD_CONNECT,
    METHOD_NO_ACCEPTABLE,
    METHOD_NO_AUTH,
    METHOD_USERPASS,
    Address,
    Reply,
    Request,
    build_greeting,
    build_request,
    build_userpass,
    parse_auth_status,
    parse_method_selection,
    parse_reply,
)

DEFAULT_PROXY = "127.0.0.1:1080"
DEFAULT_PROXY_PORT = 1080
USER_AGENT = "sockproxy-test-client/1.0"
# Characters left as they are in the request target; the rest is percent-encoded.
_PATH_SAFE = "/%:@!$&'()*+,;=?~-._"

T = TypeVar("T")


class ClientError(SockproxyError):
    """An expected failure: the message is the one line printed on stderr."""


@dataclass(frozen=True)
class Target:
    """Where to connect through the proxy and what to ask for."""

    address: Address
    host_header: str
    path: str


@dataclass(frozen=True)
class Response:
    """The status line and the decoded body of an HTTP response."""

    status_line: str
    body: bytes


def reply_text(reply: Reply) -> str:
    """``Reply.CONNECTION_REFUSED`` -> ``"connection refused"``."""
    return reply.name.lower().replace("_", " ")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def parse_url(url: str) -> Target:
    """Split an http:// URL into the SOCKS5 destination, Host header and request target."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ClientError(f"bad URL {url!r}: {exc}") from exc
    if parts.scheme.lower() != "http":
        scheme = parts.scheme or "none"
        raise ClientError(f"unsupported URL scheme {scheme!r}: only http:// URLs can be fetched")
    if not parts.hostname:
        raise ClientError(f"bad URL {url!r}: no host")
    if "[" in parts.netloc and not _is_ipv6(parts.hostname):  # Python < 3.11.4 lets [zz] by
        raise ClientError(f"bad URL {url!r}: brackets must hold an IPv6 address")
    port = 80 if port is None else port
    try:
        address = Address(parts.hostname, port)
    except SockproxyError as exc:
        raise ClientError(f"bad URL {url!r}: {exc}") from exc
    host = f"[{address.host}]" if ":" in address.host else address.host
    host_header = host if port == 80 else f"{host}:{port}"
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_PATH_SAFE)
    return Target(address, host_header, path)


def parse_proxy(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (port defaults to 1080)."""
    try:
        parts = urlsplit("//" + value)
        port = parts.port
    except ValueError as exc:
        raise ClientError(f"bad --proxy {value!r}: {exc}") from exc
    if not parts.hostname or parts.path or parts.query or parts.username is not None:
        raise ClientError(f"bad --proxy {value!r}: expected HOST:PORT")
    if port == 0:
        raise ClientError(f"bad --proxy {value!r}: port 0")
    return parts.hostname, DEFAULT_PROXY_PORT if port is None else port


def _never() -> bool:
    return False


class _Conversation:
    """A socket, a receive buffer and the name of the step under way (for errors)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.step = "connecting to the proxy"

    def receive(self, parse: Callable[[bytes], T | None]) -> T:
        """Receive until ``parse`` returns a value."""
        while True:
            result = parse(bytes(self.buf))
            if result is not None:
                return result
            chunk = self._recv()
            if not chunk:
                raise ClientError(f"{self.step}: the proxy closed the connection")
            self.buf += chunk

    def consume(self, count: int) -> None:
        del self.buf[:count]

    def _recv(self) -> bytes:
        """One read, waited for in short selects (a stop that is never set asks for them):
        Ctrl-C stops a wait on Windows too."""
        if not wait_readable(self.sock, self.sock.gettimeout(), _never):
            raise TimeoutError("timed out")
        return self.sock.recv(65536)

    def read_to_eof(self) -> bytes:
        while chunk := self._recv():
            self.buf += chunk
        data = bytes(self.buf)
        self.buf.clear()
        return data


def _negotiate(conv: _Conversation, credentials: tuple[bytes, bytes] | None) -> None:
    conv.step = "SOCKS5 greeting"
    offered = METHOD_USERPASS if credentials is not None else METHOD_NO_AUTH
    conv.sock.sendall(build_greeting(bytes((offered,))))
    method = conv.receive(parse_method_selection)
    conv.consume(2)
    if method == METHOD_NO_ACCEPTABLE:
        what = "username/password" if credentials is not None else "no authentication"
        raise ClientError(f"the proxy refused the offered authentication method ({what})")
    if method != offered:
        raise ClientError(f"the proxy chose method {method:#04x}, which was not offered")
    if credentials is not None:
        conv.step = "SOCKS5 authentication"
        conv.sock.sendall(build_userpass(*credentials))
        ok = conv.receive(parse_auth_status)
        conv.consume(2)
        if not ok:
            raise ClientError("proxy authentication failed (bad username or password)")


def _connect(conv: _Conversation, target: Target) -> None:
    conv.step = f"SOCKS5 CONNECT to {target.address}"
    conv.sock.sendall(build_request(Request(CMD_CONNECT, target.address)))
    reply, _bind, consumed = conv.receive(parse_reply)
    conv.consume(consumed)
    if reply == Reply.GENERAL_FAILURE:
        raise ClientError(
            "the proxy failed (general failure): the tunnel to the sockproxy server failed "
            "or the server refused the request; the local's log says which"
        )
    if reply != Reply.SUCCEEDED:
        raise ClientError(f"the proxy could not connect to {target.address}: {reply_text(reply)}")


def _http_request(target: Target) -> bytes:
    lines = [
        f"GET {target.path} HTTP/1.1",
        f"Host: {target.host_header}",
        f"User-Agent: {USER_AGENT}",
        "Accept: */*",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def fetch(
    proxy: tuple[str, int],
    target: Target,
    credentials: tuple[bytes, bytes] | None,
    timeout: float,
) -> Response:
    """GET ``target`` through the SOCKS5 proxy and return the parsed response."""
    host, port = proxy
    proxy_text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = socket.create_connection(proxy, timeout=timeout)
    except OSError as exc:
        raise ClientError(f"cannot connect to the proxy {proxy_text}: {_os_reason(exc)}") from exc
    conv = _Conversation(sock)
    with sock:
        try:
            _negotiate(conv, credentials)
            _connect(conv, target)
            conv.step = "sending the HTTP request"
            sock.sendall(_http_request(target))
            conv.step = "reading the HTTP response"
            raw = conv.read_to_eof()
        except TimeoutError as exc:
            raise ClientError(f"{conv.step}: timed out after {timeout:g}s") from exc
        except OSError as exc:
            raise ClientError(f"{conv.step}: {_os_reason(exc)}") from exc
        except ProtocolError as exc:
            raise ClientError(f"{conv.step}: bad answer from the proxy: {exc}") from exc
    return parse_response(raw)


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return exc.strerror or str(exc) or type(exc).__name__


def parse_response(raw: bytes) -> Response:
    """Status line and body of a complete HTTP/1.x response read to EOF."""
    if not raw:
        raise ClientError("the server closed the connection without a response")
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ClientError("malformed HTTP response: no end of headers")
    lines = head.split(b"\r\n")
    status_line = lines[0].decode("latin-1")
    if not status_line.startswith("HTTP/"):
        raise ClientError(f"malformed HTTP status line: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.decode("latin-1").partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return Response(status_line, _dechunk(body))
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ClientError(f"malformed Content-Length: {length[:40]!r}")
        expected = int(length)
        if len(body) < expected:
            raise ClientError(f"response truncated: {len(body)} of {expected} body bytes")
        body = body[:expected]
    return Response(status_line, body)


def _dechunk(data: bytes) -> bytes:
    body = bytearray()
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            raise ClientError("response truncated: incomplete chunked body")
        size_text = data[pos:line_end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ClientError(f"malformed chunk size {size_text[:20]!r}") from None
        if size == 0:
            return bytes(body)
        start = line_end + 2
        if len(data) < start + size + 2:
            raise ClientError("response truncated: incomplete chunked body")
        body += data[start : start + size]
        pos = start + size + 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ClientError line (exit 1)."""

    def error(self, message: str) -> NoReturn:
        raise ClientError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="test_client.py",
        description="Fetch an http:// URL through a SOCKS5 proxy (the proxy resolves names).",
    )
    parser.add_argument("--proxy", default=DEFAULT_PROXY, help="HOST:PORT (default %(default)s)")
    parser.add_argument("--user", help="username for RFC 1929 authentication")
    parser.add_argument("--password", help="password for RFC 1929 authentication")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per network step (default 10)"
    )
    parser.add_argument("url", metavar="URL", help="an http:// URL")
    return parser


def _credentials(user: str | None, password: str | None) -> tuple[bytes, bytes] | None:
    if user is None and password is None:
        return None
    if user is None or password is None:
        raise ClientError("--user and --password go together")
    raw_user, raw_password = user.encode(), password.encode()
    if not 1 <= len(raw_user) <= 255 or not 1 <= len(raw_password) <= 255:
        raise ClientError("--user and --password must each be 1 to 255 bytes")
    return raw_user, raw_password


def main(argv: list[str] | None = None) -> int:
    """Run the client; returns the exit status."""
    try:
        args = _build_parser().parse_args(argv)
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise ClientError("--timeout must be a positive number of seconds")
        credentials = _credentials(args.user, args.password)
        proxy = parse_proxy(args.proxy)
        target = parse_url(args.url)
        response = fetch(proxy, target, credentials, args.timeout)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(response.status_line)
    print(f"body: {len(response.body)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
