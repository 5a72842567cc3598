"""``python -m minicw COMMAND``: the commands that are not a role.

    python -m minicw store PATH     what a checkpoint file holds (store.py): the run,
                                    its counts (done, failed, missing), its first failures

The roles have their own modules: ``python -m minicw.master``,
``python -m minicw.worker``.
"""
from __future__ import annotations

import argparse
import sys

from minicw.errors import MinicwError


def parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(
        prog="python -m minicw", description="minicw commands (the roles run as "
        "python -m minicw.master and python -m minicw.worker)")
    sub = commands.add_subparsers(dest="command", metavar="COMMAND")
    store = sub.add_parser("store", help="show what a checkpoint file holds",
                           description="Show a checkpoint file's run, its counts of done, "
                           "failed and missing jobs, and its first failures.")
    store.add_argument("path", metavar="PATH", help="the checkpoint file (checkpoint=PATH)")
    store.add_argument("--failures", type=int, default=5, metavar="N",
                       help="show the first N failures (default 5)")
    return commands


def show_store(options) -> int:
    from minicw import journal, store
    with store.open(options.path) as opened:
        print(store.describe(opened, failures_shown=max(0, options.failures),
                             writer=journal.writer_of(options.path)))
    return 0


COMMANDS = {"store": show_store}


def main(argv=None) -> int:
    commands = parser()
    options = commands.parse_args(argv)
    if options.command is None:
        commands.print_help()
        return 2
    try:
        return COMMANDS[options.command](options)
    except MinicwError as exc:
        print("minicw %s: %s" % (options.command, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
