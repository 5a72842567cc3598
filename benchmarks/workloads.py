"""What the benchmark's workers run, and the benchmark's helper child processes.

``benchmarks/run.py`` puts this directory on ``sys.path``, so the functions
below are importable everywhere they run: in this process (serial runs), in
``multiprocessing`` workers, and in minicw worker processes (minicw sends the
client's ``sys.path`` with its jobs).  They therefore travel by reference,
as a user's library functions would.

Child processes are started from here (``python workloads.py ...``), each
in a role that must not share an interpreter with the benchmark itself:

    python workloads.py minimalcluster
        minicw's ancestor, when installed: a minimalcluster MasterNode and a
        2-process WorkerNode, driven by JSON lines on stdin (one reply line
        per request on stdout).  Ends at EOF on stdin.
    python workloads.py simnodes HOST PORT COUNT     (key in $MINICW_AUTHKEY)
        COUNT simulated minicw worker nodes of one process slot each: each
        registers through the ``node`` typeid and heartbeats with ``poll``
        as minicw.worker does (a thread per node, asleep in its long poll),
        and serves its slot the blobs it fetched once.  The slots are real
        ``minicw.worker_process.Runner`` objects, each with its own connection
        through the ``process`` typeid, all driven from one thread:

            every slot: send exchange(reports, want, wait) --> master
            loop: selector -> a slot whose reply is in -> its leases
                  (decode, run, pack results: the runner's own steps)
                  -> its next exchange, reports included

        One thread rather than a thread per slot: threads of one process
        contend for its GIL, which no real node does, and made every job of
        the simulation cost half as much again.  Broadcast data is not
        served.  Prints ``READY node_id ...``; ends at EOF on stdin.
    python workloads.py simprocs HOST PORT NODES PER_NODE   (key in $MINICW_AUTHKEY)
        NODES simulated nodes of PER_NODE worker processes each, every
        process a Sleeper: a real Runner with its own connection that leases,
        waits out each ``nap`` job (NAP_S) on a timer instead of sleeping,
        flushes and reports as the real loop does; all driven from one thread
        (a selector and a heap of timers).  Prints ``READY COUNT``; "counts" on
        stdin prints ``COUNTS`` and the jobs each process has done; ends at EOF.
    python workloads.py floorhub
    python workloads.py floorworkers PORT CONNECTIONS
        The scale workload's message pattern with no minicw in it, to show
        what this machine allows: a hub on 127.0.0.1 (one selector loop, as
        the master's) and processes of worker connections (one selector loop
        each, as the simulated nodes').  FloorClient submits chunks of
        ``range`` arguments in one message; the hub sends each connection up
        to ``window`` of them and another whenever one comes back, and passes
        the results on to the client, every result in by the end of a loop
        turn in one message.  Frames are a 4-byte length and a pickle.  No
        leases, reports, heartbeats or retries: a floor, not a scheduler.
        The hub prints ``READY port``; both end at EOF on stdin.
"""
from __future__ import annotations

import heapq
import inspect
import json
import logging
import math
import os
import platform
import pickle
import selectors
import socket
import struct
import sys
import threading
import time
from multiprocessing import Pipe, connection

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)  # this checkout's minicw, installed or not

from minicw import config, context, protocol, serialize, worker_process  # noqa: E402
from minicw.node import python_version  # noqa: E402
from minicw.transport import connect_master as connect  # noqa: E402

FIRST_NUMBER = 999999999999  # the minimalcluster README's factorization inputs


def inc(x):
    """The no-op job: as cheap as a job can be and still return something checkable."""
    return x + 1


NAP_S = 0.02   # how long a nap job sleeps


def nap(x):
    """A job that sleeps NAP_S and returns its argument (what the simulated worker
    processes of ``simprocs`` do without a process or a sleep of their own)."""
    time.sleep(NAP_S)
    return x


def spin(x, seconds=0.0001):
    """A job of ``seconds`` of CPU (100 us by default), returning something checkable."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return x + 1


def spin_1us(x):
    """A job of 1 us of CPU."""
    return spin(x, 1e-6)


def factorize_naive(n):
    """The minimalcluster README's factorization (trial division), prime factors of n.

    As in the README except ``n // p`` for its Python 2 ``n / p``, which in
    Python 3 would turn ``n`` into a float.
    """
    if n < 2:
        return []
    factors = []
    p = 2
    while True:
        if n == 1:
            return factors
        r = n % p
        if r == 0:
            factors.append(p)
            n = n // p
        elif p * p >= n:
            factors.append(n)
            return factors
        elif p > 2:
            # Advance in steps of 2 over odd numbers
            p += 2
        else:
            # If p == 2, get to 3
            p += 1


def factorize_lists(conn) -> None:
    """A bare process: factorize each list of numbers received on ``conn``, send the
    factors back; until None.  What any tool's worker process does, less the tool."""
    while True:
        nums = conn.recv()
        if nums is None:
            return
        conn.send([factorize_naive(n) for n in nums])


