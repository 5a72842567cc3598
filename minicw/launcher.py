"""Long-lived clusters in the background: ``minicw.start``, ``stop``, ``allocate``.

    minicw.start(n) / stop() / allocate(n)        choose_backend()
        |
        +-- sbatch on PATH --> slurm.start / stop: a master job and a worker job
        +-- otherwise -------> local_start / local_stop below (this machine)
    (stop() first goes by the record in the run directory; a SLURM command that
    fails under start() names backend="local" and scripts/local_start.py)

    local_start(n)                                     the run directory (rundir.py)
      key: $MINICW_AUTHKEY, else a new random one ---> authkey       mode 600
      python -m minicw.master --host 127.0.0.1           master.json   host, port, and per
          --port P --ready-file RUN/master.ready                       process: pid, start
      python -m minicw.worker 127.0.0.1 P - -n N                       time, log, pid and
          --start-method M --ready-file RUN/worker-K.ready             ready files
          (M: config.start_method(), $MINICW_START_METHOD or spawn)
      each with launch.child_env(key) (the key in        master.pid, worker-K.pid
      $MINICW_AUTHKEY, never argv), in a new session,    master.ready, worker-K.ready
      stdin from /dev/null, output appended to its log   master.log, worker-K.log
      start removes the old ready file, then waits
      for one naming the new pid (launch.wait_ready_file)

    local_stop()    reads master.json; asks each recorded PID to stop (workers first,
                    so they finish the jobs they hold), SIGKILL to the process
                    group it leads after a grace period; removes the records.
                    Never by process name: a PID whose start time differs from
                    the recorded one is another process and is left alone.

    clients         discover.py asks recorded_master() and rundir.read_authkey()

One cluster per run directory: starting a second master there is refused
while the first still runs (a record whose processes are all gone is stale
and is replaced), and while the run directory holds a SLURM cluster's record.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time

from minicw import config, launch, processes, rundir, slurm, tls
from minicw.errors import MinicwError

log = logging.getLogger(__name__)

# Popen objects of processes this interpreter started, so that stop() can reap them.
_children: dict = {}


# --- processes, by PID (processes.py answers for each operating system) ----------------------

def process_start_time(pid: int) -> int | str | None:
    """When ``pid`` started (processes.start_time): a record keeps it, so that stop
    never signals a later process that got the same PID."""
    return processes.start_time(pid)


def process_alive(entry: dict) -> bool:
    """Whether the process of a record entry ({"pid", "start_time"}) still runs."""
    pid = entry["pid"]
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False
    return processes.alive(pid, entry.get("start_time"))


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs.

    Zombies do not count: an orphan waits for init to reap it, and in a
    container init may take seconds to do so.
    """
    if not hasattr(os, "killpg"):
        return False
    try:
        os.killpg(pgid, 0)
    except OSError:
        return False
    if not os.path.isdir("/proc/self"):
        return True
    members = (processes.proc_stat(int(name)) for name in os.listdir("/proc")
               if name.isdigit())
    return any(fields and fields[2] == str(pgid) and fields[0] != "Z" for fields in members)


def _reap(entry: dict) -> None:
    child = _children.pop(entry["pid"], None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(config.GROUP_LINGER_S)


def end_processes(entries: list, grace_s: float = config.LOCAL_STOP_GRACE_S) -> None:
    """Ask each recorded process to stop (processes.ask_to_stop: SIGTERM, Ctrl-Break
    on Windows), wait, then kill the process group it leads.

    Each entry was started in a new session, so its PID is also the ID of a
    process group holding its children (a worker node's processes); members
    still alive after the leader ended are killed too.
    """
    running = [entry for entry in entries if process_alive(entry)]
    for entry in running:
        processes.ask_to_stop(entry["pid"])
    deadline = time.monotonic() + grace_s
    for entry in running:
        while process_alive(entry) and time.monotonic() < deadline:
            time.sleep(config.STOP_POLL_S)
        if process_alive(entry):
            log.warning("pid %d did not end within %gs of being asked to; killing its group",
                        entry["pid"], grace_s)
            processes.kill(entry["pid"], group=True)
        _reap(entry)
        _end_group_members(entry)


def _end_group_members(entry: dict) -> None:
    pgid = entry["pid"]
    if not entry.get("session") or process_alive(entry):
        return
    deadline = time.monotonic() + config.GROUP_LINGER_S
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(config.STOP_POLL_S)
    if _group_alive(pgid):
        log.warning("processes of group %d outlived their leader; killing them", pgid)
        processes.kill(pgid, group=True)


def spawn_detached(argv: list, log_path: str, env: dict) -> dict:
    """Start ``argv`` in a new session with its output in ``log_path``; its record entry."""
    with rundir.open_private(log_path, "ab") as log_file:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                 stderr=subprocess.STDOUT, env=env, close_fds=True,
                                 **launch.own_session())
    _children[popen.pid] = popen
    return {"pid": popen.pid, "start_time": process_start_time(popen.pid), "log": log_path,
            "session": os.name == "posix", "argv": argv[1:]}


