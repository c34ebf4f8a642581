"""utils/config.py: loading, validation messages, whitelists and destination rules."""

from __future__ import annotations

import ipaddress
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils.config import (
    DestinationRule,
    LocalConfig,
    ServerConfig,
    Whitelist,
    load_local_config,
    load_server_config,
    reload_authorized_keys,
)
from utils.errors import ConfigError
from utils.keys import RsaKey, fingerprint_bytes, generate_pair, write_pair

REPO = Path(__file__).resolve().parent.parent
DELETE = object()  # an override value that removes the field

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network


@dataclass(frozen=True)
class Keys:
    local: RsaKey
    server: RsaKey
    other: RsaKey
    folder: Path  # local_*, server_*, other_* .pem files written once


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    pairs = {name: generate_pair(2048) for name in ("local", "server", "other")}
    for name, key in pairs.items():
        write_pair(folder, name, key, force=False)
    return Keys(pairs["local"], pairs["server"], pairs["other"], folder)


@pytest.fixture
def workdir(tmp_path: Path, keys: Keys) -> Path:
    """A folder holding a copy of the key files in keys/ (modes kept)."""
    shutil.copytree(keys.folder, tmp_path / "keys")
    return tmp_path


def shipped(name: str) -> dict[str, object]:
    data = json.loads((REPO / name).read_text())
    assert isinstance(data, dict)
    return data


def write_config(folder: Path, name: str, overrides: dict[str, object]) -> Path:
    data = shipped(name)
    for field, value in overrides.items():
        if value is DELETE:
            del data[field]
        else:
            data[field] = value
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def server(folder: Path, **overrides: object) -> ServerConfig:
    return load_server_config(write_config(folder, "server_config.json", overrides))


def local(folder: Path, **overrides: object) -> LocalConfig:
    return load_local_config(write_config(folder, "local_config.json", overrides))


def config_error(load: Callable[[], object]) -> str:
    with pytest.raises(ConfigError) as info:
        load()
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the shipped configs ---------------------------------------------------------------------


def test_shipped_configs_load(workdir: Path, keys: Keys) -> None:
    for name in ("server_config.json", "local_config.json"):
        shutil.copy(REPO / name, workdir / name)
    s = load_server_config(workdir / "server_config.json")
    assert (s.address, s.port) == ("127.0.0.1", 9000)
    assert s.whitelist == Whitelist((IPv4Network("127.0.0.1/32"), IPv6Network("::1/128")), False)
    assert s.private_key == keys.server
    assert [k.name for k in s.authorized_keys] == ["local_public"]
    assert s.authorized_keys[0].fingerprint == fingerprint_bytes(keys.local)
    assert (s.timeouts.handshake, s.timeouts.connect, s.timeouts.idle) == (10, 10, 300)
    assert s.max_connections == 1024
    assert s.resumption_lifetime == 3600
    assert (s.destination_allow, s.destination_deny) == ((), ())

    c = load_local_config(workdir / "local_config.json")
    assert (c.address, c.port, c.auth) == ("127.0.0.1", 1080, False)
    assert (c.username, c.password) == ("user", "change-me")
    assert c.private_key == keys.local
    assert len(c.servers) == 1
    assert (c.servers[0].address, c.servers[0].port) == ("127.0.0.1", 9000)
    assert c.servers[0].public_key == keys.server.public_key()
    assert c.whitelist.allows("127.0.0.1")
    assert not c.whitelist.allows("10.0.0.1")


def test_shipped_configs_content() -> None:
    common = {"handshake_timeout": 10, "connect_timeout": 10, "idle_timeout": 300,
              "max_connections": 1024, "whitelist": ["127.0.0.1", "::1"]}  # fmt: skip
    assert shipped("server_config.json") == {
        "server_address": "127.0.0.1", "server_port": 9000,
        "local_public_key": "keys/local_public.pem",
        "server_private_key": "keys/server_private.pem", **common,
    }  # fmt: skip
    assert shipped("local_config.json") == {
        "local_address": "127.0.0.1", "local_port": 1080, "auth": False, "username": "user",
        "password": "change-me", "server_address": "127.0.0.1", "server_port": 9000,
        "server_public_key": "keys/server_public.pem",
        "local_private_key": "keys/local_private.pem", **common,
    }  # fmt: skip


