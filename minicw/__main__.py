"""``python -m minicw COMMAND``: every command of minicw in one place.

    python -m minicw master [options]          = python -m minicw.master (master.py)
    python -m minicw worker HOST PORT KEY -n N = python -m minicw.worker (worker.py)
    python -m minicw status [HOST:PORT]        what the cluster is doing (status.py):
                        [--json] [--watch S]   nodes, clients, throughput, recent failures
    python -m minicw store PATH                what a checkpoint file holds (store.py)
    python -m minicw tls-selfsigned DIR        a self-signed certificate and key for the
                        [--host NAME]          master's TLS, and its fingerprint (tls.py)

``master`` and ``worker`` hand the rest of the command line to their modules;
``python -m minicw.master`` and ``python -m minicw.worker`` keep working.
Every command takes -v / -q.  Exit codes: 0 done, 1 a minicw error (said on
stderr in one line), 2 a usage error.
"""
from __future__ import annotations

import argparse
import sys
import time

from minicw.errors import MinicwError

DELEGATED = {"master": "minicw.master:master_main", "worker": "minicw.worker:worker_main"}


def parser() -> argparse.ArgumentParser:
    from minicw import config, launch
    commands = argparse.ArgumentParser(
        prog="python -m minicw", description="minicw: run Python functions across a "
        "cluster of ordinary machines.")
    sub = commands.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("master", help="run a master (python -m minicw master --help)",
                   add_help=False)
    sub.add_parser("worker", help="run a worker node (python -m minicw worker --help)",
                   add_help=False)

    status = sub.add_parser(
        "status", help="what a cluster is doing: nodes, clients, throughput, failures",
        description="Show a master's worker nodes, clients, throughput and recent failures. "
        "The master is HOST:PORT, else $%s, else the one a launcher recorded (local run "
        "directory, then SLURM), else %s:%d; the key is --authkey-file, else $%s, else the "
        "run directory's key file." % (config.ENV_MASTER, config.DEFAULT_HOST,
                                       config.DEFAULT_PORT, config.ENV_AUTHKEY))
    status.add_argument("address", nargs="?", metavar="HOST:PORT", help="the master")
    status.add_argument("--authkey-file", metavar="FILE",
                        help="read the key from this file (mode 600)")
    status.add_argument("--json", action="store_true",
                        help="print one JSON document (its keys: python -m pydoc minicw.status)")
    status.add_argument("--watch", type=float, metavar="S",
                        help="print it again every S seconds, until Ctrl-C")
    launch.add_log_options(status)

    store = sub.add_parser("store", help="show what a checkpoint file holds",
                           description="Show a checkpoint file's run, its counts of done, "
                           "failed and missing jobs, and its first failures.")
    store.add_argument("path", metavar="PATH", help="the checkpoint file (checkpoint=PATH)")
    store.add_argument("--failures", type=int, default=5, metavar="N",
                       help="show the first N failures (default 5)")
    launch.add_log_options(store)

    selfsigned = sub.add_parser(
        "tls-selfsigned", help="make a self-signed TLS certificate and key for a master",
        description="Write DIR/cert.pem and DIR/key.pem (mode 600) with the openssl command, "
        "for `python -m minicw master --tls-cert DIR/cert.pem --tls-key DIR/key.pem`, and "
        "print the certificate's fingerprint, which peers pin with --tls-fingerprint.")
    selfsigned.add_argument("directory", metavar="DIR", help="where to write the two files")
    selfsigned.add_argument("--host", default=None, metavar="NAME",
                            help="the master's host name in the certificate (default: "
                            "this machine's)")
    selfsigned.add_argument("--days", type=int, default=3650,
                            help="how long it is valid (default %(default)s)")
    launch.add_log_options(selfsigned)
    return commands


def show_status(options) -> int:
    from minicw import discover, rundir, status
    if options.address:
        address = discover.parse_master(options.address)
    else:
        address = discover.master_address()
    key = rundir.read_key_file(options.authkey_file) if options.authkey_file else None
    key = discover.authkey(key)
    tty = sys.stdout.isatty()
    while True:
        doc = status.document(status.fetch(address, key), address)
        text = status.dumps(doc) if options.json else status.render(doc)
        if options.watch and tty and not options.json:
            text = "\033[H\033[J" + text    # the screen cleared: a live view
        print(text, flush=True)
        if not options.watch:
            return 0
        try:
            time.sleep(max(0.2, options.watch))
        except KeyboardInterrupt:
            return 0


def show_store(options) -> int:
    from minicw import journal, store
    with store.open(options.path) as opened:
        print(store.describe(opened, failures_shown=max(0, options.failures),
                             writer=journal.writer_of(options.path)))
    return 0


def make_selfsigned(options) -> int:
    import os
    import socket
    from minicw import tls
    for name in ("cert.pem", "key.pem"):
        if os.path.exists(os.path.join(options.directory, name)):
            raise tls.TlsSetupError("%s already holds %s: remove it first, or choose another "
                                    "directory" % (options.directory, name))
    host = options.host or socket.gethostname()
    cert, key, fingerprint = tls.make_selfsigned(options.directory, host, options.days)
    print("certificate: %s\nprivate key: %s (mode 600: keep it on the master's machine)\n"
          "SHA-256 fingerprint: %s\n\n"
          "python -m minicw master --tls-cert %s --tls-key %s\n"
          "python -m minicw worker HOST PORT - --tls-fingerprint %s\n"
          "MINICW_TLS_FINGERPRINT=%s python your_client.py"
          % (cert, key, tls.shown_fingerprint(fingerprint), cert, key, fingerprint,
             fingerprint))
    return 0


COMMANDS = {"status": show_status, "store": show_store, "tls-selfsigned": make_selfsigned}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module_name, function = DELEGATED[argv[0]].split(":")
        import importlib
        return getattr(importlib.import_module(module_name), function)(argv[1:])
    commands = parser()
    options = commands.parse_args(argv)
    if options.command is None:
        commands.print_help()
        return 2
    from minicw import launch
    launch.start_tool_logging(options)
    try:
        return COMMANDS[options.command](options)
    except KeyboardInterrupt:
        return 130
    except MinicwError as exc:
        print("minicw %s: %s" % (options.command, exc), file=sys.stderr)
        return 1
    except OSError as exc:   # e.g. --authkey-file missing
        print("minicw %s: %s" % (options.command, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
