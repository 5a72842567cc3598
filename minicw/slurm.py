"""SLURM: a long-lived master job and one worker job, started and stopped with sbatch.

    start(n)  (scripts/slurm_start.py, or minicw.start(n) when sbatch is on PATH)
      | key: $MINICW_AUTHKEY or a new one -> RUN/authkey (mode 600, never in a script)
      | removes RUN/master-address.json
      | sbatch --job-name=minicw-master ----------------> master job (any node)
      |   (script on stdin)                                python -m minicw.master
      |                                                    (master_main) on 0.0.0.0:
      |                                                    PORT, --authkey-file RUN/authkey
      | waits for RUN/master-address.json <--------------  --ready-file RUN/master-address
      |   naming the job's id                              .json: {pid, host, port,
      |                                                    hostname, job_id} (launch.py)
      | sbatch --job-name=minicw-workers --ntasks=N -----> worker job: srun, N tasks of
      |                                                    python -m minicw.worker HOST PORT - -n 1
      | RUN/slurm.json: job ids, job name, logs           (or docker run ... IMAGE -m minicw.worker)
      |                                                    key: $(cat RUN/authkey) at run time
    master_address()   RUN/master-address.json if its job is still queued, else the
                       node of the user's one master job in squeue and the recorded port
    stop()             scancel the recorded job ids (no record: this user's jobs with
                       the minicw names), then wait until squeue no longer lists them

RUN is the run directory (``--run-dir``, $MINICW_RUN_DIR, else ~/.minicw/run;
rundir.py keeps its files); it must be on the file system the nodes share, as
must this Python and this minicw: the jobs run ``sys.executable`` with
PYTHONPATH set to the directory that holds the minicw package
(launch.package_parent).  SLURM is only involved in starting and stopping the
master and the workers, never in running a job.

``python -m minicw.slurm address`` prints the master's host:port (``main``, a
command-line front end like master.py and worker.py, the only code here that prints).
"""
from __future__ import annotations

import argparse
import getpass
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import namedtuple

from minicw import config, launch, rundir, tls
from minicw.errors import (  # noqa: F401  (minicw.slurm.SlurmError... are public)
    MinicwError, SlurmCommandError, SlurmError, SlurmMasterNotFoundError)
from minicw.launch import package_parent  # the jobs' PYTHONPATH

log = logging.getLogger(__name__)

DEFAULT_JOB_NAME = "minicw"        # jobs are named minicw-master and minicw-workers
SLURM_RECORD = rundir.SLURM_RECORD
ADDRESS_FILE = "master-address.json"   # the master job's ready file
JOB_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")

Job = namedtuple("Job", "job_id name state nodes reason")


# --- SLURM commands -------------------------------------------------------------------

def available() -> bool:
    """Whether SLURM is installed here (``sbatch`` on the PATH)."""
    return shutil.which("sbatch") is not None


def _require(command: str) -> None:
    if shutil.which(command) is None:
        raise SlurmError("SLURM is not installed here: %s is not on the PATH; run this on "
                         "a SLURM login node, or use the local launcher "
                         "(scripts/local_start.py)" % command)