def test_key_paths_are_relative_to_the_config_folder(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    write_config(workdir, "server_config.json", {})
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    s = load_server_config(workdir / "server_config.json")
    assert s.authorized_keys[0].name == "local_public"
    monkeypatch.chdir(workdir.parent)
    relative = Path(workdir.name) / "server_config.json"
    assert load_server_config(relative).port == 9000


def test_defaults_when_optional_fields_are_absent(workdir: Path) -> None:
    drop = dict.fromkeys(
        ("handshake_timeout", "connect_timeout", "idle_timeout", "max_connections"), DELETE
    )
    s = server(workdir, **drop)
    assert (s.timeouts.handshake, s.timeouts.connect, s.timeouts.idle) == (10.0, 10.0, 300.0)
    assert (s.max_connections, s.resumption_lifetime) == (1024, 3600.0)
    c = local(workdir, auth=DELETE, username=DELETE, password=DELETE, **drop)
    assert (c.auth, c.username, c.password) == (False, "", "")


def test_custom_common_values(workdir: Path) -> None:
    s = server(workdir, handshake_timeout=2.5, idle_timeout=1, max_connections=7)
    assert (s.timeouts.handshake, s.timeouts.idle, s.max_connections) == (2.5, 1.0, 7)
    assert local(workdir, resumption_lifetime=0).resumption_lifetime == 0


def test_repr_hides_password_and_keys(workdir: Path, keys: Keys) -> None:
    c = local(workdir, auth=True, password="hunter2-very-secret")
    s = server(workdir)
    for text in (repr(c), repr(s), str(c), str(s)):
        assert "hunter2-very-secret" not in text
        for key in (keys.local, keys.server):
            assert str(key.n)[:30] not in text
            assert str(key.d)[:30] not in text


# --- errors: one line naming the file and the field ------------------------------------------


def test_error_names_the_file_as_given(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(workdir, "server_config.json", {"server_port": "abc"})
    monkeypatch.chdir(workdir)
    message = config_error(lambda: load_server_config(Path("server_config.json")))
    assert message == (
        'server_config.json: field "server_port": expected an integer in 1..65535, got "abc"'
    )


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "server_config.json"
    assert config_error(lambda: load_server_config(path)) == f"{path}: no such file"


def test_config_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "local_config.json"
    path.mkdir()
    assert config_error(lambda: load_local_config(path)).startswith(f"{path}: ")


def test_broken_json(tmp_path: Path) -> None:
    path = tmp_path / "local_config.json"
    path.write_text('{\n  "local_port": 1080\n    "auth": false\n}\n')
    assert config_error(lambda: load_local_config(path)) == (
        f"{path}: invalid JSON at line 3 column 5: Expecting ',' delimiter"
    )


@pytest.mark.parametrize("text", ["[]", '"x"', "null", "3"])
def test_top_level_must_be_an_object(tmp_path: Path, text: str) -> None:
    path = tmp_path / "server_config.json"
    path.write_text(text)
    assert "expected a JSON object" in config_error(lambda: load_server_config(path))


def test_duplicate_field(tmp_path: Path) -> None:
    path = tmp_path / "server_config.json"
    path.write_text('{"server_port": 1, "server_port": 2}')
    assert config_error(lambda: load_server_config(path)) == (
        f'{path}: field "server_port": given more than once'
    )


def test_unknown_field_with_suggestion(workdir: Path) -> None:
    message = config_error(lambda: server(workdir, server_prot=9000))
    assert message.endswith('field "server_prot": unknown field; did you mean "server_port"?')
    assert 'field "zzz": unknown field' in config_error(lambda: local(workdir, zzz=1))


def test_single_server_field_unknown_in_server_config(workdir: Path) -> None:
    message = config_error(lambda: server(workdir, server_public_key="keys/server_public.pem"))
    assert 'field "server_public_key": unknown field' in message


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("server_port", "abc", 'expected an integer in 1..65535, got "abc"'),
        ("server_port", 0, "expected an integer in 1..65535, got 0"),
        ("server_port", 65536, "expected an integer in 1..65535, got 65536"),
        ("server_port", True, "expected an integer in 1..65535, got true"),
        ("server_port", 9000.0, "expected an integer in 1..65535, got 9000.0"),
        ("server_port", DELETE, "required field is missing"),
        ("server_address", 5, "expected a string, got 5"),
        ("server_address", "bad host!", 'expected an IP address or host name, got "bad host!"'),
        ("server_address", "300.1.1.1", 'expected an IP address or host name, got "300.1.1.1"'),
        ("server_address", "", 'expected an IP address or host name, got ""'),
        ("whitelist", "127.0.0.1", 'expected a list, got "127.0.0.1"'),
        ("whitelist", [], 'must not be empty (use ["*"] to allow any address)'),
        ("whitelist", DELETE, "required field is missing"),
        ("max_connections", 0, "expected an integer >= 1, got 0"),
        ("max_connections", 1.5, "expected an integer >= 1, got 1.5"),
        ("handshake_timeout", 0, "expected a number > 0, got 0"),
        ("connect_timeout", -1, "expected a number > 0, got -1"),
        ("idle_timeout", "300", 'expected a number > 0, got "300"'),
        ("idle_timeout", False, "expected a number > 0, got false"),
        ("resumption_lifetime", -0.5, "expected a number >= 0, got -0.5"),
        ("server_private_key", "", 'expected a path to a key file, got ""'),
        ("server_private_key", DELETE, "required field is missing"),
        ("local_public_key", ["x"], 'expected a path to a key file, got ["x"]'),
        ("destination_deny", "10.0.0.0/8", 'expected a list, got "10.0.0.0/8"'),
    ],
)
def test_server_field_errors(workdir: Path, field: str, value: object, problem: str) -> None:
    message = config_error(lambda: server(workdir, **{field: value}))
    assert message == f'{workdir / "server_config.json"}: field "{field}": {problem}'


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("local_port", "1080", 'expected an integer in 1..65535, got "1080"'),
        ("auth", 1, "expected true or false, got 1"),
        ("auth", "true", 'expected true or false, got "true"'),
        ("username", 7, "expected a string, got 7"),
        ("password", 1234, "expected a string, got int"),  # a secret is never echoed
        ("server_public_key", DELETE, "required field is missing"),
        ("local_private_key", None, "expected a path to a key file, got null"),
        ("servers", {}, "expected a list, got {}"),
    ],
)
def test_local_field_errors(workdir: Path, field: str, value: object, problem: str) -> None:
    message = config_error(lambda: local(workdir, **{field: value}))
    assert message == f'{workdir / "local_config.json"}: field "{field}": {problem}'


