#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need (a virtualenv with
# requirements-dev.txt; curl from Debian's packages if it is missing), then runs pytest
# (unit, property, lint and loopback integration tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! command -v curl >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq curl >/dev/null
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq curl >/dev/null
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
exec .venv/bin/python -m pytest "$@"
