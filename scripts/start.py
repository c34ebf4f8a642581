#!/usr/bin/env python3
"""One command on Linux, macOS and Windows: install, make keys, start server and local.

    python3 scripts/start.py            (Windows: py scripts\\start.py)

Makes ``.venv`` and installs requirements.txt into it, generates missing keys into ``keys/``,
starts ``server.py`` and ``local.py`` with the shipped configs, prints what to try once both
listen, and stops both on Ctrl-C. The work is in scripts/launcher.py; this file only checks
the Python version first, in syntax every Python can parse, so an old one says what to install.
"""

import sys

if sys.version_info < (3, 10):  # noqa: UP036  (the point: this line runs on old Pythons)
    sys.stderr.write(
        "sockproxy needs Python 3.10 or newer, this is Python "
        + sys.version.split()[0]
        + ": install one from https://www.python.org/downloads/ (macOS: or brew install python3;"
        + " Ubuntu 22.04 and later: sudo apt install python3 python3-venv)\n"
    )
    sys.exit(1)

from launcher import main  # scripts/ is on sys.path: it holds this file

if __name__ == "__main__":
    sys.exit(main())