@pytest.mark.parametrize("word", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_numbers(workdir: Path, word: str) -> None:
    path = write_config(workdir, "server_config.json", {"idle_timeout": 12345})
    path.write_text(path.read_text().replace("12345", word))
    message = config_error(lambda: load_server_config(path))
    assert message == f'{path}: field "idle_timeout": expected a number > 0, got {word}'


def test_bad_cidr_in_whitelist(workdir: Path) -> None:
    message = config_error(lambda: server(workdir, whitelist=["127.0.0.1", "10.0.0.0/33"]))
    assert message.endswith(
        'field "whitelist[1]": expected an IP address, a CIDR block or "*", got "10.0.0.0/33"'
    )
    message = config_error(lambda: local(workdir, whitelist=["10.1.2.3/8"]))
    assert message.endswith('field "whitelist[0]": "10.1.2.3/8" has host bits set; '
                            'did you mean "10.0.0.0/8"?')  # fmt: skip
    assert 'field "whitelist[0]"' in config_error(lambda: local(workdir, whitelist=[7]))
    assert "scoped" in config_error(lambda: local(workdir, whitelist=["fe80::1%eth0"]))


def test_missing_key_file(workdir: Path) -> None:
    (workdir / "keys" / "server_private.pem").unlink()
    message = config_error(lambda: server(workdir))
    key_path = workdir / "keys" / "server_private.pem"
    assert message == (
        f'{workdir / "server_config.json"}: field "server_private_key": {key_path}: no such file'
    )


def test_missing_public_key_file_in_local_config(workdir: Path) -> None:
    message = config_error(lambda: local(workdir, server_public_key="keys/nope.pem"))
    assert 'field "server_public_key": ' in message
    assert f"{workdir / 'keys' / 'nope.pem'}: no such file" in message


def test_group_readable_private_key(workdir: Path) -> None:
    key_path = workdir / "keys" / "local_private.pem"
    key_path.chmod(0o640)
    message = config_error(lambda: local(workdir))
    assert message == (
        f'{workdir / "local_config.json"}: field "local_private_key": {key_path}: private key '
        f"is readable by group/others (mode 0640); run chmod 600 {key_path}"
    )


def test_wrong_passphrase(workdir: Path, keys: Keys) -> None:
    write_pair(workdir / "keys", "server", keys.server, force=True, passphrase=b"right")
    path = write_config(workdir, "server_config.json", {})
    message = config_error(lambda: load_server_config(path, b"wrong"))
    assert message.startswith(f'{path}: field "server_private_key": ')
    assert "wrong passphrase" in message
    message = config_error(lambda: load_server_config(path))
    assert "a passphrase is required" in message
    assert load_server_config(path, b"right").private_key == keys.server


def test_private_key_given_as_public_key(workdir: Path) -> None:
    message = config_error(lambda: server(workdir, local_public_key="keys/local_private.pem"))
    assert 'field "local_public_key": ' in message
    assert "holds a private key" in message


def test_auth_true_with_empty_password(workdir: Path) -> None:
    message = config_error(lambda: local(workdir, auth=True, password=""))
    assert message == (
        f'{workdir / "local_config.json"}: field "password": must not be empty when "auth" is true'
    )
    message = config_error(lambda: local(workdir, auth=True, username=DELETE))
    assert 'field "username": must not be empty' in message


def test_empty_credentials_allowed_without_auth(workdir: Path) -> None:
    assert local(workdir, auth=False, username="", password="").auth is False


def test_credentials_limited_to_255_utf8_bytes(workdir: Path) -> None:
    assert local(workdir, auth=True, password="é" * 127).password == "é" * 127  # 254 bytes
    secret = "é" * 128  # 128 characters but 256 bytes
    message = config_error(lambda: local(workdir, auth=True, password=secret))
    assert 'field "password": is 256 bytes in UTF-8; at most 255 allowed' in message
    assert "é" not in message
    message = config_error(lambda: local(workdir, auth=True, username="u" * 256))
    assert 'field "username": is 256 bytes' in message


def test_same_key_pair_on_both_sides_is_refused(workdir: Path) -> None:
    message = config_error(lambda: server(workdir, local_public_key="keys/server_public.pem"))
    assert 'field "server_private_key": is the same key pair as' in message
    message = config_error(lambda: local(workdir, server_public_key="keys/local_public.pem"))
    assert 'field "local_private_key": is the same key pair as' in message


# --- authorized keys -------------------------------------------------------------------------


def test_authorized_keys_list(workdir: Path, keys: Keys) -> None:
    s = server(
        workdir,
        local_public_key=DELETE,
        authorized_keys=[
            "keys/local_public.pem",
            {"name": "laptop", "public_key": "keys/other_public.pem"},
        ],
    )
    assert [(k.name, k.fingerprint) for k in s.authorized_keys] == [
        ("local_public", fingerprint_bytes(keys.local)),
        ("laptop", fingerprint_bytes(keys.other)),
    ]
    assert "laptop" in repr(s)


def test_local_public_key_comes_first(workdir: Path) -> None:
    entry = {"name": "other", "public_key": "keys/other_public.pem"}
    s = server(workdir, authorized_keys=[entry])
    assert [k.name for k in s.authorized_keys] == ["local_public", "other"]


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        ([{"name": "a"}], 'field "authorized_keys[0].public_key": required field is missing'),
        ([{"name": "", "public_key": "keys/other_public.pem"}], '[0].name": must not be empty'),
        ([{"public_key": "keys/other_public.pem", "x": 1}], '[0].x": unknown field'),
        ([3], 'field "authorized_keys[0]": expected an object, got 3'),
        (["keys/missing.pem"], 'field "authorized_keys[0]": '),
        (["keys/local_public.pem"], 'field "authorized_keys[0]": name "local_public" is used'),
        (
            [{"name": "dup", "public_key": "keys/local_public.pem"}],
            'field "authorized_keys[0]": same key as "local_public"',
        ),
    ],
)
def test_authorized_keys_errors(workdir: Path, entries: list[object], problem: str) -> None:
    assert problem in config_error(lambda: server(workdir, authorized_keys=entries))