def _wait_ready(entry: dict, what: str, timeout_s: float) -> dict:
    """The ready record of a detached process; MinicwError quoting its log if it fails."""
    return launch.wait_ready_file(
        entry["ready_file"], entry["pid"], lambda: process_alive(entry), what, timeout_s,
        lambda: "the end of %s: %s" % (entry["log"], rundir.tail(entry["log"])))


def _spawn_ready(run_dir: str, name: str, argv: list, key: str, what: str,
                 timeout_s: float) -> tuple:
    """Start ``argv`` detached as ``name`` and wait for its ready file: (entry, record).

    A process that does not come up is ended and its files removed.
    """
    ready_file = os.path.join(run_dir, name + ".ready")
    rundir.remove_files(ready_file)  # an old one must never pass for the new process's
    entry = spawn_detached(argv + ["--ready-file", ready_file],
                           os.path.join(run_dir, name + ".log"), launch.child_env(key))
    entry["ready_file"] = ready_file
    _write_pid_file(run_dir, name, entry)
    try:
        return entry, _wait_ready(entry, what, timeout_s)
    except MinicwError:
        end_processes([entry], grace_s=1.0)
        rundir.remove_files(entry["pid_file"], ready_file)
        raise


def _record_entries(record: dict) -> list:
    return ([record["master"]] if record.get("master") else []) + list(record.get("workers", []))


def _entry_files(entries: list) -> list:
    return [entry[field] for entry in entries for field in ("pid_file", "ready_file")
            if field in entry]


def _live_local_record(run_dir: str) -> dict | None:
    """The local record if one of its processes runs; a stale record is removed."""
    record = rundir.read_record(run_dir, rundir.LOCAL_RECORD)
    if record is None:
        return None
    _require_this_host(run_dir, record)
    if any(process_alive(entry) for entry in _record_entries(record)):
        return record
    log.info("removing the stale record %s", os.path.join(run_dir, rundir.LOCAL_RECORD))
    _remove_local_record(run_dir, record)
    return None


def _require_this_host(run_dir: str, record: dict) -> None:
    """A run directory in a shared home may hold another machine's record: hands off."""
    if record.get("hostname") != socket.gethostname():
        raise MinicwError("%s records a local cluster of host %s, not of this host (%s); "
                          "stop it there, or use another run directory (remove %s if that "
                          "host is gone)" % (run_dir, record.get("hostname"),
                                             socket.gethostname(),
                                             os.path.join(run_dir, rundir.LOCAL_RECORD)))


def _remove_local_record(run_dir: str, record: dict) -> None:
    rundir.remove_files(*_entry_files(_record_entries(record)))
    rundir.remove_files(os.path.join(run_dir, rundir.LOCAL_RECORD))
    if rundir.read_record(run_dir, rundir.SLURM_RECORD) is None:  # else a SLURM cluster uses it
        rundir.remove_files(rundir.authkey_path(run_dir))


def _write_pid_file(run_dir: str, name: str, entry: dict) -> None:
    entry["pid_file"] = os.path.join(run_dir, name + ".pid")
    with rundir.open_private(entry["pid_file"], "w") as handle:
        handle.write("%d\n" % entry["pid"])


def _start_local_master(run_dir: str, port: int, key: str, timeout_s: float,
                        tls_settings: tls.Settings) -> tuple:
    """Start the master; (its entry, the ready record)."""
    key_file = rundir.write_authkey(run_dir, key)
    argv = [sys.executable, "-m", "minicw.master", "--host", "127.0.0.1", "--port", str(port)]
    if tls_settings.serves:   # paths only: the key stays in its file
        argv += ["--tls-cert", tls_settings.cert, "--tls-key", tls_settings.key]
    try:
        return _spawn_ready(run_dir, "master", argv, key, "master", timeout_s)
    except MinicwError:
        rundir.remove_files(key_file)
        raise


