"""The writing side of a checkpoint file: one run's outcomes, committed in batches.

    clients (map's receiver thread,      Journal.add_many(outcomes)
    execute(), a ClientThread's  ------>   serialized at once (store.dump_value), queued
    completion handler)                       |
                                              v  writer thread: one SQLite transaction per
                                                 CHECKPOINT_BATCH_JOBS results, or
                                                 CHECKPOINT_BATCH_S, or CHECKPOINT_BATCH_BYTES
    Journal(path, run_meta(...))  --- lock PATH.lock, compare the file's meta with the run
    Journal.stored / stored_job   --- which jobs the file holds an outcome of (reader
    Journal.load                      connection; WAL lets it read while the writer commits)
    Journal.close                 --- commit the rest; a file with an outcome for every
                                      job gets its key index and ``complete``

Durability: every batch is one SQLite transaction, so a client killed at any
moment leaves a consistent file; what it loses is the batch not yet committed
(and the jobs still running), which a resumed run simply runs again.  One
writer at a time: ``PATH.lock`` is held (flock, or msvcrt.locking on
Windows) from open to close; a second client is refused with
CheckpointLockedError naming the holder.  The operating system releases the
lock of a killed client.  The file's format and the job key rule are in
store.py; resuming runs from it is checkpoint.py.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import sqlite3
import sys
import threading
import time
import weakref

from minicw import config, store
from minicw.errors import (CheckpointError, CheckpointLockedError, CheckpointMismatchError,
                           JobError)

log = logging.getLogger(__name__)

RESUME_CHOICES = (True, False, "force")
_KIND_NAMES = {store.KIND_MAP: "a map", store.KIND_EXECUTE: "execute()",
               store.KIND_JOBS: "a ClientThread"}
_open_journals = weakref.WeakSet()


# --- one writer at a time ------------------------------------------------------------------

class _LockFile:
    """``PATH.lock``, held by one process: flock on POSIX, msvcrt.locking on Windows."""

    _WINDOWS_BYTE = 1 << 20   # locked beyond the owner text, which others may then read

    def __init__(self, checkpoint_path: str):
        self.path = checkpoint_path + ".lock"
        self._fd = None

    def acquire(self, checkpoint_path: str) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise store.sqlite_error(checkpoint_path, "lock", exc) from None
            if not self._lock(fd):
                holder = _read_text(fd)
                os.close(fd)
                raise CheckpointLockedError(
                    "checkpoint %s is in use by another client (%s); wait for that run to "
                    "end or stop it, or give this run another file"
                    % (checkpoint_path, holder or "its lock file is %s" % self.path))
            if sys.platform == "win32" or _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file meanwhile: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, ("pid %d on %s, since %s" % (
            os.getpid(), socket.gethostname(), _now())).encode())
        self._fd = fd

    def _lock(self, fd: int) -> bool:
        try:
            if sys.platform == "win32":
                import msvcrt
                os.lseek(fd, self._WINDOWS_BYTE, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if sys.platform != "win32":
            _remove(self.path)    # while held, so no one locks a file that is going away
        os.close(fd)
        if sys.platform == "win32":
            _remove(self.path)


def _read_text(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- what a run is -------------------------------------------------------------------------

def run_meta(kind: str, function: str | None, function_key: str | None,
             environment: str | None, key_rule: str, jobs: int | None) -> dict:
    """The meta of a run (see store.py), compared with a file's when it resumes."""
    from minicw import __version__
    return {"schema": store.SCHEMA_VERSION, "kind": kind, "function": function,
            "function_key": function_key, "environment": environment, "key_rule": key_rule,
            "jobs": jobs, "python": "%d.%d.%d" % sys.version_info[:3], "minicw": __version__}


def key_rule(key_fn) -> str:
    if key_fn is None:
        return store.KEY_BY_ARGUMENTS
    return "key function %s" % (getattr(key_fn, "__qualname__", None) or repr(key_fn))