FACTORIZE_SOURCE = inspect.getsource(factorize_naive)  # for load_envir()
INC_SOURCE = inspect.getsource(inc)


def make_nums(count: int) -> list:
    """``count`` numbers from 999999999999 stepping by 2 (the README's make_nums)."""
    return list(range(FIRST_NUMBER, FIRST_NUMBER + 2 * count, 2))


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident set size of a process (VmRSS in /proc/PID/status; VmHWM: its peak),
    in bytes."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError("no %s for pid %d" % (field, pid))


# --- minimalcluster, when installed -------------------------------------------------------

def _minimalcluster_worker(host, port, authkey, nprocs):
    from minimalcluster import WorkerNode
    WorkerNode(host, port, authkey, nprocs, quiet=True).join_cluster()


def serve_minimalcluster() -> int:
    """Run minimalcluster requests from stdin: {"op": "run", ...} and {"op": "quit"}.

    A run request names an environment ``source``, its ``function`` and the
    args ``range`` [start, stop, step]; the reply gives the seconds
    ``execute()`` took, the number of results and their sum (for checking).
    """
    import multiprocessing
    import secrets
    # minimalcluster prints its progress: replies get their own copy of stdout.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)

    def reply(**fields):
        replies.write(json.dumps(fields) + "\n")

    try:
        import minimalcluster
        from minimalcluster import MasterNode
    except ImportError as exc:
        reply(error="not installed: %s" % exc)
        return 1
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    authkey = secrets.token_hex(16)
    master = MasterNode(HOST="127.0.0.1", PORT=port, AUTHKEY=authkey)
    master.start_master_server(if_join_as_worker=False)
    worker = multiprocessing.Process(target=_minimalcluster_worker,
                                     args=("127.0.0.1", port, authkey, 2))
    worker.start()  # not a daemon: minimalcluster's node starts processes of its own
    try:
        deadline = time.monotonic() + 30
        while not master.list_workers():
            if time.monotonic() > deadline:
                reply(error="minimalcluster's worker node did not join within 30 s")
                return 1
        reply(ready=True, version=getattr(minimalcluster, "__version__", None) or _version())
        for line in sys.stdin:
            request = json.loads(line)
            if request["op"] == "quit":
                break
            master.load_envir(request["source"], from_file=False)
            master.register_target_function(request["function"])
            master.load_args(list(range(*request["range"])))
            master.chunksize = request["chunksize"]
            started = time.perf_counter()
            result = master.execute()
            seconds = time.perf_counter() - started
            if result is None:
                reply(error="execute() returned None (a job failed)")
                continue
            values = result.values()
            total = sum(values) if request.get("sum") else None
            reply(seconds=seconds, count=len(result), sum=total)
    finally:
        worker.terminate()
        master.shutdown()
    return 0


def _version():
    try:
        from importlib.metadata import version
        return version("minimalcluster")
    except Exception:
        return None


# --- simulated minicw worker nodes ---------------------------------------------------------

