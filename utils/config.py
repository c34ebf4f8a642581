"""The two JSON config files, read once and validated up front.

``server_config.json`` configures the remote exit, ``local_config.json`` the
SOCKS5 front. Every problem is a ``ConfigError`` with one line naming the file
(as the user gave it) and the field, like::

    server_config.json: field "server_port": expected an integer in 1..65535, got "abc"

Key files are read and parsed here, once; relative key paths are resolved
against the folder of the config file. ``repr()`` of a config never shows the
password or key material.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from utils.errors import ConfigError
from utils.keys import (
    RsaKey,
    fingerprint_bytes,
    load_private_key,
    load_public_key,
    load_server_public_key,
)
from utils.strictmodes import read_trusted_file

__all__ = [
    "AuthorizedKey",
    "DestinationRule",
    "IPAddress",
    "IPNetwork",
    "LocalConfig",
    "ServerConfig",
    "ServerEndpoint",
    "Timeouts",
    "Whitelist",
    "load_local_config",
    "load_server_config",
    "reload_authorized_keys",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Longest RFC 1929 username or password, in bytes.
MAX_CREDENTIAL_BYTES = 255
_K = TypeVar("_K")


_LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")


def kernel_view(ip: IPAddress) -> IPAddress:
    """The address the kernel will really talk to when asked to connect or send to ``ip``.

    The unspecified addresses (``0.0.0.0``, ``::``) are the local host, so they count as
    loopback; IPv4-mapped (``::ffff:a.b.c.d``) and IPv4-compatible (``::a.b.c.d``) IPv6
    addresses are their IPv4 address. Destination rules are checked against this view.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        value = int(ip)
        if ip.ipv4_mapped is not None:
            return kernel_view(ip.ipv4_mapped)
        if value == 0:
            return _LOOPBACK_V6
        if value >> 32 == 0 and value != 1:  # ::a.b.c.d, deprecated but still routed as IPv4
            return kernel_view(ipaddress.IPv4Address(value))
        return ip
    return _LOOPBACK_V4 if int(ip) == 0 else ip


def _unmapped(ip: IPAddress) -> tuple[IPAddress, ...]:
    """The address, plus its IPv4 form when it is IPv4-mapped (``::ffff:a.b.c.d``)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip, ip.ipv4_mapped
    return (ip,)


@dataclass(frozen=True)
class Whitelist:
    """Addresses allowed to connect: a set of networks, or any address (``"*"``)."""

    networks: tuple[IPNetwork, ...]
    any: bool

    def allows(self, ip: str) -> bool:
        """Whether a peer address string (possibly scoped or IPv4-mapped) may connect."""
        return _whitelisted(self.networks, self.any, ip)


@functools.lru_cache(maxsize=4096)  # parsing an address costs more than the rest of accept()
def _whitelisted(networks: tuple[IPNetwork, ...], any_address: bool, ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if any_address:
        return True
    return any(a in net for a in _unmapped(address) for net in networks)


@dataclass(frozen=True)
class DestinationRule:
    """A network and an inclusive port range (0..65535 for any port)."""

    network: IPNetwork
    low: int
    high: int

    def matches(self, ip: IPAddress, port: int) -> bool:
        """Whether ``ip:port`` falls in the rule (an IPv4-mapped IPv6 address counts as IPv4)."""
        in_range = self.low <= port <= self.high
        return in_range and any(a in self.network for a in _unmapped(ip))


@dataclass(frozen=True)
class Timeouts:
    """Seconds: to finish a handshake, to connect to a destination, of silence on a tunnel."""

    handshake: float
    connect: float
    idle: float


@dataclass(frozen=True)
class AuthorizedKey:
    """A local's public key that the server accepts; ``name`` is for the logs."""

    name: str
    key: RsaKey = field(repr=False, compare=False)
    fingerprint: bytes  # raw SHA-256 digest, see utils.keys.fingerprint_bytes


@dataclass(frozen=True)
class ServerEndpoint:
    """A server the local can use, with the public key it must prove it holds."""

    address: str
    port: int
    public_key: RsaKey = field(repr=False)
    static_share: bytes = field(repr=False)  # the server's X25519 share, from its key file


