"""The REPL and notebook API of the minimalcluster ancestor: ``MasterNode``.

    MasterNode.start_master_server()
        starts ``python -m minicw.master`` (launch.py) and, by default, a local
        ``python -m minicw.worker``; opens a client Session to the master
    load_envir(src) / register_target_function(name) / load_args(args)
        are checked here, at once, and kept
    execute()
        stores the environment and the function name as blobs (once per
        session), cuts the args into chunks (of ``chunksize`` args, or sized
        from measured job times by chunking.py when it is None), streams them
        through the cluster (client.stream_results) and returns {arg: result};
        a long run shows its progress on stderr meanwhile (progress.py)

The master runs in its own process, not in a thread of the REPL: the REPL
stays responsive, and the master's work does not compete for the REPL's GIL.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import time

from minicw import (broadcast, chunking, client, config, envir, launch, protocol, serialize,
                    tls, transport)
from minicw.errors import ArgsError, EnvirError, MinicwError, RemoteError
from minicw.progress import OFF as NO_PROGRESS, start_progress

log = logging.getLogger(__name__)


class MasterNode:
    """A master you drive from a Python prompt.

    ``MasterNode(HOST, PORT, AUTHKEY, chunksize)``; AUTHKEY None makes a
    random key (``self.AUTHKEY``).  HOST '' listens on every interface.
    ``chunksize`` fixes how many args travel in one chunk; None (the
    default) sizes chunks from the measured time per job (chunking.py):
    one arg per chunk for slow functions, up to 4,096 for fast ones.
    What jobs print comes back to this process's stdout and stderr
    (``forward_output=False`` keeps it on the workers).
    ``dashboard``: a port (True: a free one) where the master serves its
    read-only status page on 127.0.0.1; its URL, token included, is
    ``self.dashboard_url`` once started.  ``tls_cert`` and ``tls_key`` (PEM
    files): the master it starts serves TLS, and this object and its local
    node pin that certificate; ``tls_ca`` or ``tls_fingerprint``: how
    ``connect()`` verifies a master that serves TLS (else $MINICW_TLS_*).
    """

    def __init__(self, HOST: str = "127.0.0.1", PORT: int = config.DEFAULT_PORT,
                 AUTHKEY=None, chunksize: int | None = config.DEFAULT_CHUNKSIZE,
                 forward_output=None, dashboard: int | bool | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls_ca: str | None = None, tls_fingerprint: str | None = None):
        if AUTHKEY is None:
            AUTHKEY = secrets.token_urlsafe(config.GENERATED_AUTHKEY_BYTES)
        if chunksize is not None and int(chunksize) < 1:
            raise ValueError("chunksize must be None or at least 1, not %r" % (chunksize,))
        self.HOST = HOST
        self.PORT = int(PORT)
        self.AUTHKEY = transport.as_authkey(AUTHKEY)
        self.chunksize = None if chunksize is None else int(chunksize)
        self.forward_output = forward_output  # what jobs print comes back here (output.py)
        self._job_times = chunking.JobTimes()  # for chunk sizes, across executes
        self.max_retries = config.DEFAULT_MAX_RETRIES
        self.heartbeat_timeout_s = None
        self.server_status = "Not started"
        self.dashboard = dashboard
        self.dashboard_url = None     # the master's dashboard page, once started with one
        self.tls_cert, self.tls_key = tls_cert, tls_key   # for the master it starts
        self._tls_ca, self._tls_fingerprint = tls_ca, tls_fingerprint   # for connect()
        self._master_fingerprint = None   # the started master's certificate, pinned
        self._master_process = None
        self._worker_process = None
        self._session = None
        self._address = None
        self._envir = None           # (key, source blob, label, source text)
        self._target_name = None
        self._args = None

    # --- cluster ---------------------------------------------------------------------

    @property
    def address(self) -> tuple:
        """(host, port) where workers and clients reach this master."""
        if self._address is None:
            raise MinicwError("the master server is not started; call start_master_server()")
        return self._address

    @property
    def authkey(self) -> bytes:
        return self.AUTHKEY

    def start_master_server(self, if_join_as_worker: bool = True, nprocs: int | None = None,
                            oversubscribe: bool = False):
        """Start the master in the background; by default also a local worker node.

        Raises MinicwError if the master this object started still runs.  One
        that has ended (killed, crashed) is replaced by a new one on the same
        port, so that worker nodes waiting for it rejoin.
        """
        if self._master_process is not None:
            if self._master_process.alive():
                raise MinicwError("the master server is already running at %s"
                                  % transport.format_address(self._address))
            log.warning("the master started earlier (pid %d) has ended with exit code %s; "
                        "starting a new one on port %d", self._master_process.pid,
                        self._master_process.popen.poll(), self.PORT)
            self.shutdown()
        bind_host = self.HOST if self.HOST else "0.0.0.0"
        if self.tls_cert is not None:
            tls.settings(cert=self.tls_cert, key=self.tls_key)   # the files: checked here
        self._master_process, (host, port) = launch.start_master(
            bind_host, self.PORT, self.AUTHKEY, self.heartbeat_timeout_s,
            _dashboard_port(self.dashboard), self.tls_cert, self.tls_key)
        self._address = (host, port)
        self._master_fingerprint = self._master_process.ready_record.get("tls_fingerprint")
        # This object and its node reach the master it started as that master
        # serves (pinned, or plain), whatever $MINICW_TLS_* says of other masters.
        transport.use_tls(self._address, tls.Settings(fingerprint=self._master_fingerprint))
        self.PORT = port
        self.dashboard_url = _dashboard_url(self._master_process.ready_record, self.AUTHKEY)
        try:
            self._session = client.Session(self._address, self.AUTHKEY,
                                           forward_output=self.forward_output)
            if if_join_as_worker:
                self.join_as_worker(nprocs, oversubscribe)
        except BaseException:
            self.shutdown()
            raise
        self.server_status = "Started"
        log.info("master started at %s", transport.format_address(self._address))

    def connect(self) -> "MasterNode":
        """Use a master that already runs at (HOST, PORT) instead of starting one.

        ``shutdown()`` then closes only this session; the master keeps running.
        """
        if self._session is not None:
            raise MinicwError("already connected to %s" % transport.format_address(self._address))
        self._address = (self.HOST or config.DEFAULT_HOST, self.PORT)
        transport.choose_tls(self._address, self._tls_ca, self._tls_fingerprint)
        self._session = client.Session(self._address, self.AUTHKEY,
                                           forward_output=self.forward_output)
        self.server_status = "Connected"
        return self

    def join_as_worker(self, nprocs: int | None = None, oversubscribe: bool = False,
                       process_setup: tuple | None = None) -> None:
        """Run a worker node on this machine (in its own process); ``nprocs`` is
        capped at the CPU count unless ``oversubscribe``.  ``process_setup``: (blob
        key, context key) of a callable each of its processes calls first."""
        if self._worker_process is not None and self._worker_process.alive():
            return
        # Its processes share this process's multiprocessing authkey, as the
        # children of a multiprocessing.Pool started here would.
        self._worker_process = launch.start_worker(
            self.address, self.AUTHKEY, nprocs, oversubscribe=oversubscribe,
            tls_settings=transport.tls_for(self.address),
            process_authkey=bytes(multiprocessing.current_process().authkey),
            process_setup=process_setup)

    def stop_as_worker(self, drain_s: float | None = None) -> None:
        """Stop the local worker node started by join_as_worker(); with ``drain_s``,
        first let its processes finish what they hold, for up to that long."""
        if self._worker_process is not None:
            if drain_s:
                self._worker_process.drain(drain_s)
            self._worker_process.stop()
            self._worker_process = None

    def list_workers(self) -> list:
        """One record per connected worker node: hostname, nprocs, pid, busy, ..."""
        return self._require_session().list_nodes()

    def status(self) -> dict:
        """Nodes, and queued/running/done/failed jobs per client."""
        return self._require_session().status()

    def broadcast(self, obj):
        """Send ``obj`` to the cluster once; an arg that is the returned handle
        reaches the target function as the object itself."""
        return broadcast.store(self._require_session(), obj)

    def shutdown(self) -> None:
        """Stop the local worker node and the master server."""
        if self._session is not None:
            self._session.close()
            self._session = None
        self.stop_as_worker()
        if self._master_process is not None:
            self._master_process.stop()
            self._master_process = None
        self.server_status = "Shut down"
        self.dashboard_url = None

    def _require_session(self) -> client.Session:
        if self._session is None:
            raise MinicwError("the master server is not started; call start_master_server()")
        return self._session

    # --- work ----------------------------------------------------------------------

    def load_envir(self, source: str, from_file: bool = True) -> None:
        """The environment: a path to a .py file, or with from_file=False its source."""
        if from_file:
            path = os.fspath(source)
            try:
                with open(path, "r", encoding="utf-8") as handle:
                    text = handle.read()
            except OSError as exc:
                raise EnvirError("cannot read environment file %s: %s"
                                 % (path, exc.strerror or exc)) from None
            label = os.path.abspath(path)
        else:
            text = str(source)
            label = "<envir %s>" % protocol.content_key(text.encode("utf-8"))[:8]
        envir.check_syntax(text, label)
        key, blob = envir.make_source_blob(text, label)
        self._envir = (key, blob, label, text)
        if self._target_name is not None:
            log.info("environment changed; target function %r will be looked up in it",
                     self._target_name)

    def register_target_function(self, fun_name: str) -> None:
        """Name the function in the environment that execute() runs on each arg."""
        if self._envir is None:
            raise EnvirError("load an environment with load_envir() before registering "
                             "the target function %r" % (fun_name,))
        key, _, label, text = self._envir
        envir.register(key, text, label)
        envir.lookup(key, fun_name)  # raises EnvirError naming the function
        self._target_name = fun_name

    def load_args(self, args) -> None:
        """The list of arguments; each must be hashable and appear once (results are keyed by arg)."""
        self._args = check_args(args)

    def execute(self, job_timeout: float | None = None, checkpoint=None, key=None,
                resume=True, rerun_failed: bool = True, progress: bool | None = None,
                timeout: float | None = None) -> dict:
        """Run the target function on every arg across the cluster; returns {arg: result}.

        ``checkpoint`` (a file path) journals every result and final failure
        to that SQLite file as it arrives; the same execute() again runs only
        the args with no result there (failed ones too, unless
        ``rerun_failed=False``) and returns what an uninterrupted run would.
        A file written for another environment, function or args is refused
        (CheckpointMismatchError) unless ``resume="force"``; ``resume=False``
        starts it over.  ``key(arg)`` identifies an arg that does not
        serialize the same way twice.

        With no worker node connected the jobs wait for one; if nothing is
        delivered for MINICW_NO_WORKER_WARNING_S (10 s) and no node is
        connected, a warning says so once.  Raises RemoteError (type,
        message, arg and remote traceback) at the
        first job that raised, WorkerCrashedError for a job that killed its
        process more than ``self.max_retries`` times, JobTimeoutError (a
        TimeoutError) for one that ran over ``job_timeout`` seconds.  Then,
        or on Ctrl-C, the jobs still queued are cancelled and the cluster
        stays usable.

        ``timeout`` (seconds) bounds the whole run, whatever the network does:
        past it, TimeoutError says how many jobs were done, and the rest are
        cancelled (with a checkpoint, the results that came are kept).

        A run that takes more than 2 s shows its progress on stderr (a line
        rewritten in place on a terminal); ``progress=False`` hides it,
        ``progress=True`` shows it also when stderr is not a terminal;
        $MINICW_PROGRESS=0/1 does the same for every call.
        """
        session = self._require_session()
        if self._envir is None or self._target_name is None:
            raise EnvirError("nothing to execute: call load_envir() and "
                             "register_target_function() first")
        if self._args is None:
            raise ArgsError("nothing to execute: call load_args() first")
        func_key = self._store_function(session)
        args = self._args
        # With no worker node yet the jobs wait for one (the session says so).
        processes = sum(node.nprocs for node in session.list_nodes())
        window = chunking.window_chunks(processes)
        run_progress = start_progress(len(args), progress, "execute")
        deadline = None if timeout is None else (time.monotonic() + timeout, timeout)

        def run(args, on_segment=None) -> dict:
            return run_keyed(session, func_key, args, self.chunksize, window,
                             self.max_retries, job_timeout, self._job_times, processes,
                             on_segment, run_progress, deadline)
        try:
            if checkpoint is None:
                return run(args)
            from minicw import checkpoint as checkpoints
            from minicw import journal, store
            opened = journal.Journal(checkpoint, journal.run_meta(
                store.KIND_EXECUTE, self._target_name, func_key, self._envir[0],
                journal.key_rule(key), len(args)), resume, rerun_failed)
            return checkpoints.resumed_execute(opened, args, key, run, _with_arg, run_progress)
        finally:
            run_progress.finish()

    def _store_function(self, session: client.Session) -> str:
        envir_key, source_blob, _, _ = self._envir
        session.put_blob(envir_key, source_blob)
        func_key, func_blob = protocol.pack_blob(protocol.BLOB_ENVIR_NAME, envir_key,
                                                 self._target_name)
        session.put_blob(func_key, func_blob)
        return func_key


def _dashboard_port(dashboard) -> int | None:
    """The --dashboard port for MasterNode's ``dashboard`` (True: 0, a free one)."""
    if dashboard is None or dashboard is False:
        return None
    return 0 if dashboard is True else int(dashboard)


