"""Long-lived clusters in the background: ``minicw.start``, ``stop``, ``allocate``.

    minicw.start(n) / stop() / allocate(n)
        |
        +-- sbatch on PATH --> minicw.slurm: a master job and a worker job (sbatch)
        +-- otherwise -------> the local launcher below (this machine)

    local_start(n)                                     run directory: --run-dir, else
      key: $MINICW_AUTHKEY, else a new random one      $MINICW_RUN_DIR, else ~/.minicw/run
        written with os.open(..., 0o600)  ---------->    authkey       the key, mode 600
      python -m minicw.master --host 127.0.0.1           master.json   host, port, and per
          --port P --authkey-file RUN/authkey                          process: pid, start
      python -m minicw.worker 127.0.0.1 P - -n N                       time, log, pid file
          (key in $MINICW_AUTHKEY, never in argv)        master.pid, worker-1.pid, ...
      each in a new session, stdin from /dev/null,       master.log, worker-1.log, ...
      stdout and stderr to its log; start waits for
      "listening on" / "joined" in the logs

    local_stop()    reads master.json; SIGTERM to each recorded PID (workers first,
                    so they finish the jobs they hold), SIGKILL to the process
                    group it leads after a grace period; removes the records.
                    Never by process name: a PID whose start time differs from
                    the recorded one is another process and is left alone.

    clients         discover.py asks recorded_master() and read_authkey()

One cluster per run directory: starting a second master there is refused
while the first still runs (a record whose processes are all gone is stale
and is replaced).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

from minicw import config
from minicw.errors import MinicwError

log = logging.getLogger(__name__)

ENV_RUN_DIR = "MINICW_RUN_DIR"
DEFAULT_RUN_DIR = os.path.join("~", ".minicw", "run")
AUTHKEY_FILE = "authkey"
LOCAL_RECORD = "master.json"
SLURM_RECORD = "slurm.json"       # written by minicw.slurm; one cluster per run directory
READY_TIMEOUT_S = 60.0     # a master must listen, a worker node join, within this
STOP_GRACE_S = 10.0        # SIGTERM, then SIGKILL to the process group after this
GROUP_LINGER_S = 2.0       # a group's other members may outlive its leader this long
POLL_S = 0.05
LOG_TAIL_LINES = 8

MASTER_READY = re.compile(r"listening on (\S+):(\d+)")
WORKER_READY = re.compile(r"joined ")

# Popen objects of processes this interpreter started, so that stop() can reap them.
_children: dict = {}


# --- the run directory and the key file -------------------------------------------------

def run_dir_path(run_dir: str | None = None) -> str:
    """The run directory: ``run_dir``, else $MINICW_RUN_DIR, else ~/.minicw/run."""
    path = run_dir or os.environ.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR
    return os.path.abspath(os.path.expanduser(path))


def ensure_run_dir(run_dir: str | None = None) -> str:
    """Create the run directory (mode 700) if needed; returns its absolute path."""
    path = run_dir_path(run_dir)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise MinicwError("cannot create the run directory %s: %s" % (path, exc.strerror)) from None
    return path


def authkey_path(run_dir: str | None = None) -> str:
    return os.path.join(run_dir_path(run_dir), AUTHKEY_FILE)


def choose_authkey() -> str:
    """$MINICW_AUTHKEY if set (so clients that read it agree), else a new random key."""
    return os.environ.get(config.ENV_AUTHKEY) or secrets.token_urlsafe(
        config.GENERATED_AUTHKEY_BYTES)


def write_authkey(run_dir: str, key: str) -> str:
    """Write the key file with mode 600 from the start (never readable by others)."""
    path = authkey_path(run_dir)
    temporary = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # in case the file system ignored the mode
        os.write(fd, key.encode("utf-8") + b"\n")
    finally:
        os.close(fd)
    os.replace(temporary, path)
    return path


def read_authkey(run_dir: str | None = None) -> bytes | None:
    """The key in the run directory's key file, None if there is none.

    Raises MinicwError if group or others may read the file: a key that
    leaked is no key.
    """
    path = authkey_path(run_dir)
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as handle:
            key = handle.read().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MinicwError("cannot read the key file %s: %s" % (path, exc.strerror)) from None
    if os.name == "posix" and mode & 0o077:
        raise MinicwError("the key file %s is readable by group or others (mode %03o); "
                          "run chmod 600 %s, or start the cluster again"
                          % (path, mode & 0o777, path))
    if not key:
        raise MinicwError("the key file %s is empty" % path)
    return key


# --- JSON records -------------------------------------------------------------------

def read_record(run_dir: str, name: str) -> dict | None:
    """A JSON record of the run directory, None if absent."""
    path = os.path.join(run_dir, name)
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise MinicwError("cannot read %s: %s; remove it if no cluster runs" % (path, exc)) from None


def write_record(run_dir: str, name: str, record: dict) -> str:
    """Write a JSON record atomically (a reader never sees half of it)."""
    path = os.path.join(run_dir, name)
    temporary = "%s.%d.tmp" % (path, os.getpid())
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, path)
    return path


def remove_files(*paths) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# --- processes, by PID ----------------------------------------------------------------

def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (Linux), to tell it from a later reuse of the PID."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def process_alive(entry: dict) -> bool:
    """Whether the process of a record entry ({"pid", "start_time"}) still runs."""
    pid = entry["pid"]
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: the PID was reused
    except OSError:
        return False
    if _is_zombie(pid):
        return False
    recorded = entry.get("start_time")
    return recorded is None or process_start_time(pid) in (None, recorded)


def _group_alive(pgid: int) -> bool:
    if not hasattr(os, "killpg"):
        return False
    try:
        os.killpg(pgid, 0)
    except OSError:
        return False
    return True


def _signal(entry: dict, sig, group: bool = False) -> None:
    with contextlib.suppress(OSError):
        if group and hasattr(os, "killpg"):
            os.killpg(entry["pid"], sig)
        else:
            os.kill(entry["pid"], sig)


def _reap(entry: dict) -> None:
    child = _children.pop(entry["pid"], None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(GROUP_LINGER_S)


def end_processes(entries: list, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each recorded process, wait, then SIGKILL the process group it leads.

    Each entry was started in a new session, so its PID is also the ID of a
    process group holding its children (a worker node's processes); members
    still alive after the leader ended are killed too.
    """
    running = [entry for entry in entries if process_alive(entry)]
    for entry in running:
        _signal(entry, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for entry in running:
        while process_alive(entry) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if process_alive(entry):
            log.warning("pid %d did not end within %gs of SIGTERM; killing its group",
                        entry["pid"], grace_s)
            _signal(entry, getattr(signal, "SIGKILL", signal.SIGTERM), group=True)
        _reap(entry)
        _end_group_members(entry)


def _end_group_members(entry: dict) -> None:
    pgid = entry["pid"]
    if not entry.get("session") or process_alive(entry):
        return
    deadline = time.monotonic() + GROUP_LINGER_S
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if _group_alive(pgid):
        log.warning("processes of group %d outlived their leader; killing them", pgid)
        _signal(entry, signal.SIGKILL, group=True)


def spawn_detached(argv: list, log_path: str, env: dict) -> dict:
    """Start ``argv`` in a new session with its output in ``log_path``; its record entry."""
    kwargs = {}
    if os.name == "posix":
        kwargs["start_new_session"] = True
    else:
        kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
    with open(log_path, "ab") as log_file:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                 stderr=subprocess.STDOUT, env=env, close_fds=True, **kwargs)
    _children[popen.pid] = popen
    return {"pid": popen.pid, "start_time": process_start_time(popen.pid), "log": log_path,
            "session": os.name == "posix", "argv": argv[1:]}


def tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, for error messages."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            text = handle.read().strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def wait_for_log(entry: dict, pattern, what: str, timeout_s: float):
    """The first match of ``pattern`` in the entry's log; MinicwError if it ends or stalls."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(entry["log"], "r", encoding="utf-8", errors="replace") as handle:
                match = pattern.search(handle.read())
        except OSError:
            match = None
        if match:
            return match
        if not process_alive(entry):
            raise MinicwError("the %s (pid %d) exited before it was ready; the end of %s: %s"
                              % (what, entry["pid"], entry["log"], tail(entry["log"])))
        if time.monotonic() > deadline:
            raise MinicwError("the %s (pid %d) was not ready within %gs; see %s: %s"
                              % (what, entry["pid"], timeout_s, entry["log"], tail(entry["log"])))
        time.sleep(POLL_S)


def child_env(key: str) -> dict:
    """The environment of a launched process: the key, and this minicw importable."""
    env = dict(os.environ)
    env[config.ENV_AUTHKEY] = key
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


# --- the local launcher ---------------------------------------------------------------------

def _record_entries(record: dict) -> list:
    return ([record["master"]] if record.get("master") else []) + list(record.get("workers", []))


def _live_local_record(run_dir: str) -> dict | None:
    """The local record if one of its processes runs; a stale record is removed."""
    record = read_record(run_dir, LOCAL_RECORD)
    if record is None:
        return None
    _require_this_host(run_dir, record)
    if any(process_alive(entry) for entry in _record_entries(record)):
        return record
    log.info("removing the stale record %s", os.path.join(run_dir, LOCAL_RECORD))
    _remove_local_record(run_dir, record)
    return None


def _require_this_host(run_dir: str, record: dict) -> None:
    """A run directory in a shared home may hold another machine's record: hands off."""
    if record.get("hostname") != socket.gethostname():
        raise MinicwError("%s records a local cluster of host %s, not of this host (%s); "
                          "stop it there, or use another run directory (remove %s if that "
                          "host is gone)" % (run_dir, record.get("hostname"),
                                             socket.gethostname(),
                                             os.path.join(run_dir, LOCAL_RECORD)))


