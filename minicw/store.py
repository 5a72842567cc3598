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

    map and execute() files: one row per run of consecutive results, one per failure
    results(first INTEGER PRIMARY KEY,  position of the run's first job in the argument
                                        list (runs never overlap)
            count INTEGER NOT NULL,     jobs in the run
            keys BLOB NOT NULL,         their job keys, 8 bytes each (signed, big-endian)
            value BLOB NOT NULL)        the list of their results, serialized
    failures(idx INTEGER PRIMARY KEY,   a job whose final outcome was an exception
             key INTEGER NOT NULL,      its job key
             value BLOB NOT NULL,       the exception, serialized
             error TEXT NOT NULL)       "Type: message", for people and the CLI

    ClientThread files ("jobs"): one row per job, found by job id
    jobs(idx INTEGER PRIMARY KEY,       the order the outcomes were stored
         key INTEGER NOT NULL,          the job key
         job_id BLOB NOT NULL UNIQUE,   the job id, pickled
         ok INTEGER NOT NULL,           1: value is the result; 0: the exception
         value BLOB NOT NULL,
         error TEXT)                    ok = 0: "Type: message"

    Values are serialized with minicw.serialize (``__main__`` classes by value)
    and load with the standard ``pickle.loads``.  A run of results is what one
    delivery brought (a chunk, or its part): journaling costs a few inserts
    per chunk, not one per job.

The job key, a documented rule so that a run can be matched to its file:
the first 8 bytes of the SHA-256 of the job's *identity* pickled with the
standard ``pickle.dumps`` at protocol 5 (or, for what pickle refuses, such as
a lambda or a closure, with ``minicw.serialize.dumps``), read as a signed
big-endian 64-bit integer.  The identity is the tuple of the job's positional arguments, or
``(args, kwargs)`` when it has keyword arguments; with ``key=`` it is what
``key(*args)`` returns; for a ClientThread, whose jobs may call different
functions, the identity is ``(function_key, args, kwargs)`` and rows are
found by job id.  For map and execute the function is checked once, from
``meta``.  Arguments that do not serialize the same way twice (sets of
strings, whose order changes between processes; objects with addresses in
their state) need ``key=``.
"""
from __future__ import annotations

import array
import hashlib
import heapq
import json
import os
import pickle
import sqlite3
import struct
import sys
from typing import Any, Iterator, NamedTuple

from minicw import serialize
from minicw.errors import CheckpointError

SCHEMA_VERSION = 1
KIND_MAP, KIND_EXECUTE, KIND_JOBS = "map", "execute", "jobs"
KEY_BY_ARGUMENTS = "arguments"
KEY_BY_JOB_ID = "job id"

_READ_ROWS = 64   # rows fetched from the file at a time while iterating


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

def identity_bytes(identity) -> bytes:
    """``identity`` serialized for its key: the standard pickle, or minicw's
    serializer for what pickle refuses (a lambda, a closure, a local class)."""
    try:
        return pickle.dumps(identity, 5)
    except Exception:
        return serialize.dumps(identity, 5)


KEY_FORMAT = struct.Struct(">q")   # a job key: the first 8 bytes of a SHA-256


def job_key(identity) -> int:
    """The job key of ``identity`` (see the module docstring)."""
    return KEY_FORMAT.unpack_from(hashlib.sha256(identity_bytes(identity)).digest())[0]


def call_identity(args: tuple, kwargs: dict | None = None):
    """What identifies a call by its arguments: ``args``, or ``(args, kwargs)``."""
    return (args, kwargs) if kwargs else args


def format_key(key: int) -> str:
    return (key & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big").hex()


def pack_keys(keys) -> bytes:
    packed = array.array("q", keys)
    if sys.byteorder == "little":
        packed.byteswap()
    return packed.tobytes()


def unpack_keys(blob: bytes) -> array.array:
    keys = array.array("q")
    keys.frombytes(blob)
    if sys.byteorder == "little":
        keys.byteswap()
    return keys


_PLAIN = frozenset((int, float, str, bytes, bool, type(None), complex))


def dump_value(value) -> bytes:
    """A result or an exception as stored: minicw's serializer, so that objects of
    ``__main__`` classes load in another program too (plain scalars go
    straight to the standard pickle)."""
    if type(value) in _PLAIN:
        return pickle.dumps(value, 5)
    return serialize.dumps(value, 5)


def dump_job_id(job_id) -> bytes:
    return pickle.dumps(job_id, 5)


def error_text(error: BaseException) -> str:
    """One line for a failed job: a job's own exception as "Type: message"."""
    from minicw.errors import RemoteError
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    return first if isinstance(error, RemoteError) else "%s: %s" % (type(error).__name__, first)


def load(blob: bytes):
    return pickle.loads(blob)


# --- the file --------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    first INTEGER PRIMARY KEY, count INTEGER NOT NULL, keys BLOB NOT NULL,
    value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS failures (
    idx INTEGER PRIMARY KEY, key INTEGER NOT NULL, value BLOB NOT NULL, error TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    idx INTEGER PRIMARY KEY, key INTEGER NOT NULL, job_id BLOB NOT NULL UNIQUE,
    ok INTEGER NOT NULL, value BLOB NOT NULL, error TEXT);
