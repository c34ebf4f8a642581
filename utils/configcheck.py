"""``--check``: load and validate a program's config and keys, print one line, exit.

Like ``sshd -t``: exit 0 and a summary (listen address, peers, fingerprints) on stdout, or
exit 2 and the usual one-line config error on stderr. Nothing listens, nothing connects.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from utils.base import format_peer
from utils.cli import EXIT_CONFIG, read_passphrase
from utils.config import LocalConfig, ServerConfig
from utils.errors import ConfigError
from utils.keys import fingerprint


def check(args: argparse.Namespace, summarize: Callable[[bytes | None], str]) -> int:
    """Run ``summarize(passphrase)``; print its line (exit 0) or the config error (exit 2)."""
    try:
        line = summarize(read_passphrase(args))
    except ConfigError as exc:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: config error: {exc}\n")
        return EXIT_CONFIG
    sys.stdout.write(line + "\n")
    return 0


def server_summary(config: ServerConfig) -> str:
    keys = ", ".join(f"{k.name} {fingerprint(k.key)}" for k in config.authorized_keys)
    return (
        f"{config.path}: OK: listens on {format_peer((config.address, config.port))}; "
        f"server key {fingerprint(config.private_key)}; "
        f"{len(config.authorized_keys)} authorized key(s): {keys}"
    )


def local_summary(config: LocalConfig) -> str:
    servers = ", ".join(
        f"{format_peer((s.address, s.port))} {fingerprint(s.public_key)}" for s in config.servers
    )
    auth = "on" if config.auth else "off"
    return (
        f"{config.path}: OK: listens on {format_peer((config.address, config.port))} "
        f"(auth {auth}); local key {fingerprint(config.private_key)}; "
        f"{len(config.servers)} server(s): {servers}"
    )
