"""local.py's plain HTTP front: absolute-URI requests forwarded through the tunnel.

One client connection may carry many requests, to one origin or several: each origin gets
its own tunnel, kept while the requests stay on that origin. For each request this thread
relays the response while a pooled thread uploads the request body (so that a ``100
Continue`` reaches the client before the body is sent). Framing is found by
``utils.httpproxy``; this module only moves bytes.

A failure before the response has started is answered with a status and a one-line text
body (502, 504, 407, 400); a failure in the middle of a response resets the client, so that
a cut-off body never looks complete.
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING

from client.streams import Stream, close_stream, interrupt_stream, receive, set_stream_timeout
from utils.base import AccessRecord, quietly_shutdown, set_reset_on_close
from utils.channel import Deadline, recv_some
from utils.errors import ProtocolError, SockproxyError
from utils.events import describe
from utils.httpconnect import END_OF_HEAD, MAX_HEAD_SIZE, HttpProxyError
from utils.httpproxy import (
    BodyReader,
    ForwardRequest,
    ResponseHead,
    error_response,
    parse_request,
    parse_response,
    reply_failure,
)
from utils.socks5 import CMD_CONNECT, Address, Reply, Request
from utils.workers import WORKERS, Completion

if TYPE_CHECKING:
    from client.handler import LocalHandler

READ_SIZE = 64 * 1024
GOODBYE_TIMEOUT = 2.0  # waiting for an origin's tunnel to end after ours did
UPLOAD_GRACE = 1.0  # after the response, for the last bytes of the request body to go out


def read_head(client: socket.socket, deadline: Deadline) -> bytes:
    """The client's first bytes up to and including the blank line (or too many of them)."""
    buffer = b""
    while END_OF_HEAD not in buffer and len(buffer) <= MAX_HEAD_SIZE:
        buffer += recv_some(client, deadline)
    return buffer


class _NoResponse(Exception):
    """The tunnel ended or failed before the first byte of a response."""


class _Upload:
    """The request body, client -> tunnel, on a pooled thread; keeps what follows it."""

    def __init__(self, forwarder: HttpForwarder, reader: BodyReader, buffer: bytes) -> None:
        self.rest = b""
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._cancelled = False
        self._forwarder = forwarder
        self._completion: Completion | None = None
        if reader.done:  # no body: nothing to wait for, no thread
            self.rest = buffer
            self.finished.set()
        else:
            self._completion = Completion(self._run, reader, buffer)

    def _run(self, reader: BodyReader, buffer: bytes) -> None:
        try:
            self._pump(reader, buffer)
        except (OSError, SockproxyError) as exc:
            if not self._cancelled:
                self.error = exc
                self._forwarder.abort(describe(exc))

    def _pump(self, reader: BodyReader, data: bytes) -> None:
        forwarder = self._forwarder
        while True:
            part, self.rest = reader.feed(data)
            if part:
                forwarder.send_up(part)
            if reader.done:
                self.finished.set()
                return
            data = forwarder.client.recv(READ_SIZE)
            if not data:
                raise ConnectionError("client closed in the middle of the request body")

    def stop(self, grace: float) -> None:
        """Wait up to ``grace`` s for the body to end, else stop reading it; then join."""
        if not self.finished.wait(grace):
            self._cancelled = True
            quietly_shutdown(self._forwarder.client, socket.SHUT_RD)
        if self._completion is not None:
            self._completion.join()


