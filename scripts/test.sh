#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need (a virtualenv with
# requirements-dev.txt; curl from Debian's packages if it is missing), then runs pytest
# (unit, property, lint and loopback integration tests), three test files at a time. Extra
# arguments go to pytest (then run serially unless they say -n).
#
# With no arguments it then runs the portability leg: the fast tests that cover every module
# and the real programs (PORTABLE_TESTS) under Python 3.10 (Ubuntu 22.04's python3) and 3.13
# when pyenv has them (~/.pyenv/versions/3.10.*, 3.13.*), each in its own .venv-3.1x; it says
# so when one is missing. SKIP_OTHER_PYTHONS=1 skips the leg.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PORTABLE_TESTS=(  # numpy cells, urlsplit, platform branches, signals, genkey + the real programs
    tests/test_cells.py tests/test_platform_support.py tests/test_test_client.py
    tests/test_start.py tests/test_cli.py
)
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
if [ $# -gt 0 ] || [ "${SKIP_OTHER_PYTHONS:-0}" = 1 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
status=0
# Three workers, a test file each (module fixtures stay whole): see requirements-dev.txt.
.venv/bin/python -m pytest -n 3 --dist loadfile || status=$?

# The two legs run side by side (each pytest uses one core); their output follows in turn.
legs=()
for version in 3.10 3.13; do
    interpreter=$(ls -d "$HOME"/.pyenv/versions/"$version".*/bin/python 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$interpreter" ]; then
        echo "portability leg: no Python $version in ~/.pyenv/versions: not tested on $version"
        continue
    fi
    venv=".venv-$version"
    if [ ! -x "$venv/bin/python" ]; then
        "$interpreter" -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
    echo "portability leg: $("$venv/bin/python" --version) on ${PORTABLE_TESTS[*]}" >"$venv/leg.log"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "${PORTABLE_TESTS[@]}" >>"$venv/leg.log" 2>&1 &
    legs+=("$!:$venv")
done
for leg in ${legs[@]+"${legs[@]}"}; do
    wait "${leg%%:*}" || status=$?
    cat "${leg#*:}/leg.log"
done
exit "$status"