@dataclass(frozen=True)
class ServerConfig:
    """The validated ``server_config.json``."""

    path: Path
    address: str
    port: int
    whitelist: Whitelist
    private_key: RsaKey = field(repr=False)
    authorized_keys: tuple[AuthorizedKey, ...]
    destination_allow: tuple[DestinationRule, ...]
    destination_deny: tuple[DestinationRule, ...]
    timeouts: Timeouts
    max_connections: int
    resumption_lifetime: float
    block_private: bool = False
    max_connections_per_key: int = 1024
    max_udp_associations_per_key: int = 64

    def destination_allowed(
        self, ip: IPAddress, port: int, own_addresses: frozenset[IPAddress] = frozenset()
    ) -> bool:
        """Allowed if the allow list is empty or matches, and no deny rule matches.

        The rules see ``ip`` as the kernel will use it (``kernel_view``): the allow list
        must match that view, and a deny rule matching either the view or ``ip`` as written
        refuses. With ``block_private_destinations``, the server's own addresses
        (``own_addresses``, in their kernel view) are refused too.
        """
        seen = kernel_view(ip)
        allowed = not self.destination_allow or any(
            rule.matches(seen, port) for rule in self.destination_allow
        )
        denied = any(rule.matches(a, port) for rule in self.destination_deny for a in (ip, seen))
        own = self.block_private and seen in own_addresses
        return allowed and not denied and not own

    @property
    def has_destination_rules(self) -> bool:
        """Whether anything limits where key holders may go."""
        return bool(self.destination_allow or self.destination_deny or self.block_private)


@dataclass(frozen=True)
class LocalConfig:
    """The validated ``local_config.json``."""

    path: Path
    address: str
    port: int
    auth: bool
    username: str
    password: str = field(repr=False)
    whitelist: Whitelist
    servers: tuple[ServerEndpoint, ...]
    private_key: RsaKey = field(repr=False)
    timeouts: Timeouts
    max_connections: int
    resumption_lifetime: float
    fast_open: bool = False


# --- field names ---------------------------------------------------------------------------

_COMMON_FIELDS = frozenset(
    (
        "handshake_timeout",
        "connect_timeout",
        "idle_timeout",
        "max_connections",
        "resumption_lifetime",
    )
)
_ENDPOINT_FIELDS = frozenset(("server_address", "server_port", "server_public_key"))
_SERVER_FIELDS = _COMMON_FIELDS | {
    "server_address",
    "server_port",
    "whitelist",
    "local_public_key",
    "authorized_keys",
    "server_private_key",
    "destination_allow",
    "destination_deny",
    "block_private_destinations",
    "max_connections_per_key",
    "max_udp_associations_per_key",
}
_LOCAL_FIELDS = (
    _COMMON_FIELDS
    | _ENDPOINT_FIELDS
    | {
        "local_address",
        "local_port",
        "auth",
        "username",
        "password",
        "whitelist",
        "local_private_key",
        "servers",
        "fast_open",
    }
)


# --- reading one JSON object ---------------------------------------------------------------


@dataclass(frozen=True)
class _Fields:
    """One JSON object of a config file, and what error messages need to name it."""

    file: str  # the config path as the user gave it
    base: Path  # the folder relative key paths are resolved against
    data: Mapping[str, object]
    prefix: str = ""  # like 'servers[1].' for a nested object

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(f'{self.file}: field "{self.prefix}{name}": {problem}')

    def nested(self, name: str, value: object, known: frozenset[str]) -> _Fields:
        """The object ``value`` found at field ``name``, checked for unknown fields."""
        if not isinstance(value, dict):
            raise self.error(name, f"expected an object, got {_show(value)}")
        inner = _Fields(self.file, self.base, value, f"{self.prefix}{name}.")
        _check_known(inner, known)
        return inner


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


#: Largest config file we read; real ones are a few hundred bytes.
_MAX_CONFIG = 1 << 20


def _read_json(path: Path) -> object:
    raw = read_trusted_file(path, "config file", _MAX_CONFIG)  # StrictModes, like the keys
    try:
        return json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except _DuplicateKeyError as exc:
        raise ConfigError(f'{path}: field "{exc.key}": given more than once') from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid JSON: nested too deeply") from None


