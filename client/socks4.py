"""local.py's SOCKS4 / SOCKS4a front: CONNECT through the tunnel; BIND and auth refused."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from utils.base import AccessRecord
from utils.channel import Deadline, recv_some
from utils.events import greeting_phase
from utils.socks4 import CMD_CONNECT, Socks4Error, Socks4Request, build_reply, parse_request
from utils.socks5 import CMD_CONNECT as SOCKS5_CONNECT
from utils.socks5 import Reply, Request

if TYPE_CHECKING:
    from client.handler import LocalHandler


def serve_socks4(
    handler: LocalHandler, client: socket.socket, deadline: Deadline, record: AccessRecord
) -> None:
    """Read one SOCKS4(a) request, refuse it (CD 0x5B and a reason) or relay it."""
    try:
        request, pending = _read_request(client, deadline)
        record.target = str(request.address)
        _check_allowed(handler, request)
    except Socks4Error:
        client.sendall(build_reply(granted=False))
        raise
    try:
        stream, reply, bind = handler.server.connector.open(
            Request(SOCKS5_CONNECT, request.address), deadline
        )
    except BaseException:
        client.sendall(build_reply(granted=False))
        raise
    handler.sockets.stream(stream)
    client.sendall(build_reply(reply == Reply.SUCCEEDED, bind))
    if reply != Reply.SUCCEEDED:
        record.outcome = reply.name.lower()
        return
    handler.relay(client, stream, record, pending)


def _read_request(client: socket.socket, deadline: Deadline) -> tuple[Socks4Request, bytes]:
    buffer = b""
    with greeting_phase(started=True):
        while (parsed := parse_request(buffer)) is None:
            buffer += recv_some(client, deadline)
    request, used = parsed
    return request, buffer[used:]


def _check_allowed(handler: LocalHandler, request: Socks4Request) -> None:
    if handler.server.config.auth:
        raise Socks4Error("SOCKS4 refused: auth is on and SOCKS4 has no password (use SOCKS5)")
    if request.command != CMD_CONNECT:
        raise Socks4Error(f"SOCKS4 command {request.command} refused: only CONNECT is served")