def _start_local_workers(run_dir: str, record: dict, n: int, key: str, start_method: str,
                         timeout_s: float) -> dict:
    index = record.get("next_worker", 1)
    record["next_worker"] = index + 1
    argv = [sys.executable, "-m", "minicw.worker", record["host"], str(record["port"]), "-",
            "-n", str(n), "--start-method", start_method]
    if record.get("tls_fingerprint"):
        argv += ["--tls-fingerprint", record["tls_fingerprint"]]
    if n > (os.cpu_count() or 1):
        argv.append("--oversubscribe")  # the caller asked for this many on purpose
    entry, ready = _spawn_ready(run_dir, "worker-%d" % index, argv, key, "worker node",
                                timeout_s)
    entry["nprocs"] = ready["nprocs"]
    return entry


def local_start(n: int | None = None, *, run_dir: str | None = None, port: int = 0,
                master: bool = True, workers: bool = True,
                timeout_s: float = config.READY_TIMEOUT_S,
                tls_cert: str | None = None, tls_key: str | None = None) -> tuple:
    """Start a master and a worker node of ``n`` processes on this machine, in the background.

    ``master=False`` adds workers to the recorded master; ``workers=False``
    starts only the master.  ``port`` 0 picks a free port.  ``tls_cert`` and
    ``tls_key`` (else $MINICW_TLS_CERT, $MINICW_TLS_KEY): the master serves
    TLS; its fingerprint is recorded, and the workers and clients that find
    the master here pin it.  Returns the
    master's (host, port); everything is recorded in the run directory.
    Raises MinicwError when the run directory already holds a running master,
    when there is no master to join, or when a process fails to come up (its
    log is quoted); ValueError for a bad $MINICW_START_METHOD.
    """
    n = (os.cpu_count() or 1) if n is None else int(n)
    if n < 1:
        raise MinicwError("the number of worker processes must be at least 1, not %d" % n)
    start_method = config.start_method()  # a bad one is refused before anything starts
    tls_settings = tls.settings(cert=tls_cert, key=tls_key)   # so are bad TLS files
    run_dir = rundir.ensure(run_dir)
    record = _live_local_record(run_dir)
    if master:
        record = _new_local_master(run_dir, record, port, timeout_s, tls_settings)
    elif record is None or not record.get("master") or not process_alive(record["master"]):
        raise MinicwError("no running local master is recorded in %s; start one first "
                          "(without -M / master=False)" % run_dir)
    if workers:
        key = rundir.read_authkey(run_dir)
        if key is None:
            raise MinicwError("the key file %s is missing; stop the cluster and start it "
                              "again" % rundir.authkey_path(run_dir))
        try:
            entry = _start_local_workers(run_dir, record, n, key.decode("utf-8"), start_method,
                                         timeout_s)
        except MinicwError:
            if master:
                local_stop(run_dir=run_dir, grace_s=1.0)
            raise
        record["workers"].append(entry)
        rundir.write_record(run_dir, rundir.LOCAL_RECORD, record)
    return record["host"], record["port"]


def _new_local_master(run_dir: str, record: dict | None, port: int, timeout_s: float,
                      tls_settings: tls.Settings) -> dict:
    if record is not None and record.get("master") and process_alive(record["master"]):
        raise MinicwError("a local master already runs from %s (pid %d, %s:%d); stop it "
                          "first, or use another run directory"
                          % (run_dir, record["master"]["pid"], record["host"], record["port"]))
    if rundir.read_record(run_dir, rundir.SLURM_RECORD) is not None:
        raise MinicwError("%s holds the record of a SLURM cluster (slurm.json); stop it "
                          "first, or use another run directory" % run_dir)
    entry, ready = _start_local_master(run_dir, port, rundir.choose_authkey(), timeout_s,
                                       tls_settings)
    host, port = launch.ready_address(ready, here=True)
    record = {"kind": "local", "hostname": socket.gethostname(), "host": host, "port": port,
              "master": entry, "workers": list((record or {}).get("workers", [])),
              "authkey_file": rundir.authkey_path(run_dir), "run_dir": run_dir,
              "next_worker": (record or {}).get("next_worker", 1)}
    if ready.get("tls_fingerprint"):
        record["tls_fingerprint"] = ready["tls_fingerprint"]
    rundir.write_record(run_dir, rundir.LOCAL_RECORD, record)
    return record


