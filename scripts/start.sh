#!/usr/bin/env bash
# One command for a newcomer: install, generate keys if missing, start server and local on
# loopback with the shipped configs (server 127.0.0.1:9000, SOCKS5 on 127.0.0.1:1080).
# Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
if [ ! -f keys/server_private.pem ] || [ ! -f keys/local_private.pem ]; then
    .venv/bin/python utils/genkey.py --dir keys
fi
.venv/bin/python server.py --config server_config.json &
server_pid=$!
.venv/bin/python local.py --config local_config.json &
local_pid=$!
trap 'kill -TERM $server_pid $local_pid 2>/dev/null; wait' INT TERM
echo "SOCKS5 proxy on 127.0.0.1:1080 - try: curl --socks5-hostname 127.0.0.1:1080 http://example.com/" >&2
wait -n $server_pid $local_pid
kill -TERM $server_pid $local_pid 2>/dev/null || true
wait
