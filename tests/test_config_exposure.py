"""utils/config.py against unsafe configurations (issue 12, items 3, 7 and 8).

A lone surrogate in a string field, an open proxy, the per-key limits: one line naming the
file and the field, exit code 2, and never the secret's value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import Keys, Launcher
from tests.faults_support import run_to_exit
from utils.config import load_local_config, load_server_config
from utils.errors import ConfigError

SURROGATE_JSON = '"Zq7\\ud800Xv9"'  # valid JSON, not valid Unicode


def _write_raw(path: Path, data: dict[str, object], raw_field: str, raw_json: str) -> Path:
    """``data`` as JSON with ``raw_field`` set to the JSON text ``raw_json`` as written."""
    text = json.dumps({**data, raw_field: "PLACEHOLDER"})
    path.write_text(text.replace('"PLACEHOLDER"', raw_json))
    return path


@pytest.mark.parametrize("field", ["password", "username"])
def test_lone_surrogate_in_a_credential_is_one_line_without_the_value(
    launcher: Launcher, tmp_path: Path, field: str
) -> None:
    config = launcher.local_config(9, auth=True, username="user", password="pw")
    path = _write_raw(tmp_path / "local.json", config, field, SURROGATE_JSON)
    with pytest.raises(ConfigError) as caught:
        load_local_config(path)
    message = str(caught.value)
    assert f'field "{field}"' in message and "lone surrogate" in message
    assert "Zq7" not in message and "Xv9" not in message
    done = run_to_exit("local.py", path, [], dict(os.environ), timeout=20)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "Zq7" not in done.stderr and "Traceback" not in done.stderr


def test_lone_surrogate_elsewhere_is_a_config_error_too(launcher: Launcher, tmp_path: Path) -> None:
    config = launcher.server_config()
    path = _write_raw(tmp_path / "server.json", config, "server_private_key", SURROGATE_JSON)
    with pytest.raises(ConfigError, match='field "server_private_key": holds a lone surrogate'):
        load_server_config(path)


@pytest.mark.parametrize(
    ("address", "whitelist"),
    [
        ("0.0.0.0", ["*"]),
        ("::", ["*"]),
        ("192.0.2.10", ["*"]),
        ("proxy.example", ["*"]),
        ("0.0.0.0", ["0.0.0.0/0"]),
        ("::", ["10.0.0.0/8", "::/0"]),
    ],
)
def test_open_proxy_local_is_refused(
    launcher: Launcher, tmp_path: Path, address: str, whitelist: list[str]
) -> None:
    config = launcher.local_config(9, local_address=address, whitelist=whitelist, auth=False)
    path = tmp_path / "local.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as caught:
        load_local_config(path)
    message = str(caught.value)
    assert 'field "whitelist"' in message and "open proxy" in message
    assert 'turn "auth" on' in message


def test_open_proxy_local_exits_2_with_one_line(launcher: Launcher) -> None:
    config = launcher.local_config(9, local_address="0.0.0.0", whitelist=["*"])
    path = launcher.write_config("local", config)
    done = run_to_exit("local.py", path, [], dict(os.environ), timeout=10)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "open proxy" in lines[0] and str(path) in lines[0], done.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        {"local_address": "127.0.0.1", "whitelist": ["*"]},  # loopback
        {"local_address": "::1", "whitelist": ["*"]},
        {"local_address": "localhost", "whitelist": ["*"]},
        {"local_address": "0.0.0.0", "whitelist": ["192.168.0.0/16"]},  # listed clients
        {"local_address": "::", "whitelist": ["*"], "auth": True, "username": "u", "password": "p"},
    ],
)
def test_safe_local_listeners_load(
    launcher: Launcher, tmp_path: Path, overrides: dict[str, object]
) -> None:
    path = tmp_path / "local.json"
    path.write_text(json.dumps(launcher.local_config(9, **overrides)))
    assert load_local_config(path).whitelist is not None


def test_per_key_limits_have_defaults_and_are_checked(keys: Keys, launcher: Launcher) -> None:
    path = launcher.write_config("server", launcher.server_config())
    config = load_server_config(path)
    assert (config.max_connections_per_key, config.max_udp_associations_per_key) == (1024, 64)
    for field, bad in (("max_connections_per_key", 0), ("max_udp_associations_per_key", "8")):
        path = launcher.write_config("server", launcher.server_config(**{field: bad}))
        with pytest.raises(ConfigError, match=f'field "{field}": expected an integer >= 1'):
            load_server_config(path)