class SimNode:
    """One simulated worker node: a heartbeat thread, the Runners of its ``nprocs``
    process slots (driven by run_slots or run_sleepers) and the pipe between
    them and the node."""

    def __init__(self, address, authkey: bytes, nprocs: int = 1):
        self.api = connect(address, authkey).node()
        info = {"protocol": protocol.PROTOCOL_VERSION, "hostname": socket.gethostname(),
                "pid": os.getpid(), "nprocs": nprocs, "python": python_version(),
                "platform": platform.platform(terse=True), "start_method": "simulated"}
        self.node_id, heartbeat_timeout_s = self.api.register(info)
        self.period_s = heartbeat_timeout_s / config.HEARTBEATS_PER_TIMEOUT
        self.blobs = {}     # what this node fetched, as a node's cache holds it
        self.control, process_end = Pipe(duplex=True)
        self.slots = [self._runner(address, authkey, index, process_end)
                      for index in range(nprocs)]
        self.slot = self.slots[0]

    def _runner(self, address, authkey: bytes, index: int, control):
        state = bytearray(8 * worker_process.STATE_FIELDS)
        memoryview(state).cast("q")[worker_process.STATE_POSITION] = -1
        runner = worker_process.Runner({"node_id": self.node_id, "slot": index,
                                        "control": control, "slot_state": state,
                                        "address": tuple(address), "authkey": authkey})
        runner.api = connect(address, authkey).process()
        return runner

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the heartbeat; return once the first heartbeat is through, so that
        nodes join one after another rather than all at once."""
        joined = threading.Event()
        threading.Thread(target=self._heartbeat, args=(joined,), daemon=True).start()
        if not joined.wait(timeout_s):
            raise RuntimeError("node %s: no heartbeat got through in %gs"
                               % (self.node_id, timeout_s))

    def _heartbeat(self, joined) -> None:
        wait_s = 0.0
        while True:
            try:
                commands = self.api.poll(self.node_id, wait_s)
            except Exception:   # a node reconnects; we retry (the master keeps us for
                time.sleep(0.5)  # the heartbeat timeout)
                continue
            joined.set()
            wait_s = self.period_s
            for command in commands:
                if command[0] in (protocol.CMD_SHUTDOWN, protocol.CMD_REREGISTER):
                    os._exit(0)

    def answer(self) -> None:
        """Serve one blob request of this node's slot (from the node's cache)."""
        request = self.control.recv()
        if request[0] != "blob":
            return
        key = request[1]
        data = self.blobs.get(key)
        if data is None:
            try:
                data = self.blobs[key] = self.api.get_blob(key)
            except Exception as exc:
                self.control.send(("error", key, str(exc)))
                return
        self.control.send(("blob", key, data))


def run_slots(nodes) -> None:
    """Drive every node's slot from this thread: each has one exchange call out at
    a time; whichever reply comes in, that slot runs its leases and calls again."""
    context.install_chdir_tracker()
    selector = selectors.DefaultSelector()

    def ask(slot) -> None:
        slot.api.send_call("exchange", slot.exchange_args(slot.want(), worker_process.IDLE_WAIT_S))

    for node in nodes:
        ask(node.slot)
        selector.register(node.slot.api.connection(), selectors.EVENT_READ, node.slot)
    while selector.get_map():
        for key, _ in selector.select():
            slot = key.data
            if not slot.take_reply(slot.api.receive_reply()):
                selector.unregister(key.fileobj)   # the master forgot this node
                continue
            while slot.leases:
                slot.run_next_lease()
            ask(slot)


def _run_slots_or_exit(nodes) -> None:
    try:
        run_slots(nodes)
    except BaseException:   # the benchmark sees this process end, not a silent stall
        logging.exception("simulated nodes: the slots stopped")
        os._exit(1)


def _serve_blobs(nodes) -> None:
    by_connection = {node.control: node for node in nodes}
    while True:
        for ready in connection.wait(list(by_connection)):
            by_connection[ready].answer()


def serve_sim_nodes(host: str, port: int, count: int) -> int:
    logging.basicConfig(level=logging.ERROR)
    authkey = os.environ["MINICW_AUTHKEY"].encode()
    nodes = []
    for _ in range(count):
        nodes.append(SimNode((host, port), authkey))
        nodes[-1].start()
    threading.Thread(target=_serve_blobs, args=(nodes,), daemon=True).start()
    threading.Thread(target=_run_slots_or_exit, args=(nodes,), daemon=True).start()
    print("READY " + " ".join(node.node_id for node in nodes), flush=True)
    sys.stdin.read()   # until the benchmark closes our stdin (or ends)
    os._exit(0)


# --- many simulated worker processes that sleep their jobs --------------------------------

class Sleeper:
    """A simulated worker process whose jobs are ``nap``: it leases, "sleeps" each
    job's NAP_S on a timer instead of running it, and reports its argument, with
    the real process's Runner doing the rest (what to ask for, holding leases
    and reports, packing results).  As the real loop, it reads the clock after
    every job this long, flushes the results so far once RESULT_FLUSH_S has
    passed (an exchange that waits for its reply), and asks for work when it
    holds none.  Jobs that all take NAP_S need no timer each: one timer takes
    it to the job after which the real loop would next flush, or to the end
    of the lease."""

    def __init__(self, runner):
        self.runner = runner
        self.token = None        # the lease running, None when none
        self.values = None       # what its jobs return (their arguments)
        self.pending = None      # worker_process._Pending: from which job results are held
        self.lease_started = 0.0
        self.segment = 0         # jobs until the next stop (a flush or the lease's end)
        self.jobs_done = 0

    def ask(self) -> None:
        runner = self.runner
        running = self.token is not None   # a flush: reports only, no wait
        runner.api.send_call("exchange", runner.exchange_args(
            0 if running else runner.want(), 0 if running else worker_process.IDLE_WAIT_S))

    def take_reply(self, now: float):
        """The reply of the call out; the time of this sleeper's next timer, or None
        when it asked again (or the master forgot its node: then False)."""
        runner = self.runner
        if not runner.take_reply(runner.api.receive_reply()):
            return False
        if self.token is not None:      # after a flush
            if self.token not in runner.revoked:
                return self._next_stop(now)
            runner.revoked.discard(self.token)
            self.token = None
        return self._start(now)

    def _start(self, now: float):
        runner = self.runner
        while runner.leases:
            lease = runner.next_lease()
            if lease is None:
                continue
            kind, items = serialize.loads(lease.payload)
            if kind != protocol.CALL_ONE:
                raise ValueError("simulated processes run nap(x) jobs only")
            self.token = lease.token
            self.values = [items[index] for index in lease.selection]
            self.pending = worker_process._Pending(now)
            self.lease_started = now
            return self._next_stop(now)
        self.ask()
        return None

    def _next_stop(self, now: float) -> float:
        """When the running lease next flushes or ends (jobs run back to back from now)."""
        left = len(self.values) - self.pending.start
        # (a real sleep overshoots: the job that reaches flush_at ends after it)
        self.segment = max(1, min(left, math.ceil((self.pending.flush_at - now) / NAP_S - 1e-9)))
        return now + self.segment * NAP_S

    def on_timer(self, now: float):
        """The jobs up to the next stop are done: flush or finish; the next timer or None."""
        runner, pending, values = self.runner, self.pending, self.values
        end = pending.start + self.segment
        self.jobs_done += self.segment
        runner._report(self.token, pending.start, values[pending.start:end], None,
                       now - pending.started)
        if end < len(values):   # a flush: wait for the reply, go on
            pending.start, pending.started = end, now
            pending.flush_at = now + config.RESULT_FLUSH_S
            self.ask()
            return None
        runner.chunk_took(now - self.lease_started)
        self.token = None
        return self._start(now)


def run_sleepers(sleepers) -> None:
    """Drive every sleeper from this thread: a selector for replies, a heap of timers."""
    selector = selectors.DefaultSelector()
    timers = []   # (due, sequence, sleeper)
    sequence = 0
    for sleeper in sleepers:
        sleeper.ask()
        selector.register(sleeper.runner.api.connection(), selectors.EVENT_READ, sleeper)
    clock = time.perf_counter
    while selector.get_map():
        timeout = max(0.0, timers[0][0] - clock()) if timers else None
        events = selector.select(timeout)
        now = clock()
        for key, _ in events:
            due = key.data.take_reply(now)
            if due is False:
                selector.unregister(key.fileobj)
            elif due is not None:
                sequence += 1
                heapq.heappush(timers, (due, sequence, key.data))
        while timers and timers[0][0] <= now:
            _, _, sleeper = heapq.heappop(timers)
            due = sleeper.on_timer(now)
            if due is not None:
                sequence += 1
                heapq.heappush(timers, (due, sequence, sleeper))


def serve_sim_processes(host: str, port: int, nodes: int, per_node: int) -> int:
    """``nodes`` simulated nodes of ``per_node`` sleepers each; "counts" on stdin
    prints ``COUNTS`` and the jobs each sleeper has done."""
    logging.basicConfig(level=logging.ERROR)
    authkey = os.environ["MINICW_AUTHKEY"].encode()
    sim_nodes = []
    for _ in range(nodes):
        sim_nodes.append(SimNode((host, port), authkey, per_node))
        sim_nodes[-1].start()
    sleepers = [Sleeper(runner) for node in sim_nodes for runner in node.slots]

    def drive():
        try:
            run_sleepers(sleepers)
        except BaseException:
            logging.exception("simulated processes: the loop stopped")
            os._exit(1)
    threading.Thread(target=drive, daemon=True).start()
    print("READY %d" % len(sleepers), flush=True)
    for line in sys.stdin:
        if line.strip() == "counts":
            print("COUNTS " + " ".join(str(s.jobs_done) for s in sleepers), flush=True)
    os._exit(0)


# --- the scale pattern over bare sockets (the floor) ----------------------------------------

_FRAME_HEADER = struct.Struct("!I")


def _send_frame(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    sock.sendall(_FRAME_HEADER.pack(len(data)) + data)


def _take_frames(buffer: bytearray) -> list:
    """Unpickle every whole frame at the front of ``buffer`` and cut them off it."""
    messages, start = [], 0
    while len(buffer) - start >= _FRAME_HEADER.size:
        (size,) = _FRAME_HEADER.unpack_from(buffer, start)
        end = start + _FRAME_HEADER.size + size
        if len(buffer) < end:
            break
        messages.append(pickle.loads(buffer[start + _FRAME_HEADER.size:end]))
        start = end
    del buffer[:start]
    return messages


def _floor_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _FloorHub:
    """The master's part: hand chunks out, pass results on."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.buffers = {}       # socket -> bytes read, not yet whole frames
        self.outstanding = {}   # worker socket -> chunks sent, not yet back
        self.queue = []         # chunks not yet sent, next at the end
        self.window = 1
        self.client = None
        self.results = []       # (chunk_id, values) in this loop turn

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._receive(key.fileobj)
            if self.results and self.client is not None:
                _send_frame(self.client, self.results)
                self.results = []

    def _accept(self) -> None:
        sock, _ = self.listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffers[sock] = bytearray()
        self.selector.register(sock, selectors.EVENT_READ)

    def _receive(self, sock: socket.socket) -> None:
        data = sock.recv(1 << 18)
        if not data:
            self.selector.unregister(sock)
            self.outstanding.pop(sock, None)
            if sock is self.client:
                self.client = None
            sock.close()
            return
        self.buffers[sock] += data
        for message in _take_frames(self.buffers[sock]):
            if message[0] == "worker":
                self.outstanding[sock] = 0
            elif message[0] == "submit":
                self.client, self.window = sock, message[1]
                self.queue = list(reversed(message[2]))
            else:
                self.outstanding[sock] -= 1
                self.results.append(message[1:])
        self._hand_out()

    def _hand_out(self) -> None:
        for worker_sock, sent in self.outstanding.items():
            while self.queue and sent < self.window:
                _send_frame(worker_sock, self.queue.pop())
                sent += 1
            self.outstanding[worker_sock] = sent
            if not self.queue:
                break