def _run(argv: list, stdin_text: str | None = None,
         timeout_s: float = config.SLURM_COMMAND_TIMEOUT_S) -> str:
    """Run a SLURM command; its stdout, or SlurmCommandError quoting its stderr."""
    _require(argv[0])
    shown = " ".join(shlex.quote(part) for part in argv)
    try:
        done = subprocess.run(argv, input=stdin_text, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmCommandError("`%s` did not answer within %gs; is slurmctld up?"
                                % (shown, timeout_s)) from None
    except OSError as exc:
        raise SlurmCommandError("cannot run `%s`: %s" % (shown, exc.strerror)) from None
    if done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip() or "no output"
        raise SlurmCommandError("`%s` failed with exit code %d: %s"
                                % (shown, done.returncode, said))
    return done.stdout


def current_user() -> str:
    return getpass.getuser()


def user_jobs() -> list:
    """The current user's jobs in the queue (pending, running, completing...)."""
    out = _run(["squeue", "--noheader", "--user", current_user(),
                "--format", "%i|%j|%T|%N|%r"])
    jobs = []
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 5:
            jobs.append(Job(*fields))
    return jobs


def sbatch(script: str, options: list) -> str:
    """Submit ``script`` (given on stdin, never written anywhere); returns the job id."""
    out = _run(["sbatch", "--parsable"] + list(options), stdin_text=script)
    job_id = out.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmCommandError("sbatch printed no job id: %r" % out.strip())
    return job_id


def scancel(job_ids: list) -> None:
    if job_ids:
        _run(["scancel"] + [str(job_id) for job_id in job_ids])


def wait_jobs_gone(job_ids: list, timeout_s: float = config.SLURM_STOP_TIMEOUT_S) -> None:
    """Block until squeue lists none of ``job_ids``; SlurmError naming them on timeout."""
    wanted = {str(job_id) for job_id in job_ids}
    deadline = time.monotonic() + timeout_s
    while wanted:
        left = [job for job in user_jobs() if job.job_id in wanted]
        if not left:
            return
        if time.monotonic() > deadline:
            raise SlurmError("jobs still in the queue %gs after scancel: %s" % (
                timeout_s, ", ".join("%s (%s)" % (job.job_id, job.state) for job in left)))
        time.sleep(config.SLURM_POLL_S)


# --- names, commands and batch scripts (pure) --------------------------------------------------

def job_names(job_name: str = DEFAULT_JOB_NAME) -> tuple:
    """(master job name, worker job name) for a name prefix."""
    if not JOB_NAME_PATTERN.match(job_name or ""):
        raise SlurmError("job name %r: use letters, digits, '.', '_' and '-' only" % (job_name,))
    return job_name + "-master", job_name + "-workers"


def worker_command(host: str, port: int, *, python: str | None = None, nprocs: int = 1,
                   docker_image: str | None = None, docker_args: str = "",
                   tls_fingerprint: str | None = None) -> list:
    """The argv one worker task runs: ``python -m minicw.worker HOST PORT - -n N``.

    With ``docker_image``: ``docker run -i --rm --net=host -e MINICW_AUTHKEY
    DOCKER_ARGS IMAGE -m minicw.worker HOST PORT - -n N`` (the image's
    entrypoint is python; ``-e NAME`` hands the container the key from the
    job's environment without writing it on the command line).
    """
    worker_args = ["-m", "minicw.worker", str(host), str(int(port)), "-", "-n", str(int(nprocs))]
    if tls_fingerprint:   # not a secret: it names the master's certificate
        worker_args += ["--tls-fingerprint", tls_fingerprint]
    if docker_image:
        return (["docker", "run", "-i", "--rm", "--net=host", "-e", config.ENV_AUTHKEY]
                + shlex.split(docker_args or "") + [docker_image] + worker_args)
    return [python or sys.executable] + worker_args


def _script(comment: str, lines: list) -> str:
    pythonpath = ('PYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH}; export PYTHONPATH'
                  % shlex.quote(package_parent()))
    return "\n".join(["#!/bin/sh", "# " + comment, pythonpath] + lines) + "\n"


def master_command(run_dir: str, port: int, python: str | None = None,
                   tls_settings: tls.Settings | None = None) -> list:
    """The argv of the master job: ``python -m minicw.master`` (master_main) on
    0.0.0.0:PORT, the key from the key file, the address file as its ready file;
    with ``tls_settings`` that serve TLS, their certificate and key files
    (paths on the shared filesystem)."""
    argv = [python or sys.executable, "-m", "minicw.master", "--host", "0.0.0.0",
            "--port", str(int(port)), "--authkey-file", rundir.authkey_path(run_dir),
            "--ready-file", os.path.join(run_dir, ADDRESS_FILE)]
    if tls_settings is not None and tls_settings.serves:
        argv += ["--tls-cert", tls_settings.cert, "--tls-key", tls_settings.key]
    return argv


def master_script(run_dir: str, port: int, python: str | None = None,
                  tls_settings: tls.Settings | None = None) -> str:
    """The master job's batch script; the master reads the key from the key file."""
    return _script("minicw master job (minicw.slurm); it reads the key from %s"
                   % rundir.authkey_path(run_dir),
                   ["exec " + _join(master_command(run_dir, port, python, tls_settings))])


def recorded_fingerprint(run_dir: str | None = None) -> str | None:
    """The TLS certificate fingerprint of the SLURM master recorded in the run
    directory, when it serves TLS."""
    try:
        record = rundir.read_record(rundir.path(run_dir), SLURM_RECORD)
    except MinicwError:
        return None
    return (record or {}).get("tls_fingerprint")


def worker_script(run_dir: str, command: list) -> str:
    """The worker job's batch script: the key goes from the key file to the environment."""
    key_file = shlex.quote(rundir.authkey_path(run_dir))
    return _script("minicw worker job (minicw.slurm); the key is read from the key file at run time", [
        "%s=$(cat %s) || { echo \"minicw: cannot read the key file %s\" >&2; exit 1; }"
        % (config.ENV_AUTHKEY, key_file, key_file),
        "export %s" % config.ENV_AUTHKEY,
        "exec srun " + _join(command),
    ])


def _join(argv: list) -> str:
    return " ".join(shlex.quote(str(part)) for part in argv)


def sbatch_options(name: str, log_path: str, extra: list = (), ntasks: int | None = None,
                   isolated: bool = False) -> list:
    """sbatch options: ours first, the user's (--Xmaster / --Xworkers) last so they win."""
    options = ["--job-name=" + name, "--output=" + log_path]
    if ntasks is not None:
        options.append("--ntasks=%d" % ntasks)
    if isolated:
        options.append("--ntasks-per-node=1")
    return options + list(extra)


# --- where the master is ------------------------------------------------------------------

def master_address(run_dir: str | None = None) -> tuple:
    """(host, port) of the current user's master job.

    The address the job wrote to the run directory comes first (if that job
    is still queued); else the node of the one job named <job name>-master in
    squeue, with the port recorded at start.  Raises SlurmError when SLURM is
    not installed, when several master jobs run, or when the master job is
    still pending; SlurmMasterNotFoundError when there is none.
    """
    _require("squeue")
    run_dir = rundir.path(run_dir)
    record = rundir.read_record(run_dir, SLURM_RECORD) or {}
    jobs = user_jobs()
    written = rundir.read_record(run_dir, ADDRESS_FILE)
    if written and any(job.job_id == str(written.get("job_id")) and job.state == "RUNNING"
                       for job in jobs):
        return launch.ready_address(written)
    master_name = job_names(record.get("job_name", DEFAULT_JOB_NAME))[0]
    masters = [job for job in jobs if job.name == master_name]
    return _address_from_queue(masters, master_name, record, run_dir)


def _address_from_queue(masters: list, master_name: str, record: dict, run_dir: str) -> tuple:
    if not masters:
        raise SlurmMasterNotFoundError(
            "no SLURM job named %s of user %s is in the queue; start one with "
            "scripts/slurm_start.py -n NWORKERS start" % (master_name, current_user()))
    if len(masters) > 1:
        raise SlurmError("several SLURM master jobs named %s of user %s: %s; cancel the "
                         "extra ones (scancel JOBID) or set %s=host:port"
                         % (master_name, current_user(),
                            ", ".join("%s on %s" % (job.job_id, job.nodes or job.state)
                                      for job in masters), config.ENV_MASTER))
    job = masters[0]
    if job.state != "RUNNING":
        raise SlurmError("the master job %s is %s (reason: %s); try again once it runs"
                         % (job.job_id, job.state, job.reason))
    port = int(record.get("port") or 0)
    if not port:
        raise SlurmError("the master job %s runs on %s but its port is unknown: %s has no "
                         "address; set %s=host:port" % (job.job_id, job.nodes,
                                                        os.path.join(run_dir, ADDRESS_FILE),
                                                        config.ENV_MASTER))
    return job.nodes, port


def master_host(run_dir: str | None = None) -> str:
    """The host of the current user's master job (see ``master_address``)."""
    return master_address(run_dir)[0]


slurm_master_host = master_host  # the ancestor's name


# --- start and stop ----------------------------------------------------------------------

def start(nworkers: int | None = None, *, run_dir: str | None = None,
          port: int = config.DEFAULT_PORT, master: bool = True, workers: bool = True,
          master_options=(), worker_options=(), isolated: bool = False,
          docker_image: str | None = None, docker_args: str = "",
          job_name: str = DEFAULT_JOB_NAME, timeout_s: float = config.SLURM_MASTER_TIMEOUT_S,
          python: str | None = None, tls_cert: str | None = None,
          tls_key: str | None = None) -> tuple:
    """Submit a master job and a job of ``nworkers`` worker tasks; the master's (host, port).

    Waits until the master job has written its address (``timeout_s``; on
    timeout the job is cancelled), not for the worker job to run: workers
    join whenever SLURM starts them.  ``master=False`` submits only workers,
    for the running master; ``workers=False`` only the master.  Raises
    SlurmError (sbatch missing or failing, with its message; a master
    already recorded; the master job failing, with the end of its log).
    ``tls_cert`` and ``tls_key`` (else $MINICW_TLS_CERT, $MINICW_TLS_KEY;
    files on the shared filesystem): the master serves TLS; the workers and
    clients that find it through the run directory pin its fingerprint.
    """
    _require("sbatch")
    tls_settings = tls.settings(cert=tls_cert, key=tls_key)
    if workers and (nworkers is None or int(nworkers) < 1):
        raise SlurmError("give the number of worker tasks (-n NWORKERS, at least 1), not %r"
                         % (nworkers,))
    job_names(job_name)
    run_dir = rundir.ensure(run_dir)
    record = _live_record(run_dir)
    if master:
        record, written = _start_master(run_dir, record, port, job_name, list(master_options),
                                        timeout_s, python, tls_settings)
        address = launch.ready_address(written)
    else:
        address = master_address(run_dir)
    if workers:
        try:
            _start_workers(run_dir, record, address, int(nworkers), list(worker_options),
                           isolated, docker_image, docker_args, python)
        except SlurmError:
            if master:  # leave nothing behind: the master was for these workers
                stop(run_dir=run_dir, workers=False)
            raise
    return address


def _live_record(run_dir: str) -> dict:
    """The SLURM record, without job ids that left the queue (a stale record goes)."""
    record = rundir.read_record(run_dir, SLURM_RECORD)
    if record is None:
        return {}
    queued = {job.job_id for job in user_jobs()}
    for field in ("master_job", "workers_job"):
        if record.get(field) and record[field] not in queued:
            record[field] = None
    if not record.get("master_job") and not record.get("workers_job"):
        rundir.remove_files(os.path.join(run_dir, SLURM_RECORD),
                            os.path.join(run_dir, ADDRESS_FILE))
        return {}
    return record


def _start_master(run_dir, record, port, job_name, options, timeout_s, python,
                  tls_settings) -> tuple:
    if record.get("master_job"):
        raise SlurmError("the master job %s recorded in %s is still in the queue; stop it "
                         "first (slurm_start.py stop), or use another --run-dir"
                         % (record["master_job"], run_dir))
    if rundir.read_record(run_dir, rundir.LOCAL_RECORD) is not None:
        raise SlurmError("%s holds the record of a local cluster (%s); stop it first "
                         "(scripts/local_start.py stop), or use another --run-dir"
                         % (run_dir, rundir.LOCAL_RECORD))
    rundir.write_authkey(run_dir, rundir.choose_authkey())
    rundir.remove_files(os.path.join(run_dir, ADDRESS_FILE))  # the new job's ready file
    name = job_names(job_name)[0]
    log_pattern = os.path.join(run_dir, name + "-%j.log")
    try:
        job_id = sbatch(master_script(run_dir, port, python, tls_settings),
                        sbatch_options(name, log_pattern, options))
    except SlurmError:
        if not record.get("workers_job"):  # else a queued worker job still reads it
            rundir.remove_files(rundir.authkey_path(run_dir))
        raise
    record = dict(record, kind="slurm", job_name=job_name, port=int(port), run_dir=run_dir,
                  master_job=job_id, master_log=log_pattern.replace("%j", job_id),
                  tls_fingerprint=(tls.file_fingerprint(tls_settings.cert)
                                   if tls_settings.serves else None))
    rundir.write_record(run_dir, SLURM_RECORD, record)
    try:
        written = _wait_for_address(run_dir, job_id, record["master_log"], timeout_s)
    except SlurmError:
        stop(run_dir=run_dir, workers=False)
        raise
    return record, written


def _wait_for_address(run_dir: str, job_id: str, log_path: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    next_squeue = 0.0
    job = None
    while True:
        written = rundir.read_record(run_dir, ADDRESS_FILE)
        if written and str(written.get("job_id")) == job_id:
            return written
        if time.monotonic() >= next_squeue:
            job = next((j for j in user_jobs() if j.job_id == job_id), None)
            next_squeue = time.monotonic() + config.SQUEUE_EVERY_S
            if job is None:
                raise SlurmError("the master job %s ended before writing its address; the "
                                 "end of %s: %s" % (job_id, log_path, rundir.tail(log_path)))
        if time.monotonic() > deadline:
            raise SlurmError(
                "the master job %s did not write its address to %s within %gs (it is %s, "
                "reason: %s); it was cancelled. Its log: %s: %s. Raise the timeout "
                "(--timeout) if the queue is busy"
                % (job_id, os.path.join(run_dir, ADDRESS_FILE), timeout_s, job.state,
                   job.reason, log_path, rundir.tail(log_path)))
        time.sleep(config.SLURM_POLL_S)


def _start_workers(run_dir, record, address, nworkers, options, isolated, docker_image,
                   docker_args, python) -> None:
    if record.get("workers_job"):
        raise SlurmError("the worker job %s recorded in %s is still in the queue; stop it "
                         "first (slurm_start.py -M stop)" % (record["workers_job"], run_dir))
    if rundir.read_authkey(run_dir) is None:
        raise SlurmError("no key file %s: start the master with slurm_start.py (without -M)"
                         % rundir.authkey_path(run_dir))
    job_name = record.get("job_name", DEFAULT_JOB_NAME)
    name = job_names(job_name)[1]
    log_pattern = os.path.join(run_dir, name + "-%j.log")
    command = worker_command(address[0], address[1], python=python,
                             docker_image=docker_image, docker_args=docker_args,
                             tls_fingerprint=record.get("tls_fingerprint"))
    job_id = sbatch(worker_script(run_dir, command),
                    sbatch_options(name, log_pattern, options, ntasks=nworkers, isolated=isolated))
    record.update(kind="slurm", job_name=job_name, run_dir=run_dir, workers_job=job_id,
                  nworkers=nworkers, workers_log=log_pattern.replace("%j", job_id))
    rundir.write_record(run_dir, SLURM_RECORD, record)


def stop(*, run_dir: str | None = None, master: bool = True, workers: bool = True,
         job_name: str | None = None, timeout_s: float = config.SLURM_STOP_TIMEOUT_S) -> list:
    """Cancel the recorded jobs (no record: this user's jobs with the minicw names),
    wait until they leave the queue, and remove the records.  Returns the job ids."""
    _require("scancel")
    run_dir = rundir.path(run_dir)
    record = rundir.read_record(run_dir, SLURM_RECORD)
    if record is not None:
        fields = [f for f, wanted in (("workers_job", workers), ("master_job", master)) if wanted]
        job_ids = [record[f] for f in fields if record.get(f)]
    else:
        master_name, workers_name = job_names(job_name or DEFAULT_JOB_NAME)
        names = ([workers_name] if workers else []) + ([master_name] if master else [])
        jobs = user_jobs()
        job_ids = [job.job_id for name in names for job in jobs if job.name == name]
    queued = {job.job_id for job in user_jobs()}
    scancel([job_id for job_id in job_ids if job_id in queued])
    wait_jobs_gone(job_ids, timeout_s)
    _forget(run_dir, record, master, workers)
    return job_ids


def _forget(run_dir: str, record: dict | None, master: bool, workers: bool) -> None:
    if master:
        rundir.remove_files(os.path.join(run_dir, ADDRESS_FILE))
    if record is not None:
        if workers:
            record["workers_job"] = None
        if master:
            record["master_job"] = None
        if record.get("master_job") or record.get("workers_job"):
            rundir.write_record(run_dir, SLURM_RECORD, record)
            return
        rundir.remove_files(os.path.join(run_dir, SLURM_RECORD))
    if master and rundir.read_record(run_dir, rundir.LOCAL_RECORD) is None:
        rundir.remove_files(rundir.authkey_path(run_dir))  # unless a local cluster uses it


# --- command line: python -m minicw.slurm address ----------------------------------------

def main(argv=None) -> int:
    """``python -m minicw.slurm address``: a command-line front end (it prints)."""
    parser = argparse.ArgumentParser(
        prog="python -m minicw.slurm",
        description="SLURM helpers: 'address' prints the current user's master as host:port.")
    parser.add_argument("what", choices=("address",))
    parser.add_argument("--run-dir", default=None, help="the run directory "
                        "(default: $%s, else %s)" % (config.ENV_RUN_DIR, config.DEFAULT_RUN_DIR))
    args = parser.parse_args(argv)
    try:
        print("%s:%d" % master_address(args.run_dir))
    except MinicwError as exc:
        print("minicw.slurm: error: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
