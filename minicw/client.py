"""A client's session with the master, and the stream that runs many jobs.

    Session                                   master (ClientAPI -> Scheduler)
    -------                                   ------------------------------
    hello(info)            ------------------> client_id
    put_blobs([(key, b)])  ------------------> blob store (functions, contexts, data)
    submit([ChunkSpec])    ------------------> the client's queue
    fetch(timeout)         <------------------ [Delivery], waiting for the first
    touch()                ------------------> (keepalive thread, while the session is open)
    cancel([(chunk, idx)]) ------------------> queued jobs removed, leased chunks revoked
    kill(chunk, index)     ------------------> the job's process ended when it runs it

``stream_results`` keeps a bounded window of chunks in flight: it submits
chunks as earlier ones complete, so memory on the client and the master stays
proportional to the window, not to the number of jobs.  It yields decoded
results per chunk as they arrive; on an error or an interrupt it cancels the
chunks still queued before passing the exception on.

A session is used by one consumer at a time; deliveries for chunks that the
current stream does not own (left over from a cancelled run) are dropped.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import sys
import threading
import warnings
from concurrent.futures import CancelledError

from minicw import config, context, protocol, serialize, transport
from minicw.errors import (
    JobTimeoutError, MasterLostError, MinicwError, RemoteError, WorkerCrashedError,
)

log = logging.getLogger(__name__)

FETCH_WAIT_S = 1.0   # a fetch returns at least this often, to notice interrupts


def client_info() -> dict:
    return {"protocol": protocol.PROTOCOL_VERSION, "hostname": socket.gethostname(),
            "pid": os.getpid(), "python": "%d.%d.%d" % sys.version_info[:3],
            "cwd": os.getcwd(), "sys_path": list(sys.path)}


class Session:
    """One client session with the master at ``address``."""

    def __init__(self, address, authkey):
        from minicw.master import connect
        self.address = tuple(address)
        self._manager = connect(self.address, authkey)
        self._api = self._manager.client()
        self.client_id, master_info = self._call("hello", client_info())
        self.heartbeat_timeout_s = master_info["heartbeat_timeout_s"]
        self._stored_blobs = set()
        self._blob_lock = threading.Lock()
        self._chunk_ids = itertools.count(1)
        self._context = (None, None)      # (described context, its blob key)
        self._warned = set()
        self._closed = threading.Event()
        threading.Thread(target=self._keep_alive, name="minicw-keepalive", daemon=True).start()

    def _call(self, method: str, *args):
        try:
            return getattr(self._api, method)(*args)
        except (EOFError, ConnectionError, BrokenPipeError) as exc:
            raise MasterLostError("lost the connection to the master at %s (%s)" % (
                transport.format_address(self.address), type(exc).__name__),
                self.address) from None

    def _keep_alive(self) -> None:
        period_s = self.heartbeat_timeout_s / config.HEARTBEATS_PER_TIMEOUT
        while not self._closed.wait(period_s):
            try:
                self._call("touch", self.client_id)
            except Exception as exc:
                log.debug("keepalive failed: %s", exc)
                return

    # --- requests ------------------------------------------------------------------

    def put_blob(self, key: str, data: bytes) -> None:
        """Store a blob in the master once per session."""
        if key in self._stored_blobs:
            return
        with self._blob_lock:  # two threads storing the same blob send it once
            if key not in self._stored_blobs:
                self._call("put_blobs", self.client_id, [(key, data)])
                self._stored_blobs.add(key)

    def context_key(self) -> str:
        """The blob key of this process's current cwd and sys.path (stored when new)."""
        described = context.describe()
        if described[0] is None:  # our cwd was removed: keep the last one known
            described = (self._context[0] or (None, None))[0], described[1]
        if described != self._context[0]:
            key, blob = context.make_blob(*described)
            self.put_blob(key, blob)
            self._context = (described, key)
        return self._context[1]

    def new_chunk_id(self) -> int:
        return next(self._chunk_ids)

    def submit(self, specs: list) -> None:
        for start in range(0, len(specs), config.MAX_CHUNKS_PER_CALL * 4):
            self._call("submit", self.client_id, specs[start:start + config.MAX_CHUNKS_PER_CALL * 4])

    def fetch(self, timeout_s: float) -> list:
        return self._call("fetch", self.client_id, timeout_s)

    def cancel(self, requests) -> list:
        """``[(chunk_id, indices or None)]`` -> ``[(chunk_id, cancelled indices)]``."""
        return self._call("cancel", self.client_id, list(requests))

    def kill(self, chunk_id: int, index: int) -> str:
        return self._call("kill", self.client_id, chunk_id, index)

    def blob_transfers(self, keys) -> dict:
        """{key: (times put, times fetched by worker nodes)}, for tests and diagnosis."""
        return self._call("blob_transfers", list(keys))

    def warn_once(self, notes) -> None:
        """Show each note from the workers once per session."""
        for note in notes:
            if note not in self._warned:
                self._warned.add(note)
                warnings.warn(note, RuntimeWarning, stacklevel=2)

    def list_nodes(self) -> list:
        return self._call("list_nodes")

    def status(self) -> dict:
        return self._call("status")

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._call("goodbye", self.client_id)
        except (MinicwError, OSError) as exc:
            log.debug("goodbye failed: %s", exc)


