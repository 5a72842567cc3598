"""The checkpoint file: results on disk as they arrive, readable without loading them all.

    a run with checkpoint="run.sqlite"                  minicw.store.open("run.sqlite")
    (checkpoint.py: Journal writes) ---> SQLite file ---> Store: counts(), results(),
                                         (WAL mode)        failures(), store[i], get(key)
                                                          python -m minicw store run.sqlite

The file is an SQLite database (the standard library's ``sqlite3``, WAL
mode, so a reader sees every committed batch while a run goes on).  Its
schema, version 1::

    meta(name TEXT PRIMARY KEY, value TEXT)     one row per item, value in JSON:
        schema        1
        kind          "map" (executor.map, imap_unordered), "execute"
                      (MasterNode/LocalCluster.execute) or "jobs" (ClientThread)
        function      the function's name, for messages ("jobs": null)
        function_key  the blob key of the serialized function (a content hash), or
                      for execute() of the environment's hash and the function's name
        environment   execute(): the environment source's content hash; else null
        key_rule      "arguments", "key function NAME" (key=) or "job id"
        jobs          the number of jobs of the run, once known; null before
        python        the Python that wrote it ("3.11.7");  minicw: its version
        created       when the file was made (ISO 8601, UTC)
        complete      true once a run ended with a result or failure for every job

    jobs(idx INTEGER PRIMARY KEY,  the job's position in the argument list (map,
                                   execute); for "jobs", the order they were stored
         key INTEGER NOT NULL,     the job key (below)
         job_id BLOB,              "jobs": the job id, pickled; null otherwise
         ok INTEGER NOT NULL,      1: value is the result; 0: value is the exception
         value BLOB,               serialized with minicw.serialize (loads with pickle)
         error TEXT)               ok = 0: "Type: message", for people and the CLI

    indices: jobs_job_id (unique, "jobs" files); jobs_key, built when a run
    completes (keeping it up to date during a run would triple the cost of
    journaling a result).

The job key, a documented rule so that a run can be matched to its file:
the first 8 bytes of the SHA-256 of the job's *identity* serialized with
``minicw.serialize.dumps`` (protocol 5), read as a signed big-endian 64-bit
integer.  The identity is the tuple of the job's positional arguments, or
``(args, kwargs)`` when it has keyword arguments; with ``key=`` it is what
``key(*args)`` returns; for a ClientThread, whose jobs may call different
functions, the identity is ``(function_key, args, kwargs)`` and rows are
found by job id.  For map and execute the function is checked once, from
``meta``.  Arguments that do not serialize the same way twice (sets of
strings, whose order changes between processes; objects with addresses in
their state) need ``key=``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sqlite3
from typing import Any, Iterator, NamedTuple

from minicw import serialize
from minicw.errors import CheckpointError

SCHEMA_VERSION = 1
KIND_MAP, KIND_EXECUTE, KIND_JOBS = "map", "execute", "jobs"
KEY_BY_ARGUMENTS = "arguments"
KEY_BY_JOB_ID = "job id"

_READ_ROWS = 256   # rows fetched from the file at a time while iterating


class Record(NamedTuple):
    """One stored job: its position, job id (ClientThread) and key, and its outcome."""
    index: int
    job_id: Any
    key: int
    ok: bool
    value: Any        # the result, or the exception when not ok
    error: str | None


class Counts(NamedTuple):
    done: int          # jobs with a result
    failed: int        # jobs whose final outcome was an exception
    missing: int | None  # jobs of the run with neither; None while the run's size is unknown
    total: int | None


# --- the rules ----------------------------------------------------------------------

def job_key(identity) -> int:
    """The job key of ``identity`` (see the module docstring)."""
    data = serialize.dumps(identity, 5)
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big", signed=True)


def call_identity(args: tuple, kwargs: dict | None = None):
    """What identifies a call by its arguments: ``args``, or ``(args, kwargs)``."""
    return (args, kwargs) if kwargs else args


def format_key(key: int) -> str:
    return (key & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big").hex()


def dump_value(value) -> bytes:
    return serialize.dumps(value, 5)


def dump_job_id(job_id) -> bytes:
    return serialize.dumps(job_id, 5)


def error_text(error: BaseException) -> str:
    """One line for a failed job: a job's own exception as "Type: message"."""
    from minicw.errors import RemoteError
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    return first if isinstance(error, RemoteError) else "%s: %s" % (type(error).__name__, first)


