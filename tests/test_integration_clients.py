"""Loopback integration: the clients of issue 9 against the real local.py and server.py.

curl ``-x http://`` for plain HTTP proxying (GET, POST with Content-Length and chunked
bodies, keep-alive across two origins), ``curl --socks4``/``--socks4a``, raw SOCKS4 for BIND,
and a local with ``auth`` on for 407 and the SOCKS4 refusal. The origins are two HTTP/1.1
servers on 127.0.0.1 (two ports: two origins).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    DataFiles,
    Launcher,
    Program,
    TCPServer,
    access_lines,
    read_to_end,
    run_curl,
    set_reset_on_close,
    wait_for,
)
from utils.socks4 import CMD_BIND, CMD_CONNECT, build_request, parse_reply
from utils.socks5 import Address

USER = "bob"
PASSWORD = "pw-" + secrets.token_hex(8)


class _Origin(http.server.SimpleHTTPRequestHandler):
    """HTTP/1.1 files for GET; POST answers ``<length> <sha256>`` of the body it read."""

    protocol_version = "HTTP/1.1"
    timeout = 20

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = (
            self._chunked()
            if "chunked" in self.headers.get("Transfer-Encoding", "")
            else (self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        )
        answer = f"{len(body)} {hashlib.sha256(body).hexdigest()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def _chunked(self) -> bytes:
        body = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        return body


@dataclass
class Setup:
    local: Program
    auth_local: Program
    strict_local: Program  # its whitelist has only ::1: we connect from 127.0.0.1
    origins: list[int]
    refused_port: int


def _start_origin(directory: Path) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_Origin, directory=str(directory))
    )
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    return server


@pytest.fixture(scope="module")
def setup(module_launcher: Launcher, data_files: DataFiles) -> Iterator[Setup]:
    origins = [_start_origin(data_files.dir) for _ in range(2)]
    server = module_launcher.server(wait=False)
    local = module_launcher.local(server.port, wait=False)
    auth_local = module_launcher.local(
        server.port, wait=False, auth=True, username=USER, password=PASSWORD
    )
    strict_local = module_launcher.local(server.port, wait=False, whitelist=["::1"])
    for program in (server, local, auth_local, strict_local):
        program.wait_ready()
    closed = TCPServer(lambda conn, _peer: conn.close())
    refused_port = closed.port
    closed.close()  # nothing listens there any more: connections are refused
    ports = [int(o.server_address[1]) for o in origins]
    yield Setup(local, auth_local, strict_local, ports, refused_port)
    for origin in origins:
        origin.shutdown()
        origin.server_close()


def _proxy(program: Program) -> str:
    return f"http://127.0.0.1:{program.port}"


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer, _ended = read_to_end(sock)
    return answer


# --------------------------------------------------------------------------- plain HTTP


def test_curl_get_through_http_proxy(setup: Setup, data_files: DataFiles, tmp_path: Path) -> None:
    out = tmp_path / "small.out"
    url = f"http://127.0.0.1:{setup.origins[0]}/small.bin"
    done = run_curl("-x", _proxy(setup.local), "-f", url, "-o", str(out))
    assert done.returncode == 0, done.stderr.decode()
    assert out.read_bytes() == data_files.small


@pytest.mark.parametrize("chunked", [False, True])
def test_curl_post_body(setup: Setup, tmp_path: Path, chunked: bool) -> None:
    body = os.urandom(1_500_000)  # over 1 MB: curl sends Expect: 100-continue
    (tmp_path / "body.bin").write_bytes(body)
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    url = f"http://127.0.0.1:{setup.origins[1]}/post"
    done = run_curl("-x", _proxy(setup.local), "-f", "--data-binary", f"@{tmp_path / 'body.bin'}",
                    *extra, url)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == f"{len(body)} {hashlib.sha256(body).hexdigest()}\n"


def test_curl_keep_alive_two_origins_one_client_connection(
    setup: Setup, data_files: DataFiles
) -> None:
    first, second = setup.origins
    urls = [
        f"http://127.0.0.1:{first}/small.bin",
        f"http://127.0.0.1:{first}/small.bin",
        f"http://127.0.0.1:{second}/small.bin",
    ]
    before = len(access_lines(setup.local.stderr()))
    done = run_curl("-x", _proxy(setup.local), "-f", "-w", "%{num_connects}\n", "-o",
                    "/dev/null", "-o", "/dev/null", "-o", "/dev/null", *urls)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["1", "0", "0"]  # curl opened one connection
    want = f"-> 127.0.0.1:{first},127.0.0.1:{second} "
    assert wait_for(lambda: any(want in x for x in access_lines(setup.local.stderr())), 5)
    lines = access_lines(setup.local.stderr())[before:]
    (line,) = [line for line in lines if want in line]
    down = re.search(r"down=(\d+)", line)
    assert down is not None and int(down.group(1)) > 3 * len(data_files.small)  # and 3 heads
    assert line.endswith("outcome=ok")


def test_refused_origin_gets_502_naming_it(setup: Setup) -> None:
    url = f"http://127.0.0.1:{setup.refused_port}/"
    done = run_curl("-x", _proxy(setup.local), "-w", "%{http_code}", url)
    assert done.stdout.decode() == f"127.0.0.1:{setup.refused_port} refused the connection\n502"


@pytest.mark.parametrize(
    ("request_line", "status", "advice"),
    [
        (b"GET https://127.0.0.1/ HTTP/1.1", b"400", b"set https_proxy"),
        (b"GET / HTTP/1.1", b"400", b"this is a proxy"),
        (b"GET ftp://127.0.0.1/ HTTP/1.1", b"400", b"only http://"),
    ],
)
def test_what_the_front_cannot_serve_says_what_to_do(
    setup: Setup, request_line: bytes, status: bytes, advice: bytes
) -> None:
    answer = _raw(setup.local.port, request_line + b"\r\nHost: 127.0.0.1\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status + b" ")
    assert advice in body and body.endswith(b"\n") and body.count(b"\n") == 1


def test_auth_407_then_credentials(setup: Setup, data_files: DataFiles) -> None:
    url = f"http://127.0.0.1:{setup.origins[0]}/small.bin"
    refused = run_curl("-x", _proxy(setup.auth_local), "-i", url)
    assert refused.stdout.startswith(b"HTTP/1.1 407 ")
    assert b'Proxy-Authenticate: Basic realm="sockproxy"' in refused.stdout
    wrong = run_curl("-x", _proxy(setup.auth_local), "-i", "-U", f"{USER}:wrong-{PASSWORD}", url)
    assert wrong.stdout.startswith(b"HTTP/1.1 407 ")
    done = run_curl("-x", _proxy(setup.auth_local), "-f", "-U", f"{USER}:{PASSWORD}", url)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == data_files.small
    assert PASSWORD not in setup.auth_local.stderr()


def test_hop_by_hop_headers_stay_on_the_first_hop(setup: Setup) -> None:
    """The origin sees Host from the URI and no Proxy-* or Connection-listed headers."""
    seen: list[bytes] = []

    def answer(conn: socket.socket, _peer: Any) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        seen.append(head)
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    origin = TCPServer(answer)
    try:
        request = (
            f"GET http://127.0.0.1:{origin.port}/a?b HTTP/1.1\r\nHost: wrong\r\n"
            "Proxy-Connection: keep-alive\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n"
            "Keep-Alive: 5\r\nTE: trailers\r\nX-Kept: yes\r\n\r\n"
        ).encode()
        answer_bytes = _raw(setup.local.port, request)
    finally:
        origin.close()
    assert answer_bytes == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert seen == [
        f"GET /a?b HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\nX-Kept: yes\r\n\r\n".encode()
    ]


# --------------------------------------------------------------------------- SOCKS4


@pytest.mark.parametrize(
    ("option", "host"), [("--socks4", "127.0.0.1"), ("--socks4a", "localhost")]
)
def test_curl_socks4(setup: Setup, data_files: DataFiles, option: str, host: str) -> None:
    url = f"http://{host}:{setup.origins[0]}/small.bin"
    done = run_curl(option, f"127.0.0.1:{setup.local.port}", "-f", url)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == data_files.small


def test_socks4_bind_is_refused(setup: Setup) -> None:
    answer = _raw(setup.local.port, build_request(CMD_BIND, Address("127.0.0.1", 80)))
    assert answer == b"\x00\x5b" + bytes(6)


@pytest.mark.parametrize("socks4a", [False, True])
def test_socks4_whitelist_as_for_socks5(setup: Setup, socks4a: bool) -> None:
    """Not on the whitelist: closed before a byte is read, whatever the protocol."""
    host = "localhost" if socks4a else "127.0.0.1"
    request = build_request(CMD_CONNECT, Address(host, setup.origins[0]))
    try:
        answer = _raw(setup.strict_local.port, request)
    except (ConnectionResetError, BrokenPipeError):
        answer = b""
    assert answer == b""
    assert wait_for(lambda: "refused 127.0.0.1:" in setup.strict_local.stderr(), 5)


def test_socks4_refused_when_auth_is_on(setup: Setup) -> None:
    request = build_request(CMD_CONNECT, Address("127.0.0.1", setup.origins[0]))
    answer = _raw(setup.auth_local.port, request)
    assert parse_reply(answer) == (False, Address("0.0.0.0", 0))
    assert wait_for(lambda: "SOCKS4 has no password" in setup.auth_local.stderr(), 5)


def _one_answer_then_close(conn: socket.socket, _peer: Any) -> None:
    """An origin that says nothing of closing, then closes after one response."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def test_get_on_a_tunnel_the_origin_closed_is_sent_again(setup: Setup) -> None:
    origin = TCPServer(_one_answer_then_close)
    request = f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    try:
        with socket.create_connection(("127.0.0.1", setup.local.port), timeout=10) as sock:
            for _ in range(2):
                sock.sendall(request)
                received = b""
                while len(received) < len(answer):
                    received += sock.recv(4096) or pytest.fail(f"EOF after {received!r}")
                assert received == answer
    finally:
        origin.close()
    assert len(origin.peers) == 2  # the second GET went through a fresh tunnel


