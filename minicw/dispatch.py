"""Many small calls in, few large messages out: the engine under the program clients.

    caller threads                   Dispatcher                           master
    --------------                   ----------                           ------
    submit_job(fn, args) --> Job --> pending --(sender thread, or the  --submit([ChunkSpec])-->
                                     caller itself when nothing else is
                                     under way)
                                     packs consecutive jobs into chunks
                                     sized from measured job time
    MapStream (executor.map)  -----> its own chunks, a bounded window --submit-->
                                     routes: chunk_id -> JobsRoute | MapStream
    Job.on_done(ok, value)  <------- receiver thread <----------------- fetch(): [Delivery]
    MapStream.results()     <-------   route.deliver(delivery): decodes
                                       (client.decode), settles each job once

Why batch behind a one-call API: one proxy call costs tens of microseconds,
so a loop of ``submit()`` calls is coalesced into chunks of many jobs, and
results come back many per message.  A lone job is never held back: the
sender sends whatever is pending as soon as it is free, and a submit when
nothing else is under way is sent straight from the caller's thread.

How big a chunk is: chunking.py (``backlog_chunks`` for submits: one job per
chunk for an untimed function, about CHUNK_TARGET_S of work for a timed
one; ``jobs_per_chunk`` for a map of known length: spread over every worker
process, in chunks that shrink towards its end).

Functions are serialized once per session: plain functions are remembered
(weakly) with their blob key, and a blob is sent to the master once; worker
nodes fetch each blob once.  Later changes to a remembered function's
globals or closure cells are therefore not seen by the workers.

State changes (pending, routes, outstanding counts, settling a job) happen
under ``Dispatcher._lock``, with two conditions on it: ``_work`` wakes the
sender, ``_settled`` the callers of ``wait_settled``.  ``_send_lock`` is
held while one thread packs and sends, so a cancel finds a job either
pending or with its chunk id.  User callbacks run outside both locks.  A
route (``JobsRoute`` of submitted jobs, or a ``MapStream``) owns the chunks
registered for it: ``deliver`` files a Delivery, ``fail`` ends it with an
error (the session broke, or closed).
"""
from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
import types
import weakref
from collections import deque
from concurrent.futures import CancelledError, TimeoutError as FuturesTimeoutError

from minicw import broadcast, chunking, client, config, protocol, serialize
from minicw.errors import MinicwError, SerializationError
from minicw.progress import OFF as NO_PROGRESS

log = logging.getLogger(__name__)


class Job:
    """One submitted call and what happens to it."""

    __slots__ = ("func_key", "fn", "args", "kwargs", "job_timeout", "max_retries",
                 "on_done", "chunk_id", "index", "settled", "label")

    def __init__(self, func_key, fn, args, kwargs, job_timeout, max_retries, on_done,
                 label=None):
        self.func_key = func_key
        self.fn = fn                  # named only if the job fails (not per submit)
        self.args = args
        self.kwargs = kwargs
        self.job_timeout = job_timeout
        self.max_retries = max_retries
        self.on_done = on_done        # on_done(ok, value_or_exception)
        self.chunk_id = None          # set when packed into a chunk
        self.index = None
        self.settled = False
        self.label = label            # its name in forwarded output: a str ("job mine"),
                                      # or the submit's number, named only if it prints