def test_some_authorized_key_is_required(workdir: Path) -> None:
    message = config_error(lambda: server(workdir, local_public_key=DELETE))
    assert 'field "local_public_key": required field is missing (or give "authorized_keys")' in (
        message
    )


def test_reload_authorized_keys(workdir: Path, keys: Keys) -> None:
    path = write_config(workdir, "server_config.json", {})
    assert [k.fingerprint for k in reload_authorized_keys(path)] == [fingerprint_bytes(keys.local)]
    write_config(workdir, "server_config.json", {"authorized_keys": ["keys/other_public.pem"]})
    assert [k.name for k in reload_authorized_keys(path)] == ["local_public", "other_public"]
    # only the keys are re-read: the private key (maybe encrypted) is not needed
    (workdir / "keys" / "server_private.pem").unlink()
    assert len(reload_authorized_keys(path)) == 2
    write_config(workdir, "server_config.json", {"authorized_keys": ["keys/none.pem"]})
    assert 'field "authorized_keys[0]"' in config_error(lambda: reload_authorized_keys(path))


# --- several servers -------------------------------------------------------------------------


def test_servers_list_after_the_single_server(workdir: Path, keys: Keys) -> None:
    extra = {
        "server_address": "relay.example.net",
        "server_port": 443,
        "server_public_key": "keys/other_public.pem",
    }
    c = local(workdir, servers=[extra])
    assert [(e.address, e.port) for e in c.servers] == [
        ("127.0.0.1", 9000),
        ("relay.example.net", 443),
    ]
    assert c.servers[1].public_key == keys.other.public_key()


