#!/usr/bin/env python3
"""sockproxy server: accepts encrypted tunnels from locals and connects to destinations."""

from __future__ import annotations

import logging
import sys

from server.handler import ExitServer
from utils.base import ProxyServer
from utils.cli import parse_args, run, within_fd_limit
from utils.config import load_server_config, reload_authorized_keys
from utils.errors import ConfigError

log = logging.getLogger("sockproxy.server")


def reload_keys(server: ProxyServer) -> None:
    """SIGHUP: re-read the authorized keys; live connections are not touched."""
    assert isinstance(server, ExitServer)
    try:
        keys = reload_authorized_keys(server.config.path)
    except ConfigError as exc:
        log.error("SIGHUP: keeping the old keys: %s", exc)
        return
    server.set_authorized_keys(keys)
    log.info("SIGHUP: %d authorized key(s) loaded", len(keys))


def main(argv: list[str] | None = None) -> int:
    args = parse_args("server.py", __doc__ or "", "server_config.json", argv)
    return run(
        args,
        lambda passphrase: ExitServer(within_fd_limit(load_server_config(args.config, passphrase))),
        reload_keys,
    )


if __name__ == "__main__":
    sys.exit(main())
