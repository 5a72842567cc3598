"""joblib's ``"minicw"`` parallel backend: ``Parallel(n_jobs=...)`` on the cluster.

    import minicw.joblib                     # registers the backend (joblib must be installed)
    with joblib.parallel_config(backend="minicw"):      # or parallel_backend("minicw")
        Parallel(n_jobs=-1)(delayed(f)(x) for x in xs)  # scikit-learn's n_jobs too

    Parallel --configure(n_jobs)--> MinicwBackend: a ClusterExecutor on the master
                                    named or found (local.found_or_started), else on a
                                    LocalCluster of n_jobs processes started here
             --submit(batch)------> executor.submit(batch) -> ClusterFuture
             <--callback(future)--- done (the session's receiver thread); the batch's
                                    results, or its exception, from future.result()

joblib cuts calls into batches itself (AutoBatchingMixin: batches of about
0.2-1 s of work), so each minicw job is one batch.  The backend reports the
cluster's worker processes as its effective n_jobs: that is how many batches
joblib keeps in flight.  Connections are kept for the process's life and
shared by every backend instance with the same settings (each Parallel call
may make a new one), so a LocalCluster starts once, with the first call's
n_jobs, and serves the later calls as it is; it stops at exit, or at
``minicw.joblib.shutdown()`` (the next call then connects again).  n_jobs=1
connects to nothing: joblib runs those calls here, one after another.

Nothing in minicw imports this module; joblib is not a dependency of minicw.
"""
from __future__ import annotations

import atexit
import os
import threading

import joblib
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

from minicw import local
from minicw.executor import ClusterExecutor

BACKEND_NAME = "minicw"

_connections = {}                 # settings -> _Connection
_connections_lock = threading.Lock()


class _Connection:
    """A session with a cluster, and the LocalCluster behind it when one was started."""

    def __init__(self, processes, host, port, authkey, tls_ca, tls_fingerprint):
        address, key, self.cluster = local.found_or_started(processes, host, port, authkey,
                                                            tls_ca, tls_fingerprint)
        self.closed = False
        try:
            self.executor = ClusterExecutor(address[0], address[1], key)
        except BaseException:
            if self.cluster is not None:
                self.cluster.shutdown()
            raise

    def processes(self, n_jobs: int) -> int:
        """The worker processes connected now; none yet (nodes still starting):
        as many as ``n_jobs`` asks of this machine, so that the batches still
        go to the cluster (1 would make joblib run them here)."""
        if self.cluster is not None:
            return self.cluster.n_workers or _local_processes(-1)
        return self.executor._dispatcher.worker_processes() or max(2, _local_processes(n_jobs))

    def close(self) -> None:
        self.closed = True
        try:
            self.executor.shutdown(wait=False, cancel_futures=True)
        finally:
            if self.cluster is not None:
                self.cluster.shutdown()


class MinicwBackend(AutoBatchingMixin, ParallelBackendBase):
    """Runs joblib's batches as jobs on a minicw cluster.

    Keyword arguments (``parallel_config(backend="minicw", host=..., ...)``):
    ``host``, ``port``, ``authkey``, ``tls_ca`` and ``tls_fingerprint`` name
    the master as ClusterExecutor's do; given none, the master is found as
    clients find one, else a LocalCluster of ``n_jobs`` processes is started.
    """

    supports_retrieve_callback = True   # joblib >= 1.3: submit() and a done-callback
    uses_threads = False
    supports_sharedmem = False
    default_n_jobs = -1                 # parallel_config(backend="minicw"): the whole cluster

    def __init__(self, nesting_level=None, inner_max_num_threads=None, host=None, port=None,
                 authkey=None, tls_ca=None, tls_fingerprint=None, **backend_kwargs):
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        self._where = (host, port, authkey, tls_ca, tls_fingerprint)
        self._connection = None
        self._futures = set()            # submitted batches not done yet
        self._futures_lock = threading.Lock()

    # --- how many ------------------------------------------------------------------

    def effective_n_jobs(self, n_jobs) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs == 1:
            return 1   # joblib runs these here, in order: no cluster needed
        return self._connect(_local_processes(n_jobs)).processes(n_jobs)

    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None, **backend_kwargs):
        # require="sharedmem" never reaches here: joblib gives such calls its
        # threading backend (supports_sharedmem is False).
        n_jobs = self.effective_n_jobs(n_jobs)
        self.parallel = parallel
        return n_jobs

    # --- running ------------------------------------------------------------------

    def submit(self, func, callback=None):
        future = self._connection.executor.submit(func)
        with self._futures_lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def apply_async(self, func, callback=None):
        """What joblib before 1.5 calls instead of ``submit``: the callback is
        given the future (1.3 and 1.4 pass it to ``retrieve_result_callback``;
        before 1.3 it is ignored), and what this returns has ``get(timeout)``."""
        return _Outcome(self.submit(func, callback))

    def retrieve_result_callback(self, future):
        return future.result()

    def abort_everything(self, ensure_ready=True):
        """A batch failed: the batches still queued or running are ended (a running
        one's process is replaced, as loky kills its workers)."""
        with self._futures_lock:
            futures, self._futures = list(self._futures), set()
        executor = self._connection.executor if self._connection is not None else None
        for future in futures:
            if executor is not None and not future.cancel():
                try:
                    executor.kill(future)
                except Exception:
                    pass
        self.reset_batch_stats()

    def terminate(self):
        """The end of a Parallel call: the connection stays for the next one."""
        self.reset_batch_stats()

    def _forget(self, future) -> None:
        with self._futures_lock:
            self._futures.discard(future)

    def _connect(self, processes: int) -> _Connection:
        """The shared connection for this backend's settings (a LocalCluster of
        ``processes`` when no master is found and none was started yet)."""
        if self._connection is None or self._connection.closed:
            self._connection = _shared_connection(processes, *self._where)
        return self._connection


class _Outcome:
    """A future as joblib before 1.5 expects a job: ``get(timeout)``."""

    def __init__(self, future):
        self._future = future

    def get(self, timeout=None):
        return self._future.result(timeout)

    def result(self, timeout=None):
        return self._future.result(timeout)


def _local_processes(n_jobs: int) -> int:
    """Processes for a LocalCluster asked for ``n_jobs`` as joblib counts them
    (-1: one per CPU, -2: all but one...)."""
    if n_jobs < 0:
        return max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return n_jobs


def _shared_connection(processes, host, port, authkey, tls_ca, tls_fingerprint) -> _Connection:
    settings = (host, port, authkey, tls_ca, tls_fingerprint)
    with _connections_lock:
        connection = _connections.get(settings)
        if connection is None or connection.closed:
            connection = _connections[settings] = _Connection(processes, *settings)
        return connection


def shutdown() -> None:
    """End the sessions the backend keeps, and stop the LocalClusters it started
    (done at exit; a notebook may call it to free the processes sooner)."""
    with _connections_lock:
        connections = list(_connections.values())
        _connections.clear()
    for connection in connections:
        try:
            connection.close()
        except Exception:
            pass


atexit.register(shutdown)


def register() -> None:
    """Register the ``"minicw"`` backend with joblib (importing this module does)."""
    joblib.register_parallel_backend(BACKEND_NAME, MinicwBackend)


register()
