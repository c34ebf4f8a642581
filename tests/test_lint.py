"""ruff and mypy (strict) are part of the suite, so CI fails on a lint or type error.

No Windows or macOS machine runs the suite, so mypy also checks with those platforms' typeshed:
what the local, genkey and test_client use on Windows (Python 3.11 and 3.13, where
``os.fchmod`` appears), and the whole project on macOS. Each platform keeps its own cache.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_ruff_check_is_clean() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    # server.py shares its name with the server/ package, so it is checked on its own.
    for args in (("mypy",), ("mypy", "server.py")):
        result = _run(*args)
        assert result.returncode == 0, result.stdout + result.stderr


#: What runs on the user's computer (start.py imports scripts/launcher.py).
CLIENT_FILES = ("local.py", "utils/genkey.py", "utils/test_client.py", "scripts/start.py")


@pytest.mark.parametrize("version", ["3.11", "3.13"])
def test_mypy_is_clean_for_windows(version: str) -> None:
    cache = f".mypy_cache/win32-{version}"
    options = ("--platform", "win32", "--python-version", version, "--cache-dir", cache)
    result = _run("mypy", *options, *CLIENT_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean_for_macos() -> None:
    for files in ((), ("server.py",)):
        result = _run("mypy", "--platform", "darwin", "--cache-dir", ".mypy_cache/darwin", *files)
        assert result.returncode == 0, result.stdout + result.stderr
