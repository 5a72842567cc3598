"""``python -m minicw.worker HOST PORT KEY -n N``: run a worker node from the command line.

    worker_main(argv)
      master: HOST PORT > $MINICW_MASTER > 127.0.0.1:8888
      key: KEY, or - for $MINICW_AUTHKEY
      node.WorkerNode(host, port, key).join_cluster()
      --ready-file PATH: the ready record (launch.py) once joined
      runs until SIGTERM (drained), EOF on stdin (--exit-with-stdin) or the
      master's shutdown

Nothing here imports the master's modules: a worker node never loads them.
The node itself is ``minicw.node.WorkerNode``; importing it from here, the
path of the first release, keeps working.  Printing is for people; a parent
that started this reads the ready file instead.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import threading

from minicw import config, discover, launch, tls, transport
from minicw.errors import MasterConnectionError, MinicwError
from minicw.node import WorkerNode

log = logging.getLogger(__name__)


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
    parser.add_argument("--start-method", default=None, choices=config.START_METHODS,
                        help="how worker processes start (default: $%s, else %s)"
                        % (config.ENV_START_METHOD, config.DEFAULT_START_METHOD))
    parser.add_argument("--no-reconnect", action="store_true",
                        help="exit when the master is lost instead of waiting for it")
    parser.add_argument("--max-jobs-per-process", type=int, default=None, metavar="N",
                        help="replace a worker process once it has run N jobs (after the "
                        "chunk in which it reached N)")
    parser.add_argument("--max-memory-per-process", type=_size, default=None,
                        metavar="SIZE", help="replace a worker process whose memory (RSS) "
                        "reached SIZE after a chunk, as in 2G or 500M")
    parser.add_argument("--tls-ca", metavar="FILE", help="speak TLS; verify the master's "
                        "certificate against this CA (default: $%s)" % tls.ENV_CA)
    parser.add_argument("--tls-fingerprint", metavar="SHA256", help="speak TLS; accept only "
                        "the master certificate of this SHA-256 fingerprint, as the master "
                        "prints it (default: $%s)" % tls.ENV_FINGERPRINT)
    parser.add_argument("--tls-no-check-hostname", dest="tls_check_hostname",
                        action="store_false", default=None,
                        help="with --tls-ca: do not check the master's host name")
    parser.add_argument("--process-setup", type=_process_setup, default=None,
                        metavar="KEY,CONTEXT", help="each worker process first calls the "
                        "callable broadcast under blob KEY, in the client context of blob "
                        "CONTEXT (minicw.Pool's own cluster: its initializer)")
    parser.add_argument("--connect-timeout", type=float, default=None, metavar="SECONDS",
                        help="give up when no master listens at HOST:PORT within this long "
                        "(default: wait for it; a wrong key or host fails at once)")
    launch.add_child_options(parser)
    return parser


def _process_setup(text: str) -> tuple:
    key, _, context_key = text.partition(",")
    if not key:
        raise argparse.ArgumentTypeError("expected KEY,CONTEXT (blob keys), got %r" % text)
    return key, context_key or None


def _size(text: str) -> int:
    try:
        return config.parse_size(text)
    except ValueError as exc:   # argparse would show only the function's name
        raise argparse.ArgumentTypeError(str(exc)) from None


def _worker_master(args) -> tuple:
    """The master's (host, port): the arguments, else $MINICW_MASTER, else the defaults.

    Raises MinicwError for a $MINICW_MASTER that is not host:port.
    """
    env_host, env_port = config.DEFAULT_HOST, config.DEFAULT_PORT
    if os.environ.get(config.ENV_MASTER):
        env_host, env_port = discover.parse_master(os.environ[config.ENV_MASTER])
    return args.host or env_host, args.port if args.port is not None else env_port


def _take_process_authkey() -> None:
    """A LocalCluster's node: its creator's multiprocessing authkey, for this
    process and the worker processes it starts (config.ENV_PROCESS_AUTHKEY)."""
    text = os.environ.pop(config.ENV_PROCESS_AUTHKEY, None)
    if text:
        try:
            multiprocessing.current_process().authkey = bytes.fromhex(text)
        except ValueError:
            log.warning("ignoring %s: not a hex key", config.ENV_PROCESS_AUTHKEY)


def worker_main(argv=None) -> int:
    """Run a worker node until SIGTERM (drained), EOF on stdin or the master's shutdown."""
    args = worker_parser().parse_args(argv)
    launch.start_logging(launch.log_level(args))
    _take_process_authkey()
    try:
        host, port = _worker_master(args)
    except MinicwError as exc:
        return launch.command_error("minicw-worker", exc)
    key = os.environ.get(config.ENV_AUTHKEY) if args.key == "-" else args.key
    if not key:
        return launch.command_error("minicw-worker", "KEY is '-' but $%s is not set" % config.ENV_AUTHKEY)
    try:
        tls_settings = tls.settings(ca=args.tls_ca, fingerprint=args.tls_fingerprint,
                                    check_hostname=args.tls_check_hostname)
    except MinicwError as exc:
        return launch.command_error("minicw-worker", exc)
    try:
        node = WorkerNode(host, port, key, nprocs=args.nprocs, start_method=args.start_method,
                          tls=tls_settings,
                          reconnect=not args.no_reconnect,
                          oversubscribe=args.oversubscribe,
                          connect_timeout_s=args.connect_timeout,
                          max_jobs_per_process=args.max_jobs_per_process,
                          max_memory_per_process=args.max_memory_per_process,
                          process_setup=args.process_setup)
    except ValueError as exc:
        return launch.command_error("minicw-worker", exc)
    threading.Thread(target=_announce_joined, args=(node, args.ready_file),
                     daemon=True).start()
    if args.exit_with_stdin:
        launch.exit_with_stdin(node.stop, on_drain=lambda: node.stop(drain=True))
    launch.on_signals(lambda signum, frame: node.stop(drain=True))
    try:
        node.join_cluster()
    except MasterConnectionError as exc:
        return launch.command_error("minicw-worker", exc)
    finally:
        if args.ready_file:
            launch.remove_ready_file(args.ready_file)
    if node.master_shut_down:
        print("minicw worker node: the master at %s shut down; exiting"
              % transport.format_address((host, port)), file=sys.stderr, flush=True)
    return 0


def _announce_joined(node: WorkerNode, ready_file: str | None) -> None:
    if not node.wait_registered(None):   # a year overflows Windows' wait limit
        return
    host, port = node.address
    print("minicw worker node %s joined %s:%d with %d processes"
          % (node.node_id, host, port, node.nprocs), flush=True)
    if ready_file:
        launch.write_ready_file(ready_file, launch.worker_ready_record(node.node_id, node.nprocs))


if __name__ == "__main__":
    sys.exit(worker_main())
