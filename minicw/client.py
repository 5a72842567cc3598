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
proportional to the window, not to the number of jobs.  It yields the
deliveries as they arrive; on an error or an interrupt it cancels the
chunks still queued before passing the exception on.

``decode`` is the one place a Delivery becomes results: runs of consecutive
jobs (``Segment``), each job's value or its exception.  Every client
(dispatch.py's routes and map streams, master_node.py's execute) reads
deliveries through it; ``job_exception`` is what a failed job raises.

A session is used by one consumer at a time; deliveries for chunks that the
current stream does not own (left over from a cancelled run) are dropped.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import queue
import socket
import sys
import threading
import time
import warnings
from concurrent.futures import CancelledError
from typing import NamedTuple, Optional

from minicw import config, context, output, protocol, serialize, transport
from minicw.errors import (
    AuthkeyMismatchError, ClusterShutdownError, JobTimeoutError, MasterConnectionError,
    MasterLostError, MinicwError, NoMatchingPythonError, RemoteError, SerializationError,
    SessionExpiredError, WorkerCrashedError,
)

log = logging.getLogger(__name__)

FETCH_WAIT_S = 1.0   # a fetch returns at least this often, to notice interrupts
CALLER_IDLE_S = 10.0  # a DeadlineCaller's thread ends after this long without a call
GOODBYE_WAIT_S = 3.0  # a session's last call waits this long for its answer at most


def client_info() -> dict:
    return {"protocol": protocol.PROTOCOL_VERSION, "hostname": socket.gethostname(),
            "pid": os.getpid(), "python": "%d.%d.%d" % sys.version_info[:3],
            "python_tag": serialize.PYTHON_TAG,
            "cwd": os.getcwd(), "sys_path": list(sys.path)}


class _Unfinished:
    """A chunk the session submitted and has not seen every result of."""

    __slots__ = ("spec", "jobs_left", "delivered")

    def __init__(self, spec: protocol.ChunkSpec):
        self.spec = spec
        self.jobs_left = spec.n_jobs
        self.delivered = None        # indices seen, once a chunk comes in parts