def _remove_local_record(run_dir: str, record: dict) -> None:
    remove_files(*[entry["pid_file"] for entry in _record_entries(record) if "pid_file" in entry])
    remove_files(os.path.join(run_dir, LOCAL_RECORD))
    if read_record(run_dir, SLURM_RECORD) is None:  # a SLURM cluster there uses the same key
        remove_files(authkey_path(run_dir))


def _write_pid_file(run_dir: str, name: str, entry: dict) -> None:
    entry["pid_file"] = os.path.join(run_dir, name + ".pid")
    with open(entry["pid_file"], "w") as handle:
        handle.write("%d\n" % entry["pid"])


def _start_local_master(run_dir: str, port: int, key: str, timeout_s: float) -> dict:
    key_file = write_authkey(run_dir, key)
    argv = [sys.executable, "-m", "minicw.master", "--host", "127.0.0.1", "--port", str(port),
            "--authkey-file", key_file, "--log-level", "warning"]
    entry = spawn_detached(argv, os.path.join(run_dir, "master.log"), child_env(key))
    _write_pid_file(run_dir, "master", entry)
    try:
        match = wait_for_log(entry, MASTER_READY, "master", timeout_s)
    except MinicwError:
        end_processes([entry], grace_s=1.0)
        remove_files(entry["pid_file"], key_file)
        raise
    entry["host"], entry["port"] = match.group(1), int(match.group(2))
    return entry


def _start_local_workers(run_dir: str, record: dict, n: int, key: str, timeout_s: float) -> dict:
    index = record.get("next_worker", 1)
    record["next_worker"] = index + 1
    name = "worker-%d" % index
    argv = [sys.executable, "-m", "minicw.worker", record["host"], str(record["port"]), "-",
            "-n", str(n)]
    if n > (os.cpu_count() or 1):
        argv.append("--oversubscribe")  # the caller asked for this many on purpose
    entry = spawn_detached(argv, os.path.join(run_dir, name + ".log"), child_env(key))
    entry["nprocs"] = n
    _write_pid_file(run_dir, name, entry)
    try:
        wait_for_log(entry, WORKER_READY, "worker node", timeout_s)
    except MinicwError:
        end_processes([entry], grace_s=1.0)
        remove_files(entry["pid_file"])
        raise
    return entry


def local_start(n: int | None = None, *, run_dir: str | None = None, port: int = 0,
                master: bool = True, workers: bool = True,
                timeout_s: float = READY_TIMEOUT_S) -> tuple:
    """Start a master and a worker node of ``n`` processes on this machine, in the background.

    ``master=False`` adds workers to the recorded master; ``workers=False``
    starts only the master.  ``port`` 0 picks a free port.  Returns the
    master's (host, port); everything is recorded in the run directory.
    Raises MinicwError when the run directory already holds a running master,
    when there is no master to join, or when a process fails to come up (its
    log is quoted).
    """
    n = (os.cpu_count() or 1) if n is None else int(n)
    if n < 1:
        raise MinicwError("the number of worker processes must be at least 1, not %d" % n)
    run_dir = ensure_run_dir(run_dir)
    record = _live_local_record(run_dir)
    if master:
        record = _new_local_master(run_dir, record, port, timeout_s)
    elif record is None or not record.get("master") or not process_alive(record["master"]):
        raise MinicwError("no running local master is recorded in %s; start one first "
                          "(without -M / master=False)" % run_dir)
    if workers:
        key = read_authkey(run_dir)
        if key is None:
            raise MinicwError("the key file %s is missing; stop the cluster and start it "
                              "again" % authkey_path(run_dir))
        try:
            entry = _start_local_workers(run_dir, record, n, key.decode("utf-8"), timeout_s)
        except MinicwError:
            if master:
                local_stop(run_dir=run_dir, grace_s=1.0)
            raise
        record["workers"].append(entry)
        write_record(run_dir, LOCAL_RECORD, record)
    return record["host"], record["port"]