def _check_known(f: _Fields, known: frozenset[str]) -> None:
    for name in f.data:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise f.error(name, f"unknown field{hint}")


def _open(path: Path, known: frozenset[str]) -> _Fields:
    """The top-level object of the config file at ``path``, checked for unknown fields."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {_show(data)}")
    f = _Fields(str(path), Path(os.path.abspath(path)).parent, data)
    _check_known(f, known)
    return f


def _show(value: object) -> str:
    """A short JSON rendering of a bad value for a message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


# --- field readers, shared by both loaders ---------------------------------------------------


def _value(f: _Fields, name: str, default: object) -> object:
    """The raw value of ``name``; ``default`` is used when absent (``None``: required)."""
    if name in f.data:
        return f.data[name]
    if default is None:
        raise f.error(name, "required field is missing")
    return default


def _int(
    f: _Fields, name: str, low: int, high: int | None = None, default: int | None = None
) -> int:
    value = _value(f, name, default)
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and low <= value
        and (high is None or value <= high)
    ):
        return value
    bounds = f"in {low}..{high}" if high is not None else f">= {low}"
    raise f.error(name, f"expected an integer {bounds}, got {_show(value)}")


def _port(f: _Fields, name: str) -> int:
    return _int(f, name, 1, 65535)


def _number(f: _Fields, name: str, default: float, *, allow_zero: bool = False) -> float:
    value = _value(f, name, default)
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value) if abs(value) < 1e300 else math.inf
        if math.isfinite(number) and (number > 0 or (allow_zero and number == 0)):
            return number
    bounds = ">= 0" if allow_zero else "> 0"
    raise f.error(name, f"expected a number {bounds}, got {_show(value)}")


def _bool(f: _Fields, name: str, default: bool) -> bool:
    value = _value(f, name, default)
    if not isinstance(value, bool):
        raise f.error(name, f"expected true or false, got {_show(value)}")
    return value


def _str(f: _Fields, name: str, default: str | None = None, *, secret: bool = False) -> str:
    value = _value(f, name, default)
    if not isinstance(value, str):
        shown = type(value).__name__ if secret else _show(value)
        raise f.error(name, f"expected a string, got {shown}")
    _check_unicode(f, name, value)
    return value


def _check_unicode(f: _Fields, name: str, value: str) -> None:
    """JSON allows a lone surrogate ("\\ud800"); UTF-8, file names and sockets do not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise f.error(name, "holds a lone surrogate (like \\ud800): not valid Unicode") from None


def _list(f: _Fields, name: str, default: list[object] | None = None) -> list[object]:
    value = _value(f, name, default)
    if not isinstance(value, list):
        raise f.error(name, f"expected a list, got {_show(value)}")
    return value


def _items(f: _Fields, name: str, default: list[object] | None = None) -> list[tuple[str, object]]:
    """The items of a list field, each with its name for messages, like 'whitelist[2]'."""
    return [(f"{name}[{i}]", item) for i, item in enumerate(_list(f, name, default))]


_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _is_host_name(text: str) -> bool:
    labels = text.removesuffix(".").split(".")
    return (
        len(text) <= 253
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()  # '300.1.1.1' is a bad address, not a name
    )


def _host(f: _Fields, name: str) -> str:
    value = _str(f, name)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _is_host_name(value):
            raise f.error(
                name, f"expected an IP address or host name, got {_show(value)}"
            ) from None
    return value


def _credential(f: _Fields, name: str, required: bool, *, secret: bool) -> str:
    """An RFC 1929 username or password: at most 255 bytes, non-empty when required."""
    value = _str(f, name, "", secret=secret)
    size = len(value.encode("utf-8"))
    if required and size == 0:
        raise f.error(name, 'must not be empty when "auth" is true')
    if size > MAX_CREDENTIAL_BYTES:
        raise f.error(name, f"is {size} bytes in UTF-8; at most {MAX_CREDENTIAL_BYTES} allowed")
    return value


class _InvalidError(ValueError):
    """A value that is wrong for a reason worth telling (the message is for the user)."""


def _network(text: str) -> IPNetwork | None:
    """An address or CIDR block (strict about host bits), or None if it is neither."""
    if "%" in text:
        raise _InvalidError(f"{_show(text)}: scoped addresses (with %) are not supported here")
    try:
        return _ipv4_if_mapped(ipaddress.ip_network(text))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    raise _InvalidError(f'{_show(text)} has host bits set; did you mean "{loose}"?')


def _ipv4_if_mapped(network: IPNetwork) -> IPNetwork:
    """``::ffff:a.b.c.d/N`` (N >= 96) is written as the IPv4 block it means, so it covers both."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _whitelist_entry(text: object) -> IPNetwork | None:
    """A network, or None for "*"; raises _InvalidError."""
    if text == "*":
        return None
    network = _network(text) if isinstance(text, str) else None
    if network is None:
        raise _InvalidError(f'expected an IP address, a CIDR block or "*", got {_show(text)}')
    return network