class Session:
    """One client session with the master at ``address``.

    The session remembers every blob it stored and every chunk not fully
    delivered.  When the connection breaks (or the master forgot this client),
    it reconnects with backoff for up to ``reconnect_timeout_s``, says hello
    again, stores the blobs again and resubmits those chunks; deliveries of
    jobs already delivered are dropped, so each result reaches the caller
    once.  A master that shut down on purpose is not waited for.
    """

    def __init__(self, address, authkey, reconnect_timeout_s: float | None = None,
                 forward_output=None):
        self.address = tuple(address)
        self._authkey = authkey
        self.output_limit = config.output_limit(forward_output)  # per job; 0: not forwarded
        self.reconnect_timeout_s = config.reconnect_timeout_s(reconnect_timeout_s)
        self._blobs = {}                  # key -> bytes of every blob stored
        self._blob_lock = threading.Lock()
        self._in_flight = {}              # chunk_id -> _Unfinished
        self._in_flight_lock = threading.Lock()
        self._recover_lock = threading.Lock()
        self._gave_up = None              # the MasterLostError once reconnecting has failed
        self._generation = 0              # reconnections so far
        self._chunk_ids = itertools.count(1)
        self._context = (None, None)      # (described context, its blob key)
        self._warned = set()
        self._progress_at = time.monotonic()  # last delivery, or first submit since idle
        self._told_no_nodes = False           # said that no worker node is connected
        self._closed = threading.Event()
        self.master_shut_down = False
        self._open()
        threading.Thread(target=self._keep_alive, name="minicw-keepalive", daemon=True).start()

    def _open(self) -> None:
        manager = transport.connect_master(self.address, self._authkey)
        api = manager.client()
        client_id, master_info = api.hello(client_info())
        self._manager, self._api, self.client_id = manager, api, client_id
        self._acked = 0                   # last delivery number received from this master
        self.heartbeat_timeout_s = master_info["heartbeat_timeout_s"]
        transport.master_heartbeat(self.address, self.heartbeat_timeout_s, api)

    def _call(self, method: str, *args, with_id: bool = True, after_recovery: str = "retry"):
        """Call the master; on a lost connection recover, then retry (or not:
        ``after_recovery="done"`` when recovery itself redid the call's work)."""
        while True:
            generation, api = self._generation, self._api
            call_args = (self.client_id,) + args if with_id else args
            try:
                return getattr(api, method)(*call_args)
            except ClusterShutdownError:
                self.master_shut_down = True
                raise
            except (EOFError, OSError, SessionExpiredError) as exc:
                if self._closed.is_set() or self.master_shut_down:
                    raise self._lost(exc) from None
                self._recover(generation, exc)
                if after_recovery == "done":
                    return None
            except BaseException:
                # Interrupted mid-call (Ctrl-C): the reply may still be on its
                # way, so this thread's connection cannot be trusted again.
                _discard_connection(api)
                raise

    def _lost(self, exc: BaseException) -> MasterLostError:
        return MasterLostError("lost the connection to the master at %s (%s: %s)" % (
            transport.format_address(self.address), type(exc).__name__, exc), self.address)

    def _recover(self, generation: int, cause: BaseException) -> None:
        """Reconnect and resubmit, unless another thread already has since ``generation``."""
        with self._recover_lock:
            if self._generation != generation:
                return
            if self._gave_up is not None:   # another thread waited the whole time already
                raise self._gave_up
            where = transport.format_address(self.address)
            log.warning("lost the master at %s (%s); reconnecting for up to %gs", where,
                        type(cause).__name__, self.reconnect_timeout_s)
            deadline = time.monotonic() + self.reconnect_timeout_s
            pause_s = 0.05
            while True:
                if self._closed.is_set():
                    raise self._lost(cause)
                try:
                    self._open()
                    self._restore()
                    break
                except (MasterConnectionError, EOFError, OSError, SessionExpiredError) as exc:
                    if isinstance(exc, AuthkeyMismatchError):
                        raise
                    cause = exc
                if time.monotonic() + pause_s > deadline:
                    self._gave_up = MasterLostError(
                        "lost the master at %s and it did not come back within %gs (%s: %s)"
                        % (where, self.reconnect_timeout_s, type(cause).__name__, cause),
                        self.address)
                    raise self._gave_up from None
                time.sleep(pause_s)
                pause_s = min(pause_s * 2, 1.0)
            self._generation += 1
            log.warning("reconnected to the master at %s; resubmitted %d chunks", where,
                        len(self._in_flight))

    def _restore(self) -> None:
        """On a new connection: store every blob again, resubmit what is in flight."""
        with self._blob_lock:
            blobs = list(self._blobs.items())
        for start in range(0, len(blobs), 16):
            self._api.put_blobs(self.client_id, blobs[start:start + 16])
        with self._in_flight_lock:
            specs = [unfinished.spec for unfinished in self._in_flight.values()]
        for batch in submit_batches(specs):
            self._api.submit(self.client_id, batch)

    def _keep_alive(self) -> None:
        while not self._closed.wait(self.heartbeat_timeout_s / config.HEARTBEATS_PER_TIMEOUT):
            try:
                self._call("touch")
                self._tell_if_no_nodes()
            except Exception as exc:
                log.debug("keepalive stopped: %s", exc)
                return

    def _tell_if_no_nodes(self) -> None:
        """Jobs waited ``no_worker_warning_s`` with nothing delivered: say once if that is
        because no worker node is connected (they keep waiting: a node may join)."""
        if self._told_no_nodes or not self._in_flight:
            return
        if time.monotonic() - self._progress_at < config.no_worker_warning_s():
            return
        if not self.list_nodes():
            self._told_no_nodes = True
            log.warning("no worker node is connected to the master at %s; the jobs wait "
                        "until one joins (python -m minicw.worker %s %d KEY)",
                        transport.format_address(self.address), *self.address)

    # --- requests ------------------------------------------------------------------

    def put_blob(self, key: str, data: bytes) -> None:
        """Store a blob in the master once per session."""
        if key in self._blobs:
            return
        with self._blob_lock:  # two threads storing the same blob send it once
            if key in self._blobs:
                return
            self._blobs[key] = data
        self._call("put_blobs", [(key, data)], after_recovery="done")

    def context_key(self) -> str:
        """The blob key of this process's current cwd and sys.path (stored when new).

        Called for every batch sent, so the directory checks of
        ``context.describe`` run only when the cwd or sys.path changed.
        """
        try:
            signature = (os.getcwd(), tuple(sys.path))
        except OSError:  # our cwd was removed: keep the last context known
            signature = None
        if signature is None and self._context[1] is not None:
            return self._context[1]
        if signature != self._context[0]:
            described = context.describe()
            key, blob = context.make_blob(*described, output_limit=self.output_limit)
            self.put_blob(key, blob)
            self._context = (signature, key)
        return self._context[1]

    def new_chunk_id(self) -> int:
        return next(self._chunk_ids)

    def submit(self, specs: list) -> None:
        with self._in_flight_lock:
            if not self._in_flight:
                self._progress_at = time.monotonic()
            for spec in specs:
                self._in_flight[spec.chunk_id] = _Unfinished(spec)
        for batch in submit_batches(specs):
            self._call("submit", batch, after_recovery="done")

    def fetch(self, timeout_s: float) -> list:
        """Deliveries; a job already delivered (before a resubmission) has index None."""
        generation = self._generation
        last, deliveries = self._call("fetch", timeout_s, self._acked)
        if generation == self._generation:  # not numbered by a master since replaced
            self._acked = last
        if not deliveries:
            return deliveries
        self._progress_at = time.monotonic()
        self._told_no_nodes = False   # a node works now; say it again if all leave
        with self._in_flight_lock:
            return [delivery for delivery in map(self._first_time, deliveries)
                    if delivery is not None]

    def _first_time(self, fields: tuple):
        """The Delivery (as it travelled: ``fields``) with repeated jobs masked; None
        if none of it is new."""
        delivery = protocol.view(protocol.Delivery, fields)
        chunk_id, indices = delivery.chunk_id, delivery.indices
        unfinished = self._in_flight.get(chunk_id)
        if unfinished is None:
            return None  # cancelled, or complete before a resubmission
        delivered = unfinished.delivered
        if delivered is None and len(indices) == unfinished.jobs_left == unfinished.spec.n_jobs:
            del self._in_flight[chunk_id]  # the common case: a whole chunk at once
            return delivery
        if delivered is None:
            delivered = unfinished.delivered = set()
        fresh = tuple(None if index in delivered else index for index in indices)
        new = [index for index in fresh if index is not None]
        if not new:
            return None
        self._forget_jobs(chunk_id, new)
        return delivery if len(new) == len(indices) else delivery._replace(indices=fresh)

    def cancel(self, requests) -> list:
        """``[(chunk_id, indices or None)]`` -> ``[(chunk_id, cancelled indices)]``."""
        requests = list(requests)
        outcome = self._call("cancel", requests)
        with self._in_flight_lock:
            for (chunk_id, indices), (_, cancelled) in zip(requests, outcome):
                if indices is None:
                    self._in_flight.pop(chunk_id, None)
                elif cancelled:
                    self._forget_jobs(chunk_id, cancelled)
        return outcome

    def leased(self, jobs) -> list:
        """``[(chunk_id, index)]`` -> whether a worker process holds each job."""
        return self._call("leased", list(jobs))

    def kill(self, chunk_id: int, index: int) -> str:
        outcome = self._call("kill", chunk_id, index)
        if outcome == protocol.KILL_CANCELLED:
            with self._in_flight_lock:
                self._forget_jobs(chunk_id, [index])
        return outcome

    def _forget_jobs(self, chunk_id, indices) -> None:
        """``indices`` of a chunk need no result any more (delivered, or cancelled)."""
        unfinished = self._in_flight.get(chunk_id)
        if unfinished is None:
            return
        if unfinished.delivered is None:
            unfinished.delivered = set()
        unfinished.delivered.update(indices)
        unfinished.jobs_left -= len(indices)
        if unfinished.jobs_left <= 0:
            del self._in_flight[chunk_id]

    def blob_transfers(self, keys) -> dict:
        """{key: (times put, times fetched by worker nodes)}, for tests and diagnosis."""
        return self._call("blob_transfers", list(keys), with_id=False)

    def warn_once(self, notes) -> None:
        """Show each note from the workers once per session."""
        for note in notes:
            if note not in self._warned:
                self._warned.add(note)
                warnings.warn(note, RuntimeWarning, stacklevel=2)

    def list_nodes(self) -> list:
        return self._call("list_nodes", with_id=False)

    def status(self) -> dict:
        return self._call("status", with_id=False)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        # The goodbye is a courtesy (the master forgets a silent session after
        # its heartbeat timeout): a dead link must not hold the caller for long.
        connection = getattr(self._api._tls, "connection", None)
        if connection is not None:
            transport.tune(connection, link_timeout_s=GOODBYE_WAIT_S)
        try:
            self._api.goodbye(self.client_id)
        except Exception as exc:
            log.debug("goodbye failed: %s", exc)


