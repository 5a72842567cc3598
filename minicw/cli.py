"""Command-line front ends: ``python -m minicw.master`` and ``python -m minicw.worker``.

Also installed as the console scripts ``minicw-master`` and ``minicw-worker``.
The only module that prints; everything else logs.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading

from minicw import config, launch, transport
from minicw.errors import MasterConnectionError

EXIT_USAGE = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def _on_signals(handler, signals=("SIGTERM", "SIGINT")) -> None:
    for name in signals:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)


def _split_master(text: str):
    host, _, port = text.rpartition(":")
    return (host or config.DEFAULT_HOST), int(port)


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="warning",
                        help="debug, info, warning (default) or error")
    # Used by launch.py: end when the parent closes our stdin.
    parser.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)


# --- master ---------------------------------------------------------------------

def read_authkey(explicit: str | None, key_file: str | None) -> tuple[str | None, str]:
    """(key, where it came from): --authkey, --authkey-file, then the environment."""
    if explicit:
        return explicit, "--authkey"
    if key_file:
        with open(key_file, "r", encoding="utf-8") as handle:
            key = handle.read().strip()
        if not key:
            raise ValueError("the authkey file %s is empty" % key_file)
        return key, key_file
    key = os.environ.get(config.ENV_AUTHKEY)
    if key:
        return key, config.ENV_AUTHKEY
    return None, ""


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
    parser.add_argument("--authkey-file", help="read the key from this file")
    parser.add_argument("--heartbeat-timeout", type=float, default=None, metavar="SECONDS",
                        help="declare a silent worker node or client dead after this "
                        "long (default: $%s or %g)" % (config.ENV_HEARTBEAT_TIMEOUT_S,
                                                       config.DEFAULT_HEARTBEAT_TIMEOUT_S))
    _add_common_options(parser)
    return parser


def master_main(argv=None) -> int:
    from minicw.server import Master
    args = master_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        key, key_source = read_authkey(args.authkey, args.authkey_file)
    except (OSError, ValueError) as exc:
        print("minicw-master: error: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    generated = key is None
    if generated:
        key = secrets.token_urlsafe(config.GENERATED_AUTHKEY_BYTES)
    master = Master(args.host, args.port, key, heartbeat_timeout_s=args.heartbeat_timeout)
    try:
        host, port = master.start()
    except OSError as exc:
        print("minicw-master: error: %s" % exc.strerror, file=sys.stderr)
        return EXIT_USAGE
    reach = host if host not in ("0.0.0.0", "", "::") else socket_hostname()
    print("minicw master listening on %s:%d (workers and clients connect to %s:%d)"
          % (host, port, reach, port), flush=True)
    if generated:
        print("authkey (generated, shown once): %s" % key, flush=True)
    else:
        print("authkey from %s" % key_source, flush=True)
    if args.exit_with_stdin:
        local_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        print("%s%s %d" % (launch.READY_PREFIX, local_host, port), flush=True)
        launch.exit_with_stdin(master.shutdown)
    _on_signals(lambda signum, frame: threading.Thread(target=master.shutdown).start())
    while not master.wait(1.0):  # wake now and then so signals are handled promptly
        pass
    try:
        print("minicw master on port %d shut down" % port, flush=True)
    except OSError:  # whoever read our output has gone (the parent of --exit-with-stdin)
        pass
    return 0


def socket_hostname() -> str:
    import socket
    return socket.gethostname()


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


def worker_main(argv=None) -> int:
    from minicw.node import WorkerNode
    args = worker_parser().parse_args(argv)
    _setup_logging(args.log_level)
    env_host, env_port = config.DEFAULT_HOST, config.DEFAULT_PORT
    if os.environ.get(config.ENV_MASTER):
        env_host, env_port = _split_master(os.environ[config.ENV_MASTER])
    host = args.host or env_host
    port = args.port if args.port is not None else env_port
    key = args.key
    if key == "-":
        key = os.environ.get(config.ENV_AUTHKEY)
        if not key:
            print("minicw-worker: error: KEY is '-' but $%s is not set"
                  % config.ENV_AUTHKEY, file=sys.stderr)
            return EXIT_USAGE
    try:
        node = WorkerNode(host, port, key, nprocs=args.nprocs, start_method=args.start_method,
                          reconnect=not args.no_reconnect,
                          allow_oversubscribe=args.oversubscribe)
    except ValueError as exc:
        print("minicw-worker: error: %s" % exc, file=sys.stderr)
        return EXIT_USAGE

    def announce():
        if node.wait_registered(3600 * 24 * 365):
            print("minicw worker node %s joined %s:%d with %d processes"
                  % (node.node_id, host, port, node.nprocs), flush=True)
            if args.exit_with_stdin:
                print("%s%s" % (launch.READY_PREFIX, node.node_id), flush=True)
    threading.Thread(target=announce, daemon=True).start()
    if args.exit_with_stdin:
        launch.exit_with_stdin(node.stop)
    _on_signals(lambda signum, frame: node.stop(drain=True))
    try:
        node.join_cluster()
    except MasterConnectionError as exc:
        print("minicw-worker: error: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    if node.master_shut_down:
        print("minicw worker node: the master at %s shut down; exiting"
              % transport.format_address((host, port)), file=sys.stderr, flush=True)
    return 0