# --- the file --------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    idx INTEGER PRIMARY KEY, key INTEGER NOT NULL, job_id BLOB,
    ok INTEGER NOT NULL, value BLOB, error TEXT);
"""
JOB_ID_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS jobs_job_id ON jobs(job_id)"
KEY_INDEX = "CREATE INDEX IF NOT EXISTS jobs_key ON jobs(key)"


def read_meta(connection: sqlite3.Connection) -> dict:
    return {name: json.loads(value)
            for name, value in connection.execute("SELECT name, value FROM meta")}


def write_meta(connection: sqlite3.Connection, items: dict) -> None:
    connection.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                           [(name, json.dumps(value)) for name, value in items.items()])


def is_checkpoint(connection: sqlite3.Connection) -> bool:
    tables = {name for (name,) in connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {"meta", "jobs"} <= tables


def sqlite_error(path, action: str, exc: Exception) -> CheckpointError:
    """A CheckpointError naming the file, for an sqlite3 error or an OSError."""
    detail = str(exc)
    if "not a database" in detail:
        detail = "it is not an SQLite file (a checkpoint is one)"
    return CheckpointError("cannot %s checkpoint %s: %s" % (action, path, detail))


def load(blob: bytes):
    return pickle.loads(blob)


# --- reading ----------------------------------------------------------------------------

class Store:
    """A checkpoint opened read-only: iterate, look up and count its results.

    Results are read from the file as they are asked for, a few hundred rows
    at a time, so a store of any size is read in constant memory.  It may be
    open while a run is still writing the file: it sees every committed batch.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError("no checkpoint at %s" % self.path)
        try:
            uri = "file:%s?mode=ro" % _uri_path(self.path)
            self._connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
            if not is_checkpoint(self._connection):
                raise CheckpointError("%s is an SQLite file but not a minicw checkpoint "
                                      "(no meta and jobs tables)" % self.path)
            self.meta = read_meta(self._connection)
        except sqlite3.Error as exc:
            raise sqlite_error(self.path, "read", exc) from None

    # --- counting ---
    def counts(self) -> Counts:
        done, failed = self._query_one(
            "SELECT COALESCE(SUM(ok), 0), COALESCE(SUM(1 - ok), 0) FROM jobs")
        total = self.meta.get("jobs")
        missing = None if total is None else max(0, total - done - failed)
        return Counts(done, failed, missing, total)

    def __len__(self) -> int:
        return self._query_one("SELECT COUNT(*) FROM jobs")[0]

    # --- iterating, in job order ---
    def records(self) -> Iterator[Record]:
        """Every stored job, in job order (position; for a ClientThread, the order stored)."""
        return self._records("SELECT idx, job_id, key, ok, value, error FROM jobs ORDER BY idx")

    def results(self) -> Iterator[tuple]:
        """``(index, result)`` of every job with a result, in job order."""
        for record in self._records(
                "SELECT idx, job_id, key, ok, value, error FROM jobs WHERE ok = 1 ORDER BY idx"):
            yield (record.job_id if self.meta.get("kind") == KIND_JOBS else record.index,
                   record.value)

    def failures(self) -> Iterator[Record]:
        """The jobs whose final outcome was an exception, in job order."""
        return self._records(
            "SELECT idx, job_id, key, ok, value, error FROM jobs WHERE ok = 0 ORDER BY idx")

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    # --- looking up ---
    def __getitem__(self, index: int):
        """The result of the job at ``index``; its exception is raised if it failed;
        KeyError when nothing is stored for it."""
        record = self._record("SELECT idx, job_id, key, ok, value, error FROM jobs "
                              "WHERE idx = ?", (int(index),))
        if record is None:
            raise KeyError(index)
        if not record.ok:
            raise record.value
        return record.value

    def get(self, identity, default=None):
        """The Record of a job by what identifies it: for a ClientThread its job id;
        with ``key=``, the value ``key`` returned; otherwise the tuple of its
        arguments (``store.get((x,))`` for ``map(f, xs)`` or ``execute()``)."""
        if self.meta.get("kind") == KIND_JOBS:
            record = self._record("SELECT idx, job_id, key, ok, value, error FROM jobs "
                                  "WHERE job_id = ?", (dump_job_id(identity),))
        else:
            record = self._record("SELECT idx, job_id, key, ok, value, error FROM jobs "
                                  "WHERE key = ? ORDER BY idx", (job_key(identity),))
        return default if record is None else record

    # --- the file ---
    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<minicw Store %s: %s>" % (self.path, self.counts())

    def _query_one(self, sql: str, params=()) -> tuple:
        try:
            return self._connection.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise sqlite_error(self.path, "read", exc) from None

    def _record(self, sql: str, params) -> Record | None:
        row = self._query_one(sql, params)
        return None if row is None else _record(row)

    def _records(self, sql: str) -> Iterator[Record]:
        try:
            cursor = self._connection.execute(sql)
            while True:
                rows = cursor.fetchmany(_READ_ROWS)
                if not rows:
                    return
                for row in rows:
                    yield _record(row)
                del rows
        except sqlite3.Error as exc:
            raise sqlite_error(self.path, "read", exc) from None


