"""``python -m minicw.master``: run a master from the command line.

    master_main(argv)
      key: --authkey > --authkey-file (rundir.read_key_file, mode 600)
           > $MINICW_AUTHKEY > a new one, printed once
      server.Master(host, port, key).start()
      --ready-file PATH: the ready record (launch.py) once listening
      --dashboard PORT: the read-only status page (dashboard.py), its URL printed once
      serves until SIGTERM / SIGINT, or EOF on stdin (--exit-with-stdin)

The one master main loop: ``LocalCluster``/``MasterNode`` (launch.py), the
local launcher and the SLURM master job all run it.  The master itself is
``minicw.server.Master``; importing it from here, the path of the first
release, keeps working.  Printing is for people; a parent that started this
reads the ready file instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading

from minicw import config, launch, rundir, tls
from minicw.errors import MinicwError
from minicw.server import Master

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
    parser.add_argument("--dashboard", type=int, metavar="PORT",
                        help="serve a read-only status page on this port (0: a free one); "
                        "its URL, with the token derived from the key, is printed once")
    parser.add_argument("--dashboard-host", default=config.DASHBOARD_HOST, metavar="HOST",
                        help="interface the status page listens on (default: %(default)s)")
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate "
                        "(PEM; default: $%s); `python -m minicw tls-selfsigned DIR` makes one"
                        % tls.ENV_CERT)
    parser.add_argument("--tls-key", metavar="FILE",
                        help="the certificate's private key (PEM; default: $%s)" % tls.ENV_KEY)
    parser.add_argument("--tls-ca", metavar="FILE", help="verify client certificates against "
                        "this CA (default: $%s)" % tls.ENV_CA)
    parser.add_argument("--tls-require-client-cert", action="store_true", default=None,
                        help="refuse peers without a certificate signed by --tls-ca")
    launch.add_child_options(parser)
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
    launch.start_logging(launch.log_level(args))
    try:
        key, key_source, generated = _master_key(args)
    except MinicwError as exc:
        return launch.command_error("minicw-master", exc)
    dashboard_address = (None if args.dashboard is None
                         else (args.dashboard_host, args.dashboard))
    try:
        tls_settings = tls.settings(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca,
                                    require_client_cert=args.tls_require_client_cert)
        if tls_settings.serves:
            tls.server_context(tls_settings)   # a bad certificate or key: said now, not per peer
    except MinicwError as exc:
        return launch.command_error("minicw-master", exc)
    master = Master(args.host, args.port, key, heartbeat_timeout_s=args.heartbeat_timeout,
                    dashboard_address=dashboard_address, tls_settings=tls_settings)
    try:
        host, port = master.start()
    except OSError as exc:
        return launch.command_error("minicw-master", exc.strerror)
    _print_master_started(host, port, key if generated else None, key_source)
    if master.tls is not None:
        print("TLS: certificate %s, SHA-256 fingerprint %s (peers without a CA pin it: "
              "--tls-fingerprint or $%s)" % (master.tls.cert, tls.shown_fingerprint(
                  tls.file_fingerprint(master.tls.cert)), tls.ENV_FINGERPRINT), flush=True)
    if master.dashboard is not None:
        print("dashboard (read-only; the URL holds its token): %s" % master.dashboard.url,
              flush=True)
    if args.exit_with_stdin:
        launch.exit_with_stdin(master.shutdown)
    launch.on_signals(lambda signum, frame: threading.Thread(target=master.shutdown).start())
    if args.ready_file:  # last: whoever reads it may signal us at once
        launch.write_ready_file(args.ready_file, launch.master_ready_record(
            host, port, master.dashboard.address if master.dashboard else None,
            tls.file_fingerprint(master.tls.cert) if master.tls is not None else None))
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


if __name__ == "__main__":
    sys.exit(master_main())