def differences(stored: dict, run: dict) -> list:
    """What differs between a file's meta and this run's, in words."""
    found = []
    if stored.get("schema") != store.SCHEMA_VERSION:
        found.append("its format is version %s and this minicw reads version %d"
                     % (stored.get("schema"), store.SCHEMA_VERSION))
        return found
    if stored.get("kind") != run["kind"]:
        found.append("it was written by %s and this is %s"
                     % (_KIND_NAMES.get(stored.get("kind"), stored.get("kind")),
                        _KIND_NAMES[run["kind"]]))
    if stored.get("environment") != run["environment"] and run["environment"]:
        found.append("the environment differs (its source's hash was %s and is now %s)"
                     % (str(stored.get("environment"))[:12], run["environment"][:12]))
    elif stored.get("function") != run["function"]:
        found.append("it was written for the function %r and this call runs %r"
                     % (stored.get("function"), run["function"]))
    elif stored.get("function_key") != run["function_key"]:
        reason = "its serialized code, defaults, globals or closure differ"
        if stored.get("python", "")[:4] != run["python"][:4]:
            reason = ("it was written by Python %s and this is Python %s, whose bytecode "
                      "differs" % (stored.get("python"), run["python"]))
        found.append("the function %r has changed since it was written (%s)"
                     % (run["function"], reason))
    if stored.get("key_rule") != run["key_rule"]:
        found.append("its jobs were keyed by %s and this call keys them by %s"
                     % (stored.get("key_rule"), run["key_rule"]))
    if None not in (stored.get("jobs"), run["jobs"]) and stored["jobs"] != run["jobs"]:
        found.append("it was written for %d jobs and this call has %d"
                     % (stored["jobs"], run["jobs"]))
    return found


# --- the journal ---------------------------------------------------------------------------