"""
TABLES = ("meta", "results", "failures", "jobs")


def read_meta(connection: sqlite3.Connection) -> dict:
    return {name: json.loads(value)
            for name, value in connection.execute("SELECT name, value FROM meta")}


def write_meta(connection: sqlite3.Connection, items: dict) -> None:
    connection.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                           [(name, json.dumps(value)) for name, value in items.items()])


def is_checkpoint(connection: sqlite3.Connection) -> bool:
    tables = {name for (name,) in connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    return set(TABLES) <= tables


def sqlite_error(path, action: str, exc: Exception) -> CheckpointError:
    """A CheckpointError naming the file, for an sqlite3 error or an OSError."""
    detail = str(exc)
    if "not a database" in detail:
        detail = "it is not an SQLite file (a checkpoint is one)"
    return CheckpointError("cannot %s checkpoint %s: %s" % (action, path, detail))


def runs_overlapping(connection: sqlite3.Connection, first: int, end: int,
                     with_values: bool = True) -> list:
    """``(first, count, keys[, value])`` of the runs of results that hold a position
    in [first, end), in order."""
    columns = "first, count, keys, value" if with_values else "first, count, keys"
    before = connection.execute(
        "SELECT %s FROM results WHERE first < ? ORDER BY first DESC LIMIT 1" % columns,
        (first,)).fetchall()
    if before and before[0][0] + before[0][1] <= first:
        before = []
    return before + connection.execute(
        "SELECT %s FROM results WHERE first >= ? AND first < ? ORDER BY first" % columns,
        (first, end)).fetchall()


def counts(connection: sqlite3.Connection, meta: dict) -> Counts:
    if meta.get("kind") == KIND_JOBS:
        done, failed = connection.execute(
            "SELECT COALESCE(SUM(ok), 0), COALESCE(SUM(1 - ok), 0) FROM jobs").fetchone()
    else:
        [(done,)] = connection.execute("SELECT COALESCE(SUM(count), 0) FROM results")
        [(failed,)] = connection.execute("SELECT COUNT(*) FROM failures")
    total = meta.get("jobs")
    missing = None if total is None else max(0, total - done - failed)
    return Counts(done, failed, missing, total)


# --- reading ----------------------------------------------------------------------------

class Store:
    """A checkpoint opened read-only: iterate, look up and count its results.

    Results are read from the file as they are asked for, a few runs of
    results at a time, so a store of any size is read in constant memory.
    It may be open while a run is still writing the file: it sees every
    committed batch.
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
                                      "(no meta, results, failures and jobs tables)" % self.path)
            self.meta = read_meta(self._connection)
        except sqlite3.Error as exc:
            raise sqlite_error(self.path, "read", exc) from None
        self._by_job_id = self.meta.get("kind") == KIND_JOBS

    # --- counting ---
    def counts(self) -> Counts:
        """Jobs done, failed, and missing of the run's total (when known)."""
        return self._reading(counts, self._connection, self.meta)

    def __len__(self) -> int:
        """Jobs with a stored outcome (done or failed)."""
        done, failed, _, _ = self.counts()
        return done + failed

    # --- iterating, in job order ---
    def records(self) -> Iterator[Record]:
        """Every stored job, in job order (position; for a ClientThread, the order stored)."""
        if self._by_job_id:
            return self._job_records("")
        return self._merged(self._result_records(), self._failure_records())

    def results(self) -> Iterator[tuple]:
        """``(index, result)`` of every job with a result, in job order (a ClientThread's:
        ``(job_id, result)``)."""
        if self._by_job_id:
            return ((record.job_id, record.value) for record in self._job_records("WHERE ok = 1"))
        return ((record.index, record.value) for record in self._result_records())

    def failures(self) -> Iterator[Record]:
        """The jobs whose final outcome was an exception, in job order."""
        if self._by_job_id:
            return self._job_records("WHERE ok = 0")
        return self._failure_records()

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    # --- looking up ---
    def __getitem__(self, index):
        """The result of the job at position ``index`` (a ClientThread's file: of job id
        ``index``); its exception is raised if it failed; KeyError, saying why,
        when nothing is stored for it."""
        if self._by_job_id:
            record = self.get(index)
        else:
            record = self.record(index)
        if record is None:
            raise KeyError(self._why_missing(index))
        if not record.ok:
            raise record.value
        return record.value

    def _why_missing(self, index) -> str:
        if self._by_job_id:
            return "no job with id %r is stored in %s" % (index, self.path)
        total = self.meta.get("jobs")
        if total is not None and not 0 <= index < total:
            return "job %d is not in the run, whose jobs are 0 to %d" % (index, total - 1)
        return "job %d has no outcome in %s (it has not run yet)" % (index, self.path)

    def record(self, index: int) -> Record | None:
        """The Record of the job at ``index`` (position; a ClientThread's: storing order)."""
        index = int(index)
        if self._by_job_id:
            return next(self._job_records("WHERE idx = %d" % index), None)
        for first, _, keys, value in self._reading(
                runs_overlapping, self._connection, index, index + 1):
            return Record(index, None, unpack_keys(keys)[index - first], True,
                          load(value)[index - first], None)
        return next(self._failure_records("WHERE idx = %d" % index), None)

    def get(self, *identity, default=None):
        """The Record of a job by what identifies it, or ``default``: its arguments
        as they were passed (``get(x)`` for ``map(f, xs)`` or ``execute()``,
        ``get(a, b)`` for ``map(f, As, Bs)``); with ``key=``, the value ``key``
        returned; in a ClientThread's file, its job id.  Outside a ClientThread's
        file this reads the keys of every stored job."""
        if self.meta.get("key_rule") == KEY_BY_ARGUMENTS:
            identity = tuple(identity)
        elif len(identity) == 1:
            identity = identity[0]
        else:
            raise TypeError("get() takes one %s, not %d values"
                            % ("job id" if self._by_job_id else "key", len(identity)))
        if self._by_job_id:
            found = self._reading(lambda: self._connection.execute(
                "SELECT idx FROM jobs WHERE job_id = ?", (dump_job_id(identity),)).fetchone())
            return default if found is None else self.record(found[0])
        key = job_key(identity)
        found = self._reading(lambda: self._connection.execute(
            "SELECT idx FROM failures WHERE key = ? LIMIT 1", (key,)).fetchone())
        if found is not None:
            return self.record(found[0])
        wanted = pack_keys([key])
        for first, keys in self._rows("SELECT first, keys FROM results ORDER BY first"):
            at = keys.find(wanted)
            while at >= 0 and at % 8:
                at = keys.find(wanted, at + 1)
            if at >= 0:
                return self.record(first + at // 8)
        return default

    # --- the file ---
    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<minicw Store %s: %s>" % (self.path, self.counts())

    # --- reading rows ---
    def _reading(self, read, *args):
        try:
            return read(*args)
        except sqlite3.Error as exc:
            raise sqlite_error(self.path, "read", exc) from None

    def _rows(self, sql: str, params=()) -> Iterator[tuple]:
        try:
            cursor = self._connection.execute(sql, params)
            while True:
                rows = cursor.fetchmany(_READ_ROWS)
                if not rows:
                    return
                yield from rows
                del rows
        except sqlite3.Error as exc:
            raise sqlite_error(self.path, "read", exc) from None

    def _result_records(self) -> Iterator[Record]:
        for first, _, keys, value in self._rows(
                "SELECT first, count, keys, value FROM results ORDER BY first"):
            for offset, (key, result) in enumerate(zip(unpack_keys(keys), load(value))):
                yield Record(first + offset, None, key, True, result, None)

    def _failure_records(self, where: str = "") -> Iterator[Record]:
        for index, key, value, error in self._rows(
                "SELECT idx, key, value, error FROM failures %s ORDER BY idx" % where):
            yield Record(index, None, key, False, load(value), error)

    def _job_records(self, where: str) -> Iterator[Record]:
        for index, key, job_id, ok, value, error in self._rows(
                "SELECT idx, key, job_id, ok, value, error FROM jobs %s ORDER BY idx" % where):
            yield Record(index, load(job_id), key, bool(ok), load(value), error)

    @staticmethod
    def _merged(*ordered) -> Iterator[Record]:
        return heapq.merge(*ordered, key=lambda record: record.index)


def _uri_path(path: str) -> str:
    """``path`` for an SQLite file: URI (absolute, '?' and '#' escaped)."""
    from urllib.request import pathname2url
    return pathname2url(os.path.abspath(path))


def open(path) -> Store:  # noqa: A001 - minicw.store.open, as the issue and docs name it
    """Open the checkpoint at ``path`` read-only."""
    return Store(path)


# --- python -m minicw store PATH ---------------------------------------------------------

def describe(store: Store, failures_shown: int = 5, writer: str | None = None) -> str:
    """What ``python -m minicw store`` prints: the run, its counts, its first failures
    (and ``writer``, who is writing it now)."""
    meta = store.meta
    counts = store.counts()
    lines = ["checkpoint %s" % store.path,
             "  written by   %s, minicw %s, Python %s, created %s" % (
                 {KIND_MAP: "a map", KIND_EXECUTE: "execute()", KIND_JOBS: "a ClientThread"}
                 .get(meta.get("kind"), meta.get("kind")), meta.get("minicw"),
                 meta.get("python"), meta.get("created"))]
    if writer:
        lines.append("  in use by    %s (a run is writing it now)" % writer)
    if meta.get("function"):
        lines.append("  function     %s" % meta["function"])
    for forced in meta.get("forced", []):
        lines.append("  forced       %s: resumed with resume='force' although %s"
                     % (forced["at"], "; ".join(forced["differences"])))
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

