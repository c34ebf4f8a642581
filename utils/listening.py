"""Opening a program's listening socket, with failures that name the address."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from utils.base import format_peer

S = TypeVar("S")


class Listens(Protocol):
    """A config with the address and port a program listens on."""

    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...


C = TypeVar("C", bound=Listens)


def open_server(config: C, make: Callable[[C], S]) -> S:
    """``make(config)``; an OSError (bind, listen) comes back with the address as filename."""
    try:
        return make(config)
    except OSError as exc:
        where = format_peer((config.address, config.port))
        raise OSError(exc.errno, exc.strerror or str(exc), where) from None


def listen_failure(exc: OSError) -> str:
    """``cannot listen on 127.0.0.1:1080: address already in use`` (the address if known)."""
    reason = (exc.strerror or str(exc)).lower()
    if exc.filename:
        return f"cannot listen on {exc.filename}: {reason}"
    return f"cannot listen: {reason}"
