"""The encrypted channel on a socket: the handshake driven over I/O, then sealed records.

This is the only place where the sans-IO handshake and record codecs meet a socket.
"""

from __future__ import annotations

import socket
import time

from utils.cells import MAX_RECORD_PAYLOAD, RecordOpener, RecordSealer
from utils.errors import ChannelError, ProtocolError
from utils.handshake import ClientHandshake, ServerHandshake, SessionKeys

RECV_SIZE = 256 * 1024


class ReadSize:
    """How much to ask recv() for: grows while reads fill it, shrinks when they do not.

    recv() allocates its whole buffer before it blocks, so a thousand idle connections
    waiting with large buffers would pin a lot of memory; bulk transfers still get large
    reads (and so large records) after a few round trips.
    """

    def __init__(self, high: int, low: int = 16 * 1024) -> None:
        self.low = min(low, high)
        self.high = high
        self.size = self.low

    def update(self, received: int) -> None:
        if received >= self.size:
            self.size = min(self.size * 2, self.high)
        elif received < self.size // 4:
            self.size = max(self.size // 2, self.low)


class Deadline:
    """A point in time that every blocking call of one phase must finish by."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def arm(self, sock: socket.socket) -> None:
        sock.settimeout(self.remaining())


def recv_some(sock: socket.socket, deadline: Deadline, size: int = 4096, flags: int = 0) -> bytes:
    """One recv bounded by ``deadline``; EOF is an error in a phase that needs more bytes."""
    deadline.arm(sock)
    data = sock.recv(size, flags)
    if not data:
        raise ConnectionError("peer closed the connection")
    return data


class Channel:
    """Records over one TCP connection: seal on send, open and verify on receive."""

    def __init__(self, sock: socket.socket, keys: SessionKeys) -> None:
        self.sock = sock
        self._sealer = RecordSealer(keys.send)
        self._opener = RecordOpener(keys.receive)
        self._ready: list[bytes] = []
        self._read_size = ReadSize(RECV_SIZE)

    def seal(self, payload: bytes | bytearray | memoryview) -> bytes:
        """The records for ``payload``, for a caller that sends them with other bytes."""
        return self._sealer.seal(payload)

    def send(self, payload: bytes | bytearray | memoryview) -> None:
        self.sock.sendall(self._sealer.seal(payload))

    def accept_pending(self, data: bytes) -> None:
        """Records that arrived in the same reads as the end of the handshake."""
        if data:
            self._ready += self._opener.feed(data)

    def send_end(self) -> None:
        """Send the authenticated end of stream, then a TCP half-close."""
        self.sock.sendall(self._sealer.seal_end())
        self.sock.shutdown(socket.SHUT_WR)

    def receive(self) -> list[bytes]:
        """Payloads of the next record(s); [] once the stream has ended cleanly.

        Raises ChannelError on a forged or truncated stream, TimeoutError per the socket's
        timeout. Never returns bytes that have not been authenticated.
        """
        while not self._ready:
            if self._opener.ended:
                self._expect_eof()
                return []
            data = self.sock.recv(self._read_size.size)
            self._read_size.update(len(data))
            if not data:
                self._opener.check_clean_eof()
                return []
            self._ready = self._opener.feed(data)
        ready, self._ready = self._ready, []
        return ready

    def _expect_eof(self) -> None:
        if self.sock.recv(1):
            raise ChannelError("bytes after the end of stream")

    def receive_message(self, deadline: Deadline) -> bytes:
        """One whole control message (request or reply), bounded by ``deadline``."""
        deadline.arm(self.sock)
        payloads = self.receive()
        if not payloads:
            raise ProtocolError("channel ended before the control message")
        self._ready = payloads[1:]  # data the peer sent right behind it
        return payloads[0]

    def send_message(self, message: bytes) -> None:
        if not 0 < len(message) <= MAX_RECORD_PAYLOAD:
            raise ValueError("control message size out of range")
        self.send(message)


def client_handshake(
    sock: socket.socket, handshake: ClientHandshake, deadline: Deadline, first_message: bytes = b""
) -> Channel:
    """Run the local's side of the handshake; ``first_message`` (the request) goes out as
    soon as there are keys: with the local's last flight when resuming."""
    channel: Channel | None = None
    while not handshake.done:
        flight = handshake.receive(recv_some(sock, deadline))
        if handshake.keys is not None and channel is None:
            channel = Channel(sock, handshake.keys)
            if first_message:
                flight += channel.seal(first_message)
        if flight:
            deadline.arm(sock)
            sock.sendall(flight)
    assert channel is not None
    channel.accept_pending(handshake.trailing_data())
    return channel


def server_handshake(
    sock: socket.socket, handshake: ServerHandshake, deadline: Deadline
) -> Channel:
    """Run the server's side of the handshake on ``sock``."""
    deadline.arm(sock)
    sock.sendall(handshake.start())
    while not handshake.done:
        reply = handshake.receive(recv_some(sock, deadline))
        if reply:
            deadline.arm(sock)
            sock.sendall(reply)
    assert handshake.keys is not None
    channel = Channel(sock, handshake.keys)
    channel.accept_pending(handshake.trailing_data())
    return channel