def _record(row: tuple) -> Record:
    index, job_id, key, ok, value, error = row
    return Record(index, None if job_id is None else load(job_id), key, bool(ok),
                  None if value is None else load(value), error)


def _uri_path(path: str) -> str:
    """``path`` for an SQLite file: URI (absolute, '?' and '#' escaped)."""
    from urllib.request import pathname2url
    return pathname2url(os.path.abspath(path))


def open(path) -> Store:  # noqa: A001 - minicw.store.open, as the issue and docs name it
    """Open the checkpoint at ``path`` read-only."""
    return Store(path)


# --- python -m minicw store PATH ---------------------------------------------------------

def describe(store: Store, failures_shown: int = 5) -> str:
    """What ``python -m minicw store`` prints: the run, its counts, its first failures."""
    meta = store.meta
    counts = store.counts()
    lines = ["checkpoint %s" % store.path,
             "  written by   %s, minicw %s, Python %s, created %s" % (
                 {KIND_MAP: "a map", KIND_EXECUTE: "execute()", KIND_JOBS: "a ClientThread"}
                 .get(meta.get("kind"), meta.get("kind")), meta.get("minicw"),
                 meta.get("python"), meta.get("created"))]
    if meta.get("function"):
        lines.append("  function     %s" % meta["function"])
    if meta.get("kind") == KIND_JOBS:
        lines.append("  jobs         %d stored (a ClientThread's run has no fixed size)"
                     % (counts.done + counts.failed))
    else:
        lines.append("  jobs         %s%s" % (
            "not known yet (the run has not reached its end)" if counts.total is None
            else counts.total, ", complete" if meta.get("complete") else ""))
    lines.append("  done         %d" % counts.done)
    lines.append("  failed       %d" % counts.failed)
    if counts.missing is not None:
        lines.append("  missing      %d" % counts.missing)
    shown = 0
    for record in store.failures():
        if shown == failures_shown:
            lines.append("  ... and %d more failures" % (counts.failed - shown))
            break
        if shown == 0:
            lines.append("first failures:")
        where = ("job %r" % (record.job_id,) if meta.get("kind") == KIND_JOBS
                 else "job %d" % record.index)
        lines.append("  %s: %s" % (where, record.error))
        shown += 1
    return "\n".join(lines)

