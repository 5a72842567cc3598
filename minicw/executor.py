"""``ClusterExecutor``: the cluster as a ``concurrent.futures.Executor``.

    executor.submit(fn, *a, **kw) --> ClusterFuture <-- settled by the Dispatcher's
                                        |               receiver thread (dispatch.py)
                                        +-- cancel(): removes the job from the master's
                                        |   queue if it has not started
                                        +-- executor.kill(future): ends it even if running
    executor.map(fn, *iterables)  --> MapStream.results(): lazy, a bounded window of
                                      chunks in flight, results in order
    executor.imap_unordered(...)  --> the same, results as they finish
                                      (both show their progress on long runs: progress.py)
    executor.broadcast(obj)       --> Handle: the object, sent once per worker node

Futures behave as the standard library's: ``result()`` re-raises the job's
own exception (its remote traceback chained as ``__cause__``), ``wait``,
``as_completed`` and ``asyncio.wrap_future`` work, ``shutdown`` follows the
documented contract.  ``running()`` asks the master while the future is
PENDING: a job a worker process holds is RUNNING (no longer cancellable).
"""
from __future__ import annotations

import _thread
import atexit
import threading
import weakref
from collections import deque
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError

from minicw import config, discover, dispatch, protocol, transport
# journal registers its exit handler (commit what arrived) at import: imported
# here first, it runs after _shutdown_at_exit, which lets live maps finish.
from minicw import journal
from minicw.client import job_exception
from minicw.progress import start_progress

_live_executors = weakref.WeakSet()


_NO_WAITERS = ()   # a condition's waiters until a thread first waits on it


class _FutureCondition(_thread.RLock):
    """A future's condition: the C re-entrant lock itself, waited on and notified
    with the standard library's Condition methods.

    ``threading.Condition`` wraps a lock and stores five bound methods of it
    on the instance; with a future per submit those were five more objects
    for the cyclic garbage collector per job, and a submit loop spent about
    half its time in collections.  Condition's wait and notify need only
    ``_is_owned``, ``_release_save`` and ``_acquire_restore``, which the C
    lock has, so here they run on the lock itself, and entering or leaving
    the condition is the lock's own C code.  The queue of waiting threads
    is made when the first thread waits: most futures are never waited on
    one by one (``concurrent.futures.wait`` and ``as_completed`` use the
    future's own waiter list), so most notifications find nobody and return
    at once.  The lock must be re-entrant like Future's own:
    ``concurrent.futures.wait`` holds every future's condition while it
    calls ``cancelled()`` and ``exception()`` on the finished ones.
    """

    __slots__ = ("_waiters",)

    def __init__(self):
        self._waiters = _NO_WAITERS

    def wait(self, timeout=None):
        if self._waiters is _NO_WAITERS:
            self._waiters = deque()
        return threading.Condition.wait(self, timeout)

    wait_for = threading.Condition.wait_for

    def notify(self, n=1):
        if self._waiters or not self._is_owned():  # Condition raises when not owned
            threading.Condition.notify(self, n)

    def notify_all(self):
        self.notify(len(self._waiters))


_NO_CALLBACKS = ()

