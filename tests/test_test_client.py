"""utils/test_client.py against an in-test SOCKS5 proxy and HTTP server on 127.0.0.1.

The proxy is built on utils.socks5.Socks5ServerConnection and always connects to
127.0.0.1 at the requested port, whatever host was asked for; it records the
requests so the tests can check what the client sent (domain names unresolved).
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from utils import test_client
from utils.socks5 import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    CMD_CONNECT,
    METHOD_NO_ACCEPTABLE,
    Address,
    Credentials,
    Greeting,
    NeedData,
    Reply,
    Request,
    RequestReceived,
    Socks5ServerConnection,
    auth_status,
    build_reply,
    credentials_match,
    method_selection,
    reply_for_error,
)

TIMEOUT = 5.0
LOCALHOST = "127.0.0.1"
BODY = b"hello world"

Handler = Callable[[socket.socket], None]


class TcpServer:
    """A listening socket on 127.0.0.1 and a thread serving one connection at a time."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((LOCALHOST, 0))
        self._sock.listen(8)
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    self._handler(conn)
                except Exception as exc:
                    self.errors.append(exc)

    def close(self) -> None:
        self.stopping.set()
        self._thread.join(TIMEOUT * 2)
        self._sock.close()
        assert not self._thread.is_alive(), "server thread did not stop"


class HttpOrigin:
    """Answers every request with ``response``; records the request heads."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.requests: list[bytes] = []

    def __call__(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        self.requests.append(data.partition(b"\r\n\r\n")[0])
        conn.sendall(self.response)


class Socks5Proxy:
    """A minimal SOCKS5 proxy; every CONNECT goes to 127.0.0.1:<requested port>."""

    def __init__(self, credentials: tuple[bytes, bytes] | None = None) -> None:
        self.credentials = credentials
        self.requests: list[Request] = []

    def __call__(self, conn: socket.socket) -> None:
        machine = Socks5ServerConnection(require_auth=self.credentials is not None)
        while True:
            event = machine.next_event()
            if isinstance(event, NeedData):
                data = conn.recv(4096)
                if not data:
                    return
                machine.receive_data(data)
            elif isinstance(event, Greeting):
                method = machine.choose_method(event.methods)
                conn.sendall(method_selection(method))
                if method == METHOD_NO_ACCEPTABLE:
                    return
            elif isinstance(event, Credentials):
                assert self.credentials is not None
                ok = credentials_match(*self.credentials, event.username, event.password)
                conn.sendall(auth_status(ok))
                if not ok:
                    return
            else:
                self._connect(conn, event, machine.trailing_data())
                return

    def _connect(self, conn: socket.socket, event: RequestReceived, trailing: bytes) -> None:
        request = event.request
        self.requests.append(request)
        if request.command != CMD_CONNECT:
            conn.sendall(build_reply(Reply.COMMAND_NOT_SUPPORTED))
            return
        try:
            upstream = socket.create_connection((LOCALHOST, request.address.port), TIMEOUT)
        except OSError as exc:
            conn.sendall(build_reply(reply_for_error(exc)))
            return
        with upstream:
            conn.sendall(build_reply(Reply.SUCCEEDED, Address(*upstream.getsockname())))
            upstream.sendall(trailing)
            relay(conn, upstream)


def relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both sides have sent EOF."""
    peer = {a: b, b: a}
    open_ = [a, b]
    while open_:
        readable, _, _ = select.select(open_, [], [], TIMEOUT)
        if not readable:
            raise TimeoutError("relay idle")
        for sock in readable:
            data = sock.recv(65536)
            if data:
                peer[sock].sendall(data)
            else:
                open_.remove(sock)
                peer[sock].shutdown(socket.SHUT_WR)


@pytest.fixture
def servers() -> Iterator[Callable[[Handler], TcpServer]]:
    """Start TcpServers on demand; stop them all and check their errors at the end."""
    started: list[TcpServer] = []

    def start(handler: Handler) -> TcpServer:
        server = TcpServer(handler)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
    for server in started:
        assert server.errors == []