class Dispatcher:
    """A client session with batching sender and routing receiver threads."""

    def __init__(self, address, authkey, job_timeout=None,
                 max_retries: int = config.DEFAULT_MAX_RETRIES, forward_output=None):
        self.session = client.Session(address, authkey, forward_output=forward_output)
        self._job_numbers = itertools.count(1)  # names jobs in forwarded output
        self.job_timeout = job_timeout
        self.max_retries = max_retries
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()     # held while chunks are packed and sent
        self._work = threading.Condition(self._lock)
        self._settled = threading.Condition(self._lock)
        self._pending = []                     # Jobs not yet packed
        self._sending = False                  # a thread is packing and sending
        self._routes = {}                      # chunk_id -> JobsRoute or MapStream
        self._outstanding = 0                  # jobs submitted and not settled
        self._streams = weakref.WeakSet()      # MapStreams still running
        self._func_keys = weakref.WeakKeyDictionary()  # plain function -> blob key
        self._last_function = None             # (weakref to it, its key)
        self._bytecode_keys = set()            # function blobs that carry bytecode
        self._job_times = chunking.JobTimes()  # seconds per job of each function
        self._node_count = (0, 0.0)            # (worker processes, when counted)
        self.label_output = True               # prefix forwarded lines with the job's name
        self.namespace = None                  # functions' globals shared across payloads
                                               # in a worker process (serialize.dumps)
        self.broken = None                     # the error that ended the session
        self.closed = False
        self._sender = self._spawn(self._send_loop, "minicw-sender")
        self._receiver = self._spawn(self._receive_loop, "minicw-receiver")

    @staticmethod
    def _spawn(target, name) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    # --- functions and data -------------------------------------------------------

    def function_key(self, fn) -> str:
        """The blob key of ``fn``, serializing and storing it the first time."""
        last = self._last_function
        if last is not None and last[0]() is fn:  # a loop submitting one function
            return last[1]
        remembered = isinstance(fn, types.FunctionType)
        if remembered:
            key = self._func_keys.get(fn)
            if key is not None:
                self._last_function = (weakref.ref(fn), key)
                return key
        try:
            data = serialize.dumps(fn, protocol.PICKLE_PROTOCOL, self.namespace)
        except Exception as exc:
            raise SerializationError("cannot send %r to the workers: %s" % (fn, exc)) from exc
        key, blob = protocol.pack_blob(protocol.BLOB_CALLABLE, data)
        self.session.put_blob(key, blob)
        if serialize.bytecode_python(data):
            self._bytecode_keys.add(key)
        if remembered:
            self._func_keys[fn] = key
            self._last_function = (weakref.ref(fn), key)
        return key

    def chunk_python(self, func_keys, payload: bytes) -> str | None:
        """The Python a chunk needs: this one when its functions or its payload
        carry bytecode (only a node of the same version may run them), else None."""
        if serialize.bytecode_python(payload) or not self._bytecode_keys.isdisjoint(func_keys):
            return serialize.PYTHON_TAG
        return None

    def broadcast(self, obj) -> broadcast.Handle:
        """Store ``obj`` in the master once; jobs given the handle receive the object."""
        self.check_open()
        return broadcast.store(self.session, obj, self.namespace)

    def jobs_per_chunk(self, func_key, run_jobs: int | None = None,
                       jobs_left: int | None = None) -> int:
        """Jobs for the next chunk of ``func_key`` in a run of ``run_jobs`` (None: unknown)
        of which ``jobs_left`` are not cut yet."""
        return self._job_times.jobs_per_chunk(func_key, run_jobs, self.worker_processes(),
                                              jobs_left)

    def worker_processes(self) -> int:
        """Worker processes connected now (counted at most every NODE_COUNT_TTL_S)."""
        count, when = self._node_count
        now = time.monotonic()
        if now - when > config.NODE_COUNT_TTL_S:
            count = sum(node["nprocs"] for node in self.session.list_nodes())
            self._node_count = (count, now)
        return count

    def window_chunks(self) -> int:
        return chunking.window_chunks(self.worker_processes())

    # --- submitting ---------------------------------------------------------------------

    def check_open(self) -> None:
        if self.broken is not None:
            raise self.broken
        if self.closed:
            raise RuntimeError("cannot schedule new jobs after shutdown")

    def submit_job(self, fn, args, kwargs, on_done, job_timeout=None, max_retries=None,
                   label=None) -> Job:
        """Queue ``fn(*args, **kwargs)``; ``on_done(ok, value)`` is called once with the
        outcome.  ``label`` names the job in its forwarded output (default: "job N",
        N counting this session's submits)."""
        self.check_open()
        job = Job(self.function_key(fn), fn, args, kwargs,
                  self.job_timeout if job_timeout is None else job_timeout,
                  self.max_retries if max_retries is None else max_retries, on_done,
                  label or next(self._job_numbers))
        with self._lock:
            self.check_open()
            self._outstanding += 1
            self._pending.append(job)
            # A job submitted when nothing else is under way goes out from this
            # thread at once (no wake-up of the sender); in a burst, the sender
            # thread batches what accumulates while it is busy.
            send_here = not self._sending and self._outstanding == 1
            if send_here:
                self._sending = True
            elif not self._sending:  # a busy sender takes this job on its next round
                self._work.notify()
        if send_here:
            self._send_pending()
        return job

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                while not (self._pending and not self._sending) and not self.closed:
                    self._work.wait()
                if self.closed and not self._pending:
                    return
                self._sending = True
            self._send_pending()

    def _send_pending(self) -> None:
        """Pack and send everything pending; the caller has set ``_sending``."""
        try:
            while True:
                with self._send_lock:
                    with self._lock:
                        jobs, self._pending = self._pending, []
                        if not jobs:
                            self._sending = False
                            return
                    self._send_jobs(jobs)
        except BaseException:
            with self._lock:
                self._sending = False
                self._work.notify()  # jobs queued meanwhile saw _sending and did not
            raise

    def _send_jobs(self, jobs: list) -> None:
        context_key = None
        specs = []
        failed = []
        try:
            context_key = self.session.context_key()
            for chunk_jobs in self._cut(jobs):
                spec = self._pack(chunk_jobs, context_key, failed)
                if spec is not None:
                    specs.append(spec)
            if specs:
                self.session.submit(specs)
        except BaseException as exc:
            # Interrupted (Ctrl-C while pickling a large argument, say): the
            # jobs in hand fail rather than wait forever, and the interrupt goes on.
            interrupt = None if isinstance(exc, Exception) else exc
            error = exc if interrupt is None else MinicwError(
                "job submission was interrupted by %s; the job may not have reached "
                "the master" % type(exc).__name__)
            sent = {spec.chunk_id for spec in specs}
            self._fail_chunks(sent, error)
            unsent = [job for job in jobs if job.chunk_id not in sent]
            failed.extend((job, error) for job in unsent)
        else:
            interrupt = None
        for job, exc in failed:
            self._settle(job, False, exc)
        if interrupt is not None:
            raise interrupt

    def _cut(self, jobs: list):
        """The live jobs (not cancelled before they were sent), in the chunks
        ``chunking.backlog_chunks`` sizes them into."""
        live = [job for job in jobs if not job.settled]
        processes = self.worker_processes() if len(live) >= chunking.LARGE_BACKLOG else 0
        calls = [(job.func_key, (job.job_timeout, job.max_retries)) for job in live]
        start = 0
        for size in chunking.backlog_chunks(calls, self._job_times, processes):
            yield live[start:start + size]
            start += size

    def _pack(self, jobs: list, context_key, failed: list):
        """A ChunkSpec for ``jobs`` (registering its route), or None if none could be packed."""
        func_keys = []
        items = []
        for job in jobs:
            if job.func_key not in func_keys:
                func_keys.append(job.func_key)
            items.append((func_keys.index(job.func_key), job.args, job.kwargs))
        try:
            payload = protocol.pack_payload(protocol.CALL_FULL, items, self.namespace)
        except Exception:
            if len(jobs) == 1:
                failed.append((jobs[0], _argument_error(jobs[0])))
                return None
            # Find the culprits: pack the rest without them.
            good = []
            for job in jobs:
                try:
                    protocol.pack_payload(protocol.CALL_FULL, [(0, job.args, job.kwargs)],
                                          self.namespace)
                    good.append(job)
                except Exception:
                    failed.append((job, _argument_error(job)))
            return self._pack(good, context_key, failed) if good else None
        chunk_id = self.session.new_chunk_id()
        with self._lock:
            for index, job in enumerate(jobs):
                job.chunk_id = chunk_id
                job.index = index
            self._routes[chunk_id] = JobsRoute(self, tuple(func_keys), jobs)
        job = jobs[0]
        return protocol.ChunkSpec(chunk_id, tuple(func_keys), len(jobs), payload,
                                  job.job_timeout, job.max_retries, context_key,
                                  self.chunk_python(func_keys, payload))

    def register_stream(self, chunk_id: int, stream) -> None:
        with self._lock:
            self._routes[chunk_id] = stream
            self._streams.add(stream)

    def unregister_stream(self, chunk_ids) -> None:
        with self._lock:
            for chunk_id in chunk_ids:
                self._routes.pop(chunk_id, None)

    # --- cancelling -------------------------------------------------------------------

    def cancel_job(self, job: Job) -> bool:
        """Cancel a job that has not started: True if it will never run."""
        with self._send_lock:  # so a job being sent has its chunk id
            with self._lock:
                if job.settled:
                    return False
                if job.chunk_id is None:  # still pending here: the sender skips it
                    self._settle_locked(job)
                    return True
            try:
                [(_, cancelled)] = self.session.cancel([(job.chunk_id, [job.index])])
            except MinicwError:
                return False
        if job.index not in cancelled:
            return False  # leased: it may be running
        with self._lock:
            if job.settled:
                return False
            self._settle_locked(job)
        return True

    def job_leased(self, job: Job) -> bool:
        """Whether a worker process holds the job now (it can no longer be cancelled)."""
        with self._lock:
            if job.settled or job.chunk_id is None:
                return False
        try:
            [held] = self.session.leased([(job.chunk_id, job.index)])
        except MinicwError:
            return False
        return held

    def kill_job(self, job: Job) -> bool:
        """End a job wherever it is; True if it will end as cancelled."""
        if self.cancel_job(job):
            return True
        with self._lock:
            if job.settled or job.chunk_id is None:
                return False
        outcome = self.session.kill(job.chunk_id, job.index)
        if outcome == protocol.KILL_CANCELLED:
            with self._lock:
                if job.settled:
                    return False
                self._settle_locked(job)
            return True
        return outcome == protocol.KILL_KILLING

    def cancel_all_queued(self) -> list:
        """Cancel every job not yet running; returns the Jobs cancelled."""
        with self._send_lock:
            with self._lock:
                cancelled = [job for job in self._pending if not job.settled]
                for job in cancelled:
                    self._settle_locked(job)
                sent = {chunk_id: [job.index for job in route.jobs if not job.settled]
                        for chunk_id, route in self._routes.items() if route.jobs}
            if sent:
                try:
                    outcome = self.session.cancel(list(sent.items()))
                except MinicwError:
                    outcome = []
                with self._lock:
                    for chunk_id, indices in outcome:
                        route = self._routes.get(chunk_id)
                        if route is None:
                            continue
                        for index in indices:
                            job = route.jobs[index]
                            if not job.settled:
                                self._settle_locked(job)
                                cancelled.append(job)
        return cancelled

    def kill_all(self) -> None:
        """End every submitted job now: the queued ones are cancelled, the running
        ones killed (their processes are replaced); minicw.Pool.terminate()."""
        with self._lock:
            jobs = self._pending + [job for route in self._routes.values() for job in route.jobs]
        self.kill_jobs(jobs)
        for stream in self.active_streams():
            stream.close()

    def kill_jobs(self, jobs) -> None:
        """End ``jobs`` wherever they are: those still queued are cancelled in one
        call (settled, their ``on_done`` not called), running ones killed (their
        ``on_done`` gets CancelledError when the master confirms)."""
        with self._send_lock:   # so a job being sent has its chunk id
            with self._lock:
                live = [job for job in jobs if not job.settled]
                sent = {}
                for job in live:
                    if job.chunk_id is None:   # still pending here: the sender skips it
                        self._settle_locked(job)
                    else:
                        sent.setdefault(job.chunk_id, []).append(job.index)
            if not sent:
                return
            try:
                outcome = self.session.cancel(list(sent.items()))
            except MinicwError:
                return   # the session is gone: nothing of it runs on
        cancelled = {(chunk_id, index) for chunk_id, indices in outcome for index in indices}
        for job in live:
            if job.chunk_id is None or job.settled:
                continue
            if (job.chunk_id, job.index) in cancelled:
                with self._lock:
                    if not job.settled:
                        self._settle_locked(job)
                continue
            try:
                self.kill_job(job)
            except MinicwError:
                return

    # --- results ---------------------------------------------------------------------

    def _receive_loop(self) -> None:
        while True:
            try:
                deliveries = self.session.fetch(client.FETCH_WAIT_S)
            except Exception as exc:
                if not self.closed:
                    self._break(exc)
                return
            for delivery in deliveries:
                self._route(delivery)
            if self.closed and not deliveries:
                return

    def _route(self, delivery: protocol.Delivery) -> None:
        with self._lock:
            route = self._routes.get(delivery.chunk_id)
        if route is not None:  # None: its jobs were cancelled or its stream closed
            route.deliver(delivery)

    def record_time(self, func_keys, seconds: float, count: int) -> None:
        self._job_times.record(func_keys, seconds, count)

    def _settle(self, job: Job, ok: bool, value) -> None:
        with self._lock:
            if job.settled:
                return
            self._settle_locked(job)
        try:
            job.on_done(ok, value)
        except Exception:
            log.exception("a job's completion handler raised")

    def _settle_locked(self, job: Job) -> None:
        job.settled = True
        job.fn = job.args = job.kwargs = None  # free the function and arguments now
        self._outstanding -= 1
        if self._outstanding == 0:
            self._settled.notify_all()

    def _fail_chunks(self, chunk_ids, exc) -> None:
        for chunk_id in chunk_ids:
            with self._lock:
                route = self._routes.pop(chunk_id, None)
            if route is not None:
                route.fail(exc)

    def _break(self, exc: BaseException) -> None:
        """The session ended under us: every outstanding job fails with ``exc``."""
        log.warning("client session ended: %s", exc)
        self.broken = exc
        self._fail_all(self._take_all(), exc)

    def _take_all(self) -> tuple:
        """``(pending jobs, routes)``, taken from the dispatcher; the sender is woken."""
        with self._lock:
            routes, self._routes = self._routes, {}
            pending, self._pending = self._pending, []
            self._work.notify_all()
        return pending, routes

    def _fail_all(self, taken: tuple, exc: BaseException) -> None:
        pending, routes = taken
        for job in pending:
            self._settle(job, False, exc)
        for route in routes.values():
            route.fail(exc)

    # --- shutting down -------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def wait_settled(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted job is settled."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while self._outstanding:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._settled.wait(remaining)
            return True

    def active_streams(self) -> list:
        with self._lock:
            return list(self._streams)

    def close(self) -> None:
        """End the session; jobs not settled yet are settled as cancelled."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        taken = self._take_all()
        self.session.close()
        current = threading.current_thread()
        for thread in (self._sender, self._receiver):
            if thread is not current:
                thread.join()
        self._fail_all(taken, CancelledError(
            "the client session was closed before the job finished"))


class JobsRoute:
    """Where the results of one chunk of submitted jobs go: each job's ``on_done``."""

    __slots__ = ("dispatcher", "func_keys", "jobs")

    def __init__(self, dispatcher: Dispatcher, func_keys: tuple, jobs: list):
        self.dispatcher = dispatcher
        self.func_keys = func_keys
        self.jobs = jobs              # by index in the chunk

    def deliver(self, delivery: protocol.Delivery) -> None:
        dispatcher = self.dispatcher
        jobs = self.jobs
        segments, seconds = client.decode(
            delivery, dispatcher.session,
            (lambda index: _job_label(jobs[index].label)) if dispatcher.label_output
            else _unlabelled)
        if seconds is not None:
            dispatcher.record_time(self.func_keys, seconds,
                                   sum(len(segment.values) for segment in segments))
        outcomes = []
        with dispatcher._lock:  # settle the whole delivery under one acquisition
            for first, values, errors in segments:
                for offset, value in enumerate(values):
                    job = jobs[first + offset]
                    if job.settled:
                        continue
                    error = errors.get(offset) if errors else None
                    if error is not None and hasattr(error, "job"):
                        # a crash or a timeout: say which call
                        _rename_job(error, "%s%s" % (name_of(job.fn), _short_repr(job.args)))
                    dispatcher._settle_locked(job)
                    outcomes.append((job.on_done, error is None,
                                     value if error is None else error))
            if all(job.settled for job in jobs):
                dispatcher._routes.pop(delivery.chunk_id, None)
        for on_done, ok, value in outcomes:
            try:
                on_done(ok, value)
            except Exception:
                log.exception("a job's completion handler raised")

    def fail(self, exc: BaseException) -> None:
        for job in self.jobs:
            self.dispatcher._settle(job, False, exc)


