"""Where the server lets a request go: the ONE place that resolves a SOCKS address and checks it.

TCP CONNECT, HTTP CONNECT (the local sends it as a CONNECT) and UDP datagrams all call
``Destinations.resolve``: IP literals are used as they are (no resolver round trip), names are
resolved here (never at the local), and every resulting address is checked by the rules of
``ServerConfig.destination_allowed`` as the kernel will treat it (``utils.config.kernel_view``:
``0.0.0.0`` and ``::`` are the local host, IPv4-mapped and IPv4-compatible IPv6 are IPv4).

With ``block_private_destinations`` the server's own addresses are refused too: a connection
to its public address reaches every service bound to ``0.0.0.0``. They are read at start and
again on SIGHUP (``refresh``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from utils.config import IPAddress, ServerConfig, kernel_view
from utils.socks5 import Address, Reply, reply_for_error

log = logging.getLogger("sockproxy.server")

Sockaddr = tuple[Any, ...]
#: (family, socket address) of one allowed destination, ready for socket() and connect()
Target = tuple[socket.AddressFamily, Sockaddr]

_PROC_IPV4 = Path("/proc/net/fib_trie")
_PROC_IPV6 = Path("/proc/net/if_inet6")


class Destinations:
    """The destination rules plus the server's own addresses; thread-safe to read."""

    def __init__(
        self,
        config: ServerConfig,
        read_own: Callable[[], frozenset[IPAddress]] | None = None,
    ) -> None:
        self.config = config
        self._read_own = read_own or own_addresses
        self.own: frozenset[IPAddress] = frozenset()
        self.refresh()

    def refresh(self) -> None:
        """Re-read the host's addresses (at start and on SIGHUP); one assignment, no lock."""
        if self.config.block_private:
            self.own = frozenset(kernel_view(ip) for ip in self._read_own())

    def allowed(self, ip: IPAddress, port: int) -> bool:
        return self.config.destination_allowed(ip, port, self.own)

    def resolve(self, address: Address, kind: socket.SocketKind) -> list[Target] | Reply:
        """The addresses ``address`` may be reached at (in resolver order), or the REP code
        that says why none: NOT_ALLOWED when the rules refuse every one."""
        try:
            candidates = _candidates(address, kind)
        except UnicodeError:  # the idna codec refuses the name (e.g. a label over 63 bytes)
            return Reply.HOST_UNREACHABLE
        except OSError as exc:
            return reply_for_error(exc)
        allowed = [
            (family, sockaddr)
            for family, sockaddr, ip in candidates
            if self.allowed(ip, address.port)
        ]
        if not allowed:
            log.warning("destination %s denied by the rules", address)
            return Reply.NOT_ALLOWED
        return allowed


def _candidates(
    address: Address, kind: socket.SocketKind
) -> list[tuple[socket.AddressFamily, Sockaddr, IPAddress]]:
    """getaddrinfo for a name; an IP literal as it is (most requests: no resolver)."""
    literal = _ip_literal(address.host)
    if isinstance(literal, ipaddress.IPv4Address):
        return [(socket.AF_INET, (address.host, address.port), literal)]
    if literal is not None:
        return [(socket.AF_INET6, (address.host, address.port, 0, 0), literal)]
    infos = socket.getaddrinfo(address.host, address.port, type=kind)
    return [(info[0], info[4], ipaddress.ip_address(info[4][0])) for info in infos]


def _ip_literal(host: str) -> IPAddress | None:
    """The address of an IP literal (canonical, as ``Address`` keeps it), None for a name.

    inet_pton then bytes: several times faster than parsing the text with ``ipaddress``,
    which matters for UDP (measured: tests/test_replyfilter.py sends 100,000 datagrams).
    """
    for family, kind in (
        (socket.AF_INET, ipaddress.IPv4Address),
        (socket.AF_INET6, ipaddress.IPv6Address),
    ):
        try:
            return kind(socket.inet_pton(family, host))
        except OSError:
            continue
    return None


# --- the host's own addresses ------------------------------------------------------------


def own_addresses() -> frozenset[IPAddress]:
    """Every address a local interface holds (Linux: from /proc, no resolver, no ioctl).

    Elsewhere, the addresses the host name resolves to (which may miss some).
    """
    found = set(_proc_ipv4(_read(_PROC_IPV4))) | set(_proc_ipv6(_read(_PROC_IPV6)))
    if not found:
        found = set(_host_name_addresses())
    return frozenset(found)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _proc_ipv4(fib_trie: str) -> Iterable[IPAddress]:
    """The ``/32 host LOCAL`` entries of /proc/net/fib_trie: the host's IPv4 addresses."""
    previous = ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|-- "):
            previous = text[4:]
        elif text == "/32 host LOCAL" and previous:
            yield ipaddress.IPv4Address(previous)


def _proc_ipv6(if_inet6: str) -> Iterable[IPAddress]:
    """The first column of /proc/net/if_inet6: 32 hex digits per address."""
    for line in if_inet6.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            yield ipaddress.IPv6Address(int(fields[0], 16))


def _host_name_addresses() -> Iterable[IPAddress]:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except (OSError, UnicodeError):
        return
    for info in infos:
        yield ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])


def warn_if_exposed(config: ServerConfig) -> None:
    """One warning at start for a server beyond loopback that lets key holders go anywhere."""
    try:
        on_loopback = ipaddress.ip_address(config.address).is_loopback
    except ValueError:
        on_loopback = config.address.lower().removesuffix(".") == "localhost"
    if not on_loopback and not config.has_destination_rules:
        log.warning(
            "listening on %s with no destination rules: every key holder can reach this"
            " host's loopback services and its private networks; set"
            ' "block_private_destinations": true or destination_allow/destination_deny',
            config.address,
        )
