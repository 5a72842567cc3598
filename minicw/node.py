"""A worker node: supervises N worker processes on one machine.

    master <--register / unregister------------ WorkerNode
           <--poll (heartbeat, long-poll) ------- heartbeat thread --commands--+
           --[commands: shutdown, kill, ...]-->                                 |
           <--get_blob(key) (once per node) ---- supervisor loop <--wake-up----+
           <--process_ended(slot, ...) --------    | waits on: process sentinels,
                                                   |   control pipes, the wake-up pipe
                                                   v
                                  worker processes (worker_process.py), one per slot,
                                  each leasing jobs from the master directly

The node does not carry jobs.  It registers the machine, keeps the master
sure it is alive, starts and replaces processes, serves them the blobs it
caches (functions, contexts, broadcast data: each crosses the network once
per node, not once per process or per job; a fetcher thread downloads them
so a large one never stalls supervision), kills a process whose job is over
its time limit or that runs a job its client asked to kill, and tells the
master which job a dead process was running.

Processes are created through an explicit multiprocessing context, ``spawn``
by default: the Windows and macOS default, and safe beside the node's threads.
Under spawn and forkserver, multiprocessing makes each new process (and the
fork server) run the parent's main module first.  A worker process needs
nothing from it (functions travel by value, its target is importable), and a
script that starts a node at top level, without ``if __name__ ==
"__main__":``, would start another node in each of them; so the main module
is hidden from multiprocessing while a worker process starts (``_main_hidden``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import sys
import queue
import shutil
import signal
import tempfile
import threading
import time
import types
from collections import OrderedDict
from multiprocessing import connection, get_context

from minicw import config, output, protocol, serialize, transport, worker_process
from minicw.errors import (
    AuthkeyMismatchError, ClusterShutdownError, MasterConnectionError, MasterHostUnknownError,
    TlsError,
)

log = logging.getLogger(__name__)

# How one registration ends (``_serve_registration``).
ENDED_STOPPED = "stopped"        # stop() was called, or a drain finished
ENDED_SHUTDOWN = "shutdown"      # the master said it shuts down
ENDED_LOST = "lost"              # the connection to the master broke
ENDED_REREGISTER = "reregister"  # the master forgot this node

# The supervisor's own command beside the master's: the connection broke.
CMD_LOST = protocol.Command(ENDED_LOST)

WATCHDOG_PERIOD_S = 0.1  # how often the supervisor checks job deadlines and kill requests
KILL_REQUEST_TTL_S = 600.0  # a kill request for a job that never runs here is forgotten


def python_version() -> str:
    return "%s %d.%d.%d" % ((platform.python_implementation(),) + tuple(sys.version_info[:3]))


def describe_platform() -> str:
    """The operating system, its release and the machine, from facts that cost no
    more than a system call ("Linux-6.1.0-x86_64", "Windows-10.0.19045-AMD64").
    platform.platform() asks WMI on Windows, which aborted under Wine."""
    if hasattr(os, "uname"):
        system = os.uname()
        return "%s-%s-%s" % (system.sysname, system.release, system.machine)
    if hasattr(sys, "getwindowsversion"):
        version = sys.getwindowsversion()
        return "Windows-%d.%d.%d-%s" % (version.major, version.minor, version.build,
                                        os.environ.get("PROCESSOR_ARCHITECTURE", "unknown"))
    return sys.platform


# WaitForMultipleObjects takes at most 64 handles; multiprocessing.connection.wait
# raises ValueError beyond 63 on Windows before Python 3.13.
WAIT_HANDLES_MAX = 63 if sys.platform == "win32" and sys.version_info < (3, 13) else None


def wait_any(objects: list, timeout_s: float, batch_max: int | None = WAIT_HANDLES_MAX) -> list:
    """``multiprocessing.connection.wait`` over any number of objects: beyond
    ``batch_max`` the rest are polled first, then the first batch is waited on
    (what becomes ready in the others meanwhile is seen at the next call)."""
    if batch_max is None or len(objects) <= batch_max:
        return connection.wait(objects, timeout=timeout_s)
    batches = [objects[start:start + batch_max] for start in range(0, len(objects), batch_max)]
    ready = [obj for batch in batches for obj in connection.wait(batch, timeout=0)]
    return ready or connection.wait(batches[0], timeout=timeout_s)


def cap_nprocs(nprocs: int | None, oversubscribe: bool = False) -> int:
    """The number of processes to run: the CPU count by default, and never above it
    unless ``oversubscribe`` (jobs that mostly wait, on I/O or on other machines)."""
    cpus = os.cpu_count() or 1
    if nprocs is None:
        return cpus
    nprocs = int(nprocs)
    if nprocs < 1:
        raise ValueError("nprocs must be at least 1, not %d" % nprocs)
    if nprocs > cpus and not oversubscribe:
        log.warning("%d processes asked for, but this machine has %d CPUs; using %d (to run "
                    "%d anyway: --oversubscribe on the command line, oversubscribe=True in "
                    "Python)", nprocs, cpus, cpus, nprocs)
        return cpus
    return nprocs


class _MainWithoutSource(types.ModuleType):
    """The user's main module as multiprocessing's start methods see it while a
    worker process starts: no ``__file__`` and no ``__spec__``, so the new
    process does not run it; every other attribute is the real module's, so
    another thread that pickles something of ``__main__`` meanwhile finds it."""

    def __init__(self, main: types.ModuleType):
        super().__init__("__main__")
        self.__spec__ = None
        self._real_main = main

    def __getattr__(self, name: str):
        if name == "__file__":
            raise AttributeError(name)
        return getattr(self._real_main, name)


_main_swap_lock = threading.Lock()


@contextlib.contextmanager
def _main_hidden():
    """Hide the main module from multiprocessing for the start of one process."""
    with _main_swap_lock:
        main = sys.modules.get("__main__")
        if main is None:
            yield
            return
        sys.modules["__main__"] = _MainWithoutSource(main)
        try:
            yield
        finally:
            sys.modules["__main__"] = main


class _Slot:
    """One worker process and what the node knows about it."""

    __slots__ = ("index", "process", "control", "state", "send_lock")

    def __init__(self, index, process, control, state):
        self.index = index
        self.process = process
        self.control = control
        self.state = state
        self.send_lock = threading.Lock()  # the supervisor and the blob fetcher both send

    def send(self, message) -> None:
        with self.send_lock:
            try:
                self.control.send(message)
            except OSError:
                pass  # the process is gone; its sentinel reports it


class BlobCache:
    """Blobs this node has fetched, least recently used dropped beyond a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._data = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
            return data

    def put(self, key, data) -> None:
        with self._lock:
            if key in self._data:
                return
            self._data[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._data) > 1:
                _, dropped = self._data.popitem(last=False)
                self._bytes -= len(dropped)


