"""ruff and mypy (strict) are part of the suite, so CI fails on a lint or type error.

No Windows or macOS machine runs the suite, so mypy also checks with those platforms' typeshed:
what the local, genkey and test_client use on Windows (Python 3.11 and 3.13, where
``os.fchmod`` appears), and the whole project on macOS. Each platform keeps its own cache.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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

#: The other platforms' checks, run side by side (each mypy is one process on one core).
PLATFORM_CHECKS = {
    "win32-3.11": ("--platform", "win32", "--python-version", "3.11", *CLIENT_FILES),
    "win32-3.13": ("--platform", "win32", "--python-version", "3.13", *CLIENT_FILES),
    "darwin": ("--platform", "darwin"),  # the whole project, as configured
}


def test_mypy_is_clean_for_windows_and_macos() -> None:
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "mypy", "--cache-dir", f".mypy_cache/{name}", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in PLATFORM_CHECKS.items()
    }
    failures = []
    for name, run in runs.items():
        output, _ = run.communicate(timeout=600)
        if run.returncode != 0:
            failures.append(f"{name}:\n{output}")
    assert not failures, "\n".join(failures)
    server = _run("mypy", "--cache-dir", ".mypy_cache/darwin", "--platform", "darwin", "server.py")
    assert server.returncode == 0, server.stdout + server.stderr  # on its own, as above