def local_stop(*, run_dir: str | None = None, master: bool = True, workers: bool = True,
               grace_s: float = config.LOCAL_STOP_GRACE_S) -> list:
    """End the recorded processes (by PID) and remove their records.

    ``master=False`` leaves the master running, ``workers=False`` the worker
    nodes.  Returns the entries of the processes it ended (empty if nothing
    was recorded).
    """
    run_dir = rundir.path(run_dir)
    record = rundir.read_record(run_dir, rundir.LOCAL_RECORD)
    if record is None:
        return []
    _require_this_host(run_dir, record)
    ended = []
    if workers:
        ended += record.get("workers", [])
        end_processes(record.get("workers", []), grace_s)
        rundir.remove_files(*_entry_files(record.get("workers", [])))
        record["workers"] = []
    if master and record.get("master"):
        ended.append(record["master"])
        end_processes([record["master"]], grace_s)
        rundir.remove_files(*_entry_files([record["master"]]))
        record["master"] = None
    if record.get("master") or record.get("workers"):
        rundir.write_record(run_dir, rundir.LOCAL_RECORD, record)
    else:
        _remove_local_record(run_dir, record)
    return ended


def recorded_master(run_dir: str | None = None) -> tuple | None:
    """(host, port) of the local master recorded in the run directory, if it runs here."""
    try:
        record = rundir.read_record(rundir.path(run_dir), rundir.LOCAL_RECORD)
    except MinicwError as exc:
        log.warning("%s", exc)
        return None
    if not record or not record.get("master"):
        return None
    if record.get("hostname") != socket.gethostname() or not process_alive(record["master"]):
        return None
    return record["host"], int(record["port"])


def recorded_fingerprint(run_dir: str | None = None) -> str | None:
    """The TLS certificate fingerprint of the local master recorded in the run
    directory, when it serves TLS."""
    try:
        record = rundir.read_record(rundir.path(run_dir), rundir.LOCAL_RECORD)
    except MinicwError:
        return None
    return (record or {}).get("tls_fingerprint")


# --- SLURM or local ------------------------------------------------------------------------

def choose_backend(choice: str | None = None) -> str:
    """"slurm" when ``sbatch`` is on the PATH, else "local" (``choice`` overrides)."""
    if choice is not None:
        if choice not in ("slurm", "local"):
            raise ValueError("backend must be 'slurm', 'local' or None, not %r" % (choice,))
        return choice
    return "slurm" if slurm.available() else "local"


def start(n: int | None = None, *, backend: str | None = None, **options) -> tuple:
    """Start a master and ``n`` workers in the background: SLURM jobs if sbatch is on
    the PATH, else processes on this machine.  Returns the master's (host, port).

    Options (both): run_dir, port, master, workers, timeout_s.  SLURM only:
    master_options, worker_options, isolated, docker_image, docker_args, job_name.
    Raises what local_start or slurm.start raise; a SLURM command that fails
    when SLURM was chosen for the caller (slurmctld down, say) says how to run
    on this machine instead.
    """
    if choose_backend(backend) == "local":
        return local_start(n, **options)
    try:
        return slurm.start(n, **options)
    except slurm.SlurmCommandError as exc:
        if backend is not None:
            raise
        raise slurm.SlurmCommandError(
            "%s -- SLURM was chosen because sbatch is on the PATH; to start the cluster on "
            "this machine instead, pass backend=\"local\" (minicw.start(n, backend=\"local\"), "
            "minicw.allocate(n, backend=\"local\")) or run scripts/local_start.py" % exc) from None


def stop(*, backend: str | None = None, **options) -> list:
    """Stop what ``start`` started; returns what was ended.  ``backend`` None: the
    one whose record is in the run directory, else the one ``start`` would choose."""
    if _recorded_backend(options.get("run_dir"), backend) == "slurm":
        return slurm.stop(**options)
    return local_stop(**options)


def _recorded_backend(run_dir: str | None, backend: str | None) -> str:
    """``backend`` if given; else the kind of cluster recorded in the run directory
    (a local cluster started on a machine with sbatch is stopped locally)."""
    if backend is None:
        run_dir = rundir.path(run_dir)
        if rundir.read_record(run_dir, rundir.LOCAL_RECORD) is not None:
            return "local"
        if rundir.read_record(run_dir, rundir.SLURM_RECORD) is not None:
            return "slurm"
    return choose_backend(backend)


@contextlib.contextmanager
def allocate(n: int | None = None, *, backend: str | None = None, **options):
    """``with minicw.allocate(n) as (host, port):`` start, run the block, stop (always)."""
    stop_options = {k: v for k, v in options.items() if k in ("run_dir", "job_name")}
    address = start(n, backend=backend, **options)
    try:
        yield address
    finally:
        stop(backend=backend, **stop_options)