def _whitelist(f: _Fields, name: str) -> Whitelist:
    items = _items(f, name)
    if not items:
        raise f.error(name, 'must not be empty (use ["*"] to allow any address)')
    networks: list[IPNetwork] = []
    for item_name, item in items:
        try:
            network = _whitelist_entry(item)
        except _InvalidError as exc:
            raise f.error(item_name, str(exc)) from None
        if network is not None:
            networks.append(network)
    return Whitelist(tuple(networks), any=len(networks) < len(items))


_RULE_BRACKETED = re.compile(r"\[(?P<net>[^\]]+)\](?P<prefix>/\d{1,3})?(?::(?P<ports>.*))?")
_PORTS = re.compile(r"(?P<low>\d{1,5})(?:-(?P<high>\d{1,5}))?")
_RULE_FORMS = (
    'expected "CIDR", "CIDR:PORT" or "CIDR:LOW-HIGH" '
    '(IPv6 in brackets when a port is given, like "[::1]/128:22")'
)


def _split_rule(text: str) -> tuple[str, str | None]:
    """``(network, ports or None)`` of a destination rule string."""
    bracketed = _RULE_BRACKETED.fullmatch(text)
    if bracketed is not None:
        return bracketed["net"] + (bracketed["prefix"] or ""), bracketed["ports"]
    if text.count(":") == 1:  # IPv4 with a port; IPv6 without brackets never has one
        network, ports = text.split(":")
        return network, ports
    return text, None


def _port_range(text: str | None) -> tuple[int, int]:
    """The inclusive range of ``PORT`` or ``LOW-HIGH``; all ports when None."""
    if text is None:
        return 0, 65535
    match = _PORTS.fullmatch(text)
    low = int(match["low"]) if match else 0
    high = int(match["high"] or low) if match else -1
    if not 0 <= low <= high <= 65535:
        raise _InvalidError(f"bad port or port range {_show(text)}: need LOW <= HIGH <= 65535")
    return low, high


def _parse_rule(text: object) -> DestinationRule:
    """A destination rule from its string form; raises _InvalidError."""
    if not isinstance(text, str):
        raise _InvalidError(f"{_RULE_FORMS}, got {_show(text)}")
    network_text, ports = _split_rule(text)
    network = _network(network_text)
    if network is None:
        raise _InvalidError(f"{_RULE_FORMS}, got {_show(text)}")
    low, high = _port_range(ports)
    return DestinationRule(network, low, high)


def _rules(f: _Fields, name: str) -> tuple[DestinationRule, ...]:
    rules = []
    for item_name, item in _items(f, name, []):
        try:
            rules.append(_parse_rule(item))
        except _InvalidError as exc:
            raise f.error(item_name, str(exc)) from None
    return tuple(rules)


def _key_at(f: _Fields, name: str, value: object, loader: Callable[[Path], _K]) -> _K:
    """Load the key file named by ``value`` (of field ``name``); errors name file and field."""
    if not isinstance(value, str) or not value:
        raise f.error(name, f"expected a path to a key file, got {_show(value)}")
    _check_unicode(f, name, value)
    path = Path(os.path.normpath(f.base / Path(value).expanduser()))
    try:
        return loader(path)
    except ConfigError as exc:
        raise f.error(name, str(exc)) from None