class WorkerNode:
    """A worker node of the cluster at ``(IP, PORT)``.

    ``WorkerNode(IP, PORT, AUTHKEY, nprocs).join_cluster()`` blocks and serves
    until ``stop()`` is called (from another thread), the master shuts down,
    or SIGTERM/Ctrl-C in the command-line worker.  Ctrl-C at an interactive
    prompt takes the node out of the cluster at once (its jobs go to other
    nodes) and raises KeyboardInterrupt.  ``nprocs`` defaults to the
    CPU count and is capped at it.  ``max_jobs_per_process`` and
    ``max_memory_per_process`` (bytes, or a size such as "2G") replace a
    worker process after the chunk in which it reached either.
    """

    def __init__(self, IP: str, PORT: int, AUTHKEY, nprocs: int | None = None,
                 start_method: str | None = None,
                 reconnect: bool = True, oversubscribe: bool = False,
                 connect_timeout_s: float | None = 0.0, allow_oversubscribe: bool = False,
                 max_jobs_per_process: int | None = None,
                 max_memory_per_process: int | str | None = None, tls=None,
                 process_setup: tuple | None = None):
        self.address = (IP, int(PORT))
        self.connect_timeout_s = connect_timeout_s  # how long join_cluster waits for a
                                                    # master not started yet (None: ever)
        self.authkey = transport.as_authkey(AUTHKEY)
        if tls is not None:   # a tls.Settings; else the environment's ($MINICW_TLS_*)
            transport.use_tls(self.address, tls)
        self.tls = transport.tls_for(self.address)   # what its worker processes use too
        # allow_oversubscribe: the name of minicw 0.1
        self.nprocs = cap_nprocs(nprocs, oversubscribe or allow_oversubscribe)
        self.context = get_context(config.start_method(start_method))
        self.reconnect = reconnect
        # Recycling: a process that has run this many jobs, or grown to this
        # much memory, is replaced after the chunk it is running (a leaking job
        # then holds its memory for a while, not for the node's lifetime).
        self.recycle = _recycle_limits(max_jobs_per_process, max_memory_per_process)
        # (blob key, context key): a broadcast callable every process it starts
        # calls first, in that client's context (a minicw.Pool's initializer).
        self.process_setup = process_setup
        self.node_id = None
        self.master_shut_down = False
        self._slots = {}
        self._blobs = BlobCache(config.NODE_BLOB_CACHE_BYTES)
        self._blob_requests = queue.Queue()   # (slot, key) for the fetcher thread
        self._kill_requests = {}  # (slot index, token) -> (position, time requested)
        self._commands = []
        self._commands_lock = threading.Lock()
        self._wake_reader, self._wake_writer = self.context.Pipe(duplex=False)
        self._stop_requested = threading.Event()
        self._drain_requested = threading.Event()
        self._registered = threading.Event()
        self._output_dir = None   # the slots' files of what their jobs print (output.py)

    # --- public ------------------------------------------------------------------

    def join_cluster(self) -> None:
        """Connect, register, run the processes; blocks until the node stops.

        Raises a MasterConnectionError naming host and port when the master
        cannot be reached at first: a wrong host or key at once; nothing
        listening after ``connect_timeout_s`` (the master may start later: the
        node waits that long, and says once that it waits).  Once joined, a
        lost master is waited for and rejoined with backoff.
        """
        manager = self._connect_patiently(
            None if self.connect_timeout_s is None else time.monotonic() + self.connect_timeout_s,
            "waiting for the master at %s: nothing accepts connections there yet; this node "
            "joins when it starts" % transport.format_address(self.address))
        if manager is None:
            return  # stop() was called while it waited
        try:
            while not self._stop_requested.is_set():
                outcome = self._serve_registration(manager)
                if outcome in (ENDED_STOPPED, ENDED_SHUTDOWN) or not self.reconnect:
                    break
                if outcome == ENDED_LOST:
                    manager = self._reconnect_with_backoff()
                    if manager is None:
                        break
        finally:
            self._stop_processes()
            self._registered.clear()
            if self._output_dir is not None:
                shutil.rmtree(self._output_dir, ignore_errors=True)
                self._output_dir = None

    def stop(self, drain: bool = False) -> None:
        """Ask ``join_cluster`` to return; with ``drain``, leased jobs finish first."""
        if drain:
            self._drain_requested.set()
        else:
            self._stop_requested.set()
        self._wake()

    def wait_registered(self, timeout_s: float | None) -> bool:
        """True once the node has joined; False after ``timeout_s`` (None: no limit)."""
        return self._registered.wait(timeout_s)

    # --- connection -------------------------------------------------------------------

    def _connect(self):
        return transport.connect_master(self.address, self.authkey)

    def _reconnect_with_backoff(self):
        where = transport.format_address(self.address)
        log.warning("lost the master at %s; reconnecting", where)
        try:
            manager = self._connect_patiently(None)
        except (MasterHostUnknownError, AuthkeyMismatchError) as exc:
            log.error("cannot rejoin %s: %s", where, exc)
            return None
        if manager is not None:
            log.warning("reconnected to the master at %s", where)
        return manager

    def _connect_patiently(self, deadline: float | None, waiting_note: str | None = None):
        """A connection, tried again with backoff while the master is not there (not
        started yet, or restarting); None if stop() is called meanwhile.

        Raises MasterHostUnknownError, AuthkeyMismatchError and TlsError at once
        (waiting cures none), and the last MasterConnectionError once the
        time.monotonic() ``deadline`` (None: never) would pass.  ``waiting_note``
        is logged once, at the first failed try.
        """
        pause_s = 0.1
        while not self._stop_requested.is_set():
            try:
                return self._connect()
            except (MasterHostUnknownError, AuthkeyMismatchError, TlsError):
                raise
            except MasterConnectionError:
                if deadline is not None and time.monotonic() + pause_s > deadline:
                    raise
                if waiting_note:
                    log.warning("%s", waiting_note)
                    waiting_note = None
            if self._stop_requested.wait(pause_s):
                break
            pause_s = min(pause_s * 2, config.NODE_RECONNECT_MAX_S)
        return None

    def _info(self) -> dict:
        return {"protocol": protocol.PROTOCOL_VERSION, "hostname": socket.gethostname(),
                "pid": os.getpid(), "nprocs": self.nprocs, "python": python_version(),
                "python_tag": serialize.PYTHON_TAG,
                "platform": describe_platform(),
                "start_method": self.context.get_start_method()}

    def _serve_registration(self, manager) -> str:
        """Register, run the processes until something ends this registration.

        Returns one of the ENDED_* constants.
        """
        api = manager.node()
        try:
            self.node_id, heartbeat_timeout_s = api.register(self._info())
            transport.master_heartbeat(self.address, heartbeat_timeout_s, api)
        except ClusterShutdownError:
            return ENDED_SHUTDOWN
        except (EOFError, OSError):
            return ENDED_LOST
        with self._commands_lock:
            self._commands.clear()  # an earlier registration's news is no news for this one
        self._start_heartbeat(api, heartbeat_timeout_s / config.HEARTBEATS_PER_TIMEOUT)
        fetcher = threading.Thread(target=self._fetch_blobs, args=(api,),
                                   name="minicw-blob-fetcher", daemon=True)
        fetcher.start()
        try:
            for index in range(self.nprocs):
                self._start_process(index)
            self._registered.set()
            log.info("node %s serving %d processes for %s", self.node_id, self.nprocs,
                     transport.format_address(self.address))
            outcome = self._supervise(api)
        except (EOFError, OSError) as exc:
            log.warning("connection to the master failed: %s", exc)
            outcome = ENDED_LOST
        except BaseException:
            # Ctrl-C at an interactive prompt, say: leave the cluster now, so
            # that the master hands the jobs this node held to other nodes.
            self._leave(api, fetcher, ENDED_STOPPED)
            raise
        return self._leave(api, fetcher, outcome)

    def _leave(self, api, fetcher: threading.Thread, outcome: str) -> str:
        """End a registration: its processes, its fetcher, and (``ENDED_STOPPED``:
        the node leaves on purpose) its place in the master."""
        self._registered.clear()
        self._blob_requests.put(None)
        fetcher.join()
        self._stop_processes()
        if outcome == ENDED_STOPPED:
            try:
                api.unregister(self.node_id)
            except Exception:  # the master may be gone; it will expire us
                pass
        return outcome

    def _start_heartbeat(self, api, period_s: float) -> None:
        node_id = self.node_id

        def beat():
            while not self._stop_requested.is_set() and self.node_id == node_id:
                try:
                    commands = api.poll(node_id, period_s)
                except Exception as exc:
                    log.debug("heartbeat failed: %s", exc)
                    self._post(CMD_LOST)
                    return
                for command in commands:
                    self._post(command)
                    if command.kind in (protocol.CMD_SHUTDOWN, protocol.CMD_REREGISTER):
                        return
        threading.Thread(target=beat, name="minicw-heartbeat", daemon=True).start()

    def _post(self, command) -> None:
        with self._commands_lock:
            self._commands.append(command)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_writer.send_bytes(b"!")
        except OSError:
            pass

    # --- supervision -----------------------------------------------------------------------

    def _supervise(self, api) -> str:
        draining = False
        while True:
            if self._stop_requested.is_set():
                return ENDED_STOPPED
            if self._drain_requested.is_set() and not draining:
                draining = True
                for slot in self._slots.values():
                    slot.state[worker_process.STATE_DRAIN] = 1
                    slot.send((worker_process.MSG_DRAIN,))  # for a process waiting on a blob
            if draining and not self._slots:
                return ENDED_STOPPED
            waitables = [self._wake_reader]
            for slot in self._slots.values():
                waitables.append(slot.process.sentinel)
                waitables.append(slot.control)
            ready = wait_any(waitables, WATCHDOG_PERIOD_S)
            for obj in ready:
                if obj is self._wake_reader:
                    while self._wake_reader.poll():
                        self._wake_reader.recv_bytes()
            outcome = self._run_commands(api)
            if outcome:
                return outcome
            for slot in list(self._slots.values()):
                if slot.control in ready:
                    self._answer(api, slot)
                if not slot.process.is_alive():
                    self._process_ended(api, slot, protocol.END_DIED, draining)
            self._enforce_deadlines(api)
            self._enforce_kill_requests(api)

    def _run_commands(self, api):
        with self._commands_lock:
            commands, self._commands = self._commands, []
        for command in commands:
            kind = command.kind
            if kind == protocol.CMD_SHUTDOWN:
                self.master_shut_down = True
                log.warning("the master at %s shut down",
                            transport.format_address(self.address))
                return ENDED_SHUTDOWN
            if kind == protocol.CMD_REREGISTER:
                log.warning("the master forgot node %s; registering again", self.node_id)
                return ENDED_REREGISTER
            if kind == ENDED_LOST:
                return ENDED_LOST
            if kind == protocol.CMD_KILL:
                self._kill_job(api, command.slot, command.token, command.position)
        return None

    def _answer(self, api, slot: _Slot) -> None:
        try:
            request = slot.control.recv()
        except (EOFError, OSError):
            return  # the process is gone; its sentinel reports it
        kind, key = request
        if kind == worker_process.MSG_BLOB:
            data = self._blobs.get(key)
            if data is not None:
                slot.send((worker_process.MSG_BLOB, key, data))
            else:
                self._blob_requests.put((slot, key))

    def _fetch_blobs(self, api) -> None:
        """The fetcher thread: download blobs the cache lacks, answer the processes."""
        while True:
            request = self._blob_requests.get()
            if request is None:
                return
            slot, key = request
            data = self._blobs.get(key)  # an earlier request may have fetched it
            if data is not None:
                slot.send((worker_process.MSG_BLOB, key, data))
                continue
            try:
                data = api.get_blob(key)
            except (EOFError, OSError) as exc:
                slot.send((worker_process.MSG_ERROR, key, "lost the master: %s" % exc))
                self._post(CMD_LOST)  # the supervisor's caller handles that
                continue
            except Exception as exc:  # e.g. the blob's client left: tell the process
                slot.send((worker_process.MSG_ERROR, key, str(exc)))
                continue
            self._blobs.put(key, data)
            slot.send((worker_process.MSG_BLOB, key, data))

    def _enforce_deadlines(self, api) -> None:
        now_ns = time.monotonic_ns()
        for slot in list(self._slots.values()):
            deadline_ns = slot.state[worker_process.STATE_DEADLINE_NS]
            if deadline_ns and now_ns > deadline_ns and slot.state[worker_process.STATE_TOKEN]:
                self._end_slot(api, slot, protocol.END_TIMED_OUT)

    def _kill_job(self, api, slot_index, token, position) -> None:
        """Remember a kill request; it is carried out when the process reaches the job."""
        self._kill_requests[(slot_index, token)] = (position, time.monotonic())
        self._enforce_kill_requests(api)

    def _enforce_kill_requests(self, api) -> None:
        now = time.monotonic()
        for (slot_index, token), (position, requested) in list(self._kill_requests.items()):
            slot = self._slots.get(slot_index)
            if slot is None or now - requested > KILL_REQUEST_TTL_S:
                del self._kill_requests[(slot_index, token)]
                continue
            if slot.state[worker_process.STATE_TOKEN] != token:
                continue  # not started yet (or finished: then the TTL forgets it)
            # A batch of fast jobs holds its first position and its end.  The end is
            # read first: the process writes the position first, and positions only
            # grow, so a stale end never covers jobs that have finished.
            batch_end = slot.state[worker_process.STATE_BATCH_END]
            running = slot.state[worker_process.STATE_POSITION]
            batch_end = max(running + 1, batch_end)
            if running > position:
                del self._kill_requests[(slot_index, token)]  # it finished first
            elif position < batch_end:
                del self._kill_requests[(slot_index, token)]
                self._end_slot(api, slot, protocol.END_KILLED, position)

    def _end_slot(self, api, slot: _Slot, reason: str, position: int | None = None) -> None:
        """Kill a slot's process on purpose and report why (and which job: by
        default the one it was running)."""
        _kill_group(slot.process)
        slot.process.join()
        self._process_ended(api, slot, reason, draining=False, position=position)

    def _process_ended(self, api, slot: _Slot, reason: str, draining: bool,
                       position: int | None = None) -> None:
        process = slot.process
        process.join()
        _kill_group(process)   # what its job started dies with it
        token = slot.state[worker_process.STATE_TOKEN]
        if position is None:
            position = slot.state[worker_process.STATE_POSITION]
            if slot.state[worker_process.STATE_BATCH_END] > position + 1:
                # It died in a batch of several jobs: which one is unknown
                # (the master runs them again, one at a time, uncharged).
                position = None
        exit_description = describe_exit(process.exitcode)
        del self._slots[slot.index]
        slot.control.close()
        left_on_its_own = slot.state[worker_process.STATE_EXIT]
        if left_on_its_own == worker_process.EXIT_STOPPED and process.exitcode == 0 and draining:
            return
        if left_on_its_own == process.exitcode == worker_process.EXIT_RECYCLED:
            # It reported everything and held nothing: no job to charge.
            log.info("worker process %d (pid %s) was replaced after reaching its limit (%s)",
                     slot.index, process.pid, _describe_recycle(self.recycle))
            if not draining:
                self._start_process(slot.index)
            return
        if left_on_its_own == process.exitcode == worker_process.EXIT_RETIRED:
            # A job asked for a fresh process after it (a Pool's maxtasksperchild).
            # It reported what it ran; what it still held goes back uncharged
            # (no token: no job was running when it left).
            log.debug("worker process %d (pid %s) was replaced at its job's request",
                      slot.index, process.pid)
            api.process_ended(self.node_id, slot.index, 0, -1, protocol.END_DIED,
                              "replaced at its job's request", None)
            if not draining:
                self._start_process(slot.index)
            return
        if left_on_its_own in (worker_process.EXIT_NODE_UNKNOWN, worker_process.EXIT_MASTER_LOST):
            # The process found the master gone or this registration forgotten;
            # ask the master which, rather than respawning into the same wall.
            try:
                commands = api.poll(self.node_id, 0)
            except (EOFError, OSError):
                commands = [CMD_LOST]
            for command in commands:
                self._post(command)
            if commands:
                return
        if reason == protocol.END_DIED:
            log.warning("worker process %d (pid %s) ended: %s (running job %s of lease %s)",
                        slot.index, process.pid, exit_description,
                        "?" if position is None else position, token)
        elif reason == protocol.END_TIMED_OUT:
            log.info("worker process %d (pid %s) killed: job %s of lease %s ran over its "
                     "time limit", slot.index, process.pid, position, token)
        else:
            log.info("worker process %d (pid %s) killed: job %s of lease %s was cancelled "
                     "while it ran", slot.index, process.pid, position, token)
        printed = None
        if reason != protocol.END_KILLED and token and position is not None:
            printed = output.crashed_output(self._output_file(slot.index), position) or None
            if printed is not None:
                printed = ("%s:%s" % (socket.gethostname(), process.pid), printed)
        api.process_ended(self.node_id, slot.index, token, position, reason, exit_description,
                          printed)
        if not draining:
            self._start_process(slot.index)

    def _output_file(self, index: int) -> str:
        """The file in which slot ``index``'s process mirrors what its job prints."""
        if self._output_dir is None:
            self._output_dir = tempfile.mkdtemp(prefix="minicw-node-")
        return os.path.join(self._output_dir, "slot-%d.out" % index)

    def _start_process(self, index: int) -> None:
        node_end, process_end = self.context.Pipe(duplex=True)
        state = self.context.RawArray("q", worker_process.STATE_FIELDS)
        state[worker_process.STATE_POSITION] = -1
        spec = {"node_id": self.node_id, "slot": index, "control": process_end,
                "slot_state": state, "address": self.address, "authkey": self.authkey,
                "output_file": self._output_file(index), "recycle": self.recycle,
                "tls": self.tls, "setup": self.process_setup}
        process = self.context.Process(target=worker_process.run_process, args=(spec,),
                                       name="minicw-worker-%d" % index, daemon=True)
        with _main_hidden():
            process.start()
        process_end.close()
        self._slots[index] = _Slot(index, process, node_end, state)

    def _stop_processes(self) -> None:
        for slot in list(self._slots.values()):
            _kill_group(slot.process)
        for slot in list(self._slots.values()):
            slot.process.join()
            slot.control.close()
        self._slots.clear()