def test_post_on_a_tunnel_the_origin_closed_gets_502(setup: Setup) -> None:
    origin = TCPServer(_one_answer_then_close)
    get = f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    post = f"POST http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"
    try:
        with socket.create_connection(("127.0.0.1", setup.local.port), timeout=10) as sock:
            sock.sendall(get)
            first = b""
            while not first.endswith(b"ok"):
                first += sock.recv(4096) or pytest.fail(f"EOF after {first!r}")
            sock.sendall(post.encode())
            second, ended = read_to_end(sock)
    finally:
        origin.close()
    head, _, body = second.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), second
    assert body.decode() in (  # the end of stream came first, or the server's reset did
        f"127.0.0.1:{origin.port} closed the connection without a response\n",
        f"127.0.0.1:{origin.port}: reset by the peer\n",
    )
    assert ended == "eof"
    assert len(origin.peers) == 1  # never sent twice


def _reset_in_the_middle(conn: socket.socket, _peer: Any) -> None:
    """A body delimited by the end of the connection, cut off by a reset."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100)
    time.sleep(0.2)
    set_reset_on_close(conn)


def test_a_cut_off_response_resets_the_client(setup: Setup) -> None:
    """Never a clean end after a cut-off body: the client could take it for the whole."""
    origin = TCPServer(_reset_in_the_middle)
    request = f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n\r\n".encode()
    try:
        with socket.create_connection(("127.0.0.1", setup.local.port), timeout=10) as sock:
            sock.sendall(request)
            received, ended = read_to_end(sock)
    finally:
        origin.close()
    assert received == b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100
    assert ended == "reset"
    want = f"-> 127.0.0.1:{origin.port} "
    assert wait_for(
        lambda: any(
            want in x and "outcome=aborted: " in x for x in access_lines(setup.local.stderr())
        ),
        5,
    ), setup.local.stderr()[-2000:]


# --------------------------------------------------------------------------- access log


def test_access_log_outcomes_are_events(setup: Setup) -> None:
    local = setup.local
    before = len(access_lines(local.stderr()))
    with socket.create_connection(("127.0.0.1", local.port), timeout=5):
        pass  # closed before a single byte
    with socket.create_connection(("127.0.0.1", local.port), timeout=5) as sock:
        sock.sendall(b"\x05\x02")  # half a greeting
    with socket.create_connection(("127.0.0.1", local.port), timeout=5) as sock:
        sock.sendall(b"\x05")
        set_reset_on_close(sock)  # reset in the middle of the greeting
    wanted = [
        "outcome=client closed before the greeting",
        "outcome=client closed during the greeting",
        "outcome=client reset during the greeting",
    ]

    def logged() -> list[str]:
        return access_lines(local.stderr())[before:]

    def all_logged() -> bool:
        return all(any(line.endswith(w) for line in logged()) for w in wanted)

    assert wait_for(all_logged, 10), local.stderr()
