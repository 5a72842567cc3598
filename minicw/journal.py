"""The writing side of a checkpoint file: one run's outcomes, committed in batches.

    clients (map's receiver thread,      Journal.add_outcomes(runs of outcomes), add_job
    execute(), a ClientThread's  ------>   serialized at once (store.dump_value), queued
    completion handler)                       |
                                              v  writer thread: one SQLite transaction per
                                                 CHECKPOINT_BATCH_JOBS results, or
                                                 CHECKPOINT_BATCH_S, or CHECKPOINT_BATCH_BYTES
    Journal(path, run_meta(...))  --- lock PATH.lock, compare the file's meta with the run
    Journal.stored / stored_job   --- which jobs the file holds an outcome of (reader
    Journal.load                      connection; WAL lets it read while the writer commits)
    Journal.close                 --- commit the rest; a file with an outcome for every
                                      job of its run is marked ``complete``

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
from collections import deque

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
        os.lseek(fd, 0, os.SEEK_SET)   # (the Windows lock moved the position)
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

    @classmethod
    def holder(cls, checkpoint_path: str) -> str | None:
        """Who holds the lock of ``checkpoint_path`` now ("pid N on HOST, since T"),
        or None when no run is writing it."""
        lock = cls(checkpoint_path)
        try:
            fd = os.open(lock.path, os.O_RDWR)
        except OSError:
            return None     # no lock file: nobody
        try:
            if not lock._lock(fd):
                return _read_text(fd) or "a process that left no name"
            lock._unlock(fd)
            return None     # a lock file left by a killed run: nobody holds it
        finally:
            os.close(fd)

    def _unlock(self, fd: int) -> None:
        if sys.platform == "win32":
            import msvcrt
            os.lseek(fd, self._WINDOWS_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        else:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_UN)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if sys.platform != "win32":
            _remove(self.path)    # while held, so no one locks a file that is going away
        os.close(fd)
        if sys.platform == "win32":
            _remove(self.path)


def writer_of(checkpoint_path) -> str | None:
    """Who is journaling to ``checkpoint_path`` now, or None."""
    return _LockFile.holder(os.fspath(checkpoint_path))


def _read_text(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode("utf-8", "replace").strip("\0 \n")
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

    Opening it locks the file and checks it against the run; ``stored`` and
    ``stored_job`` say which jobs already have an outcome, ``load`` reads
    them back; ``add_outcomes`` (map, execute) and ``add_job`` (ClientThread)
    queue outcomes, which the writer thread commits in batches; ``close``
    commits the rest and releases the lock.  A failure to write (a full
    disk) is raised, as a CheckpointError, by the next add, ``flush`` or ``close``.
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
        if os.path.isdir(self.path):
            raise CheckpointError("cannot use %s as a checkpoint: it is a directory; name a "
                                  "file, such as %s" % (self.path,
                                                        os.path.join(self.path, "run.sqlite")))
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
        self._ops = []                   # writes waiting for the writer: (op, *row)
        self._jobs_waiting = 0           # ... the outcomes in them
        self._bytes = 0                  # ... and their size
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
                raise CheckpointError("%s is an SQLite file of another program (not the "
                                      "tables of a minicw checkpoint): give the run another "
                                      "file" % self.path)
            stored = store.read_meta(connection) if tables else {}
            if tables and resume is False:
                connection.executescript("".join("DROP TABLE %s;" % table
                                                 for table in store.TABLES))
                stored = {}
            connection.executescript(store.SCHEMA)
            found = self._check(stored) if stored else []
            meta = dict(self.run)
            meta["created"] = stored.get("created", _now())
            if stored.get("jobs") is not None and meta["jobs"] is None:
                meta["jobs"] = stored["jobs"]
            meta["complete"] = bool(stored.get("complete"))
            meta["forced"] = stored.get("forced", [])
            connection.execute("BEGIN IMMEDIATE")
            if found:   # resume="force": say so in the file, and keep only this run's jobs
                meta["forced"] = meta["forced"] + [{"at": _now(), "differences": found}]
                if meta["jobs"] is not None:
                    _trim(connection, meta["jobs"])
                    meta["complete"] = False
            store.write_meta(connection, meta)
            connection.execute("COMMIT")
            self.empty = not any(connection.execute("SELECT 1 FROM %s LIMIT 1" % table).fetchone()
                                 for table in ("results", "failures", "jobs"))
            self._failures_possible = connection.execute(
                "SELECT 1 FROM failures LIMIT 1").fetchone() is not None
            return connection
        except sqlite3.Error as exc:
            raise store.sqlite_error(self.path, "open", exc) from None

    def _check(self, stored: dict) -> list:
        """What differs between the file and this run (resume='force' allows it);
        CheckpointMismatchError when anything does and it may not be forced."""
        found = differences(stored, self.run)
        kinds = {stored.get("kind"), self.run["kind"]}
        forcible = store.KIND_JOBS not in kinds or len(kinds) == 1
        if not found or (self.force and forcible
                         and stored.get("schema") == store.SCHEMA_VERSION):
            if found:
                log.warning("checkpoint %s: resuming anyway (resume='force'): %s",
                            self.path, "; ".join(found))
            return found
        advice = ("pass resume='force' to use its results anyway, or resume=False to "
                  "start it over" if forcible else "resume=False starts it over")
        raise CheckpointMismatchError("checkpoint %s does not match this run: %s; %s (or "
                                      "give this run another file)"
                                      % (self.path, "; ".join(found), advice))

    # --- what is stored (map, execute: by position) ---
    def stored(self, first: int, keys: list) -> list:
        """For the jobs at positions ``first``.. with ``keys``: True where the file
        holds an outcome this run reuses (a result, or a failure when not
        ``rerun_failed``).  CheckpointMismatchError when a stored job's key
        differs (unless resume='force': that job runs again)."""
        flags = [False] * len(keys)
        if self.empty:
            return flags
        end = first + len(keys)
        with self._read_lock:
            runs = self._read(store.runs_overlapping, self._reader, first, end, False)
            failures = self._read(lambda: self._reader.execute(
                "SELECT idx, key FROM failures WHERE idx >= ? AND idx < ?",
                (first, end)).fetchall())
        for run_first, count, blob in runs:
            stored_keys = store.unpack_keys(blob)
            for position in range(max(first, run_first), min(end, run_first + count)):
                flags[position - first] = self._same(
                    position, stored_keys[position - run_first], keys[position - first])
        for position, key in failures:
            flags[position - first] = (self._same(position, key, keys[position - first])
                                       and not self.rerun_failed)
        self.reused += sum(flags)
        return flags

    def _same(self, position: int, stored_key: int, key: int) -> bool:
        """Whether the job stored at ``position`` is this run's; a job whose
        arguments changed is refused, or with resume='force' forgotten."""
        if stored_key == key:
            return True
        if not self.force:
            if self.run["key_rule"] == store.KEY_BY_ARGUMENTS:
                what = "the arguments of job %d differ from those it stored" % position
                why = ("the argument list changed, or its arguments do not pickle the same "
                       "way twice (then pass key=, a function of the arguments that does)")
            else:
                what = "the key of job %d differs from the one it stored" % position
                why = ("the argument list changed, or the key function's value does not "
                       "pickle the same way twice (a set, an object without a stable "
                       "state: return a string, a number or a tuple of those)")
            raise CheckpointMismatchError(
                "checkpoint %s does not match this run: %s (key %s, now %s): %s; "
                "resume='force' runs such jobs again"
                % (self.path, what, store.format_key(stored_key), store.format_key(key), why))
        self._queue([("forget", position)], 0, 0)
        return False

    def reusable_before(self, length: int) -> int:
        """How many of the positions below ``length`` hold an outcome this run reuses."""
        with self._read_lock:
            [(done,)] = self._read(lambda: self._reader.execute(
                "SELECT COALESCE(SUM(MIN(count, ? - first)), 0) FROM results WHERE first < ?",
                (length, length)).fetchall())
            [(failed,)] = self._read(lambda: self._reader.execute(
                "SELECT COUNT(*) FROM failures WHERE idx < ?", (length,)).fetchall())
        return done + (0 if self.rerun_failed else failed)

    def load(self, first: int, count: int):
        """``(ok, value)`` of the stored jobs at positions ``first``..``first+count``,
        read a window of runs at a time (each run's results are loaded once)."""
        position, end = first, first + count
        while position < end:
            window_end = min(end, position + config.CHECKPOINT_LOOKUP_JOBS)
            with self._read_lock:
                runs = self._read(store.runs_overlapping, self._reader, position, window_end,
                                  True)
                if runs:   # a run is read whole: the window reaches its end
                    window_end = min(end, max(window_end, runs[-1][0] + runs[-1][1]))
                failures = dict(self._read(lambda: self._reader.execute(
                    "SELECT idx, value FROM failures WHERE idx >= ? AND idx < ?",
                    (position, window_end)).fetchall()))
            runs = deque(runs)
            while position < window_end:
                while runs and runs[0][0] + runs[0][1] <= position:
                    runs.popleft()
                if runs and runs[0][0] <= position:
                    run_first, run_count, _, blob = runs.popleft()
                    values = store.load(blob)
                    stop = min(window_end, run_first + run_count)
                    for value in values[position - run_first:stop - run_first]:
                        yield True, value
                    del values
                    position = stop
                elif position in failures:
                    yield False, store.load(failures.pop(position))
                    position += 1
                else:
                    raise CheckpointError("checkpoint %s lost job %d while this run read it "
                                          "(was it written by another program meanwhile?)"
                                          % (self.path, position))

    # --- what is stored (ClientThread: by job id) ---
    def stored_job(self, job_id, key: int):
        """A ClientThread's job: ``(ok, value)`` when the file holds an outcome this
        run reuses, else None."""
        if self.empty:
            return None
        with self._read_lock:
            rows = self._read(lambda: self._reader.execute(
                "SELECT key, ok, value FROM jobs WHERE job_id = ?",
                (store.dump_job_id(job_id),)).fetchall())
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

    def _read(self, read, *args):
        """``read(*args)`` on the reader connection (hold ``_read_lock``)."""
        try:
            return read(*args)
        except sqlite3.Error as exc:
            raise store.sqlite_error(self.path, "read", exc) from None

    # --- writing ---
    def add_outcomes(self, positions, keys, values, errors=None) -> None:
        """Queue the outcomes of jobs at ``positions`` (increasing) with ``keys``:
        ``values``, or ``errors[offset]`` for a job that failed.  Each run of
        consecutive positions without a failure becomes one row."""
        ops = []
        jobs = size = 0
        total = len(values)
        start = 0
        while start < total:
            if errors and start in errors:
                op = self._failure_op(positions[start], keys[start], errors[start])
                ops.append(op)
                jobs, size, start = jobs + 1, size + len(op[3]), start + 1
                continue
            end = start + 1
            if not errors and positions[total - 1] - positions[start] == total - 1 - start:
                end = total          # the usual case: one run to the end
            else:
                while (end < total and positions[end] == positions[end - 1] + 1
                       and not (errors and end in errors)):
                    end += 1
            for op in self._run_ops(positions[start], keys[start:end], values[start:end]):
                ops.append(op)
                jobs, size = jobs + op[2], size + len(op[4])
            start = end
        self._queue(ops, jobs, size)

    def _run_ops(self, first: int, keys: list, values: list) -> list:
        try:
            return [("run", first, len(values), store.pack_keys(keys),
                     store.dump_value(list(values)))]
        except Exception:
            pass
        ops = []   # a result that does not serialize: store the others, one by one
        for offset, value in enumerate(values):
            try:
                ops.append(("run", first + offset, 1, store.pack_keys([keys[offset]]),
                            store.dump_value([value])))
            except Exception as exc:
                self._unstored(exc)
        return ops

    def _failure_op(self, position: int, key: int, error: BaseException) -> tuple:
        return ("failure", position, key, self._dump_error(error), store.error_text(error))

    def add_job(self, job_id, key: int, ok: bool, value) -> None:
        """Queue a ClientThread job's outcome."""
        if ok:
            try:
                blob = store.dump_value(value)
            except Exception as exc:
                self._unstored(exc)
                return
            error = None
        else:
            blob, error = self._dump_error(value), store.error_text(value)
        self._queue([("job", key, store.dump_job_id(job_id), int(bool(ok)), blob, error)],
                    1, len(blob))

    @staticmethod
    def _dump_error(error: BaseException) -> bytes:
        try:
            return store.dump_value(error)
        except Exception:
            return store.dump_value(JobError(store.error_text(error)))

    def _unstored(self, exc: Exception) -> None:
        self.unstored += 1
        if self.unstored == 1:
            log.warning("checkpoint %s: a result cannot be stored (%s); such jobs run again "
                        "when the run is resumed", self.path, exc)

    def _queue(self, ops: list, jobs: int, size: int) -> None:
        with self._cond:
            self._raise_failure()
            if self._closing:
                return    # results of a stream closed meanwhile: the run has ended
            if not self._ops:
                self._first_at = time.monotonic()
                self._cond.notify_all()
            self._ops.extend(ops)
            self._jobs_waiting += jobs
            self._bytes += size
            if self._batch_full():
                self._cond.notify_all()
            while self._bytes > config.CHECKPOINT_BACKLOG_BYTES and self._failure is None:
                self._cond.wait()  # the disk is slower than the results: hold them up

    def _batch_full(self) -> bool:
        return (self._jobs_waiting >= config.CHECKPOINT_BATCH_JOBS
                or self._bytes >= config.CHECKPOINT_BATCH_BYTES)

    def set_meta(self, **items) -> None:
        with self._cond:
            self._meta_updates.update(items)
            self._cond.notify_all()

    def flush(self) -> None:
        """Wait until everything queued is committed."""
        with self._cond:
            self._cond.notify_all()
            while (self._ops or self._meta_updates) and self._failure is None:
                self._cond.wait()
            self._raise_failure()

    def close(self) -> None:
        """Commit what is queued, then release the file.  Safe to call twice."""
        with self._cond:
            already = self._closing
        if not already:
            with self._read_lock:   # first: the writer's last act needs the file to itself
                self._reader.close()
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._writer.join()
            self._lock_file.release()
            _open_journals.discard(self)
        with self._cond:
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    # --- the writer thread ---
    def _write_loop(self) -> None:
        connection = None
        try:
            connection = sqlite3.connect(self.path, isolation_level=None)
            connection.execute("PRAGMA synchronous=NORMAL")  # WAL: safe against a crash
            while True:
                ops, size, meta, closing = self._next_batch()
                if ops or meta:
                    self._commit(connection, ops, meta)
                    with self._cond:
                        self._bytes -= size
                        self._cond.notify_all()
                if closing:
                    self._finish(connection)
                    return
        except (sqlite3.Error, OSError) as exc:
            with self._cond:
                self._failure = store.sqlite_error(self.path, "write", exc)
                self._ops = []
                self._meta_updates = {}
                self._bytes = self._jobs_waiting = 0
                self._cond.notify_all()
            log.error("%s", self._failure)
        finally:
            if connection is not None:
                connection.close()

    def _next_batch(self) -> tuple:
        """Wait for a batch: enough outcomes, old enough ones, meta, or closing."""
        with self._cond:
            while True:
                if self._closing or self._meta_updates or self._batch_full():
                    break
                if self._ops:
                    wait = self._first_at + config.CHECKPOINT_BATCH_S - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            ops, self._ops = self._ops, []
            size, self._jobs_waiting = self._bytes, 0
            meta, self._meta_updates = self._meta_updates, {}
            return ops, size, meta, self._closing

    def _commit(self, connection: sqlite3.Connection, ops: list, meta: dict) -> None:
        """One transaction: the ops in order, then meta."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                getattr(self, "_write_" + op[0])(connection, *op[1:])
            if meta:
                store.write_meta(connection, meta)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def _write_run(self, connection, first, count, keys, value) -> None:
        if self._failures_possible:   # jobs that failed before, run again
            connection.execute("DELETE FROM failures WHERE idx >= ? AND idx < ?",
                               (first, first + count))
        connection.execute("INSERT INTO results (first, count, keys, value) VALUES (?, ?, ?, ?)",
                           (first, count, keys, value))

    def _write_failure(self, connection, position, key, value, error) -> None:
        self._failures_possible = True
        connection.execute("INSERT OR REPLACE INTO failures (idx, key, value, error) "
                           "VALUES (?, ?, ?, ?)", (position, key, value, error))

    @staticmethod
    def _write_job(connection, key, job_id, ok, value, error) -> None:
        connection.execute("INSERT OR REPLACE INTO jobs (key, job_id, ok, value, error) "
                           "VALUES (?, ?, ?, ?, ?)", (key, job_id, ok, value, error))

    @staticmethod
    def _write_forget(connection, position) -> None:
        """A job whose arguments changed (resume='force'): out of its run of results."""
        connection.execute("DELETE FROM failures WHERE idx = ?", (position,))
        for first, count, keys, value in store.runs_overlapping(connection, position,
                                                                 position + 1, True):
            connection.execute("DELETE FROM results WHERE first = ?", (first,))
            keys, values = store.unpack_keys(keys), store.load(value)
            for start, stop in ((first, position), (position + 1, first + count)):
                if start < stop:
                    connection.execute(
                        "INSERT INTO results (first, count, keys, value) VALUES (?, ?, ?, ?)",
                        (start, stop - start, store.pack_keys(keys[start - first:stop - first]),
                         store.dump_value(values[start - first:stop - first])))

    @staticmethod
    def _finish(connection: sqlite3.Connection) -> None:
        """A file with an outcome for every job of its run is complete.  The file
        leaves WAL mode, so that readers of a finished run (which cannot clean
        up after themselves) leave no -wal and -shm files beside it."""
        meta = store.read_meta(connection)
        counts = store.counts(connection, meta)
        if meta.get("kind") != store.KIND_JOBS and counts.missing == 0 and not meta.get(
                "complete"):
            connection.execute("BEGIN IMMEDIATE")
            store.write_meta(connection, {"complete": True})
            connection.execute("COMMIT")
        connection.execute("PRAGMA busy_timeout = %d" % config.CHECKPOINT_UNWAL_WAIT_MS)
        try:
            connection.execute("PRAGMA journal_mode = DELETE")
        except sqlite3.OperationalError:
            pass   # a reader has it open: it stays in WAL mode, which is as good


def _trim(connection: sqlite3.Connection, jobs: int) -> None:
    """Forget what a file holds at positions from ``jobs`` on (a forced run of fewer jobs)."""
    connection.execute("DELETE FROM failures WHERE idx >= ?", (jobs,))
    connection.execute("DELETE FROM results WHERE first >= ?", (jobs,))
    for first, count, keys, value in connection.execute(
            "SELECT first, count, keys, value FROM results WHERE first < ? AND first + count > ?",
            (jobs, jobs)).fetchall():
        kept = jobs - first
        connection.execute("UPDATE results SET count = ?, keys = ?, value = ? WHERE first = ?",
                           (kept, store.pack_keys(store.unpack_keys(keys)[:kept]),
                            store.dump_value(store.load(value)[:kept]), first))


def _close_all_at_exit() -> None:
    """A program that ends with a map unfinished still commits what arrived."""
    for journal in list(_open_journals):
        try:
            journal.close()
        except Exception:
            pass


atexit.register(_close_all_at_exit)