def _kill_group(process) -> None:
    """Kill a worker process and, where the platform has process groups, the
    processes its jobs started (the worker process leads a group of its own;
    after it died, its group lives on in what it left)."""
    if hasattr(os, "killpg") and process.pid is not None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
            return
        except (ProcessLookupError, PermissionError):
            pass   # no group left (or never one): the process alone, if alive
    if process.is_alive():
        process.kill()


# Windows reports a process that crashed by the NTSTATUS code of the crash.
NTSTATUS_NAMES = {
    0xC0000005: "STATUS_ACCESS_VIOLATION: an invalid memory access, like SIGSEGV",
    0xC000001D: "STATUS_ILLEGAL_INSTRUCTION, like SIGILL",
    0xC0000094: "STATUS_INTEGER_DIVIDE_BY_ZERO, like SIGFPE",
    0xC00000FD: "STATUS_STACK_OVERFLOW",
    0xC0000135: "STATUS_DLL_NOT_FOUND",
    0xC000013A: "STATUS_CONTROL_C_EXIT: ended by Ctrl-C",
    0xC0000374: "STATUS_HEAP_CORRUPTION",
    0xC0000409: "STATUS_STACK_BUFFER_OVERRUN: a fail-fast abort, like SIGABRT",
}


def describe_exit(exitcode) -> str:
    """'exit code 3', 'killed by signal SIGKILL' or, for a Windows crash, its
    NTSTATUS name, for a Process.exitcode."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return "killed by signal %s" % signal.Signals(-exitcode).name
        except ValueError:
            return "killed by signal %d" % -exitcode
    if exitcode in NTSTATUS_NAMES:
        return "exit code 0x%08X (%s)" % (exitcode, NTSTATUS_NAMES[exitcode])
    return "exit code %d" % exitcode



def _recycle_limits(max_jobs, max_memory) -> tuple:
    """``(jobs, bytes)`` after which a worker process is replaced (0: no limit)."""
    if max_jobs is not None and (type(max_jobs) is not int or max_jobs < 1):
        raise ValueError("max_jobs_per_process must be a positive whole number, not %r"
                         % (max_jobs,))
    if isinstance(max_memory, str):
        max_memory = config.parse_size(max_memory)
    if max_memory is not None and (type(max_memory) is not int or max_memory < 1):
        raise ValueError("max_memory_per_process must be a positive number of bytes (or a "
                         "size such as 2G), not %r" % (max_memory,))
    return max_jobs or 0, max_memory or 0


def _describe_recycle(limits: tuple) -> str:
    jobs, memory = limits
    parts = (["%d jobs" % jobs] if jobs else []) + (["%d MB" % (memory >> 20)] if memory else [])
    return " or ".join(parts)