def _key(f: _Fields, name: str, loader: Callable[[Path], RsaKey]) -> RsaKey:
    return _key_at(f, name, _value(f, name, None), loader)


def _private_key(f: _Fields, name: str, passphrase: bytes | None) -> RsaKey:
    return _key(f, name, lambda path: load_private_key(path, passphrase))


def _common(f: _Fields) -> tuple[Timeouts, int, float]:
    """The optional fields both files share: timeouts, max_connections, resumption_lifetime."""
    timeouts = Timeouts(
        handshake=_number(f, "handshake_timeout", 10.0),
        connect=_number(f, "connect_timeout", 10.0),
        idle=_number(f, "idle_timeout", 300.0),
    )
    max_connections = _int(f, "max_connections", 1, default=1024)
    lifetime = _number(f, "resumption_lifetime", 3600.0, allow_zero=True)
    return timeouts, max_connections, lifetime


def _check_distinct(f: _Fields, name: str, own: RsaKey, peer: RsaKey, peer_name: str) -> None:
    """Refuse a peer key that is this side's own: either side could then pose as the other."""
    if fingerprint_bytes(own) == fingerprint_bytes(peer):
        raise f.error(name, f"is the same key pair as {peer_name}; generate one pair per side")


# --- server_config.json --------------------------------------------------------------------


def _authorized_key(f: _Fields, item_name: str, item: object) -> AuthorizedKey:
    """A path entry (named after the file stem) or a ``{"name", "public_key"}`` entry."""
    if isinstance(item, str) or item_name == "local_public_key":
        key = _key_at(f, item_name, item, load_public_key)
        return AuthorizedKey(Path(str(item)).stem, key, fingerprint_bytes(key))
    entry = f.nested(item_name, item, frozenset(("name", "public_key")))
    name = _str(entry, "name")
    if not name:
        raise entry.error("name", "must not be empty")
    key = _key(entry, "public_key", load_public_key)
    return AuthorizedKey(name, key, fingerprint_bytes(key))


def _authorized_keys(f: _Fields) -> tuple[AuthorizedKey, ...]:
    """``local_public_key`` (if given, first) then the ``authorized_keys`` entries."""
    if "local_public_key" not in f.data and "authorized_keys" not in f.data:
        raise f.error("local_public_key", 'required field is missing (or give "authorized_keys")')
    entries = [(n, f.data[n]) for n in ("local_public_key",) if n in f.data]
    result: list[AuthorizedKey] = []
    for item_name, item in entries + _items(f, "authorized_keys", []):
        key = _authorized_key(f, item_name, item)
        for seen in result:
            if seen.name == key.name:
                raise f.error(item_name, f'name "{key.name}" is used twice')
            if seen.fingerprint == key.fingerprint:
                raise f.error(item_name, f'same key as "{seen.name}"')
        result.append(key)
    return tuple(result)


# What a server exposed to the internet should never let clients reach (SSRF): its own
# loopback, the private networks behind it, link-local (cloud metadata at 169.254.169.254),
# carrier-grade NAT, multicast and reserved space. ``block_private_destinations`` adds them.
PRIVATE_DESTINATIONS = tuple(
    DestinationRule(ipaddress.ip_network(block), 0, 65535)
    for block in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
        "240.0.0.0/4", "::/128", "::1/128", "64:ff9b::/96", "fc00::/7", "fe80::/10", "ff00::/8",
        # translation and deprecated ranges that can lead back to any IPv4 address above:
        # local-use NAT64, 6to4, IPv4-compatible, SIIT IPv4-translated, site-local
        "64:ff9b:1::/48", "2002::/16", "::/96", "::ffff:0:0:0/96", "fec0::/10",
    )
)  # fmt: skip


