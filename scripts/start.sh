#!/usr/bin/env bash
# Kept for old habits: the start command is now python3 scripts/start.py (Linux, macOS, Windows).
exec "${PYTHON:-python3}" "$(dirname "$0")/start.py" "$@"
