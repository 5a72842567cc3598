"""The run directory: where the launchers record what they started.

    --run-dir DIR  >  $MINICW_RUN_DIR  >  ~/.minicw/run          path()
        |
        +-- authkey              the key, mode 600 from creation   write_authkey()
        |                        (refused if group or others may   read_authkey()
        |                        read it)                          read_key_file()
        +-- master.json          local launcher (launcher.py)      write_record()
        +-- slurm.json           SLURM launcher (slurm.py)         read_record()
        +-- master-address.json  the SLURM master job's ready file (launch.py format)
        +-- master.ready, worker-N.ready, *.pid, *.log: the local launcher's processes

    writers                                 readers
    -------                                 -------
    launcher.local_start, slurm.start  -->  discover (clients given no host or key),
    master.py, worker.py (their ready       launcher.local_stop, slurm.stop,
    file, through launch.py)                scripts/*_start.py

Every JSON file is written to a temporary name and renamed, so a reader
(another process, maybe on another node of a shared file system) never sees
half of one.  The key file is the only secret: it is created with mode 600
and read only if it is still private.  One cluster per run directory; the
launchers decide what that means, this module only keeps the files.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import secrets
import subprocess

from minicw import config
from minicw.errors import MinicwError

log = logging.getLogger(__name__)

AUTHKEY_FILE = "authkey"
LOCAL_RECORD = "master.json"      # written by minicw.launcher
SLURM_RECORD = "slurm.json"       # written by minicw.slurm
LOG_TAIL_LINES = 8                # lines of a log quoted in an error message


# --- where ---------------------------------------------------------------------------

def path(run_dir: str | None = None) -> str:
    """The run directory: ``run_dir``, else $MINICW_RUN_DIR, else ~/.minicw/run."""
    chosen = run_dir or os.environ.get(config.ENV_RUN_DIR) or config.DEFAULT_RUN_DIR
    return os.path.abspath(os.path.expanduser(chosen))


def ensure(run_dir: str | None = None) -> str:
    """Create the run directory (mode 700) if needed; returns its absolute path.

    Others must not write there (they could replace a record or a key file):
    a directory of ours that group or others may write is made 700 again; one
    of another user's that they may write is refused.
    """
    where = path(run_dir)
    try:
        os.makedirs(where, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise MinicwError("cannot create the run directory %s: %s"
                          % (where, exc.strerror)) from None
    if os.name == "posix":
        _keep_private(where)
    return where


def _keep_private(where: str) -> None:
    status = os.stat(where)
    if not status.st_mode & 0o022:
        return
    if status.st_uid != os.getuid():
        raise MinicwError("the run directory %s belongs to another user and others may write "
                          "in it; use a directory of your own (--run-dir or $%s)"
                          % (where, config.ENV_RUN_DIR))
    log.warning("the run directory %s was writable by others (mode %o); made it 700",
                where, status.st_mode & 0o777)
    os.chmod(where, 0o700)


def open_private(file_path: str, mode: str = "w", **options):
    """``open(file_path, mode)`` for a file only its owner may read or write,
    whatever the umask (records, logs, pid files)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(file_path, flags, 0o600)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, 0o600)   # an existing file keeps its mode through os.open
    return os.fdopen(fd, mode, **options)


# --- the key ---------------------------------------------------------------------------

def authkey_path(run_dir: str | None = None) -> str:
    return os.path.join(path(run_dir), AUTHKEY_FILE)


def new_authkey() -> str:
    """A new random key, printable (it goes into files and environment variables)."""
    return secrets.token_urlsafe(config.GENERATED_AUTHKEY_BYTES)


def choose_authkey() -> str:
    """$MINICW_AUTHKEY if set (so clients that read it agree), else a new random key."""
    return os.environ.get(config.ENV_AUTHKEY) or new_authkey()


def write_authkey(run_dir: str, key: str) -> str:
    """Write the key file with mode 600 from the start (never readable by others)."""
    key_file = authkey_path(run_dir)
    temporary = _temporary_name(key_file)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # in case the file system ignored the mode
        if WINDOWS:
            _restrict_to_owner(temporary)  # before the key is in it
        os.write(fd, key.encode("utf-8") + b"\n")
    finally:
        os.close(fd)
    os.replace(temporary, key_file)
    return key_file