def serve_floor_hub() -> int:
    hub = _FloorHub()
    print("READY %d" % hub.listener.getsockname()[1], flush=True)
    threading.Thread(target=hub.serve, daemon=True).start()
    sys.stdin.read()
    return 0


def serve_floor_workers(port: int, connections: int) -> int:
    socks = [_floor_socket(port) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    for sock in socks:
        _send_frame(sock, ("worker",))
        selector.register(sock, selectors.EVENT_READ, bytearray())

    def work() -> None:
        while True:
            for key, _ in selector.select():
                data = key.fileobj.recv(1 << 18)
                if not data:
                    os._exit(0)
                key.data.extend(data)
                for chunk_id, arguments in _take_frames(key.data):
                    _send_frame(key.fileobj, ("result", chunk_id, [inc(x) for x in arguments]))
    threading.Thread(target=work, daemon=True).start()
    print("READY", flush=True)
    sys.stdin.read()
    return 0


class FloorClient:
    """Runs ``sum(inc(x) for x in range(n))`` through a floor hub, in chunks."""

    def __init__(self, port: int):
        self.sock = _floor_socket(port)
        self.buffer = bytearray()

    def run(self, n: int, chunksize: int, window: int) -> int:
        chunks = [(index, range(start, min(n, start + chunksize)))
                  for index, start in enumerate(range(0, n, chunksize))]
        _send_frame(self.sock, ("submit", window, chunks))
        total, due = 0, len(chunks)
        while due:
            data = self.sock.recv(1 << 18)
            if not data:
                raise ConnectionError("the floor hub went away")
            self.buffer += data
            for results in _take_frames(self.buffer):
                for _, values in results:
                    total += sum(values)
                due -= len(results)
        return total

    def close(self) -> None:
        self.sock.close()


def main(argv) -> int:
    if argv[:1] == ["minimalcluster"]:
        return serve_minimalcluster()
    if argv[:1] == ["simnodes"] and len(argv) == 4:
        return serve_sim_nodes(argv[1], int(argv[2]), int(argv[3]))
    if argv[:1] == ["simprocs"] and len(argv) == 5:
        return serve_sim_processes(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    if argv == ["floorhub"]:
        return serve_floor_hub()
    if argv[:1] == ["floorworkers"] and len(argv) == 3:
        return serve_floor_workers(int(argv[1]), int(argv[2]))
    print("usage: workloads.py minimalcluster | simnodes HOST PORT COUNT"
          " | simprocs HOST PORT NODES PER_NODE | floorhub"
          " | floorworkers PORT CONNECTIONS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
