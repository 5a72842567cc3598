#!/usr/bin/env python3
"""Start or stop a minicw master job and a worker job on a SLURM cluster.

    python3 scripts/slurm_start.py -n 32 start    one master job, one job of 32 worker tasks
    python3 scripts/slurm_start.py stop           scancel them, wait until they leave squeue
    -M / -W              leave the master / the workers alone
    --Xmaster ARG        an sbatch option for the master job (repeatable)
    --Xworkers ARG       an sbatch option for the worker job (repeatable)
    -i, --isolated       one worker per node (--ntasks-per-node=1)
    -d, --docker-image   run each worker as: docker run -i --rm --net=host
    --docker-args "..."  -e MINICW_AUTHKEY DOCKER_ARGS IMAGE -m minicw.worker ...

The run directory (--run-dir, $MINICW_RUN_DIR, else ~/.minicw/run) must be
on the file system the nodes share: the master job writes its address there,
the key file (mode 600) is there, and so are the job logs.  Clients find the
master with minicw.slurm.master_host() or by themselves.
"""
import argparse
import os
import sys

try:
    import minicw  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # a clean checkout: use the package next to this script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minicw import config, launch, rundir, slurm  # noqa: E402
from minicw.errors import MinicwError  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slurm_start.py",
        description="Start or stop a minicw master job and a worker job on SLURM.")
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("-n", dest="nworkers", type=int, default=None, metavar="NWORKERS",
                   help="worker tasks of the worker job (one process each); needed to "
                        "start workers")
    p.add_argument("-M", dest="master", action="store_false", help="leave the master alone")
    p.add_argument("-W", dest="workers", action="store_false", help="leave the workers alone")
    p.add_argument("--Xmaster", dest="master_options", metavar="ARG", action="append",
                   default=[], help="pass ARG to sbatch for the master job (repeatable)")
    p.add_argument("--Xworkers", dest="worker_options", metavar="ARG", action="append",
                   default=[], help="pass ARG to sbatch for the worker job (repeatable)")
    p.add_argument("-i", "--isolated", action="store_true", help="one worker per node")
    p.add_argument("-d", "--docker-image", default=None, metavar="IMAGE",
                   help="run the workers in this Docker image (python as its entrypoint, "
                        "minicw installed)")
    p.add_argument("--docker-args", default="", metavar='"..."',
                   help="more arguments for docker run, e.g. '-v /shared:/shared'")
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="the master serves TLS with this certificate (default: $MINICW_TLS_CERT); "
                        "workers and clients that find it here pin its fingerprint")
    p.add_argument("--tls-key", default=None, metavar="FILE",
                   help="the certificate's private key (default: $MINICW_TLS_KEY)")
    p.add_argument("--run-dir", default=None,
                   help="where to record the cluster, on the shared file system "
                        "(default: $%s, else %s)" % (config.ENV_RUN_DIR, config.DEFAULT_RUN_DIR))
    p.add_argument("--port", type=int, default=config.DEFAULT_PORT,
                   help="the master's port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--job-name", default=slurm.DEFAULT_JOB_NAME,
                   help="job name prefix: jobs are PREFIX-master and PREFIX-workers "
                        "(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=config.SLURM_MASTER_TIMEOUT_S,
                   metavar="SECONDS",
                   help="start: how long the master job may take to write its address; "
                        "stop: to leave the queue (default: %(default)g)")
    launch.add_log_options(p)
    return p


def do_start(args, run_dir: str) -> None:
    host, port = slurm.start(
        args.nworkers, run_dir=run_dir, port=args.port, master=args.master,
        workers=args.workers, master_options=args.master_options,
        worker_options=args.worker_options, isolated=args.isolated,
        docker_image=args.docker_image, docker_args=args.docker_args,
        job_name=args.job_name, timeout_s=args.timeout, tls_cert=args.tls_cert,
        tls_key=args.tls_key)
    record = rundir.read_record(run_dir, rundir.SLURM_RECORD) or {}
    print("master   %s:%d  job %s  log %s" % (host, port, record.get("master_job"),
                                              record.get("master_log")))
    if args.workers:
        print("workers  %d tasks  job %s  log %s" % (args.nworkers, record.get("workers_job"),
                                                     record.get("workers_log")))
    print("key file %s (mode 600)" % rundir.authkey_path(run_dir))
    if record.get("tls_fingerprint"):
        print("TLS      certificate fingerprint %s (pinned by the workers and by clients "
              "that find the master here)" % record["tls_fingerprint"])
    print("clients: minicw.slurm.master_host() finds the master; a client given no host "
          "or key finds both by itself (with %s=%s if not the default)"
          % (config.ENV_RUN_DIR, run_dir))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    launch.start_tool_logging(args)
    run_dir = rundir.path(args.run_dir)
    try:
        if args.action == "start":
            do_start(args, run_dir)
        else:
            job_ids = slurm.stop(run_dir=run_dir, master=args.master, workers=args.workers,
                                 job_name=args.job_name, timeout_s=args.timeout)
            print("cancelled jobs %s; none left in the queue" % ", ".join(job_ids)
                  if job_ids else "no minicw jobs to stop")
    except MinicwError as exc:
        print("slurm_start.py: error: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