class MapResults(itertools.chain):
    """What ``executor.map`` returns: the results of a MapStream, one segment's
    iterator after another (``itertools.chain``, so that taking the next result
    runs no Python code), with a generator's ``close()``: the stream's jobs
    still queued or running are cancelled."""

    @classmethod
    def of(cls, segments, stream: MapStream) -> "MapResults":
        results = cls.from_iterable(segments)
        results._segments = segments
        results._stream = stream
        return results

    def close(self) -> None:
        # the segment being taken first: the chain holds it, and a generator's
        # close() ends its iteration at once
        taking = self._stream.taking
        if taking is not None:
            deque(taking, maxlen=0)
        self._segments.close()
        self._stream.close()


def _taking(values: deque, count: int):
    """An iterator that pops ``count`` results off ``values``: once the caller drops
    a result, nothing here holds it."""
    return itertools.starmap(values.popleft, itertools.repeat((), count))


_MORE = object()   # MapStream._take: nothing in flight, submit more first
_IDLE = object()   # MapStream._take: nothing arrived for a while, the progress line may tick


def name_of(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _unlabelled(index) -> None:
    """No name for a job's forwarded lines: they come as the job wrote them."""
    return None


def _short_repr(args, limit: int = 60) -> str:
    text = repr(tuple(args)) if args is not None else "(...)"
    if text.endswith(",)"):
        text = text[:-2] + ")"
    return text if len(text) <= limit else text[:limit - 4] + "...)"


def _job_label(label) -> str:
    """A job's name in forwarded output: its given name, or "job N" for its number
    (formatted here, when it printed, not for every submit)."""
    return label if isinstance(label, str) else "job %d" % label


def _rename_job(error, label: str) -> None:
    """Name the failed call in a WorkerCrashedError / JobTimeoutError."""
    error.job = label
    error.args = (label,) + tuple(error.args[1:])


def _argument_error(job: Job) -> SerializationError:
    """The error of a job whose arguments cannot be serialized; the serializer's
    own exception is its ``__cause__`` (minicw.Pool raises that one, as
    multiprocessing does)."""
    cause = None
    try:
        serialize.dumps((job.args, job.kwargs), protocol.PICKLE_PROTOCOL)
        detail = "unknown reason"
    except Exception as exc:
        detail, cause = str(exc), exc
    error = SerializationError("cannot send the job's arguments to the workers: %s" % detail)
    error.__cause__ = cause
    return error


# --- map over iterables, streaming ----------------------------------------------------------

class MapStream:
    """``fn`` over items pulled lazily, at most a window of chunks in flight; the
    route of every chunk it submitted.

    The consumer's thread pulls items and submits chunks as results are
    consumed; the receiver thread files results with ``deliver``.  Ordered
    results are yielded by position; unordered ones as they arrive.
    """

    jobs = ()   # a route's jobs that cancel_all_queued may cancel: a stream's are its own

    def __init__(self, dispatcher: Dispatcher, fn, items, kind: int, chunksize: int | None,
                 window_jobs: int | None, ordered: bool, timeout: float | None,
                 job_timeout=None, max_retries=None, length: int | None = None,
                 progress=NO_PROGRESS):
        self.dispatcher = dispatcher
        self.func_key = dispatcher.function_key(fn)
        self.func_name = name_of(fn)
        self.length = length                 # jobs in the whole map; None: unknown
        # A range, list or tuple of single arguments is cut by slicing: no
        # per-item work here, and a range travels as a range.
        self._sequence = items if kind == protocol.CALL_ONE and type(items) in (
            range, list, tuple) else None
        self.items = iter(items)
        self.kind = kind
        self.chunksize = chunksize
        self.window_chunks = dispatcher.window_chunks()
        self.window_jobs = window_jobs
        self.ordered = ordered
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.job_timeout = dispatcher.job_timeout if job_timeout is None else job_timeout
        self.max_retries = dispatcher.max_retries if max_retries is None else max_retries
        self.context_key = dispatcher.session.context_key()
        self._cond = threading.Condition()
        self._feed_lock = threading.Lock()   # one thread pulls from ``items`` at a time
        self._in_flight = {}                 # chunk_id -> [first position, jobs not yet yielded]
        self._ready = {}                     # first position -> (values, errors), ordered mode
        self._arrived = deque()              # (values, errors), unordered mode
        self._next_position = 0              # next position to pull from ``items``
        self._next_to_yield = 0
        self._jobs_in_flight = 0             # submitted, not yet yielded
        self._results_due = 0                # submitted, result not yet arrived
        self._exhausted = False
        self._submitted = False              # the first chunks have gone
        self._error = None                   # the session broke
        self._eager = False                  # shutdown: submit everything now
        self.checkpointed = None             # a checkpoint.CheckpointedMap journaling results
        self._timed_out = False              # its timeout ran out (close cancels in the background)
        self._caller = None                  # client.DeadlineCaller: submits with a timeout
        self.progress = progress             # progress.Progress: counts segments as taken
        self.taking = None                   # the iterator over the segment being taken

    # --- feeding (consumer's thread) ---------------------------------------------------------

    def top_up(self) -> None:
        """Submit chunks until the window is full or the items run out.

        Refilling waits until half the window has come back, so chunks go
        to the master many per call instead of one per call.  What was
        packed in the first FIRST_SUBMIT_S goes at once, so work starts
        while the rest are packed (by time, not by count: once workers on
        this machine are busy, packing gets a fraction of a CPU, so a small
        first call would leave them waiting for the next); the rest go in
        calls of about SUBMIT_BYTES_PER_CALL.
        """
        with self._feed_lock:
            if not self._eager and not self._half_empty():
                return
            specs, size = [], 0
            first_by = time.perf_counter() + config.FIRST_SUBMIT_S
            while not self._exhausted and (self._eager or self._has_room(len(specs))):
                spec = self._next_chunk()
                if spec is None:
                    continue
                specs.append(spec)
                size += len(spec.payload)
                if size >= config.SUBMIT_BYTES_PER_CALL or (
                        not self._submitted and time.perf_counter() >= first_by):
                    self._submit(specs)
                    specs, size = [], 0
            if specs:
                self._submit(specs)

    def _submit(self, specs: list) -> None:
        if self.deadline is None:
            self.dispatcher.session.submit(specs)
        else:
            self._submit_by_deadline(specs)
        self._submitted = True

    def _submit_by_deadline(self, specs: list) -> None:
        """Submit, waiting no longer than the map's ``timeout`` allows, whatever
        the link does (client.DeadlineCaller)."""
        if self._caller is None:
            self._caller = client.DeadlineCaller(FuturesTimeoutError)
        try:
            self._caller.call(self.deadline, self.dispatcher.session.submit, specs)
        except FuturesTimeoutError:
            self._timed_out = self._caller.timed_out
            raise

    def _half_empty(self) -> bool:
        with self._cond:
            if self.window_jobs is not None and self._jobs_in_flight * 2 <= self.window_jobs:
                return True
            return len(self._in_flight) * 2 <= self.window_chunks

    def _has_room(self, unsent: int) -> bool:
        with self._cond:
            chunks = len(self._in_flight) + unsent
            if chunks >= self.window_chunks:
                return False
            return self.window_jobs is None or self._jobs_in_flight < self.window_jobs

    def _next_chunk(self):
        size = self.chunksize or self.dispatcher.jobs_per_chunk(
            self.func_key, self.length,
            None if self.length is None else self.length - self._next_position)
        if self.window_jobs is not None:
            with self._cond:
                size = max(1, min(size, self.window_jobs - self._jobs_in_flight))
        if self._sequence is not None:
            batch = self._sequence[self._next_position:self._next_position + size]
        else:
            batch = list(itertools.islice(self.items, size))
        if len(batch) < size:
            self._exhausted = True
        if not batch:
            return None
        if self.kind == protocol.CALL_STAR:
            batch = [tuple(item) for item in batch]
        payload = protocol.pack_payload(self.kind, batch, self.dispatcher.namespace)
        chunk_id = self.dispatcher.session.new_chunk_id()
        with self._cond:
            self._in_flight[chunk_id] = [self._next_position, len(batch)]
            self._next_position += len(batch)
            self._jobs_in_flight += len(batch)
            self._results_due += len(batch)
        self.dispatcher.register_stream(chunk_id, self)
        return protocol.ChunkSpec(chunk_id, (self.func_key,), len(batch), payload,
                                  self.job_timeout, self.max_retries, self.context_key,
                                  self.dispatcher.chunk_python((self.func_key,), payload))

    # --- arriving results (receiver thread) ----------------------------------------------------

    def deliver(self, delivery: protocol.Delivery) -> None:
        chunk_id = delivery.chunk_id
        segments, seconds = client.decode(
            delivery, self.dispatcher.session,
            functools.partial(self._label, chunk_id) if self.dispatcher.label_output
            else _unlabelled)
        count = sum(len(segment.values) for segment in segments)
        if seconds is not None:
            self.dispatcher.record_time((self.func_key,), seconds, count)
        checkpointed = self.checkpointed
        with self._cond:
            record = self._in_flight.get(chunk_id)
            if record is None:
                return
            first = record[0]
            self._results_due -= count
            for index, values, errors in segments:
                if errors:
                    for offset, error in errors.items():
                        if hasattr(error, "job"):  # a crash or a timeout: say which item
                            position = first + index + offset
                            if checkpointed is not None:  # this stream runs a resumed map's gaps
                                position = checkpointed.position_of(position)
                            _rename_job(error, "%s on item %d" % (self.func_name, position))
                if self.ordered:
                    self._ready[first + index] = (deque(values), errors)
                else:
                    self._arrived.append((deque(values), errors))
            if checkpointed is not None:
                # Queued before the consumer may see them: a run that ends
                # once it has yielded its last result must find them queued.
                for index, values, errors in segments:
                    checkpointed.journal_segment(first + index, values, errors)
            if not self.ordered:
                self._retire(chunk_id, record, count)
            # In order, most chunks arrive before the consumer wants them:
            # waking it for those would cost a thread switch each (200 nodes
            # finish 200 chunks in any order).
            if not self.ordered or self._next_to_yield in self._ready or not self._results_due:
                self._cond.notify_all()

    def _label(self, chunk_id: int, index: int) -> str:
        """A job's name in its forwarded output: its item's position in the map."""
        record = self._in_flight.get(chunk_id)
        if record is None:
            return "item ?"
        position = record[0] + index
        if self.checkpointed is not None:
            position = self.checkpointed.position_of(position)
        return "item %d" % position

    def _retire(self, chunk_id, record, count: int) -> None:
        """``count`` jobs of a chunk were yielded (or handed over, unordered)."""
        record[1] -= count
        self._jobs_in_flight -= count
        if record[1] <= 0:
            del self._in_flight[chunk_id]
            self.dispatcher.unregister_stream((chunk_id,))

    def fail(self, exc: BaseException) -> None:
        """The session ended: results still due will never come (those here still count)."""
        with self._cond:
            if self._results_due:
                self._error = exc
            self._cond.notify_all()

    # --- consuming (consumer's thread) ----------------------------------------------------------

    def results(self) -> "MapResults":
        """The results in order (or as they arrive), raising at the first failed job."""
        return MapResults.of(self._segments(), self)

    def _segments(self):
        """Iterators over the segments' results, in the stream's order: the
        caller's iteration (a chain of them) moves from one result to the next
        in C, and comes here once per segment.  At a failure, the results
        before it, then its exception."""
        progress = self.progress
        try:
            while True:
                self.top_up()
                segment = self._take()
                if segment is _MORE:
                    continue
                if segment is _IDLE:
                    progress.tick()
                    continue
                if segment is None:
                    return
                values, errors = segment
                del segment
                if errors is None:
                    progress.add(len(values))   # a segment at a time: per result, nothing
                    self.taking = _taking(values, len(values))
                    yield self.taking
                    continue
                failed = min(errors)
                progress.add(failed + 1, 1)   # up to the failure that will raise
                self.taking = _taking(values, failed)
                yield self.taking
                raise client.job_exception(errors[failed])
        finally:
            self.close()
            if self.checkpointed is None:   # else its Results, which counts stored ones too
                progress.finish()

    def next_segment(self, timeout: float | None = None):
        """The next segment ``(deque of values, errors)`` in the stream's order,
        or None when all are taken; FuturesTimeoutError when none came within
        ``timeout`` seconds, after which the stream goes on (``results()``
        instead ends at its map-wide timeout).  For iterators that raise each
        failure in its place and go on (minicw.Pool's imap)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.top_up()
            segment = self._take(deadline)
            if segment is _IDLE:
                self.progress.tick()
            elif segment is not _MORE:
                if segment is not None:
                    values, errors = segment
                    self.progress.add(len(values), len(errors) if errors else 0)
                return segment

    def _take(self, call_deadline: float | None = None):
        """The next segment ``(deque of values, errors)`` to yield; None when all are
        yielded; _MORE when nothing is in flight and more must be submitted; _IDLE
        when nothing came within the progress display's wake-up time.  A
        ``call_deadline`` (time.monotonic()) bounds this call only."""
        with self._cond:
            while True:
                if self.ordered:
                    segment = self._ready.pop(self._next_to_yield, None)
                    if segment is not None:
                        count = len(segment[0])
                        self._next_to_yield += count
                        self._retire_oldest(count)
                        return segment
                elif self._arrived:
                    return self._arrived.popleft()
                if self._error is not None:
                    raise self._error
                if not self._in_flight:
                    return None if self._exhausted else _MORE
                remaining = None
                deadline = self.deadline if call_deadline is None else call_deadline
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._timed_out = call_deadline is None
                        raise FuturesTimeoutError()
                wait_s = self.progress.wait_s(remaining)
                if not self._cond.wait(wait_s) and wait_s != remaining:
                    return _IDLE

    def _retire_oldest(self, count: int) -> None:
        """In order, ``count`` yielded positions belong to the oldest chunks in flight."""
        while count:
            oldest = next(iter(self._in_flight))
            record = self._in_flight[oldest]
            taken = min(count, record[1])
            self._retire(oldest, record, taken)
            count -= taken

    def finish_eagerly(self) -> None:
        """Submit every remaining item now (shutdown: the session is about to end)."""
        self._eager = True
        self.top_up()

    def wait_delivered(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted job's result has arrived (shutdown(wait=True))."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._error is not None or not self._results_due, timeout_s)

    def close(self) -> None:
        """Stop: cancel what is still queued or running on the cluster."""
        with self._cond:
            chunk_ids = list(self._in_flight)
            self._in_flight.clear()
            self._ready.clear()
            self._arrived.clear()
            self._exhausted = True
            self._results_due = 0
            self._cond.notify_all()
        if chunk_ids:
            self.dispatcher.unregister_stream(chunk_ids)
            if not self.dispatcher.closed and self.dispatcher.broken is None:
                requests = [(chunk_id, None) for chunk_id in chunk_ids]
                if self._timed_out:   # the link may be what timed out: do not wait on it
                    if self._caller is None:
                        self._caller = client.DeadlineCaller(FuturesTimeoutError)
                    self._caller.call_later(client.cancel_quietly, self.dispatcher.session,
                                            requests)
                else:
                    client.cancel_quietly(self.dispatcher.session, requests)
        if self._caller is not None:
            self._caller.close()