def test_servers_list_alone(workdir: Path) -> None:
    entry = {
        "server_address": "::1",
        "server_port": 9001,
        "server_public_key": "keys/server_public.pem",
    }
    drop = dict.fromkeys(("server_address", "server_port", "server_public_key"), DELETE)
    c = local(workdir, servers=[entry], **drop)
    assert [(e.address, e.port) for e in c.servers] == [("::1", 9001)]
    assert 'field "servers": must not be empty' in config_error(
        lambda: local(workdir, servers=[], **drop)
    )


def test_single_server_partially_given(workdir: Path) -> None:
    entry = {
        "server_address": "::1",
        "server_port": 9001,
        "server_public_key": "keys/server_public.pem",
    }
    message = config_error(lambda: local(workdir, servers=[entry], server_port=DELETE))
    assert message.endswith('field "server_port": required field is missing')


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"server_address": "h", "server_port": 0, "server_public_key": "keys/server_public.pem"},
         'field "servers[0].server_port": expected an integer in 1..65535, got 0'),
        ({"server_address": "h", "server_public_key": "keys/server_public.pem"},
         'field "servers[0].server_port": required field is missing'),
        ({"server_address": "h", "server_port": 1, "server_public_key": "keys/server_public.pem",
          "auth": True}, 'field "servers[0].auth": unknown field'),
        ("h:1", 'field "servers[0]": expected an object, got "h:1"'),
    ],
)  # fmt: skip
def test_servers_entry_errors(workdir: Path, entry: object, problem: str) -> None:
    assert problem in config_error(lambda: local(workdir, servers=[entry]))