class Journal:
    """The writing side of one checkpoint file, for one run.

    ``open`` locks the file and checks it against the run; ``stored`` and
    ``stored_job`` say which jobs already have an outcome; ``add_many`` queues
    outcomes, which the writer thread commits in batches; ``close`` commits
    the rest and releases the lock.  A failure to write (a full disk) is
    raised, as a CheckpointError, by the next ``add_many``, ``flush`` or ``close``.
    """

    def __init__(self, path, run: dict, resume=True, rerun_failed: bool = True):
        if resume not in RESUME_CHOICES:
            raise ValueError("resume must be True, False or 'force', not %r" % (resume,))
        self.path = os.fspath(path)
        self.run = run
        self.force = resume == "force"
        self.rerun_failed = bool(rerun_failed)
        self.reused = 0                  # jobs whose stored outcome this run reuses
        self.unstored = 0                # outcomes that could not be serialized
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise CheckpointError("cannot open checkpoint %s: its directory %s does not exist"
                                  % (self.path, folder))
        self._lock_file = _LockFile(self.path)
        self._lock_file.acquire(self.path)
        try:
            self._reader = self._open_file(resume)
        except BaseException:
            self._lock_file.release()
            raise
        self._read_lock = threading.Lock()
        self._cond = threading.Condition()
        self._rows = []                  # serialized outcomes waiting for the writer
        self._bytes = 0                  # ... their size
        self._first_at = None            # when the oldest of them was queued
        self._meta_updates = {}
        self._failure = None             # the CheckpointError that stopped the writer
        self._closing = False
        self._writer = threading.Thread(target=self._write_loop, name="minicw-checkpoint",
                                        daemon=True)
        self._writer.start()
        _open_journals.add(self)

    # --- opening ---
    def _open_file(self, resume) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(self.path, isolation_level=None,
                                         check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            tables = store.is_checkpoint(connection)
            if not tables and connection.execute(
                    "SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None:
                connection.close()
                raise CheckpointError("%s is an SQLite file of another program (no minicw "
                                      "meta and jobs tables): give the run another file"
                                      % self.path)
            stored = store.read_meta(connection) if tables else {}
            if tables and stored and resume is False:
                connection.executescript("DROP TABLE jobs; DROP TABLE meta;")
                stored = {}
            connection.executescript(store.SCHEMA)
            if stored:
                self._check(stored)
            meta = dict(self.run)
            if stored:
                meta["created"] = stored.get("created", _now())
                if stored.get("jobs") is not None and meta["jobs"] is None:
                    meta["jobs"] = stored["jobs"]
            else:
                meta["created"] = _now()
            # A complete file keeps its key index (a resume only rewrites failed
            # jobs); in any other, the index would slow every insert: it is
            # built when the file becomes complete.
            meta["complete"] = bool(stored.get("complete"))
            connection.execute("BEGIN IMMEDIATE")
            store.write_meta(connection, meta)
            if not meta["complete"]:
                connection.execute("DROP INDEX IF EXISTS jobs_key")
            if self.run["kind"] == store.KIND_JOBS:
                connection.execute(store.JOB_ID_INDEX)
            connection.execute("COMMIT")
            self.empty = connection.execute("SELECT 1 FROM jobs LIMIT 1").fetchone() is None
            return connection
        except sqlite3.Error as exc:
            raise store.sqlite_error(self.path, "open", exc) from None

    def _check(self, stored: dict) -> None:
        found = differences(stored, self.run)
        kinds = {stored.get("kind"), self.run["kind"]}
        forcible = store.KIND_JOBS not in kinds or len(kinds) == 1
        if not found or (self.force and forcible
                         and stored.get("schema") == store.SCHEMA_VERSION):
            if found:
                log.warning("checkpoint %s: resuming anyway (resume='force'): %s",
                            self.path, "; ".join(found))
            return
        advice = ("pass resume='force' to use its results anyway, or resume=False to "
                  "start it over" if forcible else "resume=False starts it over")
        raise CheckpointMismatchError("checkpoint %s does not match this run: %s; %s (or "
                                      "give this run another file)"
                                      % (self.path, "; ".join(found), advice))

    # --- what is stored ---
    def stored(self, first: int, keys: list) -> list:
        """For the jobs at positions ``first``.. with ``keys``: True where the file
        holds an outcome this run reuses (a result, or a failure when not
        ``rerun_failed``).  CheckpointMismatchError when a stored job's key
        differs (unless resume='force': that job runs again)."""
        flags = [False] * len(keys)
        if self.empty:
            return flags
        rows = self._read("SELECT idx, key, ok FROM jobs WHERE idx >= ? AND idx < ?",
                          (first, first + len(keys)))
        for index, key, ok in rows:
            offset = index - first
            if key != keys[offset]:
                if self.force:
                    continue
                raise CheckpointMismatchError(
                    "checkpoint %s does not match this run: the arguments of job %d differ "
                    "from those it stored (key %s, now %s): the argument list changed, or "
                    "its arguments do not serialize the same way twice (then pass key=, a "
                    "function of the arguments); resume='force' runs such jobs again"
                    % (self.path, index, store.format_key(key), store.format_key(keys[offset])))
            flags[offset] = bool(ok) or not self.rerun_failed
        self.reused += sum(flags)
        return flags

    def load(self, first: int, count: int):
        """``(ok, value)`` of the stored jobs at positions ``first``..``first+count``."""
        for start in range(first, first + count, config.CHECKPOINT_LOOKUP_JOBS):
            end = min(first + count, start + config.CHECKPOINT_LOOKUP_JOBS)
            rows = self._read("SELECT ok, value FROM jobs WHERE idx >= ? AND idx < ? "
                              "ORDER BY idx", (start, end))
            if len(rows) != end - start:
                raise CheckpointError("checkpoint %s lost jobs %d..%d while this run read it "
                                      "(was it written by another program meanwhile?)"
                                      % (self.path, start, end - 1))
            for ok, value in rows:
                yield bool(ok), store.load(value)

    def stored_job(self, job_id, key: int):
        """A ClientThread's job: ``(ok, value)`` when the file holds an outcome this
        run reuses, else None."""
        if self.empty:
            return None
        rows = self._read("SELECT key, ok, value FROM jobs WHERE job_id = ?",
                          (store.dump_job_id(job_id),))
        if not rows:
            return None
        stored_key, ok, value = rows[0]
        if stored_key != key:
            if self.force:
                return None
            raise CheckpointMismatchError(
                "checkpoint %s does not match this run: job id %r was stored for another "
                "call (another function or other arguments); resume='force' runs such jobs "
                "again" % (self.path, job_id))
        if not ok and self.rerun_failed:
            return None
        self.reused += 1
        return bool(ok), store.load(value)

    def _read(self, sql: str, params) -> list:
        try:
            with self._read_lock:
                return self._reader.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise store.sqlite_error(self.path, "read", exc) from None

    # --- writing ---
    def add_many(self, entries) -> None:
        """Queue outcomes ``(index, key, job_id, ok, value)`` (index None: a
        ClientThread's job, ``value`` the exception when not ok)."""
        rows = []
        size = 0
        for index, key, job_id, ok, value in entries:
            row = self._row(index, key, job_id, ok, value)
            if row is not None:
                rows.append(row)
                size += len(row[4])
        with self._cond:
            self._raise_failure()
            if self._closing:
                return    # results of a stream closed meanwhile: the run has ended
            if not self._rows:
                self._first_at = time.monotonic()
                self._cond.notify_all()
            self._rows.extend(rows)
            self._bytes += size
            if (len(self._rows) >= config.CHECKPOINT_BATCH_JOBS
                    or self._bytes >= config.CHECKPOINT_BATCH_BYTES):
                self._cond.notify_all()
            while self._bytes > config.CHECKPOINT_BACKLOG_BYTES and self._failure is None:
                self._cond.wait()  # the disk is slower than the results: hold them up

    def _row(self, index, key, job_id, ok, value):
        job_id_blob = None if job_id is None else store.dump_job_id(job_id)
        if ok:
            try:
                return (index, key, job_id_blob, 1, store.dump_value(value), None)
            except Exception as exc:
                self.unstored += 1
                if self.unstored == 1:
                    log.warning("checkpoint %s: a result cannot be stored (%s); such jobs "
                                "run again when the run is resumed", self.path, exc)
                return None
        try:
            blob = store.dump_value(value)
        except Exception:
            blob = store.dump_value(JobError(store.error_text(value)))
        return (index, key, job_id_blob, 0, blob, store.error_text(value))

    def set_meta(self, **items) -> None:
        with self._cond:
            self._meta_updates.update(items)
            self._cond.notify_all()

    def flush(self) -> None:
        """Wait until everything queued is committed."""
        with self._cond:
            self._cond.notify_all()
            while (self._rows or self._meta_updates) and self._failure is None:
                self._cond.wait()
            self._raise_failure()

    def close(self) -> None:
        """Commit what is queued, then release the file.  Safe to call twice."""
        with self._cond:
            already, self._closing = self._closing, True
            self._cond.notify_all()
        if not already:
            self._writer.join()
            with self._read_lock:
                self._reader.close()
            self._lock_file.release()
            _open_journals.discard(self)
        with self._cond:
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _write_loop(self) -> None:
        connection = None
        try:
            connection = sqlite3.connect(self.path, isolation_level=None)
            connection.execute("PRAGMA synchronous=NORMAL")  # WAL: safe against a crash
            while True:
                rows, meta, closing = self._next_batch()
                if rows or meta:
                    self._commit(connection, rows, meta)
                    with self._cond:
                        self._bytes -= sum(len(row[4]) for row in rows)
                        self._cond.notify_all()
                if closing:
                    self._finish(connection)
                    return
        except (sqlite3.Error, OSError) as exc:
            with self._cond:
                self._failure = store.sqlite_error(self.path, "write", exc)
                self._rows = []
                self._meta_updates = {}
                self._bytes = 0
                self._cond.notify_all()
            log.error("%s", self._failure)
        finally:
            if connection is not None:
                connection.close()

    def _next_batch(self) -> tuple:
        """Wait for a batch: enough rows, old enough rows, meta, or closing."""
        with self._cond:
            while True:
                if self._closing or self._meta_updates or (
                        len(self._rows) >= config.CHECKPOINT_BATCH_JOBS
                        or self._bytes >= config.CHECKPOINT_BATCH_BYTES):
                    break
                if self._rows:
                    wait = self._first_at + config.CHECKPOINT_BATCH_S - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            rows, self._rows = self._rows, []
            meta, self._meta_updates = self._meta_updates, {}
            return rows, meta, self._closing

    @staticmethod
    def _commit(connection: sqlite3.Connection, rows: list, meta: dict) -> None:
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany("INSERT OR REPLACE INTO jobs (idx, key, job_id, ok, value, "
                                   "error) VALUES (?, ?, ?, ?, ?, ?)", rows)
            if meta:
                store.write_meta(connection, meta)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    @staticmethod
    def _finish(connection: sqlite3.Connection) -> None:
        """A file with an outcome for every job of its run is complete: it gets its
        key index (store.get) and says so in meta."""
        meta = store.read_meta(connection)
        jobs = meta.get("jobs")
        if jobs is None or meta.get("kind") == store.KIND_JOBS:
            return
        [(stored,)] = connection.execute("SELECT COUNT(*) FROM jobs WHERE idx < ?", (jobs,))
        if stored == jobs:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(store.KEY_INDEX)
            store.write_meta(connection, {"complete": True})
            connection.execute("COMMIT")


def _close_all_at_exit() -> None:
    """A program that ends with a map unfinished still commits what arrived."""
    for journal in list(_open_journals):
        try:
            journal.close()
        except Exception:
            pass


atexit.register(_close_all_at_exit)