class HttpForwarder:
    """Serves the absolute-URI requests of one client connection (a LiveTunnel for the log)."""

    def __init__(self, handler: LocalHandler, client: socket.socket, record: AccessRecord) -> None:
        self.handler = handler
        self.client = client
        self.record = record
        self.config = handler.server.config
        self.to_channel = 0
        self.to_plain = 0
        self.failure: str | None = None
        self._stream: Stream | None = None
        self._origin: Address | None = None
        self._from_origin = b""  # bytes the origin sent beyond the last response
        self._origins: list[str] = []
        self._lock = threading.Lock()

    # --- the connection

    def serve(self, buffer: bytes) -> None:
        """Serve requests until the client or a response ends the connection (after an
        abort the handler's ConnectionSockets resets the client and logs the reason)."""
        self.record.relay = self
        self.client.settimeout(self.config.timeouts.idle)
        try:
            self._serve(buffer)
        except (OSError, SockproxyError):
            if self.failure is None:
                raise  # not an abort: the handler logs it as the outcome
        finally:
            self._end_stream(graceful=self.failure is None)

    def _serve(self, buffer: bytes) -> None:
        while True:
            request, buffer = self._next_request(buffer)
            if request is None:
                return
            if self.config.auth and not self.handler.credentials_ok(request.credentials):
                raise self._answer(
                    HttpProxyError(407, "Proxy Authentication Required", "wrong or no credentials")
                )
            keep_alive, buffer = self._exchange(request, buffer)
            if not keep_alive:
                return

    def _next_request(self, buffer: bytes) -> tuple[ForwardRequest | None, bytes]:
        """The next request, or None if the client closed cleanly before sending one."""
        try:
            while (parsed := parse_request(buffer)) is None:
                data = self._receive_more(bool(buffer))
                if not data:
                    if buffer:
                        raise ConnectionError("client closed in the middle of a request head")
                    return None, b""
                buffer += data
        except HttpProxyError as exc:
            raise self._answer(exc) from None
        request, used = parsed
        return request, buffer[used:]

    def _receive_more(self, started: bool) -> bytes:
        """More of a request head; b"" also when an idle keep-alive connection times out."""
        try:
            return self.client.recv(READ_SIZE)
        except TimeoutError:
            if started:
                raise
            return b""

    def _answer(self, exc: HttpProxyError) -> HttpProxyError:
        """Send ``exc`` as our response (a one-line body) and return it to be raised."""
        self.client.sendall(
            error_response(exc.status, exc.reason, str(exc), ask_for_auth=exc.status == 407)
        )
        return exc

    # --- one request

    def _exchange(self, request: ForwardRequest, buffer: bytes) -> tuple[bool, bytes]:
        """Forward ``request``, relay its response; (may the client send another, what follows).

        A kept tunnel may have been closed by the origin meanwhile (its idle timeout): an
        idempotent request without a body that gets no response byte on it is sent once more
        on a fresh tunnel (RFC 9110 section 9.2.2); anything else gets a 502.
        """
        retry = request.retryable and self._stream is not None and self._origin == request.origin
        try:
            return self._attempt(request, buffer)
        except _NoResponse as exc:
            if not retry:
                raise self._answer(HttpProxyError(502, "Bad Gateway", str(exc))) from None
        self._end_stream(graceful=False)
        try:
            return self._attempt(request, buffer)
        except _NoResponse as exc:
            raise self._answer(HttpProxyError(502, "Bad Gateway", str(exc))) from None

    def _attempt(self, request: ForwardRequest, buffer: bytes) -> tuple[bool, bytes]:
        stream = self._stream_to(request.origin)
        try:
            self.send_up(request.head)
        except (OSError, SockproxyError) as exc:
            raise _NoResponse(f"{request.origin}: {describe(exc)}") from None
        upload = _Upload(self, BodyReader(request.body), buffer)
        try:
            head = self._relay_response(request, stream)
        finally:
            upload.stop(UPLOAD_GRACE)
        if upload.error is not None:
            raise upload.error
        keep_alive = request.keep_alive and head.keep_alive and not self._from_origin
        return keep_alive and upload.finished.is_set(), upload.rest

    def _stream_to(self, origin: Address) -> Stream:
        """The tunnel to ``origin``: the current one if it goes there, else a new one."""
        if self._stream is not None and self._origin == origin:
            return self._stream
        self._end_stream(graceful=True)
        name = str(origin)
        if name not in self._origins:
            self._origins.append(name)
            self.record.target = ",".join(self._origins)
        stream = self._open(origin)
        self._stream, self._origin = stream, origin
        if self.failure is not None:  # aborted while the tunnel opened: abort() missed it
            raise ConnectionAbortedError(self.failure)
        set_stream_timeout(stream, self.config.timeouts.idle)
        return stream

    def _open(self, origin: Address) -> Stream:
        deadline = Deadline(self.config.timeouts.handshake)
        try:
            stream, reply, _ = self.handler.server.connector.open(
                Request(CMD_CONNECT, origin), deadline
            )
        except (OSError, SockproxyError) as exc:
            raise self._answer(
                HttpProxyError(
                    502, "Bad Gateway", f"tunnel to the sockproxy server failed: {describe(exc)}"
                )
            ) from None
        if reply == Reply.SUCCEEDED:
            return stream
        close_stream(stream)
        raise self._answer(reply_failure(reply, str(origin)))

    def _relay_response(self, request: ForwardRequest, stream: Stream) -> ResponseHead:
        """Relay interim responses, then the final one with its body; return its head."""
        while True:
            head, used, buffer = self._response_head(request, stream)
            self._send_down(buffer[:used])
            self._from_origin = buffer[used:]
            if not head.interim:
                break
        try:
            self._relay_body(BodyReader(head.body), stream)
        except (OSError, SockproxyError) as exc:
            self.abort(describe(exc))  # the client must not take a cut-off body for whole
            raise
        return head

    def _relay_body(self, reader: BodyReader, stream: Stream) -> None:
        data = self._from_origin
        while True:
            part, self._from_origin = reader.feed(data)
            self._send_down(part)
            if reader.done:
                return
            payloads = receive(stream)
            if not payloads:
                reader.feed_eof()
                return
            data = b"".join(payloads)

    def _response_head(
        self, request: ForwardRequest, stream: Stream
    ) -> tuple[ResponseHead, int, bytes]:
        """Read a response head; before it, every failure is answered with 502 or 504."""
        buffer = self._from_origin
        try:
            while (parsed := parse_response(buffer, request.method)) is None:
                payloads = receive(stream)
                if not payloads and not buffer:
                    raise _NoResponse(f"{request.origin} closed the connection without a response")
                if not payloads:
                    raise ProtocolError("the response head was cut off")
                buffer += b"".join(payloads)
        except TimeoutError:
            raise self._answer(
                HttpProxyError(504, "Gateway Timeout", f"{request.origin} did not answer in time")
            ) from None
        except (OSError, SockproxyError) as exc:
            if self.failure is not None:
                raise
            if not buffer:
                raise _NoResponse(f"{request.origin}: {describe(exc)}") from None
            raise self._answer(
                HttpProxyError(502, "Bad Gateway", f"{request.origin}: {describe(exc)}")
            ) from None
        head, used = parsed
        return head, used, buffer

    # --- bytes

    def send_up(self, data: bytes) -> None:
        assert self._stream is not None
        self._stream.send(data)
        self.to_channel += len(data)

    def _send_down(self, data: bytes) -> None:
        if data:
            self.client.sendall(data)
            self.to_plain += len(data)

    def abort(self, reason: str) -> None:
        """Stop everything; the client gets a reset (also called by a shutdown)."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
        set_reset_on_close(self.client)
        quietly_shutdown(self.client, socket.SHUT_RD)
        if self._stream is not None:
            interrupt_stream(self._stream)

    def _end_stream(self, graceful: bool) -> None:
        """Close the current tunnel; ``graceful``: say goodbye first, on a pooled thread."""
        stream, self._stream, self._origin = self._stream, None, None
        self._from_origin = b""
        if stream is None:
            return
        if graceful:
            try:
                WORKERS.submit(_goodbye, stream)
                return
            except RuntimeError:
                pass  # no thread to wait with: close at once
        close_stream(stream)


def _goodbye(stream: Stream) -> None:
    """End of stream, then a short wait for the server's, so that both sides end cleanly."""
    try:
        stream.send_end()
        set_stream_timeout(stream, GOODBYE_TIMEOUT)
        while receive(stream):
            pass
    except (OSError, SockproxyError):
        pass  # the requests are done; only the goodbye failed
    finally:
        close_stream(stream)