def submit_batches(specs: list):
    """``specs`` cut into the batches of one submit call each, as they travel:
    up to about SUBMIT_BYTES_PER_CALL of payloads (a chunk larger than that
    goes alone)."""
    start, size = 0, 0
    for end, spec in enumerate(specs):
        if size and size + len(spec.payload) > config.SUBMIT_BYTES_PER_CALL:
            yield [protocol.on_wire(spec) for spec in specs[start:end]]
            start, size = end, 0
        size += len(spec.payload)
    if start < len(specs):
        yield [protocol.on_wire(spec) for spec in specs[start:]]


def _discard_connection(api) -> None:
    """Forget (and close) the calling thread's connection of a proxy."""
    connection = getattr(api._tls, "connection", None)
    if connection is not None:
        del api._tls.connection
        try:
            connection.close()
        except OSError:
            pass


# --- decoding deliveries -------------------------------------------------------------

def failure_error(failure: protocol.JobFailure, job: str) -> BaseException:
    """The exception a synthesized failure stands for."""
    kind, detail = failure
    if kind == protocol.FAIL_CRASHED:
        exit_description, attempts, printed = detail
        return WorkerCrashedError(job, exit_description, attempts,
                                  output.text_of(printed[1]) if printed else "")
    if kind == protocol.FAIL_TIMEOUT:
        return JobTimeoutError(job, detail)
    if kind == protocol.FAIL_CANCELLED:
        return CancelledError("job %s was cancelled: %s" % (job, detail))
    if kind == protocol.FAIL_NO_PYTHON:
        python, present = detail
        return NoMatchingPythonError(job, python, list(present))
    return MinicwError("job %s was lost: %s" % (job, detail))