def load_server_config(path: Path, passphrase: bytes | None = None) -> ServerConfig:
    """Read and check ``server_config.json``; ``passphrase`` decrypts the server private key."""
    f = _open(path, _SERVER_FIELDS)
    address, port = _host(f, "server_address"), _port(f, "server_port")
    whitelist = _whitelist(f, "whitelist")
    allow, deny = _rules(f, "destination_allow"), _rules(f, "destination_deny")
    block_private = _bool(f, "block_private_destinations", False)
    if block_private:
        deny += PRIVATE_DESTINATIONS
    timeouts, max_connections, lifetime = _common(f)
    per_key = _int(f, "max_connections_per_key", 1, default=1024)
    udp_per_key = _int(f, "max_udp_associations_per_key", 1, default=64)
    authorized = _authorized_keys(f)
    private_key = _private_key(f, "server_private_key", passphrase)
    for item in authorized:
        peer = f'the authorized local key "{item.name}"'
        _check_distinct(f, "server_private_key", private_key, item.key, peer)
    return ServerConfig(
        path=path,
        address=address,
        port=port,
        whitelist=whitelist,
        private_key=private_key,
        authorized_keys=authorized,
        destination_allow=allow,
        destination_deny=deny,
        timeouts=timeouts,
        max_connections=max_connections,
        resumption_lifetime=lifetime,
        block_private=block_private,
        max_connections_per_key=per_key,
        max_udp_associations_per_key=udp_per_key,
    )


def reload_authorized_keys(path: Path) -> tuple[AuthorizedKey, ...]:
    """Re-read only ``local_public_key``/``authorized_keys`` of a server config (SIGHUP)."""
    return _authorized_keys(_open(path, _SERVER_FIELDS))


# --- local_config.json ---------------------------------------------------------------------


def _endpoint(f: _Fields) -> ServerEndpoint:
    address, port = _host(f, "server_address"), _port(f, "server_port")
    value = _value(f, "server_public_key", None)
    key, share = _key_at(f, "server_public_key", value, load_server_public_key)
    return ServerEndpoint(address=address, port=port, public_key=key, static_share=share)


def _servers(f: _Fields) -> tuple[ServerEndpoint, ...]:
    """The single server (if given, first) then the ``servers`` list; at least one."""
    single = "servers" not in f.data or any(name in f.data for name in _ENDPOINT_FIELDS)
    result = [_endpoint(f)] if single else []
    for item_name, item in _items(f, "servers", []):
        result.append(_endpoint(f.nested(item_name, item, _ENDPOINT_FIELDS)))
    if not result:
        raise f.error("servers", "must not be empty")
    return tuple(result)


def _is_loopback_host(host: str) -> bool:
    """Whether a listening address is on loopback only (no name is resolved here)."""
    if host.lower().removesuffix(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name that may resolve to anything: treat it as beyond loopback
    return any(a.is_loopback for a in _unmapped(ip))


def _refuse_open_proxy(f: _Fields, address: str, auth: bool, whitelist: Whitelist) -> None:
    """A local on a non-loopback address with auth off and ``["*"]`` is an open proxy."""
    everyone = whitelist.any or any(net.prefixlen == 0 for net in whitelist.networks)
    if everyone and not auth and not _is_loopback_host(address):
        raise f.error(
            "whitelist",
            f'["*"] with "auth" off on {address} makes an open proxy for anyone who reaches it:'
            ' turn "auth" on or list the client networks in "whitelist"',
        )


def load_local_config(path: Path, passphrase: bytes | None = None) -> LocalConfig:
    """Read and check ``local_config.json``; ``passphrase`` decrypts the local private key."""
    f = _open(path, _LOCAL_FIELDS)
    address, port = _host(f, "local_address"), _port(f, "local_port")
    auth = _bool(f, "auth", False)
    username = _credential(f, "username", auth, secret=False)
    password = _credential(f, "password", auth, secret=True)
    whitelist = _whitelist(f, "whitelist")
    _refuse_open_proxy(f, address, auth, whitelist)
    timeouts, max_connections, lifetime = _common(f)
    servers = _servers(f)
    private_key = _private_key(f, "local_private_key", passphrase)
    for server in servers:
        peer = f"the public key of server {server.address}:{server.port}"
        _check_distinct(f, "local_private_key", private_key, server.public_key, peer)
    return LocalConfig(
        path=path,
        address=address,
        port=port,
        auth=auth,
        username=username,
        password=password,
        whitelist=whitelist,
        servers=servers,
        private_key=private_key,
        timeouts=timeouts,
        max_connections=max_connections,
        resumption_lifetime=lifetime,
        fast_open=_bool(f, "fast_open", False),
    )
