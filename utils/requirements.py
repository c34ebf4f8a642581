"""The one line a program prints when a package of requirements.txt is not installed.

Standard library only: this runs exactly when the requirements are missing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

EXIT_MISSING = 2

#: import name -> the package in requirements.txt that provides it
PACKAGES = {"Crypto": "pycryptodome", "cryptography": "cryptography", "numpy": "numpy"}

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"


def missing_message(program: str, module: str) -> str:
    package = PACKAGES[module]
    if sys.prefix != sys.base_prefix:  # already in a venv: install into it
        how = f"{sys.executable} -m pip install -r {REQUIREMENTS}"
    else:
        venv = REQUIREMENTS.parent / ".venv"
        how = (
            f"python3 -m venv {venv} && {venv}/bin/pip install -r {REQUIREMENTS}, "
            f"then run {venv}/bin/python {sys.argv[0]}"
        )
    return (
        f"{program}: the Python package {package} is not installed; install the requirements: {how}"
    )


def exit_missing(error: ModuleNotFoundError) -> NoReturn:
    """Exit 2 with one line naming the missing package; re-raise if it is not a requirement."""
    module = (error.name or "").partition(".")[0]
    if module not in PACKAGES:
        raise error
    sys.stderr.write(missing_message(Path(sys.argv[0]).name, module) + "\n")
    sys.exit(EXIT_MISSING)