def ok_response(body: bytes = BODY) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = test_client.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *fragments: str) -> None:
    assert err.startswith("error: ")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def closed_port() -> int:
    """A 127.0.0.1 port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
    return port


# ------------------------------------------------------------------------- success


def test_fetch_ip_url(
    servers: Callable[[Handler], TcpServer], capsys: pytest.CaptureFixture[str]
) -> None:
    origin = HttpOrigin(ok_response())
    http = servers(origin)
    proxy = Socks5Proxy()
    socks = servers(proxy)
    url = f"http://127.0.0.1:{http.port}/hello?x=1"
    code, out, err = run(["--proxy", f"127.0.0.1:{socks.port}", "--timeout", "5", url], capsys)
    assert (code, err) == (0, "")
    assert out == "HTTP/1.1 200 OK\nbody: 11 bytes\n"
    assert proxy.requests == [Request(CMD_CONNECT, Address("127.0.0.1", http.port))]
    assert proxy.requests[0].address.atyp == ATYP_IPV4
    head = origin.requests[0].decode()
    assert head.startswith("GET /hello?x=1 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{http.port}" in head
    assert "\r\nConnection: close" in head


def test_domain_is_resolved_by_the_proxy(
    servers: Callable[[Handler], TcpServer], capsys: pytest.CaptureFixture[str]
) -> None:
    origin = HttpOrigin(ok_response(b"x" * 100_000))
    http = servers(origin)
    proxy = Socks5Proxy()
    socks = servers(proxy)
    url = f"http://origin.invalid:{http.port}/a%20b/c d"
    code, out, err = run(["--proxy", f"127.0.0.1:{socks.port}", url], capsys)
    assert (code, err) == (0, "")
    assert out == "HTTP/1.1 200 OK\nbody: 100000 bytes\n"
    assert proxy.requests[0].address == Address("origin.invalid", http.port)
    assert proxy.requests[0].address.atyp == ATYP_DOMAIN
    head = origin.requests[0].decode()
    assert head.startswith("GET /a%20b/c%20d HTTP/1.1\r\n")
    assert f"\r\nHost: origin.invalid:{http.port}" in head


def test_ipv6_literal_url(
    servers: Callable[[Handler], TcpServer], capsys: pytest.CaptureFixture[str]
) -> None:
    origin = HttpOrigin(ok_response())
    http = servers(origin)
    proxy = Socks5Proxy()
    socks = servers(proxy)
    url = f"http://[::1]:{http.port}/"
    code, out, _ = run(["--proxy", f"127.0.0.1:{socks.port}", url], capsys)
    assert code == 0
    assert out == "HTTP/1.1 200 OK\nbody: 11 bytes\n"
    assert proxy.requests[0].address == Address("::1", http.port)
    assert proxy.requests[0].address.atyp == ATYP_IPV6
    assert f"\r\nHost: [::1]:{http.port}" in origin.requests[0].decode()


def test_chunked_body_is_counted_decoded(
    servers: Callable[[Handler], TcpServer], capsys: pytest.CaptureFixture[str]
) -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    )
    http = servers(HttpOrigin(response))
    socks = servers(Socks5Proxy())
    url = f"http://127.0.0.1:{http.port}/"
    code, out, _ = run(["--proxy", f"127.0.0.1:{socks.port}", url], capsys)
    assert code == 0
    assert out == "HTTP/1.1 200 OK\nbody: 11 bytes\n"


def test_auth_success(
    servers: Callable[[Handler], TcpServer], capsys: pytest.CaptureFixture[str]
) -> None:
    http = servers(HttpOrigin(ok_response()))
    socks = servers(Socks5Proxy(credentials=(b"alice", b"s3cret")))
    argv = ["--proxy", f"127.0.0.1:{socks.port}", "--user", "alice", "--password", "s3cret"]
    code, out, err = run([*argv, f"http://127.0.0.1:{http.port}/"], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("HTTP/1.1 200 OK\n")


# ------------------------------------------------------------------------ failures


def test_connection_refused_by_destination(
    servers: Callable[[Handler], TcpServer], capsys: pytest.CaptureFixture[str]
) -> None:
    socks = servers(Socks5Proxy())
    url = f"http://127.0.0.1:{closed_port()}/"
    code, out, err = run(["--proxy", f"127.0.0.1:{socks.port}", url], capsys)
    assert code == 1
    assert out == ""
    assert_one_error_line(err, "connection refused")


def test_proxy_not_listening(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    code, _, err = run(["--proxy", f"127.0.0.1:{port}", "http://127.0.0.1/"], capsys)
    assert code == 1
    assert_one_error_line(err, "cannot connect to the proxy", "connection refused")


def test_auth_failure(
    servers: Callable[[Handler], TcpServer], capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = Socks5Proxy(credentials=(b"alice", b"s3cret"))
    socks = servers(proxy)
    argv = ["--proxy", f"127.0.0.1:{socks.port}", "--user", "alice", "--password", "wrong"]
    code, _, err = run([*argv, "http://127.0.0.1:1/"], capsys)
    assert code == 1
    assert_one_error_line(err, "authentication failed")
    assert proxy.requests == []


def test_method_refused(
    servers: Callable[[Handler], TcpServer], capsys: pytest.CaptureFixture[str]
) -> None:
    socks = servers(Socks5Proxy(credentials=(b"alice", b"s3cret")))
    code, _, err = run(["--proxy", f"127.0.0.1:{socks.port}", "http://127.0.0.1:1/"], capsys)
    assert code == 1
    assert_one_error_line(err, "refused the offered authentication method")


def test_proxy_silent_times_out(
    servers: Callable[[Handler], TcpServer], capsys: pytest.CaptureFixture[str]
) -> None:
    def silent(conn: socket.socket) -> None:
        while conn.recv(4096):  # read the greeting, never answer, wait for the client to quit
            pass

    socks = servers(silent)
    argv = ["--proxy", f"127.0.0.1:{socks.port}", "--timeout", "0.3", "http://127.0.0.1:1/"]
    code, _, err = run(argv, capsys)
    assert code == 1
    assert_one_error_line(err, "SOCKS5 greeting", "timed out")


def test_truncated_body(
    servers: Callable[[Handler], TcpServer], capsys: pytest.CaptureFixture[str]
) -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"
    http = servers(HttpOrigin(response))
    socks = servers(Socks5Proxy())
    url = f"http://127.0.0.1:{http.port}/"
    code, _, err = run(["--proxy", f"127.0.0.1:{socks.port}", url], capsys)
    assert code == 1
    assert_one_error_line(err, "truncated", "5 of 100")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["ftp://example.com/"], "scheme"),
        (["https://example.com/"], "scheme"),
        (["example.com"], "scheme"),
        (["http:///path"], "no host"),
        (["http://example.com:99999/"], "bad URL"),
        (["http://[zz]/"], "bad URL"),
        ([], "required"),
        (["--user", "u", "http://example.com/"], "--password"),
        (["--proxy", "127.0.0.1:x", "http://example.com/"], "--proxy"),
        (["--timeout", "0", "http://example.com/"], "--timeout"),
        (["--timeout", "abc", "http://example.com/"], "timeout"),
    ],
)
def test_usage_errors(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(argv, capsys)
    assert code == 1
    assert out == ""
    assert_one_error_line(err, fragment)


def test_parse_proxy() -> None:
    assert test_client.parse_proxy("127.0.0.1:1080") == ("127.0.0.1", 1080)
    assert test_client.parse_proxy("[::1]:9050") == ("::1", 9050)
    assert test_client.parse_proxy("proxy.example") == ("proxy.example", 1080)
