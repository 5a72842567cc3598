"""``minicw.Pool``: ``multiprocessing.Pool`` on a minicw cluster, by changing one import.

    Pool(processes, initializer, initargs, maxtasksperchild)
      |  a master named or found (host=, $MINICW_MASTER, a launcher's run
      |  directory, a SLURM master job: discover.found_master), else a
      |  LocalCluster of ``processes`` worker processes, stopped with the pool
      v
    one client session (dispatch.Dispatcher)
      apply_async(f, args)   one job: f itself, or pool_task.Task(f, setup) --> ApplyResult
      map_async(f, items)    the items cut into chunks as multiprocessing cuts
                             them (4 per worker process); one job per chunk:
                             pool_task.MapChunk(f) over its list --------------> MapResult
      imap(f, items)         a MapStream over the chunks, pulled from ``items``
      imap_unordered         as results are taken (a bounded read-ahead) -------> IMapIterator
                                        |
    results are settled from the session's receiver thread: the callback first,
    then ready (so ``wait()`` returning means the callback ran)

What multiprocessing does, this does: a job's exception is re-raised by
``get()`` with the worker's traceback as its ``__cause__``
(``multiprocessing.pool.RemoteTraceback``); a result that cannot be sent is a
``MaybeEncodingError``; an argument that cannot be pickled raises the
pickler's own exception; a pool not running raises ValueError; ``get(timeout)``
raises ``multiprocessing.TimeoutError``; leaving a ``with`` block terminates.
Where a cluster differs: ``processes`` sizes only a LocalCluster the pool
starts (a running cluster's size is its nodes'); on a running cluster, whose
processes serve other clients too, the initializer runs in a worker process
before its first task of this pool (pool_task.py), where the pool's own
cluster's processes run it when they start; what jobs print comes back to this
process's stdout and stderr as they wrote it.  ``terminate()`` never leaves a
result hanging: whatever had not finished raises CancelledError.
"""
from __future__ import annotations

import atexit
import functools
import itertools
import logging
import multiprocessing
import os
import threading
import uuid
import warnings
import weakref
from collections import deque
from concurrent.futures import CancelledError, TimeoutError as FuturesTimeoutError
from multiprocessing.pool import CLOSE, INIT, RUN, TERMINATE, MaybeEncodingError, RemoteTraceback

from minicw import config, dispatch, local, protocol, transport
from minicw.errors import RemoteError, SerializationError, UnpicklableResultError
from minicw.pool_task import MapChunk, Setup, Task
from minicw.progress import start_progress

log = logging.getLogger(__name__)

FUNCTIONS_KEPT = 64      # a pool's wrapped functions remembered (each is sent once)
_NO_KEYWORDS = {}        # a map chunk's keyword arguments (never changed)
TERMINATED = "the pool was terminated before this task finished"
JOIN_DRAIN_S = 60.0      # join(): how long the own cluster's processes may take to finish
                         # starting (their initializer) before they are stopped

_live_pools = weakref.WeakSet()