def _dashboard_url(ready_record: dict, authkey: bytes) -> str | None:
    """The page's URL from the master's ready record (which holds no token)."""
    if "dashboard_port" not in ready_record:
        return None
    from minicw import dashboard  # the page's server, only for a master that serves one
    return dashboard.page_url(ready_record["dashboard_host"], ready_record["dashboard_port"],
                              authkey, here=True, https="tls_fingerprint" in ready_record)


def check_args(args):
    """The args as a list; ArgsError naming the first unhashable or repeated one.

    A range stays a range: its items are distinct ints, and its chunks travel
    as ranges (a few bytes each, whatever their length).
    """
    if isinstance(args, range):
        return args
    if isinstance(args, (str, bytes)) or not hasattr(args, "__iter__"):
        raise ArgsError("load_args() takes a list of arguments, not %s" % type(args).__name__)
    args = list(args)
    seen = set()
    for position, arg in enumerate(args):
        try:
            repeated = arg in seen
        except TypeError:
            raise ArgsError("arg %d (%r) is unhashable (%s); results are keyed by arg, so "
                            "use tuples instead of lists or dicts"
                            % (position, arg, type(arg).__name__)) from None
        if repeated:
            raise ArgsError("arg %d (%r) appears more than once; results are keyed by arg, "
                            "so every arg must be unique" % (position, arg))
        seen.add(arg)
    return args