# The fields Future.__init__ sets (the same from 3.8 to 3.13); on a Python
# whose Future has others, ClusterFuture calls it instead of setting them.
_FUTURE_FIELDS_KNOWN = set(vars(Future())) == {
    "_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}


class ClusterFuture(Future):
    """A Future whose ``cancel()`` reaches the master."""

    def __init__(self, dispatcher: dispatch.Dispatcher):
        if _FUTURE_FIELDS_KNOWN:   # Future.__init__ without its Condition, made twice
            self._condition = _FutureCondition()
            self._state = "PENDING"
            self._result = None
            self._exception = None
            self._waiters = []
            self._done_callbacks = _NO_CALLBACKS  # a list once one is added
        else:
            super().__init__()
            self._condition = _FutureCondition()
        self._dispatcher = dispatcher
        self._job = None

    def add_done_callback(self, fn) -> None:
        with self._condition:
            if self._done_callbacks is _NO_CALLBACKS:
                self._done_callbacks = []
        super().add_done_callback(fn)

    def cancel(self) -> bool:
        with self._condition:
            if self._state != "PENDING":
                return self._state in ("CANCELLED", "CANCELLED_AND_NOTIFIED")
        if self._job is None or not self._dispatcher.cancel_job(self._job):
            return False
        return self._mark_cancelled()

    def running(self) -> bool:
        """True once a worker process holds the job: it runs, or is next in that
        process, and can no longer be cancelled (as ``concurrent.futures``'
        RUNNING).  The master is asked while the future is PENDING."""
        with self._condition:
            if self._state != "PENDING" or self._job is None:
                return self._state == "RUNNING"
        if not self._dispatcher.job_leased(self._job):
            return False
        with self._condition:
            if self._state == "PENDING":
                self.set_running_or_notify_cancel()
            return self._state == "RUNNING"

    def _mark_cancelled(self) -> bool:
        with self._condition:
            if self._state == "RUNNING":   # killed while it ran (executor.kill)
                self._state = "PENDING"    # so Future.cancel, which refuses RUNNING, settles it
        if not Future.cancel(self):
            return self.cancelled()
        self.set_running_or_notify_cancel()  # wakes wait() and as_completed()
        return True

    def _on_done(self, ok: bool, value) -> None:
        if ok:
            self._set(Future.set_result, value)
        elif isinstance(value, CancelledError):
            self._mark_cancelled()
        else:
            self._set(Future.set_exception, job_exception(value))

    def _set(self, setter, value) -> None:
        try:
            setter(self, value)
        except InvalidStateError:
            pass  # cancelled meanwhile


class ClusterExecutor(Executor):
    """Run calls on a minicw cluster, as a ``concurrent.futures.Executor``.

    ``host``/``port``/``authkey`` default to $MINICW_MASTER and
    $MINICW_AUTHKEY (see discover.py).  ``job_timeout`` (seconds) limits
    each job's run time; ``max_retries`` reruns a job whose process died.
    What jobs print comes back to this process's stdout and stderr, each line
    prefixed with its worker and job, unless ``forward_output=False`` (or
    $MINICW_FORWARD_OUTPUT=0); a number sets the characters kept per job.
    ``tls_ca`` (a CA file) or ``tls_fingerprint`` (the master's certificate
    SHA-256): talk to a master that serves TLS ($MINICW_TLS_CA,
    $MINICW_TLS_FINGERPRINT by default).
    """

    def __init__(self, host: str | None = None, port: int | None = None, authkey=None,
                 job_timeout: float | None = None,
                 max_retries: int = config.DEFAULT_MAX_RETRIES, forward_output=None,
                 tls_ca: str | None = None, tls_fingerprint: str | None = None):
        address = discover.master_address(host, port)
        transport.choose_tls(address, tls_ca, tls_fingerprint)
        self._dispatcher = dispatch.Dispatcher(address, discover.authkey(authkey),
                                               job_timeout, max_retries, forward_output)
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        _live_executors.add(self)

    @property
    def address(self) -> tuple:
        return self._dispatcher.session.address

    # --- the Executor interface -----------------------------------------------------------

    def submit(self, fn, /, *args, **kwargs) -> ClusterFuture:
        return self._submit(fn, args, kwargs, None, None)

    def _submit(self, fn, args, kwargs, job_timeout, max_retries) -> ClusterFuture:
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = ClusterFuture(self._dispatcher)
            future._job = self._dispatcher.submit_job(fn, args, kwargs, future._on_done,
                                                      job_timeout, max_retries)
            return future

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None,
            ordered: bool = True, job_timeout=None, max_retries=None,
            checkpoint=None, key=None, resume=True, rerun_failed: bool = True,
            progress: bool | None = None):
        """Like ``Executor.map``, but lazy: at most a window of jobs is in flight.

        ``chunksize`` > 1 fixes the jobs per chunk; the default 1 lets minicw
        size chunks from the measured job time.  ``buffersize`` caps the
        jobs in flight (default: a window per worker process).  The first
        window is submitted before ``map`` returns; a failed job raises its
        exception when the iteration reaches it.

        ``checkpoint`` (a file path) journals every result and final failure
        to that SQLite file as it arrives (checkpoint.py, store.py); the same
        call again runs only the jobs with no result there and yields
        exactly what an uninterrupted run would.  Failed jobs run again
        unless ``rerun_failed=False``.  Jobs are matched by a key of their
        arguments, or of ``key(*args)`` when given; a file written for
        another function or argument list is refused (CheckpointMismatchError)
        unless ``resume="force"``; ``resume=False`` starts the file over.

        A run that takes more than 2 s shows its progress on stderr (a line
        rewritten in place on a terminal; see progress.py); ``progress=False``
        hides it, ``progress=True`` shows it also when stderr is not a
        terminal; $MINICW_PROGRESS=0/1 does the same for every call.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0.")
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if len(iterables) == 1:
                kind, items = protocol.CALL_ONE, iterables[0]
            else:
                kind, items = protocol.CALL_STAR, zip(*iterables)
            length = _shortest_length(iterables)
            run_progress = start_progress(length, progress, "map")
            resumed = None
            if checkpoint is not None:
                resumed = self._checkpointed(fn, kind, items, length, ordered, checkpoint,
                                             key, resume, rerun_failed)
                items = resumed.missing_items()
                length = None if length is None else resumed.missing_count(length)
            stream = None
            try:
                stream = dispatch.MapStream(
                    self._dispatcher, fn, items, kind, chunksize if chunksize > 1 else None,
                    buffersize, ordered, timeout, job_timeout, max_retries, length=length,
                    progress=run_progress)
                stream.checkpointed = resumed
                stream.top_up()
            except BaseException:
                if stream is not None:
                    stream.close()   # what it submitted is cancelled (a timeout: in the background)
                run_progress.finish()
                if resumed is not None:
                    resumed.journal.close()
                raise
        if resumed is not None:
            return resumed.results(stream, run_progress)
        return stream.results()

    def _checkpointed(self, fn, kind, items, length, ordered, path, key, resume,
                      rerun_failed):
        from minicw import checkpoint, store
        opened = journal.Journal(path, journal.run_meta(
            store.KIND_MAP, dispatch.name_of(fn), self._dispatcher.function_key(fn), None,
            journal.key_rule(key), length), resume, rerun_failed)
        identity = checkpoint.identities(kind == protocol.CALL_STAR, key)
        return checkpoint.CheckpointedMap(opened, items, identity, ordered)

    def imap_unordered(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None,
                       job_timeout=None, progress: bool | None = None, **checkpoint_options):
        """``map`` that yields results as their jobs finish (also with ``checkpoint=``
        and ``progress=``)."""
        return self.map(fn, *iterables, timeout=timeout, chunksize=chunksize,
                        buffersize=buffersize, ordered=False, job_timeout=job_timeout,
                        progress=progress, **checkpoint_options)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            already = self._shutdown
            self._shutdown = True
        if already and not wait:
            return
        dispatcher = self._dispatcher
        if cancel_futures:
            for job in dispatcher.cancel_all_queued():
                job.on_done(False, CancelledError())
            for stream in dispatcher.active_streams():
                stream.close()
        if wait:
            self._finish()
        else:
            threading.Thread(target=self._finish, name="minicw-shutdown", daemon=True).start()

    def _finish(self) -> None:
        """Let submitted work and live map iterators complete, then end the session."""
        dispatcher = self._dispatcher
        if dispatcher.closed:
            return
        for stream in dispatcher.active_streams():
            if dispatcher.broken is None:
                stream.finish_eagerly()
        for stream in dispatcher.active_streams():
            stream.wait_delivered()
        dispatcher.wait_settled()
        dispatcher.close()

    # --- beyond the standard Executor ----------------------------------------------------------

    def with_options(self, job_timeout: float | None = None, max_retries: int | None = None):
        """This executor with other per-job limits for the calls made through the result:
        ``executor.with_options(job_timeout=5).submit(fn, x)``."""
        return _WithOptions(self, job_timeout, max_retries)

    def kill(self, future: ClusterFuture) -> bool:
        """End the future's job even if it is running (its process is replaced).

        True if the job will not produce a result: the future then raises
        CancelledError.  False if it already finished.
        """
        if future.done() or future._job is None:
            return False
        if not self._dispatcher.kill_job(future._job):
            return False
        if future._job.settled and not future.done():
            future._mark_cancelled()  # cancelled while still queued
        return True

    def broadcast(self, obj):
        """Send ``obj`` to the cluster once; pass the returned handle as a job argument."""
        return self._dispatcher.broadcast(obj)

    def list_workers(self) -> list:
        return self._dispatcher.session.list_nodes()

    def status(self) -> dict:
        return self._dispatcher.session.status()


class _WithOptions:
    """``submit``/``map``/``imap_unordered`` of an executor with other per-job limits."""

    def __init__(self, executor: ClusterExecutor, job_timeout, max_retries):
        self._executor = executor
        self._job_timeout = job_timeout
        self._max_retries = max_retries

    def submit(self, fn, /, *args, **kwargs) -> ClusterFuture:
        return self._executor._submit(fn, args, kwargs, self._job_timeout, self._max_retries)

    def map(self, fn, *iterables, **options):
        """The executor's ``map`` (``progress=``, ``checkpoint=``... pass through)."""
        options.setdefault("job_timeout", self._job_timeout)
        options.setdefault("max_retries", self._max_retries)
        return self._executor.map(fn, *iterables, **options)

    def imap_unordered(self, fn, *iterables, **options):
        return self.map(fn, *iterables, ordered=False, **options)


def _shutdown_at_exit() -> None:
    for executor in list(_live_executors):
        try:
            executor.shutdown(wait=True)
        except Exception:
            pass


atexit.register(_shutdown_at_exit)


def _shortest_length(iterables) -> int | None:
    """How many calls ``map`` makes when every iterable is sized; None otherwise."""
    try:
        return min(len(iterable) for iterable in iterables)
    except TypeError:
        return None