class Pool:
    """A pool of worker processes on a minicw cluster, with multiprocessing.Pool's API.

    ``processes``: the worker processes of the LocalCluster the pool starts
    when no master is named or found (default: the CPU count); a running
    cluster is used whole.  ``initializer(*initargs)`` runs in each worker
    process when it starts (on a running cluster: before its first task of
    this pool), again in a replacement process; after ``maxtasksperchild``
    tasks of this pool a process is replaced.  ``context`` is accepted for
    compatibility (the cluster's nodes choose how their processes start).
    ``host``, ``port``, ``authkey``, ``tls_ca`` and ``tls_fingerprint`` name the
    master as ClusterExecutor's do.
    """

    def __init__(self, processes: int | None = None, initializer=None, initargs=(),
                 maxtasksperchild: int | None = None, context=None, *,
                 host: str | None = None, port: int | None = None, authkey=None,
                 tls_ca: str | None = None, tls_fingerprint: str | None = None):
        self._state = INIT
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
                not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        # The worker processes (multiprocessing's attribute): a running cluster's
        # are counted again as tasks are cut (_pool_size).
        self._processes = processes or os.cpu_count() or 1
        self._initializer_set = initializer is not None
        self._cluster = None
        self._dispatcher = None
        self._functions = {}                   # (func, kind) -> what is sent for it
        self._cache = _Outstanding()           # results not settled yet
        self._iterators = weakref.WeakSet()    # imap iterators (terminate() ends them)
        address, key, self._cluster = local.found_or_started(processes, host, port, authkey,
                                                             tls_ca, tls_fingerprint,
                                                             join=False)
        try:
            self._dispatcher = dispatch.Dispatcher(address, key)
            self._dispatcher.label_output = False   # worker output as multiprocessing shows it
            # One module namespace per pool in each worker process, as each of
            # multiprocessing's pools has processes of its own: what the
            # initializer sets there, the tasks see.
            self._pool_id = uuid.uuid4().hex
            self._dispatcher.namespace = self._pool_id
            self._pool_size()
            self._setup = None
            if initializer is not None or maxtasksperchild is not None:
                setup = Setup(self._pool_id, initializer, initargs, maxtasksperchild)
                self._setup = self._dispatcher.broadcast(setup)
            if self._cluster is not None:
                # Its own processes run the initializer when they start, as
                # multiprocessing's do (a shared cluster's, at their first task).
                process_setup = None
                if initializer is not None:
                    process_setup = (self._setup.key, self._dispatcher.session.context_key())
                self._cluster.join_as_worker(self._cluster.n_workers, self._cluster.oversubscribe,
                                             process_setup)
        except BaseException:
            _teardown(self._dispatcher, self._cluster, self._cache, self._iterators)
            raise
        self._finalizer = weakref.finalize(self, _teardown, self._dispatcher, self._cluster,
                                           self._cache, self._iterators)
        self._state = RUN
        _live_pools.add(self)

    # --- the multiprocessing.Pool interface ---------------------------------------------------

    def apply(self, func, args=(), kwds={}):
        """``func(*args, **kwds)`` on a worker; blocks until the result is ready."""
        return self._wait_for(self.apply_async(func, args, kwds))

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):
        """``func(*args, **kwds)`` on a worker: an ApplyResult at once; ``callback``
        (or ``error_callback``) is called with its outcome when it is ready."""
        self._check_running()
        result = ApplyResult(self._cache, callback, error_callback, self)
        try:
            result._jobs.append(self._dispatcher.submit_job(self._wrapped(func, Task), args,
                                                            kwds, result._on_done))
        except Exception as exc:
            result._on_done(False, exc)
        return result

    def map(self, func, iterable, chunksize: int | None = None) -> list:
        """``list(map(func, iterable))`` run in chunks on the workers."""
        return self._wait_for(self._map_async(func, iterable, False, chunksize))

    def starmap(self, func, iterable, chunksize: int | None = None) -> list:
        """``map``, each item a tuple of arguments: ``func(*item)``."""
        return self._wait_for(self._map_async(func, iterable, True, chunksize))

    def map_async(self, func, iterable, chunksize: int | None = None, callback=None,
                  error_callback=None):
        """``map`` that returns a MapResult at once."""
        return self._map_async(func, iterable, False, chunksize, callback, error_callback)

    def starmap_async(self, func, iterable, chunksize: int | None = None, callback=None,
                      error_callback=None):
        """``starmap`` that returns a MapResult at once."""
        return self._map_async(func, iterable, True, chunksize, callback, error_callback)

    def imap(self, func, iterable, chunksize: int = 1):
        """Results in order, as they come; ``iterable`` is read lazily (a bounded
        number of chunks ahead of what was taken)."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func, iterable, chunksize: int = 1):
        """``imap`` with results in the order they finish."""
        return self._imap(func, iterable, chunksize, ordered=False)

    def close(self) -> None:
        """Accept no more tasks; ``join()`` then waits for those submitted."""
        if self._state == RUN:
            self._state = CLOSE

    def terminate(self) -> None:
        """Stop at once: queued tasks are dropped, running ones killed, and results
        not ready raise CancelledError."""
        self._state = TERMINATE
        self._finalizer()

    def join(self) -> None:
        """Wait for every task to finish (after ``close()``), then end the session
        and stop the LocalCluster the pool started."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        if self._state == CLOSE and self._finalizer.alive:
            dispatcher = self._dispatcher
            for stream in dispatcher.active_streams():   # imap iterators not consumed yet
                if dispatcher.broken is None:
                    stream.finish_eagerly()
            for stream in dispatcher.active_streams():
                stream.wait_delivered()   # their results stay theirs to iterate
            self._cache.wait_empty()
            if self._finalizer.detach() is None:
                return   # terminated meanwhile (another thread)
            try:
                if self._cluster is not None and self._initializer_set:
                    # As multiprocessing's join, only once each process has run the
                    # initializer (one that has just started runs it, then leaves).
                    self._cluster.stop_as_worker(drain_s=JOIN_DRAIN_S)
            finally:
                _end_session(self._dispatcher, self._cluster)
        self._finalizer()

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc_info) -> None:
        self.terminate()

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __repr__(self) -> str:
        where = "" if self._dispatcher is None else " master=%s" % transport.format_address(
            self._dispatcher.session.address)
        return "<%s.%s state=%s pool_size=%s%s>" % (
            type(self).__module__, type(self).__qualname__, self._state,
            self._processes, where)

    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if getattr(self, "_state", None) == RUN:
            _warn("unclosed running multiprocessing pool %r" % (self,), ResourceWarning,
                  source=self)

    # --- beyond multiprocessing.Pool -------------------------------------------------------

    @property
    def address(self) -> tuple:
        """The (host, port) of the master the pool uses."""
        return self._dispatcher.session.address

    def status(self) -> dict:
        """The master's status: nodes, clients, throughput (minicw.status)."""
        return self._dispatcher.session.status()

    # --- the pieces ------------------------------------------------------------------------

    def _wait_for(self, result: "ApplyResult"):
        """``result.get()`` for the blocking calls; interrupted (Ctrl-C), their
        tasks are ended, since nobody can take their results any more."""
        try:
            return result.get()
        except BaseException:
            if not result.ready():
                self._dispatcher.kill_jobs(result._jobs)
                result._cancel()   # join() does not wait for it
            raise

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _pool_size(self) -> int:
        """The worker processes the pool's tasks are spread over: a running
        cluster's as its master counts them now (when it has any)."""
        dispatcher = self._dispatcher
        if self._cluster is None and dispatcher is not None and not dispatcher.closed:
            try:
                self._processes = self._dispatcher.worker_processes() or self._processes
            except Exception:
                pass
        return self._processes

    def _wrapped(self, func, kind, star: bool = False):
        """What is sent for ``func``: the function itself for ``apply`` when the pool
        has no initializer and no task limit, else a wrapper that is remembered,
        so that it is serialized and sent once."""
        if kind is Task and self._setup is None:
            return func
        key = (func, kind, star)
        try:
            wrapped = self._functions.get(key)
        except TypeError:   # an unhashable callable: wrapped anew every call
            key, wrapped = None, None
        if wrapped is None:
            wrapped = Task(func, self._setup) if kind is Task else MapChunk(func, star,
                                                                             self._setup)
            if key is not None:
                if len(self._functions) >= FUNCTIONS_KEPT:
                    self._functions.clear()
                self._functions[key] = wrapped
        return wrapped

    def _map_async(self, func, iterable, star: bool, chunksize, callback=None,
                   error_callback=None):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        length = len(iterable)
        if chunksize is None:
            chunksize, extra = divmod(length, self._pool_size() * 4)
            if extra:
                chunksize += 1
        if length == 0:
            chunksize = 0
        result = MapResult(self._cache, chunksize, length, callback, error_callback, self)
        if not chunksize:
            return result
        wrapped = self._wrapped(func, MapChunk, star)
        items = iter(iterable)
        try:
            for index in range(result._chunks_left):
                try:
                    chunk = list(itertools.islice(items, chunksize))
                except Exception as exc:   # the iterable raised: it is this map's error
                    result._fail_from(index, exc)
                    break
                try:
                    result._jobs.append(self._dispatcher.submit_job(
                        wrapped, (chunk,), _NO_KEYWORDS,
                        functools.partial(result._on_chunk, index)))
                except Exception as exc:
                    result._fail_from(index, exc)
                    break
        except BaseException:   # interrupted while submitting: nobody will take it
            self._dispatcher.kill_jobs(result._jobs)
            result._cancel()
            raise
        return result

    def _imap(self, func, iterable, chunksize: int, ordered: bool):
        self._check_running()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        try:
            length = -(-len(iterable) // chunksize)
        except TypeError:
            length = None
        failure = []
        # No progress line unless $MINICW_PROGRESS=1: multiprocessing draws none.
        stream = dispatch.MapStream(
            self._dispatcher, self._wrapped(func, MapChunk), _chunks(iterable, chunksize, failure),
            protocol.CALL_ONE, None, None, ordered, None, length=length,
            progress=start_progress(length, config.progress_setting() or False, "imap"))
        try:
            stream.top_up()   # the first chunks go now, as multiprocessing's do
        except BaseException as exc:
            stream.close()
            stream.progress.finish()
            if isinstance(exc, SerializationError):
                raise pool_error(exc) from None
            raise
        iterator = (IMapIterator if ordered else IMapUnorderedIterator)(stream, failure, self)
        self._iterators.add(iterator)
        return iterator


def _teardown(dispatcher, cluster, cache, iterators) -> None:
    """Terminate a pool (terminate(), garbage collection, or interpreter exit):
    results not ready and imap iterators not at their end raise CancelledError,
    its jobs stop, its session ends, and the LocalCluster it started stops."""
    cache.cancel_all()
    for iterator in list(iterators):
        iterator._terminated = True
    if dispatcher is not None and cluster is None and not dispatcher.closed \
            and dispatcher.broken is None:
        try:
            dispatcher.kill_all()   # a shared cluster: only this pool's jobs stop
        except Exception as exc:
            log.debug("stopping a pool's jobs: %s", exc)
    _end_session(dispatcher, cluster)


def _end_session(dispatcher, cluster) -> None:
    """End the pool's session, then stop the LocalCluster it started."""
    try:
        if dispatcher is not None:
            dispatcher.close()
    finally:
        if cluster is not None:
            cluster.shutdown()


def _chunks(iterable, size: int, failure: list):
    """Lists of ``size`` items of ``iterable``; if it raises, the items since the last
    whole chunk are dropped and the exception put in ``failure`` (imap raises it
    after the results of the chunks before it, as multiprocessing does)."""
    try:
        items = iter(iterable)
        while True:
            chunk = list(itertools.islice(items, size))
            if not chunk:
                return
            yield chunk
    except Exception as exc:
        failure.append(exc)


def pool_error(error: BaseException) -> BaseException:
    """What a failed task raises from ``get()``, as multiprocessing raises it."""
    if isinstance(error, RemoteError) and error.exception is not None:
        original = error.exception
        if isinstance(original, UnpicklableResultError):
            return _encoding_error(original)
        original.__cause__ = RemoteTraceback('\n"""\n%s"""' % error.remote_traceback)
        return original
    cause = error
    while isinstance(cause, SerializationError) and isinstance(cause.__cause__, Exception):
        cause = cause.__cause__   # the pickler's own exception, unchanged
    return cause


class _Repr:
    """An object whose repr() is a given text (MaybeEncodingError keeps reprs)."""

    def __init__(self, text: str):
        self._text = text

    def __repr__(self) -> str:
        return self._text


def _encoding_error(error: UnpicklableResultError) -> MaybeEncodingError:
    return MaybeEncodingError(_Repr(error.reason), _Repr(error.value_repr))


# --- results ------------------------------------------------------------------------------------

class _Outstanding:
    """A pool's results not settled yet; ``join()`` waits for none to be left."""

    def __init__(self):
        self._results = set()
        self._empty = threading.Condition(threading.Lock())

    def add(self, result) -> None:
        with self._empty:
            self._results.add(result)

    def discard(self, result) -> None:
        with self._empty:
            self._results.discard(result)
            if not self._results:
                self._empty.notify_all()

    def __len__(self) -> int:
        return len(self._results)

    def wait_empty(self) -> None:
        with self._empty:
            while self._results:
                self._empty.wait()

    def cancel_all(self) -> None:
        with self._empty:
            results, self._results = list(self._results), set()
            self._empty.notify_all()
        for result in results:
            result._cancel()


class ApplyResult(multiprocessing.pool.ApplyResult):
    """The result of ``apply_async``: ``get``, ``wait``, ``ready``, ``successful``.

    A multiprocessing.pool.AsyncResult for ``isinstance``; its methods are all
    its own (the base class's work on a multiprocessing pool's internals)."""

    def __init__(self, cache: _Outstanding, callback=None, error_callback=None, pool=None):
        self._event = threading.Event()
        self._pool = pool        # kept alive until this is settled, as multiprocessing's
        self._lock = threading.Lock()
        self._cache = cache
        self._callback = callback
        self._error_callback = error_callback
        self._success = None
        self._value = None
        self._jobs = []          # its dispatch.Jobs (settled ones have dropped their arguments)
        cache.add(self)

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError("{0!r} not ready".format(self))
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None):
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _on_done(self, ok: bool, value) -> None:
        self._settle(ok, value if ok else pool_error(value))

    def _settle(self, ok: bool, value, run_callback: bool = True) -> None:
        """The outcome, once: the callback runs before ``get()`` and ``wait()`` return."""
        with self._lock:
            if self._event.is_set() or self._success is not None:
                return
            self._success, self._value = ok, value
        callback = self._callback if ok else self._error_callback
        self._callback = self._error_callback = None
        if callback is not None and run_callback:
            try:
                callback(value)
            except BaseException:   # SystemExit too: the receiver thread must go on
                log.exception("a pool result's %s raised", "callback" if ok else "error_callback")
        self._event.set()
        self._cache.discard(self)
        # Its jobs' completion handlers refer to it: without this cycle it is
        # freed, with the results it holds, as soon as nobody else holds it.
        self._jobs.clear()
        self._pool = None

    def _cancel(self) -> None:
        self._settle(False, CancelledError(TERMINATED), run_callback=False)


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of ``map_async``: the chunks' results in order, or the first
    failure to arrive (once every chunk has come back, as multiprocessing)."""

    def __init__(self, cache: _Outstanding, chunksize: int, length: int, callback=None,
                 error_callback=None, pool=None):
        super().__init__(cache, callback, error_callback, pool)
        self._values = [None] * length
        self._chunksize = chunksize
        self._failure = None
        if chunksize <= 0:
            self._chunks_left = 0
            self._success, self._value = True, self._values
            self._event.set()
            cache.discard(self)
            self._pool = None
        else:
            self._chunks_left = -(-length // chunksize)
        self._chunks_total = self._chunks_left

    def _on_chunk(self, index: int, ok: bool, value) -> None:
        with self._lock:
            if self._success is not None:   # terminated meanwhile
                return
            self._chunks_left -= 1
            if ok:
                if self._failure is None:
                    start = index * self._chunksize
                    self._values[start:start + self._chunksize] = value
            elif self._failure is None:
                self._failure = pool_error(value)
                self._values = None
            if self._chunks_left:
                return
        if self._failure is None:
            self._settle(True, self._values)
        else:
            self._settle(False, self._failure)

    def _fail_from(self, index: int, exc: BaseException) -> None:
        """Chunks ``index`` on were never sent: ``exc`` is the map's failure (the
        chunks sent still count before the result is ready)."""
        for missing in range(index, self._chunks_total):
            self._on_chunk(missing, False, exc)


class IMapIterator(multiprocessing.pool.IMapIterator):
    """The iterator of ``imap`` and ``imap_unordered``; ``next(timeout)`` raises
    ``multiprocessing.TimeoutError`` when no result came within ``timeout`` seconds.
    A multiprocessing.pool.IMapIterator for ``isinstance``, with methods of its own."""

    def __init__(self, stream: dispatch.MapStream, failure: list, pool=None):
        self._stream = stream
        self._failure = failure      # the exception the input iterable raised, if any
        self._values = deque()       # results taken from the stream, not yet returned
        self._done = False
        self._terminated = False     # its pool was terminated
        self._pool = pool            # kept alive until the end, as multiprocessing's
        self._closer = weakref.finalize(self, _close_stream, stream)

    def __iter__(self) -> "IMapIterator":
        return self

    def next(self, timeout: float | None = None):
        values = self._values
        while not values:
            if self._done:
                raise StopIteration
            if self._terminated:
                self._end()
                raise CancelledError(TERMINATED)
            try:
                segment = self._stream.next_segment(timeout)
            except FuturesTimeoutError:
                raise multiprocessing.TimeoutError from None
            except SerializationError as exc:   # an item that cannot be sent
                raise pool_error(exc) from None
            if segment is None:
                self._end()
                if self._failure:
                    raise self._failure.pop()
                raise StopIteration
            chunk_results, errors = segment
            for offset, chunk in enumerate(chunk_results):
                if errors and offset in errors:
                    values.append(_Failed(pool_error(errors[offset])))
                else:
                    values.extend(chunk)
        value = values.popleft()
        if type(value) is _Failed:
            raise value.error
        return value

    __next__ = next

    def _end(self) -> None:
        self._done = True
        self._pool = None
        self._closer()


class IMapUnorderedIterator(IMapIterator, multiprocessing.pool.IMapUnorderedIterator):
    """The iterator of ``imap_unordered``: results as they finish."""


class _Failed:
    """A failed chunk's place among an IMapIterator's results."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def _close_stream(stream: dispatch.MapStream) -> None:
    """An imap iterator ended or was dropped: what it still had running is cancelled."""
    stream.close()
    stream.progress.finish()


def _terminate_at_exit() -> None:
    """Pools still running when the interpreter exits are terminated, as
    multiprocessing's are: their tasks end, their own clusters stop, and none
    warns of being left open while the interpreter tears down."""
    for pool in list(_live_pools):
        try:
            pool.terminate()
        except Exception:
            pass


atexit.register(_terminate_at_exit)