def read_key_file(key_file: str, missing_ok: bool = False) -> bytes | None:
    """The key in ``key_file`` (None if it is absent and ``missing_ok``).

    The one key reader: the run directory's key file, and ``--authkey-file``.
    Raises MinicwError if the file cannot be read, is empty, or group or
    others may read it (on POSIX): a key that leaked is no key.
    """
    try:
        mode = os.stat(key_file).st_mode
        with open(key_file, "rb") as handle:
            key = handle.read().strip()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise MinicwError("no key file %s" % key_file) from None
    except OSError as exc:
        raise MinicwError("cannot read the key file %s: %s" % (key_file, exc.strerror)) from None
    if os.name == "posix" and mode & 0o077:
        raise MinicwError("the key file %s is readable by group or others (mode %03o); "
                          "run chmod 600 %s, or start the cluster again"
                          % (key_file, mode & 0o777, key_file))
    others = _windows_readers(key_file) if WINDOWS else None
    if others:
        raise MinicwError("the key file %s is readable by %s; run icacls \"%s\" "
                          "/inheritance:r /grant:r %%USERNAME%%:F, or start the cluster again"
                          % (key_file, others, key_file))
    if not key:
        raise MinicwError("the key file %s is empty" % key_file)
    return key


def read_authkey(run_dir: str | None = None) -> bytes | None:
    """The key in the run directory's key file, None if there is none (see read_key_file)."""
    return read_key_file(authkey_path(run_dir), missing_ok=True)


# --- Windows: the key file's access list (mode bits mean nothing there) ---------------------

WINDOWS = os.name == "nt"
# Principals that stand for other people: a key file readable by one is no secret.
WIDE_PRINCIPALS = ("Everyone", "BUILTIN\\Users", "NT AUTHORITY\\Authenticated Users",
                   "BUILTIN\\Guests")


def _icacls(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["icacls"] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=config.SLURM_COMMAND_TIMEOUT_S)


def _restrict_to_owner(file_path: str) -> None:
    """Give the file an access list of its own (not inherited) granting only this user."""
    user = os.environ.get("USERNAME") or getpass.getuser()
    try:
        done = _icacls(file_path, "/inheritance:r", "/grant:r", "%s:F" % user)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MinicwError("cannot make the key file %s private: icacls failed (%s)"
                          % (file_path, exc)) from None
    if done.returncode != 0:
        raise MinicwError("cannot make the key file %s private: icacls said: %s"
                          % (file_path, done.stdout.strip()))


def _windows_readers(file_path: str) -> str | None:
    """The first principal in the file's access list that stands for other people
    (``icacls FILE``), or None (also when icacls cannot say)."""
    try:
        done = _icacls(file_path)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    for line in done.stdout.splitlines():
        for principal in WIDE_PRINCIPALS:
            if principal + ":" in line:
                return principal
    return None


# --- JSON records --------------------------------------------------------------------------

def write_json(file_path: str, record: dict) -> str:
    """Write ``record`` to ``file_path`` atomically (a reader never sees half of it)."""
    temporary = _temporary_name(file_path)
    with open_private(temporary, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, file_path)
    return file_path


def read_json(file_path: str) -> dict | None:
    """The record in ``file_path``, None if absent; MinicwError if it cannot be read."""
    try:
        with open(file_path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise MinicwError("cannot read %s: %s; remove it if no cluster runs"
                          % (file_path, exc)) from None


def write_record(run_dir: str, name: str, record: dict) -> str:
    """Write the JSON record ``name`` of the run directory atomically; its path."""
    return write_json(os.path.join(run_dir, name), record)


def read_record(run_dir: str, name: str) -> dict | None:
    """The JSON record ``name`` of the run directory, None if absent."""
    return read_json(os.path.join(run_dir, name))


def _temporary_name(file_path: str) -> str:
    # Unique per process: two writers never share a temporary file.
    return "%s.%d.tmp" % (file_path, os.getpid())


# --- files ---------------------------------------------------------------------------------

def remove_files(*paths: str) -> None:
    """Remove each file; one already gone is fine."""
    for file_path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(file_path)


def tail(log_path: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file on one line, for error messages."""
    try:
        with open(log_path, "r", encoding="utf-8", errors="replace") as handle:
            text = handle.read().strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
