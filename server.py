#!/usr/bin/env python3
"""sockproxy server: accepts encrypted tunnels from locals and connects to destinations."""

from __future__ import annotations

import logging
import sys

try:
    from server.destinations import warn_if_exposed
    from server.handler import ExitServer
    from utils.base import ProxyServer
    from utils.cli import parse_args, run, within_fd_limit
    from utils.config import ServerConfig, load_server_config, reload_authorized_keys
    from utils.configcheck import check, server_summary
    from utils.errors import ConfigError
    from utils.listening import open_server
except ModuleNotFoundError as missing:
    from utils.requirements import exit_missing

    exit_missing(missing)
except KeyboardInterrupt:  # SIGINT while still loading: a stop, not a crash
    sys.stderr.write("server.py: stopped before it started\n")
    sys.exit(0)

log = logging.getLogger("sockproxy.server")


def reload_keys(server: ProxyServer) -> None:
    """SIGHUP: re-read the host's addresses and the authorized keys; live connections stay."""
    assert isinstance(server, ExitServer)
    server.destinations.refresh()
    try:
        keys = reload_authorized_keys(server.config.path)
    except ConfigError as exc:
        log.error("SIGHUP: keeping the old keys: %s", exc)
        return
    server.set_authorized_keys(keys)
    log.info("SIGHUP: %d authorized key(s) loaded", len(keys))


def start_server(config: ServerConfig) -> ExitServer:
    warn_if_exposed(config)
    return open_server(config, ExitServer)


def main(argv: list[str] | None = None) -> int:
    args = parse_args("server.py", __doc__ or "", "server_config.json", argv)
    if args.check:
        return check(args, lambda phrase: server_summary(load_server_config(args.config, phrase)))
    return run(
        args,
        lambda phrase: start_server(within_fd_limit(load_server_config(args.config, phrase))),
        reload_keys,
    )


if __name__ == "__main__":
    sys.exit(main())