def _chunk_job(chunk_id, index) -> str:
    return "job %s/%s" % (chunk_id, index)


def _forward_crash_output(failure: protocol.JobFailure, indices, label_of) -> None:
    """A crashed job's output, written as if it had come with a result."""
    if failure.kind != protocol.FAIL_CRASHED or not failure.detail[2]:
        return
    origin, printed = failure.detail[2]
    for index in indices:
        if index is not None:
            output.write_job(origin, label_of(index), printed)


def remote_error(description: tuple, arg=None, has_arg: bool = False) -> RemoteError:
    type_name, message, remote_traceback = description[:3]
    return RemoteError(type_name, message, remote_traceback, arg,
                       protocol.load_exception(description), has_arg)


def job_exception(error: BaseException) -> BaseException:
    """What a failed job raises in the caller: the job's own exception when it
    arrived intact (its remote traceback chained as ``__cause__``), else ``error``."""
    if isinstance(error, RemoteError) and error.exception is not None:
        original = error.exception
        original.__cause__ = _RemoteTraceback(error.remote_traceback)
        return original
    return error


class _RemoteTraceback(Exception):
    """Shows the worker's traceback under the re-raised exception."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\nRemote traceback:\n" + self.text.rstrip()


class Segment(NamedTuple):
    """Results of the consecutive jobs ``first, first+1, ...`` of one chunk."""
    first: int
    values: list
    errors: Optional[dict]    # {offset in values: exception} of the jobs that failed


def decode(delivery: protocol.Delivery, session: Session | None = None,
           label_of=None) -> tuple:
    """``([Segment], seconds)`` for one Delivery, its results loaded once.

    What the jobs printed is written to this process's stdout and stderr
    (output.py), each line prefixed with the worker and ``label_of(index)``,
    the job's name for the caller (default: "job CHUNK/INDEX").

    A whole run of consecutive jobs stays one segment, so results move in
    bulk; failures and jobs rerun out of order become one-job segments, and
    jobs delivered before a resubmission (index None) are left out.
    ``seconds`` is the time the jobs took on the worker (None for a
    synthesized failure, or results that cannot be loaded here: then every
    job fails with a SerializationError).  Notes from the workers are shown
    as warnings through ``session``.
    """
    chunk_id, indices = delivery.chunk_id, delivery.indices
    if label_of is None:
        label_of = functools.partial(_chunk_job, chunk_id)
    if delivery.failure is not None:
        _forward_crash_output(delivery.failure, indices, label_of)
        return [Segment(index, [None], {0: failure_error(delivery.failure,
                                                         "%s/%s" % (chunk_id, index))})
                for index in indices if index is not None], None
    try:
        values, errors, seconds, notes, printed = serialize.loads(delivery.results)
    except Exception as exc:
        error = SerializationError("cannot load the results of chunk %s: %s" % (chunk_id, exc))
        return [Segment(index, [None], {0: error}) for index in indices
                if index is not None], None
    if notes and session is not None:
        session.warn_once(notes)
    if printed is not None:
        origin, by_offset = printed
        output.forward(origin, {offset: jobs_output for offset, jobs_output in by_offset.items()
                                if indices[offset] is not None},
                       lambda offset: label_of(indices[offset]))
    if errors:
        errors = {offset: remote_error(description) for offset, description in errors.items()}
    if type(indices) is range and indices.step == 1:
        return [Segment(indices.start, values, errors or None)], seconds
    segments = []
    for offset, (index, value) in enumerate(zip(indices, values)):
        if index is not None:
            error = errors.get(offset) if errors else None
            segments.append(Segment(index, [value], {0: error} if error else None))
    return segments, seconds


# --- streaming many chunks ------------------------------------------------------------------

def delivered_jobs(indices) -> int:
    """How many jobs a Delivery's indices account for (None: delivered before a restart)."""
    if isinstance(indices, range):
        return len(indices)
    return len(indices) - indices.count(None)