# --- whitelist semantics ---------------------------------------------------------------------


def whitelist_of(workdir: Path, entries: list[object]) -> Whitelist:
    return local(workdir, whitelist=entries).whitelist


def test_whitelist_ipv4_and_ipv6_networks(workdir: Path) -> None:
    w = whitelist_of(workdir, ["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "::1"])
    assert not w.any
    for ok in (
        "10.0.0.1",
        "10.255.255.255",
        "192.168.1.7",
        "2001:db8::1",
        "2001:db8:ffff::",
        "::1",
    ):
        assert w.allows(ok), ok
    for bad in ("11.0.0.1", "192.168.1.8", "2001:db9::1", "::2", "127.0.0.1"):
        assert not w.allows(bad), bad


def test_whitelist_mapped_and_scoped_addresses(workdir: Path) -> None:
    w = whitelist_of(workdir, ["127.0.0.1", "fe80::/10"])
    assert w.allows("::ffff:127.0.0.1")
    assert not w.allows("::ffff:127.0.0.2")
    assert w.allows("fe80::1%eth0")
    assert w.allows("fe80::1")
    assert w.allows("febf::1%2")
    assert not w.allows("fec0::1%eth0")


def test_whitelist_mapped_network_entry(workdir: Path) -> None:
    w = whitelist_of(workdir, ["::ffff:10.0.0.0/104"])
    assert w.networks == (IPv4Network("10.0.0.0/8"),)
    assert w.allows("::ffff:10.1.2.3")
    assert w.allows("10.1.2.3")  # an IPv4 peer may be reported without the mapping
    assert not w.allows("11.1.2.3")


@pytest.mark.parametrize(
    "bad", ["", "localhost", "1.2.3", "10.0.0.1:80", "::g", "[::1]", " 1.2.3.4"]
)
def test_whitelist_unparsable_peer_is_refused(workdir: Path, bad: str) -> None:
    assert not whitelist_of(workdir, ["0.0.0.0/0", "::/0"]).allows(bad)
    assert not whitelist_of(workdir, ["*"]).allows(bad)


def test_whitelist_star_allows_any(workdir: Path) -> None:
    w = whitelist_of(workdir, ["*"])
    assert w.any
    assert w.networks == ()
    for ip in ("1.2.3.4", "::1", "2001:db8::5", "::ffff:8.8.8.8", "fe80::1%lo"):
        assert w.allows(ip)
    mixed = whitelist_of(workdir, ["10.0.0.0/8", "*"])
    assert mixed.any
    assert mixed.allows("8.8.8.8")


def test_whitelist_without_star_is_not_any(workdir: Path) -> None:
    w = whitelist_of(workdir, ["0.0.0.0/0"])
    assert w.allows("8.8.8.8")
    assert not w.allows("2001:db8::1")


@given(st.ip_addresses(v=4), st.integers(0, 32), st.ip_addresses(v=4))
def test_whitelist_cidr_property(
    base: ipaddress.IPv4Address, prefix: int, peer: ipaddress.IPv4Address
) -> None:
    network = IPv4Network((int(base) >> (32 - prefix) << (32 - prefix), prefix))
    w = Whitelist((network,), any=False)
    same_prefix = int(peer) >> (32 - prefix) == int(base) >> (32 - prefix)
    assert w.allows(str(peer)) is same_prefix
    assert w.allows(f"::ffff:{peer}") is same_prefix


# --- destination rules -----------------------------------------------------------------------


def rules_of(workdir: Path, allow: list[object], deny: list[object] | None = None) -> ServerConfig:
    return server(workdir, destination_allow=allow, destination_deny=deny or [])


@pytest.mark.parametrize(
    ("text", "network", "low", "high"),
    [
        ("10.0.0.0/8", "10.0.0.0/8", 0, 65535),
        ("10.0.0.0/8:22", "10.0.0.0/8", 22, 22),
        ("10.0.0.0/8:1000-2000", "10.0.0.0/8", 1000, 2000),
        ("192.168.1.1", "192.168.1.1/32", 0, 65535),
        ("192.168.1.1:443", "192.168.1.1/32", 443, 443),
        ("0.0.0.0/0:0-65535", "0.0.0.0/0", 0, 65535),
        ("[::1]/128:22", "::1/128", 22, 22),
        ("[::1]/128", "::1/128", 0, 65535),
        ("::1/128", "::1/128", 0, 65535),
        ("::1", "::1/128", 0, 65535),
        ("[::1]:8080-8090", "::1/128", 8080, 8090),
        ("[2001:db8::/32]:443", "2001:db8::/32", 443, 443),
        ("2001:db8::/32", "2001:db8::/32", 0, 65535),
    ],
)
def test_destination_rule_parsing(
    workdir: Path, text: str, network: str, low: int, high: int
) -> None:
    s = rules_of(workdir, [text], [text])
    expected = DestinationRule(ipaddress.ip_network(network), low, high)
    assert s.destination_allow == (expected,)
    assert s.destination_deny == (expected,)


@pytest.mark.parametrize(
    "text",
    ["", "10.0.0.0/33", "10.0.0.0/8:", "10.0.0.0/8:65536", "10.0.0.0/8:20-10", "10.0.0.0/8:a",
     "10.0.0.0/8:1-2-3", "::1/128:22", "[::1]/129", "[::1]:", "[10.0.0.0/8", "host:22",
     "10.0.0.0/8:-5", "10.0.0.0/8: 22", "10.0.0.1/8"],
)  # fmt: skip
def test_destination_rule_errors(workdir: Path, text: str) -> None:
    message = config_error(lambda: rules_of(workdir, [], [text]))
    assert f'{workdir / "server_config.json"}: field "destination_deny[0]": ' in message
    message = config_error(lambda: rules_of(workdir, ["1.1.1.1", text]))
    assert 'field "destination_allow[1]": ' in message


def test_destination_rule_error_messages(workdir: Path) -> None:
    assert config_error(lambda: rules_of(workdir, ["::1/128:22"])).endswith(
        'expected "CIDR", "CIDR:PORT" or "CIDR:LOW-HIGH" (IPv6 in brackets when a port is given, '
        'like "[::1]/128:22"), got "::1/128:22"'
    )
    assert "bad port or port range" in config_error(lambda: rules_of(workdir, ["1.2.3.4:99999"]))
    assert 'did you mean "10.0.0.0/8"' in config_error(lambda: rules_of(workdir, ["10.0.0.1/8"]))
    assert "expected" in config_error(lambda: rules_of(workdir, [22]))


def test_mapped_deny_rule_blocks_plain_ipv4(workdir: Path) -> None:
    s = rules_of(workdir, [], ["[::ffff:10.0.0.0]/104:22", "[::ffff:0:0]/96:25"])
    assert s.destination_deny == (
        DestinationRule(IPv4Network("10.0.0.0/8"), 22, 22),
        DestinationRule(IPv4Network("0.0.0.0/0"), 25, 25),
    )
    assert not s.destination_allowed(ipaddress.ip_address("10.9.9.9"), 22)
    assert not s.destination_allowed(ipaddress.ip_address("::ffff:10.9.9.9"), 22)
    assert not s.destination_allowed(ipaddress.ip_address("1.1.1.1"), 25)
    assert s.destination_allowed(ipaddress.ip_address("10.9.9.9"), 23)


def test_destination_allowed(workdir: Path) -> None:
    ip = ipaddress.ip_address
    s = rules_of(workdir, [], ["10.0.0.0/8", "127.0.0.1:22", "[::1]/128:1-1024"])
    assert s.destination_allowed(ip("8.8.8.8"), 53)
    assert not s.destination_allowed(ip("10.1.2.3"), 443)
    assert not s.destination_allowed(ip("::ffff:10.1.2.3"), 443)  # no bypass via a mapped address
    assert not s.destination_allowed(ip("127.0.0.1"), 22)
    assert s.destination_allowed(ip("127.0.0.1"), 23)
    assert not s.destination_allowed(ip("::1"), 1024)
    assert s.destination_allowed(ip("::1"), 1025)

    s = rules_of(workdir, ["192.168.0.0/16:80", "192.168.0.0/16:443"], ["192.168.9.0/24"])
    assert s.destination_allowed(ip("192.168.1.1"), 80)
    assert s.destination_allowed(ip("192.168.1.1"), 443)
    assert not s.destination_allowed(ip("192.168.1.1"), 8080)
    assert not s.destination_allowed(ip("192.168.9.1"), 80)  # deny wins
    assert not s.destination_allowed(ip("8.8.8.8"), 80)  # not in a non-empty allow list


def _rule_texts(network: IPv4Network | IPv6Network, low: int, high: int) -> list[str]:
    """Every way to write the rule (network, low..high)."""
    ports = "" if (low, high) == (0, 65535) else (f"{low}" if low == high else f"{low}-{high}")
    full = (
        [f"{network}:{low}-{high}"]
        if network.version == 4
        else [
            f"[{network.network_address}]/{network.prefixlen}:{low}-{high}",
            f"[{network}]:{low}-{high}",
        ]
    )
    if network.version == 4:
        short = [f"{network}:{ports}" if ports else str(network)]
    else:
        addr, plen = network.network_address, network.prefixlen
        short = [f"[{addr}]/{plen}:{ports}"] if ports else [str(network), f"[{addr}]/{plen}"]
    return full + short


networks = st.one_of(
    st.builds(
        lambda a, p: IPv4Network((int(a) >> (32 - p) << (32 - p), p)),
        st.ip_addresses(v=4),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, p: IPv6Network((int(a) >> (128 - p) << (128 - p), p)),
        st.ip_addresses(v=6),
        st.integers(0, 128),
    ),
)
networks = networks.filter(  # IPv4-mapped blocks are normalized to IPv4: tested above
    lambda n: not (n.version == 6 and n.prefixlen >= 96 and n.network_address.ipv4_mapped)
)
port_ranges = st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(sorted)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(network=networks, ports=port_ranges)
def test_destination_rule_round_trip(
    workdir: Path, network: IPv4Network | IPv6Network, ports: list[int]
) -> None:
    low, high = ports
    texts = _rule_texts(network, low, high)
    s = rules_of(workdir, list(texts))
    assert set(s.destination_allow) == {DestinationRule(network, low, high)}


@given(
    network=networks,
    ports=port_ranges,
    peer4=st.ip_addresses(v=4),
    peer6=st.ip_addresses(v=6),
    port=st.integers(0, 65535),
)
def test_destination_rule_matches_property(
    network: IPv4Network | IPv6Network,
    ports: list[int],
    peer4: ipaddress.IPv4Address,
    peer6: ipaddress.IPv6Address,
    port: int,
) -> None:
    low, high = ports
    rule = DestinationRule(network, low, high)
    bits = network.max_prefixlen - network.prefixlen
    in_ports = low <= port <= high
    for peer in (peer4, peer6, network.network_address, network.broadcast_address):
        # An IPv4-mapped IPv6 address is also its IPv4 address (as the kernel treats it).
        as_v4 = peer.ipv4_mapped if isinstance(peer, ipaddress.IPv6Address) else None
        same = any(
            view.version == network.version
            and int(view) >> bits == int(network.network_address) >> bits
            for view in (peer, as_v4)
            if view is not None
        )
        assert rule.matches(peer, port) is (same and in_ports)
    if network.version == 4:  # the IPv4-mapped form of an IPv4 address matches an IPv4 rule
        mapped = ipaddress.IPv6Address("::ffff:" + str(network.network_address))
        assert rule.matches(mapped, port) is in_ports