def _new_local_master(run_dir: str, record: dict | None, port: int, timeout_s: float) -> dict:
    if record is not None and record.get("master") and process_alive(record["master"]):
        raise MinicwError("a local master already runs from %s (pid %d, %s:%d); stop it "
                          "first, or use another run directory"
                          % (run_dir, record["master"]["pid"], record["host"], record["port"]))
    if read_record(run_dir, SLURM_RECORD) is not None:
        raise MinicwError("%s holds the record of a SLURM cluster (slurm.json); stop it "
                          "first, or use another run directory" % run_dir)
    entry = _start_local_master(run_dir, port, choose_authkey(), timeout_s)
    record = {"kind": "local", "hostname": socket.gethostname(), "host": entry.pop("host"),
              "port": entry.pop("port"), "master": entry,
              "workers": list((record or {}).get("workers", [])),
              "authkey_file": authkey_path(run_dir), "run_dir": run_dir,
              "next_worker": (record or {}).get("next_worker", 1)}
    write_record(run_dir, LOCAL_RECORD, record)
    return record


def local_stop(*, run_dir: str | None = None, master: bool = True, workers: bool = True,
               grace_s: float = STOP_GRACE_S) -> list:
    """End the recorded processes (by PID) and remove their records.

    ``master=False`` leaves the master running, ``workers=False`` the worker
    nodes.  Returns the entries of the processes it ended (empty if nothing
    was recorded).
    """
    run_dir = run_dir_path(run_dir)
    record = read_record(run_dir, LOCAL_RECORD)
    if record is None:
        return []
    _require_this_host(run_dir, record)
    ended = []
    if workers:
        ended += record.get("workers", [])
        end_processes(record.get("workers", []), grace_s)
        remove_files(*[entry["pid_file"] for entry in record.get("workers", [])])
        record["workers"] = []
    if master and record.get("master"):
        ended.append(record["master"])
        end_processes([record["master"]], grace_s)
        remove_files(record["master"]["pid_file"])
        record["master"] = None
    if record.get("master") or record.get("workers"):
        write_record(run_dir, LOCAL_RECORD, record)
    else:
        _remove_local_record(run_dir, record)
    return ended


@contextlib.contextmanager
def local_allocate(n: int | None = None, **options):
    """``with local_allocate(n) as (host, port):`` a local cluster for the block."""
    stop_options = {k: v for k, v in options.items() if k == "run_dir"}
    address = local_start(n, **options)
    try:
        yield address
    finally:
        local_stop(**stop_options)


def recorded_master(run_dir: str | None = None) -> tuple | None:
    """(host, port) of the local master recorded in the run directory, if it runs here."""
    try:
        record = read_record(run_dir_path(run_dir), LOCAL_RECORD)
    except MinicwError as exc:
        log.warning("%s", exc)
        return None
    if not record or not record.get("master"):
        return None
    if record.get("hostname") != socket.gethostname() or not process_alive(record["master"]):
        return None
    return record["host"], int(record["port"])


# --- SLURM or local ------------------------------------------------------------------------

def choose_backend(choice: str | None = None) -> str:
    """"slurm" when ``sbatch`` is on the PATH, else "local" (``choice`` overrides)."""
    if choice is not None:
        if choice not in ("slurm", "local"):
            raise ValueError("backend must be 'slurm', 'local' or None, not %r" % (choice,))
        return choice
    return "slurm" if shutil.which("sbatch") else "local"


def start(n: int | None = None, *, backend: str | None = None, **options) -> tuple:
    """Start a master and ``n`` workers in the background: SLURM jobs if sbatch is on
    the PATH, else processes on this machine.  Returns the master's (host, port).

    Options (both): run_dir, port, master, workers, timeout_s.  SLURM only:
    master_options, worker_options, isolated, docker_image, docker_args, job_name.
    """
    if choose_backend(backend) == "slurm":
        from minicw import slurm
        return slurm.start(n, **options)
    return local_start(n, **options)


def stop(*, backend: str | None = None, **options) -> list:
    """Stop what ``start`` started (same backend choice); returns what was ended."""
    if choose_backend(backend) == "slurm":
        from minicw import slurm
        return slurm.stop(**options)
    return local_stop(**options)


@contextlib.contextmanager
def allocate(n: int | None = None, *, backend: str | None = None, **options):
    """``with minicw.allocate(n) as (host, port):`` start, run the block, stop (always)."""
    stop_options = {k: v for k, v in options.items() if k in ("run_dir", "job_name")}
    address = start(n, backend=backend, **options)
    try:
        yield address
    finally:
        stop(backend=backend, **stop_options)