class DeadlineCaller:
    """Calls the master from a thread of its own, each waited for no longer
    than a deadline: a link gone silent holds a call up to the link timeout
    and then the reconnection, but not the caller past its deadline
    (``timeout_error()`` is raised; the call goes on, and lands once the link
    is back).  One thread for a whole run, so its proxy connection serves call
    after call; it ends after ``close()``, or CALLER_IDLE_S without a call."""

    def __init__(self, timeout_error):
        self._timeout_error = timeout_error   # () -> the exception a late call raises
        self._requests = queue.SimpleQueue()   # (call, args, outcome, done), or None: end
        self._lock = threading.Lock()
        self._thread = None
        self.timed_out = False

    def call(self, deadline: float, call, *args):
        outcome = []
        done = threading.Event()
        self._put((call, args, outcome, done))
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise self.passed()
        returned, value = outcome[0]
        if returned:
            return value
        raise value

    def passed(self) -> BaseException:
        """The deadline has passed: the exception to raise."""
        self.timed_out = True
        return self._timeout_error()

    def call_later(self, call, *args) -> None:
        """``call(*args)`` after the calls before it, without waiting for it."""
        self._put((call, args, [], threading.Event()))

    def close(self) -> None:
        """End the thread once the calls before this are made."""
        self._requests.put(None)

    def _put(self, request) -> None:
        self._requests.put(request)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, daemon=True,
                                                name="minicw-deadline-caller")
                self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                request = self._requests.get(timeout=CALLER_IDLE_S)
            except queue.Empty:
                request = None
            if request is None:   # closed, or idle
                with self._lock:   # _put starts a new thread for what comes after this
                    if self._requests.empty():
                        self._thread = None
                        return
                continue
            call, args, outcome, done = request
            try:
                outcome.append((True, call(*args)))
            except BaseException as exc:
                outcome.append((False, exc))
            finally:
                done.set()


