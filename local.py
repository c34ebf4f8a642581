#!/usr/bin/env python3
"""sockproxy local: a SOCKS5 proxy for your browser that tunnels everything to the server."""

from __future__ import annotations

import sys

try:
    from client.handler import LocalServer
    from utils.cli import parse_args, run, within_fd_limit
    from utils.config import load_local_config
    from utils.configcheck import check, local_summary
    from utils.listening import open_server
except ModuleNotFoundError as missing:
    from utils.requirements import exit_missing

    exit_missing(missing)
except KeyboardInterrupt:  # SIGINT while still loading: a stop, not a crash
    sys.stderr.write("local.py: stopped before it started\n")
    sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args("local.py", __doc__ or "", "local_config.json", argv)
    if args.check:
        return check(args, lambda phrase: local_summary(load_local_config(args.config, phrase)))

    def build(passphrase: bytes | None) -> LocalServer:
        return open_server(within_fd_limit(load_local_config(args.config, passphrase)), LocalServer)

    return run(args, build)


if __name__ == "__main__":
    sys.exit(main())
