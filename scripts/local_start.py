#!/usr/bin/env python3
"""Start or stop a minicw master and N worker processes on this machine, in the background.

    python3 scripts/local_start.py -n 4 start     master + one worker node of 4 processes
    python3 scripts/local_start.py stop           ends exactly the recorded PIDs
    -M: leave the master alone (start: add workers to it; stop: stop only workers)
    -W: leave the workers alone (start: only a master; stop: only the master)

Where things are (address, PIDs, logs, the mode-600 key file) is recorded in
the run directory (--run-dir, $MINICW_RUN_DIR, else ~/.minicw/run); clients
on this machine given no host or key find them there.
"""
import argparse
import os
import sys

try:
    import minicw  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # a clean checkout: use the package next to this script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minicw import config, launch, launcher, rundir  # noqa: E402
from minicw.errors import MinicwError  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="local_start.py",
        description="Start or stop a minicw master and worker processes on this machine, "
                    "in the background.")
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("-n", dest="nworkers", type=int, default=None, metavar="N",
                   help="worker processes (default: the CPU count)")
    p.add_argument("-M", dest="master", action="store_false",
                   help="leave the master alone (start: add workers to the recorded master)")
    p.add_argument("-W", dest="workers", action="store_false",
                   help="leave the workers alone (start: only the master)")
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="the master serves TLS with this certificate (default: $MINICW_TLS_CERT); "
                        "workers and clients that find it here pin its fingerprint")
    p.add_argument("--tls-key", default=None, metavar="FILE",
                   help="the certificate's private key (default: $MINICW_TLS_KEY)")
    p.add_argument("--run-dir", default=None,
                   help="where to record the cluster (default: $%s, else %s)"
                   % (config.ENV_RUN_DIR, config.DEFAULT_RUN_DIR))
    p.add_argument("--port", type=int, default=0,
                   help="the master's port on 127.0.0.1 (default: a free one)")
    p.add_argument("--timeout", type=float, default=config.READY_TIMEOUT_S, metavar="SECONDS",
                   help="how long a process may take to come up (default: %(default)g)")
    launch.add_log_options(p)
    return p


def report_start(run_dir: str) -> None:
    record = rundir.read_record(run_dir, rundir.LOCAL_RECORD) or {}
    master = record.get("master")
    if master:
        print("master   %s:%d  pid %d  log %s" % (record["host"], record["port"],
                                                  master["pid"], master["log"]))
    for entry in record.get("workers", []):
        print("workers  %d processes  pid %d  log %s" % (entry["nprocs"], entry["pid"],
                                                        entry["log"]))
    print("key file %s (mode 600)" % rundir.authkey_path(run_dir))
    if record.get("tls_fingerprint"):
        print("TLS      certificate fingerprint %s (pinned by the workers and by clients "
              "that find the master here)" % record["tls_fingerprint"])
    print("record   %s" % os.path.join(run_dir, rundir.LOCAL_RECORD))
    print("clients on this machine find the master and the key by themselves; "
          "stop with: %s stop --run-dir %s" % (sys.argv[0], run_dir))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    launch.start_tool_logging(args)
    run_dir = rundir.path(args.run_dir)
    try:
        if args.action == "start":
            launcher.local_start(args.nworkers, run_dir=run_dir, port=args.port,
                                 master=args.master, workers=args.workers,
                                 timeout_s=args.timeout, tls_cert=args.tls_cert,
                                 tls_key=args.tls_key)
            report_start(run_dir)
        else:
            ended = launcher.local_stop(run_dir=run_dir, master=args.master,
                                        workers=args.workers)
            if not ended:
                print("nothing recorded in %s" % run_dir)
            for entry in ended:
                print("stopped pid %d (%s)" % (entry["pid"], entry["argv"][1]))
    except MinicwError as exc:
        print("local_start.py: error: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