def stream_results(session: Session, chunks, window: int, on_idle=None,
                   deadline: float | None = None, timeout_error=TimeoutError):
    """Run chunks with at most ``window`` in flight; yield each Delivery (``decode``
    reads it; it may hold part of a chunk).  ``on_idle()`` runs after a fetch
    that brought nothing (at least every FETCH_WAIT_S: a progress line ticks).

    ``chunks`` yields ChunkSpecs (their ids from ``session.new_chunk_id``).
    Closing the generator early (or an exception in the consumer) cancels
    every chunk still queued.  Past ``deadline`` (time.monotonic()), whatever
    the link does, it raises ``timeout_error()`` and cancels them in the background.
    """
    remaining_by_chunk = {}   # chunk_id -> jobs not yet delivered
    chunk_iter = iter(chunks)
    exhausted = False
    caller = None if deadline is None else DeadlineCaller(timeout_error)
    try:
        while True:
            batch = []
            while not exhausted and len(remaining_by_chunk) + len(batch) < window:
                spec = next(chunk_iter, None)
                if spec is None:
                    exhausted = True
                    break
                batch.append(spec)
                remaining_by_chunk[spec.chunk_id] = spec.n_jobs
            if batch:
                if caller is None:
                    session.submit(batch)
                else:
                    caller.call(deadline, session.submit, batch)
            if not remaining_by_chunk:
                return
            if deadline is None:
                deliveries = session.fetch(FETCH_WAIT_S)
            else:
                wait_s = min(FETCH_WAIT_S, max(0.0, deadline - time.monotonic()))
                deliveries = caller.call(deadline, session.fetch, wait_s)
                if not deliveries and time.monotonic() >= deadline:
                    raise caller.passed()
            if not deliveries and on_idle is not None:
                on_idle()
            for delivery in deliveries:
                chunk_id = delivery.chunk_id
                if chunk_id not in remaining_by_chunk:
                    continue  # left over from an earlier, cancelled stream
                remaining_by_chunk[chunk_id] -= delivered_jobs(delivery.indices)
                if remaining_by_chunk[chunk_id] <= 0:
                    del remaining_by_chunk[chunk_id]
                yield delivery
    finally:
        if remaining_by_chunk:
            requests = [(chunk_id, None) for chunk_id in remaining_by_chunk]
            if caller is not None and caller.timed_out:
                # the link may be what made it late: do not wait on it again
                caller.call_later(cancel_quietly, session, requests)
            else:
                cancel_quietly(session, requests)
        if caller is not None:
            caller.close()


def cancel_quietly(session: Session, requests) -> None:
    """Cancel chunks on the way out of a run; a failure to do so is only logged."""
    try:
        session.cancel(requests)
    except (MinicwError, OSError) as exc:
        log.debug("cancelling %d chunks failed: %s", len(requests), exc)