def run_keyed(session: client.Session, func_key: str, args: list, chunksize: int | None,
              window: int, max_retries: int, job_timeout: float | None = None,
              job_times: chunking.JobTimes | None = None, processes: int = 0,
              on_segment=None, progress=NO_PROGRESS, deadline: tuple | None = None) -> dict:
    """Run ``func(arg)`` for every arg in chunks; {arg: result} or the first error.

    ``on_segment(args, values, errors)`` (a checkpoint's journal) sees every
    run of consecutive outcomes as it arrives, failures included; ``progress``
    (progress.Progress) counts them.  ``deadline``: (time.monotonic() limit, the
    timeout it came from); past it, TimeoutError says how far the run got, and
    the jobs not done are cancelled.

    Chunks hold ``chunksize`` args, or when it is None as many as
    ``job_times`` and ``processes`` call for (chunking.jobs_per_chunk),
    decided as each chunk is cut, so the sizes follow the timings that
    come back.
    """
    args_by_chunk = {}
    context_key = session.context_key()
    job_times = chunking.JobTimes() if job_times is None else job_times

    def next_size(start: int) -> int:
        if chunksize is not None:
            return chunksize
        return job_times.jobs_per_chunk(func_key, len(args), processes, len(args) - start)

    def chunks():
        start = 0
        while start < len(args):
            items = args[start:start + next_size(start)]
            start += len(items)
            chunk_id = session.new_chunk_id()
            args_by_chunk[chunk_id] = items
            payload = protocol.pack_payload(protocol.CALL_ONE, items)
            # The function is a name in the environment: any Python runs it, unless
            # the args carry bytecode.
            yield protocol.ChunkSpec(chunk_id, (func_key,), len(items), payload, job_timeout,
                                     max_retries, context_key, serialize.bytecode_python(payload))

    results = {}

    def timed_out() -> TimeoutError:
        return TimeoutError("execute() did not finish within its timeout of %gs: %d of the %d "
                            "jobs it ran were done; the rest were cancelled"
                            % (deadline[1], len(results), len(args)))
    stream = client.stream_results(session, chunks(), window, on_idle=progress.tick,
                                   deadline=deadline and deadline[0], timeout_error=timed_out)
    try:
        for delivery in stream:
            items = args_by_chunk[delivery.chunk_id]
            segments, seconds = client.decode(delivery, session,
                                              lambda index: "arg %r" % (items[index],))
            if seconds is not None:
                job_times.record((func_key,), seconds,
                                 sum(len(segment.values) for segment in segments))
            for first, values, errors in segments:
                if on_segment is not None:
                    on_segment(items[first:first + len(values)], values, errors)
                if errors:
                    offset = min(errors)
                    progress.add(offset + 1, 1)
                    raise _with_arg(errors[offset], items[first + offset])
                progress.add(len(values))
                results.update(zip(items[first:first + len(values)], values))
    finally:
        stream.close()
    return results


def _with_arg(error: BaseException, arg) -> BaseException:
    """Attach the failing arg to a RemoteError (other failures name their job)."""
    if isinstance(error, RemoteError):
        error.arg = arg
        error.has_arg = True
        error.args = (error.type_name, error.message, error.remote_traceback, arg,
                      error.exception, True)
    return error
