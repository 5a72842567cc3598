"""``python -m minicw.master``: run a master from the command line.

The master itself is ``minicw.server.Master``; this module is its command
line (``cli.master_main``) and keeps ``from minicw.master import Master``,
the import path of the first release, working.
"""
import sys

from minicw.server import Master  # noqa: F401  (public import path)

if __name__ == "__main__":
    from minicw.cli import master_main
    sys.exit(master_main())
