"""Command-line front ends: ``python -m minicw.master`` and ``python -m minicw.worker``.

    master_main(argv)                           worker_main(argv)
    -----------------                           -----------------
    key: --authkey > --authkey-file             key: KEY, or "-" for $MINICW_AUTHKEY
         (rundir.read_key_file)                 WorkerNode(host, port, key).join_cluster()
         > $MINICW_AUTHKEY > a new one          --ready-file PATH: launch.py's ready
         (printed once)                           record, once joined
    server.Master(host, port, key).start()      serves until SIGTERM (the jobs it holds
    --ready-file PATH: launch.py's ready          finish first), EOF on stdin
      record, once listening                      (--exit-with-stdin) or the master's
    serves until SIGTERM / SIGINT or EOF on       shutdown; removes its ready file
      stdin (--exit-with-stdin); removes its
      ready file on the way out

Also installed as the console scripts ``minicw-master`` and ``minicw-worker``.
``master_main`` is the one master main loop: LocalCluster's master
(launch.py), the local launcher's and the SLURM master job all run
``python -m minicw.master``.  Printing is for people; a parent that started
one of these reads its ready file instead.  With scripts/*_start.py and
``python -m minicw.slurm address``, the only code that prints; everything
else logs.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from minicw import config, discover, launch, rundir, transport
from minicw.errors import MasterConnectionError, MinicwError
from minicw.node import WorkerNode
from minicw.server import Master

EXIT_USAGE = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def _on_signals(handler, signals=("SIGTERM", "SIGINT")) -> None:
    for name in signals:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="warning",
                        help="debug, info, warning (default) or error")
    parser.add_argument("--ready-file", metavar="PATH",
                        help="once ready, write a JSON record here (for a program that "
                        "started this one; see minicw/launch.py); removed at exit")
    # Used by launch.py: end when the parent closes our stdin.
    parser.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)


def _error(program: str, message) -> int:
    print("%s: error: %s" % (program, message), file=sys.stderr)
    return EXIT_USAGE


# --- master ---------------------------------------------------------------------

def master_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minicw.master",
        description="Run a minicw master: it holds the job and result queues that "
                    "worker nodes and clients connect to.")
    parser.add_argument("--host", default="0.0.0.0",
                        help="interface to listen on (default: all, 0.0.0.0)")
    parser.add_argument("--port", type=int, default=config.DEFAULT_PORT,
                        help="port to listen on; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--authkey", help="the cluster's key (visible in ps; prefer "
                        "--authkey-file or %s)" % config.ENV_AUTHKEY)
    parser.add_argument("--authkey-file", help="read the key from this file (it must be "
                        "readable by its owner only: chmod 600)")
    parser.add_argument("--heartbeat-timeout", type=float, default=None, metavar="SECONDS",
                        help="declare a silent worker node or client dead after this "
                        "long (default: $%s or %g)" % (config.ENV_HEARTBEAT_TIMEOUT_S,
                                                       config.DEFAULT_HEARTBEAT_TIMEOUT_S))
    _add_common_options(parser)
    return parser


def _master_key(args) -> tuple:
    """(key, where it came from, whether it was generated); MinicwError from the key file."""
    if args.authkey:
        return args.authkey, "--authkey", False
    if args.authkey_file:
        return rundir.read_key_file(args.authkey_file), args.authkey_file, False
    if os.environ.get(config.ENV_AUTHKEY):
        return os.environ[config.ENV_AUTHKEY], config.ENV_AUTHKEY, False
    return rundir.new_authkey(), "", True


def master_main(argv=None) -> int:
    """Run a master until SIGTERM, SIGINT or (--exit-with-stdin) EOF on stdin; the exit code."""
    args = master_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        key, key_source, generated = _master_key(args)
    except MinicwError as exc:
        return _error("minicw-master", exc)
    master = Master(args.host, args.port, key, heartbeat_timeout_s=args.heartbeat_timeout)
    try:
        host, port = master.start()
    except OSError as exc:
        return _error("minicw-master", exc.strerror)
    _print_master_started(host, port, key if generated else None, key_source)
    if args.exit_with_stdin:
        launch.exit_with_stdin(master.shutdown)
    _on_signals(lambda signum, frame: threading.Thread(target=master.shutdown).start())
    if args.ready_file:  # last: whoever reads it may signal us at once
        launch.write_ready_file(args.ready_file, launch.master_ready_record(host, port))
    while not master.wait(1.0):  # wake now and then so signals are handled promptly
        pass
    if args.ready_file:
        launch.remove_ready_file(args.ready_file)
    try:
        print("minicw master on port %d shut down" % port, flush=True)
    except OSError:  # whoever read our output has gone (the parent of --exit-with-stdin)
        pass
    return 0


def _print_master_started(host: str, port: int, generated_key: str | None,
                          key_source: str) -> None:
    reach = launch.ready_address(launch.master_ready_record(host, port))
    print("minicw master listening on %s:%d (workers and clients connect to %s:%d)"
          % ((host, port) + reach), flush=True)
    if generated_key:
        print("authkey (generated, shown once): %s" % generated_key, flush=True)
    else:
        print("authkey from %s" % key_source, flush=True)


# --- worker --------------------------------------------------------------------------

def worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minicw.worker",
        description="Run a minicw worker node: N local processes that run jobs "
                    "from the master at HOST:PORT.")
    parser.add_argument("host", nargs="?", default=None,
                        help="the master's host (default: from $%s, else %s)"
                        % (config.ENV_MASTER, config.DEFAULT_HOST))
    parser.add_argument("port", nargs="?", type=int, default=None,
                        help="the master's port (default: from $%s, else %d)"
                        % (config.ENV_MASTER, config.DEFAULT_PORT))
    parser.add_argument("key", nargs="?", default="-",
                        help="the cluster's key, or - to read $%s (default)" % config.ENV_AUTHKEY)
    parser.add_argument("-n", "--nprocs", type=int, default=None,
                        help="worker processes (default: the CPU count; capped at it)")
    parser.add_argument("--oversubscribe", action="store_true",
                        help="allow more processes than CPUs")
    parser.add_argument("--start-method", default=config.DEFAULT_START_METHOD,
                        choices=("spawn", "forkserver", "fork"))
    parser.add_argument("--no-reconnect", action="store_true",
                        help="exit when the master is lost instead of waiting for it")
    _add_common_options(parser)
    return parser


def _worker_master(args) -> tuple:
    """The master's (host, port): the arguments, else $MINICW_MASTER, else the defaults.

    Raises MinicwError for a $MINICW_MASTER that is not host:port.
    """
    env_host, env_port = config.DEFAULT_HOST, config.DEFAULT_PORT
    if os.environ.get(config.ENV_MASTER):
        env_host, env_port = discover.parse_master(os.environ[config.ENV_MASTER])
    return args.host or env_host, args.port if args.port is not None else env_port


def worker_main(argv=None) -> int:
    """Run a worker node until SIGTERM (drained), EOF on stdin or the master's shutdown."""
    args = worker_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        host, port = _worker_master(args)
    except MinicwError as exc:
        return _error("minicw-worker", exc)
    key = os.environ.get(config.ENV_AUTHKEY) if args.key == "-" else args.key
    if not key:
        return _error("minicw-worker", "KEY is '-' but $%s is not set" % config.ENV_AUTHKEY)
    try:
        node = WorkerNode(host, port, key, nprocs=args.nprocs, start_method=args.start_method,
                          reconnect=not args.no_reconnect,
                          allow_oversubscribe=args.oversubscribe)
    except ValueError as exc:
        return _error("minicw-worker", exc)
    threading.Thread(target=_announce_joined, args=(node, args.ready_file),
                     daemon=True).start()
    if args.exit_with_stdin:
        launch.exit_with_stdin(node.stop)
    _on_signals(lambda signum, frame: node.stop(drain=True))
    try:
        node.join_cluster()
    except MasterConnectionError as exc:
        return _error("minicw-worker", exc)
    finally:
        if args.ready_file:
            launch.remove_ready_file(args.ready_file)
    if node.master_shut_down:
        print("minicw worker node: the master at %s shut down; exiting"
              % transport.format_address((host, port)), file=sys.stderr, flush=True)
    return 0


def _announce_joined(node: WorkerNode, ready_file: str | None) -> None:
    if not node.wait_registered(3600 * 24 * 365):
        return
    host, port = node.address
    print("minicw worker node %s joined %s:%d with %d processes"
          % (node.node_id, host, port, node.nprocs), flush=True)
    if ready_file:
        launch.write_ready_file(ready_file, launch.worker_ready_record(node.node_id, node.nprocs))
