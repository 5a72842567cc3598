"""Everything on this machine: ``LocalCluster``.

    with LocalCluster(n_workers=2) as cluster:   master + one worker node, both
        cluster.load_envir(...)                  child processes on 127.0.0.1,
        cluster.execute()                        a random key and a free port
        cluster.executor().map(fn, items)       a concurrent.futures executor on it
    # leaving the block stops both, also when the body raised

Other processes can join or use the cluster through ``cluster.address`` and
``cluster.authkey``.
"""
from __future__ import annotations

import secrets

from minicw import config, launcher
from minicw.master_node import MasterNode


class LocalCluster(MasterNode):
    """A master and one worker node with ``n_workers`` processes on 127.0.0.1.

    A context manager; also ``start()`` / ``shutdown()``.  ``n_workers``
    defaults to the CPU count and is capped at it unless ``oversubscribe``.  Offers the MasterNode calls (``load_envir``,
    ``register_target_function``, ``load_args``, ``execute``, ``list_workers``).
    ``dashboard=True`` (or a port): the master serves its status page at
    ``cluster.dashboard_url``.  ``tls_cert`` and ``tls_key`` (PEM files): every
    connection of the cluster runs over TLS, pinned to that certificate.
    """

    def __init__(self, n_workers: int | None = None, chunksize: int | None = config.DEFAULT_CHUNKSIZE,
                 heartbeat_timeout_s: float | None = None, oversubscribe: bool = False,
                 forward_output=None, dashboard: int | bool | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None):
        super().__init__(HOST="127.0.0.1", PORT=0,
                         AUTHKEY=secrets.token_urlsafe(config.GENERATED_AUTHKEY_BYTES),
                         chunksize=chunksize, forward_output=forward_output,
                         dashboard=dashboard, tls_cert=tls_cert, tls_key=tls_key)
        self.n_workers = n_workers
        self.oversubscribe = oversubscribe    # n_workers may exceed the CPU count
        self.heartbeat_timeout_s = heartbeat_timeout_s

    def start(self, join: bool = True) -> "LocalCluster":
        """Start the master, and its worker node unless ``join`` is False (then
        ``join_as_worker(...)`` starts it)."""
        self.start_master_server(if_join_as_worker=join, nprocs=self.n_workers,
                                 oversubscribe=self.oversubscribe)
        return self

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def executor(self, **options):
        """A ClusterExecutor bound to this cluster (``options``: job_timeout, max_retries,
        forward_output, which defaults to the cluster's)."""
        from minicw.executor import ClusterExecutor
        options.setdefault("forward_output", self.forward_output)
        host, port = self.address
        return ClusterExecutor(host, port, self.authkey, **options)

    def client_thread(self, callback, **options):
        """A ClientThread bound to this cluster, not yet started."""
        from minicw.client_thread import ClientThread
        options.setdefault("forward_output", self.forward_output)
        host, port = self.address
        return ClientThread(callback, host, port, self.authkey, **options)


def found_or_started(processes: int | None = None, host: str | None = None,
                     port: int | None = None, authkey=None, tls_ca: str | None = None,
                     tls_fingerprint: str | None = None, join: bool = True) -> tuple:
    """``(address, authkey, cluster)``: the master named or found
    (discover.found_master; ``cluster`` None), else a LocalCluster started here
    with ``processes`` worker processes (any number, as multiprocessing starts
    them; default one per CPU), which the caller stops; ``join`` False: its
    master only (the caller starts the node).  minicw.Pool and the joblib
    backend: the same program runs on a laptop and on the cluster."""
    from minicw import discover, transport
    address = discover.found_master(host, port)
    if address is not None:
        transport.choose_tls(address, tls_ca, tls_fingerprint)
        return address, discover.authkey(authkey), None
    cluster = LocalCluster(n_workers=processes, oversubscribe=processes is not None)
    cluster.start(join)
    return cluster.address, cluster.authkey, cluster


def allocate(n: int | None = None, **options):
    """``with allocate(n) as (host, port):`` a background master and ``n`` worker
    processes on this machine, recorded in the run directory, stopped at the end
    of the block (see ``minicw.launcher.local_start`` for the options)."""
    return launcher.allocate(n, backend="local", **options)