# --- decoding deliveries -------------------------------------------------------------

def failure_error(failure, job: str) -> BaseException:
    """The exception a synthesized failure stands for."""
    kind, detail = failure
    if kind == protocol.FAIL_CRASHED:
        exit_description, attempts = detail
        return WorkerCrashedError(job, exit_description, attempts)
    if kind == protocol.FAIL_TIMEOUT:
        return JobTimeoutError(job, detail)
    if kind == protocol.FAIL_CANCELLED:
        return CancelledError("job %s was cancelled: %s" % (job, detail))
    return MinicwError("job %s was lost: %s" % (job, detail))


def remote_error(description: tuple, arg=None, has_arg: bool = False) -> RemoteError:
    type_name, message, remote_traceback = description[:3]
    return RemoteError(type_name, message, remote_traceback, arg,
                       protocol.load_exception(description), has_arg)


def decode(delivery, session: Session | None = None):
    """``([(index, ok, value_or_error)], seconds)`` for one Delivery.

    Errors are exception objects; ``seconds`` is the time the jobs took on
    the worker (None for a synthesized failure).  Notes from the workers are
    shown as warnings through ``session``.
    """
    chunk_id, indices, results, failure = delivery
    if failure is not None:
        return [(index, False, failure_error(failure, "%s/%s" % (chunk_id, index)))
                for index in indices], None
    values, errors, seconds, notes = serialize.loads(results)
    if notes and session is not None:
        session.warn_once(notes)
    if not errors:
        return list(zip(indices, itertools.repeat(True), values)), seconds
    decoded = []
    for position, (index, value) in enumerate(zip(indices, values)):
        description = errors.get(position)
        if description is None:
            decoded.append((index, True, value))
        else:
            decoded.append((index, False, remote_error(description)))
    return decoded, seconds


def decode_delivery(delivery, session: Session | None = None):
    """[(index, ok, value_or_error)] for one Delivery (see ``decode``)."""
    return decode(delivery, session)[0]


# --- streaming many chunks ------------------------------------------------------------------

def stream_results(session: Session, chunks, window: int):
    """Run chunks with at most ``window`` in flight; yield ``(chunk_id, decoded)``.

    ``chunks`` yields ChunkSpec tuples (their ids from ``session.new_chunk_id``).
    ``decoded`` is what ``decode_delivery`` returns, possibly for part of a
    chunk.  Closing the generator early (or an exception in the consumer)
    cancels every chunk still queued.
    """
    remaining_by_chunk = {}   # chunk_id -> jobs not yet delivered
    chunk_iter = iter(chunks)
    exhausted = False
    try:
        while True:
            batch = []
            while not exhausted and len(remaining_by_chunk) + len(batch) < window:
                spec = next(chunk_iter, None)
                if spec is None:
                    exhausted = True
                    break
                batch.append(spec)
                remaining_by_chunk[spec[0]] = spec[2]
            if batch:
                session.submit(batch)
            if not remaining_by_chunk:
                return
            for delivery in session.fetch(FETCH_WAIT_S):
                chunk_id, indices = delivery[0], delivery[1]
                if chunk_id not in remaining_by_chunk:
                    continue  # left over from an earlier, cancelled stream
                remaining_by_chunk[chunk_id] -= len(indices)
                if remaining_by_chunk[chunk_id] <= 0:
                    del remaining_by_chunk[chunk_id]
                yield chunk_id, decode_delivery(delivery, session)
    finally:
        if remaining_by_chunk:
            cancel_quietly(session, [(chunk_id, None) for chunk_id in remaining_by_chunk])


def cancel_quietly(session: Session, requests) -> None:
    """Cancel chunks on the way out of a run; a failure to do so is only logged."""
    try:
        session.cancel(requests)
    except (MinicwError, OSError) as exc:
        log.debug("cancelling %d chunks failed: %s", len(requests), exc)
