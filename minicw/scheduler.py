"""The master's state: clients, their chunks, leases, worker nodes, blobs.

Everything the master knows lives in one ``Scheduler`` behind one lock; every
method is a complete transition, called from the master's event loop (and
its reaper and shutdown; see server.py).  Nothing here touches the network.
A call that may wait (``exchange``, ``fetch``, ``poll``) returns its reply
or a ``Waiter``; the transition that settles a Waiter queues its reply, and
the reply is handed to the Waiter's ``on_reply`` once the lock is released
(``waiting.Transition``).

    client             Scheduler                                 worker process
    ------             ---------                                 --------------
    submit(specs) ---> client.queue (deque of Chunk) --+
                       rotation: clients with queued   |
                       chunks, served fairly by job    +-> exchange(reports, want)
                       count (_next_fair_chunk)        |
                                                       |      leases <-----------
                       leases: token -> Chunk  <-------+
    fetch()  <-------- client.deliveries  <--------------- reports (token, start, count, bytes)

Job lifecycle.  The unit of scheduling is a chunk (one client's jobs that
travel together); a job's state is implied by where its index is:

    QUEUED    index in ``chunk.selection`` of a chunk in ``client.queue``
    LEASED    index in ``chunk.selection[chunk.done:]`` of a chunk in ``leases``
              (the worker process runs them in order; RUNNING is the one at the
              position its node reads from the process's shared slot state)
    DONE      reported under the chunk's current token; a Delivery is queued
              for the client and the master forgets the job
    RETRIED   its process died under it: back to QUEUED at the front of the
              chunk, ``crashes[index]`` counts it, up to ``max_retries``
    FAILED    crashes beyond max_retries, over its time limit, or its client
              asked to kill it: a failure Delivery is queued instead of results
    CANCELLED removed from a queued chunk's selection by ``cancel``; the
              rest of a leased chunk revoked by ``cancel`` (its process skips
              or abandons it); or the whole client went away (closed, or
              silent past the heartbeat timeout) and its chunks were dropped

Transitions happen only in: ``submit`` (-> QUEUED), ``_lease`` (QUEUED ->
LEASED), ``_accept_report`` (LEASED -> DONE), ``_end_lease`` (LEASED -> QUEUED,
RETRIED or FAILED; ``kill`` makes a node end the process so that the lease
ends as FAILED for that job), ``_cancel_queued``, ``_revoke`` and
``_drop_client`` (-> CANCELLED).

Idle worker processes are served in the order they started waiting: new or
requeued work is leased to the waiting processes first (``_hand_out``), each
up to its fair share, before a process that comes back asking can take more.
So a process that is slow to be scheduled is not starved by fast ones.

A lease is identified by a token that is never reused.  A report under any
token other than the chunk's current one is dropped, and so is a report from
a node that was declared dead: a result reaches its client exactly once even
when a frozen node wakes up and reports late.
"""
from __future__ import annotations

import itertools
import logging
import math
import sys
import threading
import time
from collections import OrderedDict, deque

from minicw import blobs, config, protocol
from minicw.activity import Activity
from minicw.waiting import WAIT_FETCH, WAIT_LEASE, WAIT_POLL, Failure, Transition, Waiter
from minicw.errors import (ClusterShutdownError, InvalidCallError, MinicwError,
                           SessionExpiredError)

log = logging.getLogger(__name__)

MAX_DELIVERIES_PER_FETCH = 64
_NOT_HERE = object()   # _next_fair_chunk: nothing queued that this node's Python may run


RUNNABLE_SCAN = 64     # queued chunks of a client a node of another Python looks through


def _runnable_position(queue, python: str | None) -> int | None:
    """Where in a client's queue the first chunk a node running ``python`` may run
    is: its next one, else one of the next RUNNABLE_SCAN; None if none there."""
    if _runs_on(queue[0], python):
        return 0
    for position, chunk in enumerate(itertools.islice(queue, 1, RUNNABLE_SCAN), 1):
        if _runs_on(chunk, python):
            return position
    return None


def _runs_on(chunk, python: str | None) -> bool:
    """Whether a node running ``python`` may take ``chunk`` (one cancelled while
    queued is taken by anyone, to be skipped)."""
    return chunk.python is None or chunk.python == python or not chunk.selection


class Chunk:
    """Jobs of one client that are scheduled together."""

    __slots__ = ("client", "chunk_id", "func_keys", "payload", "timeout_s", "max_retries",
                 "context_key", "python", "selection", "token", "holder", "done", "crashes")

    def __init__(self, client, fields: tuple):
        spec = protocol.view(protocol.ChunkSpec, fields)
        self.chunk_id = spec.chunk_id
        self.payload = spec.payload
        self.timeout_s = spec.timeout_s
        self.max_retries = spec.max_retries
        self.python = spec.python       # the only Python that may run it, or None
        # Every chunk names the same few keys: share one string of each.
        self.func_keys = tuple(map(sys.intern, spec.func_keys))
        self.context_key = None if spec.context_key is None else sys.intern(spec.context_key)
        self.client = client
        self.selection = range(spec.n_jobs)  # job indices still to run, in run order
        self.token = 0                  # current lease token, 0 while queued
        self.holder = None              # (NodeState, slot) while leased
        self.done = 0                   # positions of selection reported under token
        self.crashes = None             # {index: times its process died under it}


class ClientState:
    __slots__ = ("client_id", "info", "last_seen", "queue", "in_rotation", "chunks",
                 "deliveries", "delivery_seq", "fetches", "blob_keys", "deficit",
                 "queued_jobs", "running_jobs", "done_jobs", "failed_jobs",
                 "unrunnable_since", "may_queue_bytecode", "connected_at", "run",
                 "blob_bytes")

    def __init__(self, client_id, info):
        self.client_id = client_id
        self.info = info
        self.last_seen = time.monotonic()
        self.queue = deque()            # Chunk, next to lease on the left
        self.in_rotation = False
        self.chunks = {}                # chunk_id -> Chunk, queued or leased
        self.deliveries = deque()       # (sequence number, Delivery) not yet acknowledged
        self.delivery_seq = 0
        self.fetches = deque()          # Waiter of its fetches waiting for a delivery
        self.blob_keys = set()
        self.deficit = 0                # jobs of credit while waiting its turn
        self.queued_jobs = self.running_jobs = self.done_jobs = self.failed_jobs = 0
        self.unrunnable_since = None    # when no node of its bytecode's Python was left
        self.may_queue_bytecode = False  # it submitted chunks that need its Python since
                                         # the reaper last found none queued
        self.connected_at = time.time()
        self.run = None                 # Run: since its first job after being idle
        self.blob_bytes = 0             # of the blobs it put (config.max_session_blobs)


class NodeState:
    __slots__ = ("node_id", "info", "python", "last_seen", "tokens_by_slot", "revoked_by_slot",
                 "commands", "poll", "jobs_done", "jobs_failed", "joined_at")

    def __init__(self, node_id, info):
        self.node_id = node_id
        self.info = info
        self.python = info.get("python_tag")  # runs chunks that need this Python
        self.last_seen = time.monotonic()
        self.tokens_by_slot = {slot: set() for slot in range(info["nprocs"])}
        self.revoked_by_slot = {}       # slot -> tokens its process must skip
        self.commands = []
        self.poll = None                # Waiter of its heartbeat waiting for a command
        self.jobs_done = 0
        self.jobs_failed = 0
        self.joined_at = time.time()

    @property
    def busy_processes(self) -> int:
        return sum(1 for tokens in self.tokens_by_slot.values() if tokens)


class Run:
    """A client's run, for the log: from its first job after being idle until it
    has had nothing queued or running for RUN_IDLE_S."""
    __slots__ = ("started", "jobs", "done", "failed", "idle_since")

    def __init__(self):
        self.started = time.monotonic()
        self.jobs = self.done = self.failed = 0
        self.idle_since = None


RUN_IDLE_S = 2.0   # a client idle this long has ended its run (a loop of round trips is one)
STATUS_FAILURES = 10  # recent failures status() returns, newest first


class Scheduler:
    """The master's bookkeeping; thread-safe, every public method is one transition."""

    def __init__(self, heartbeat_timeout_s: float):
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._lock = threading.Lock()
        self._changing = Transition(self._lock, self._answer_fetches)
        self._replies = self._changing.replies
        self._fed_clients = self._changing.fed_clients
        self._waiting = OrderedDict()   # Waiter -> None, oldest first
        self._clients = {}
        self._nodes = {}
        self._rotation = deque()        # ClientState with queued chunks, round robin
        self._queued_chunks = 0
        self._live_slots = 0            # worker processes of all registered nodes
        self._leases = {}               # token -> Chunk
        self._blobs = blobs.BlobStore()
        self._tokens = itertools.count(1)
        self._client_ids = itertools.count(1)
        self._node_serials = itertools.count(1)
        self.closed = False
        self._told_shutdown = set()     # nodes that received CMD_SHUTDOWN
        self._all_told = threading.Condition(self._lock)
        self.activity = Activity()      # throughput and recent failures (status, dashboard)

    # --- clients ------------------------------------------------------------------

    def open_client(self, info: dict) -> int:
        with self._changing:
            self._check_open()
            client_id = next(self._client_ids)
            self._clients[client_id] = ClientState(client_id, info)
            log.info("client %d connected from %s (pid %s)", client_id,
                     info.get("hostname"), info.get("pid"))
            return client_id

    def close_client(self, client_id: int) -> None:
        with self._changing:
            client = self._clients.get(client_id)
            if client is not None:
                self._drop_client(client, "closed its session")

    def touch(self, client_id: int) -> None:
        with self._changing:
            self._client(client_id).last_seen = time.monotonic()

    def put_blobs(self, client_id: int, blobs) -> None:
        """Store ``[(key, bytes)]``; kept while any client that put them is connected,
        up to config.max_session_blobs() per client (InvalidCallError beyond)."""
        with self._changing:
            client = self._client(client_id)
            new = {key: data for key, data in blobs if key not in client.blob_keys}
            size = client.blob_bytes + sum(len(data) for data in new.values())
            count = len(client.blob_keys) + len(new)
            max_size, max_count = config.max_session_blobs()
            if size > max_size or count > max_count:
                raise InvalidCallError(
                    "this client session would keep %d blobs of %d bytes in the master; the "
                    "limit is %d blobs, %d bytes (%s, %s): broadcast fewer or smaller objects"
                    % (count, size, max_count, max_size, config.ENV_MAX_SESSION_BLOBS,
                       config.ENV_MAX_SESSION_BLOB_BYTES))
            for key, data in new.items():
                self._blobs.put(client_id, key, data)
                client.blob_keys.add(key)
            client.blob_bytes = size

    def get_blob(self, key: str) -> bytes:
        with self._changing:
            return self._blobs.fetch(key)

    def blob_transfers(self, keys) -> dict:
        """{key: (times put, times fetched by nodes)} for blobs the master holds."""
        with self._changing:
            return self._blobs.transfers(keys)

    def submit(self, client_id: int, specs) -> None:
        """Queue chunks: ``specs`` lists ChunkSpecs as they travel (plain tuples)."""
        with self._changing:
            self._check_open()
            client = self._client(client_id)
            client.last_seen = time.monotonic()
            # Every chunk is checked before any is queued: a refused submit changes nothing.
            chunks = [Chunk(client, spec) for spec in specs]
            ids = set()
            for chunk in chunks:
                if chunk.chunk_id in client.chunks or chunk.chunk_id in ids:
                    raise InvalidCallError("chunk %d: chunk_id is already in use by a chunk of "
                                           "this client" % chunk.chunk_id)
                ids.add(chunk.chunk_id)
                missing = [key for key in chunk.func_keys + (chunk.context_key,)
                           if key is not None and key not in self._blobs]
                if missing:
                    raise InvalidCallError("chunk %d names function blobs the master does not "
                                           "hold: %s" % (chunk.chunk_id, ", ".join(missing)))
            for chunk in chunks:
                if chunk.python is not None:
                    client.may_queue_bytecode = True
                client.chunks[chunk.chunk_id] = chunk
                client.queue.append(chunk)
                client.queued_jobs += len(chunk.selection)
                self._run_of(client).jobs += len(chunk.selection)
            self._queued_chunks += len(specs)
            self._enter_rotation(client, front=False)
            self._hand_out()

    def fetch(self, client_id: int, timeout_s: float, ack: int, on_reply):
        """``(last sequence number, [Delivery])``, or a Waiter (see ``exchange``) that
        is answered when a delivery comes or after ``timeout_s``.

        Deliveries stay here until a later fetch acknowledges them (``ack``:
        the last sequence number the client received).  A reply lost on the
        way (its caller was interrupted, the connection broke) is therefore
        sent again; the client drops what it has already seen.
        """
        with self._changing:
            client = self._client(client_id)
            client.last_seen = time.monotonic()
            deliveries = client.deliveries
            while deliveries and deliveries[0][0] <= ack:
                deliveries.popleft()
            if not deliveries and timeout_s > 0 and not self.closed:
                waiter = Waiter(WAIT_FETCH, client, time.monotonic() + timeout_s, on_reply,
                                ack=ack)
                client.fetches.append(waiter)
                return waiter
            return self._fetch_reply(client, ack)

    def _fetch_reply(self, client: ClientState, ack: int):
        if not client.deliveries:
            self._check_open()
            return ack, []
        batch = list(itertools.islice(client.deliveries, MAX_DELIVERIES_PER_FETCH))
        return batch[-1][0], [delivery for _, delivery in batch]

    def _answer_fetches(self) -> None:
        """Answer the oldest waiting fetch of every client that got deliveries."""
        for client in self._fed_clients:
            if client.fetches and client.deliveries:
                waiter = client.fetches.popleft()
                client.last_seen = time.monotonic()
                self._settle(waiter, self._fetch_reply(client, waiter.ack))
        self._fed_clients.clear()

    def cancel(self, client_id: int, requests) -> list:
        """Cancel jobs: ``requests`` is ``[(chunk_id, indices or None)]``.

        With ``indices`` only jobs still queued are cancelled (a job that may
        be running is not touched).  With None the whole rest of the chunk
        is: queued jobs are removed, and a leased chunk is revoked, so its
        process skips or abandons it and its late results are dropped.
        Returns ``[(chunk_id, cancelled indices)]``.
        """
        with self._changing:
            client = self._client(client_id)
            outcome = []
            for chunk_id, indices in requests:
                chunk = client.chunks.get(chunk_id)
                if chunk is None:
                    outcome.append((chunk_id, []))
                elif chunk.token:
                    outcome.append((chunk_id, self._revoke(chunk) if indices is None else []))
                else:
                    outcome.append((chunk_id, self._cancel_queued(chunk, indices)))
            return outcome

    def leased(self, client_id: int, jobs) -> list:
        """For each ``(chunk_id, index)`` of ``jobs``: whether a worker process holds
        it (LEASED: it runs or is about to, and can no longer be cancelled)."""
        with self._changing:
            client = self._client(client_id)
            held = []
            for chunk_id, index in jobs:
                chunk = client.chunks.get(chunk_id)
                held.append(chunk is not None and bool(chunk.token)
                            and index in chunk.selection[chunk.done:])
            return held

    def kill(self, client_id: int, chunk_id: int, index: int) -> str:
        """End job ``index`` of a chunk wherever it is.

        Returns KILL_CANCELLED (it was still queued), KILL_KILLING (its process
        is told to die when it runs that job; the job then fails as
        cancelled) or KILL_UNKNOWN (it is done or was never submitted).
        """
        with self._changing:
            client = self._client(client_id)
            chunk = client.chunks.get(chunk_id)
            if chunk is None:
                return protocol.KILL_UNKNOWN
            if not chunk.token:
                cancelled = self._cancel_queued(chunk, [index])
                return protocol.KILL_CANCELLED if cancelled else protocol.KILL_UNKNOWN
            try:
                position = chunk.selection.index(index)
            except ValueError:
                return protocol.KILL_UNKNOWN
            if position < chunk.done:
                return protocol.KILL_UNKNOWN
            node, slot = chunk.holder
            node.commands.append(protocol.Command(protocol.CMD_KILL, slot, chunk.token,
                                                  position))
            self._answer_poll(node)
            return protocol.KILL_KILLING

    def _cancel_queued(self, chunk: Chunk, indices) -> list:
        """QUEUED -> CANCELLED for ``indices`` (all when None) of a queued chunk."""
        if indices is None:
            cancelled = list(chunk.selection)
            chunk.selection = ()
        else:
            wanted = set(indices)
            cancelled = [i for i in chunk.selection if i in wanted]
            chunk.selection = tuple(i for i in chunk.selection if i not in wanted)
        client = chunk.client
        client.queued_jobs -= len(cancelled)
        if not chunk.selection:
            # It stays in the queue and is skipped when its turn comes.
            del client.chunks[chunk.chunk_id]
            self._queued_chunks -= 1
        return cancelled

    def _revoke(self, chunk: Chunk) -> list:
        """LEASED -> CANCELLED for the rest of a leased chunk."""
        remaining = list(chunk.selection[chunk.done:])
        node, slot = chunk.holder
        node.revoked_by_slot.setdefault(slot, set()).add(chunk.token)
        self._release(chunk)
        client = chunk.client
        client.running_jobs -= len(remaining)
        del client.chunks[chunk.chunk_id]
        return remaining

    # --- worker nodes -----------------------------------------------------------------

    def register_node(self, info: dict) -> str:
        with self._changing:
            self._check_open()
            node_id = "%s:%s#%d" % (info["hostname"], info["pid"], next(self._node_serials))
            self._nodes[node_id] = NodeState(node_id, info)
            self._live_slots += info["nprocs"]
            log.info("node %s joined with %d processes (Python %s)", node_id,
                     info["nprocs"], info.get("python"))
            return node_id

    def unregister_node(self, node_id: str) -> None:
        with self._changing:
            node = self._nodes.get(node_id)
            if node is not None:
                self._drop_node(node, "left")

    def poll(self, node_id: str, timeout_s: float, on_reply):
        """A node's heartbeat: its commands (``[protocol.Command]``), or a Waiter (see
        ``exchange``) answered when a command comes or after ``timeout_s``."""
        with self._changing:
            node = self._nodes.get(node_id)
            if node is None:
                return [protocol.Command(protocol.CMD_REREGISTER)]
            node.last_seen = time.monotonic()
            if node.commands or self.closed or timeout_s <= 0:
                return self._poll_reply(node)
            if node.poll is not None:  # a poll still waiting: its node gave up on it
                self._answer_poll(node)
            node.poll = Waiter(WAIT_POLL, node, time.monotonic() + timeout_s, on_reply)
            return node.poll

    def _poll_reply(self, node: NodeState) -> list:
        node.last_seen = time.monotonic()
        if self.closed:
            self._told_shutdown.add(node.node_id)
            self._all_told.notify_all()
            return [protocol.Command(protocol.CMD_SHUTDOWN)]
        if self._nodes.get(node.node_id) is not node:
            return [protocol.Command(protocol.CMD_REREGISTER)]
        commands, node.commands = node.commands, []
        return commands

    def _answer_poll(self, node: NodeState) -> None:
        """Answer the node's waiting heartbeat, if any, with its commands now."""
        waiter = node.poll
        if waiter is not None and self._unhook(waiter):
            self._settle(waiter, self._reply_now(waiter))

    def process_ended(self, node_id: str, slot: int, token: int, position: int,
                      reason: str, exit_description: str, output=None) -> None:
        """A node's worker process ended; settle every lease it held.

        ``token``/``position`` say which job it was running (0/-1: none known;
        a token with position None: one of a batch of that lease's jobs, which
        one is unknown); ``output`` is what that job printed before (output.py),
        or None.
        """
        with self._changing:
            node = self._nodes.get(node_id)
            if node is None:
                return
            held = node.tokens_by_slot.get(slot, set())
            node.tokens_by_slot[slot] = set()
            node.revoked_by_slot.pop(slot, None)
            for held_token in sorted(held):
                chunk = self._leases.get(held_token)
                if chunk is None:
                    continue
                if held_token != token:
                    self._end_lease(chunk, None, reason, exit_description)
                elif position is None:
                    self._end_lease(chunk, None, reason, exit_description, one_at_a_time=True)
                elif reason == protocol.END_KILLED and position < chunk.done:
                    # the job to kill had finished and reported: the rest goes back
                    self._end_lease(chunk, None, reason, exit_description)
                else:
                    self._end_lease(chunk, max(position, chunk.done), reason, exit_description,
                                    output)

    # --- worker processes -----------------------------------------------------------

    def exchange(self, node_id: str, slot: int, reports, want: int, timeout_s: float,
                 on_reply):
        """Take a process's reports, then lease it up to ``want`` chunks.

        Returns ``(leases, revoked_tokens)``, or None when the process must
        stop (its node is not registered any more, or the master is closing).
        When nothing is queued it returns a Waiter instead: its reply will be passed to
        ``on_reply`` (from whichever thread settles it, never under the
        lock), and whoever holds it calls ``end_wait`` at its deadline.
        """
        with self._changing:
            node = self._nodes.get(node_id)
            if node is None or self.closed or slot not in node.tokens_by_slot:
                return None
            for report in reports:
                self._accept_report(node, slot, report)
            leases = self._lease(node, slot, want) if want > 0 else []
            if not leases and want > 0 and timeout_s > 0:
                waiter = Waiter(WAIT_LEASE, node, time.monotonic() + timeout_s, on_reply,
                                slot=slot, want=want)
                self._waiting[waiter] = None
                return waiter
            return self._lease_reply(node, slot, leases)

    def end_wait(self, waiter: Waiter) -> None:
        """The waiter's time is up: answer it with what there is now, unless it
        was answered already."""
        with self._changing:
            if self._unhook(waiter):
                self._settle(waiter, self._reply_now(waiter))

    def cancel_wait(self, waiter: Waiter) -> None:
        """The waiter's caller is gone: forget it without answering, and without
        taking anything for it (commands and deliveries stay for the next call)."""
        with self._changing:
            self._unhook(waiter)

    def _unhook(self, waiter: Waiter) -> bool:
        """Take a waiter out of its queue; False when it was answered already."""
        owner = waiter.owner
        if waiter.kind == WAIT_LEASE:
            return self._waiting.pop(waiter, False) is None
        if waiter.kind == WAIT_POLL:
            if owner.poll is not waiter:
                return False
            owner.poll = None
            return True
        if waiter not in owner.fetches:
            return False
        owner.fetches.remove(waiter)
        return True

    def _reply_now(self, waiter: Waiter):
        """What a waiter taken out of its queue is answered with, as things are."""
        owner = waiter.owner
        if waiter.kind == WAIT_LEASE:
            if self.closed or self._nodes.get(owner.node_id) is not owner:
                return None
            return self._lease_reply(owner, waiter.slot, [])
        if waiter.kind == WAIT_POLL:
            return self._poll_reply(owner)
        try:
            self._client(owner.client_id)
            owner.last_seen = time.monotonic()
            return self._fetch_reply(owner, waiter.ack)
        except MinicwError as exc:
            return Failure(exc)

    def _lease_reply(self, node: NodeState, slot: int, leases: list) -> tuple:
        return leases, tuple(node.revoked_by_slot.pop(slot, ()))

    def _settle(self, waiter: Waiter, reply) -> None:
        """Queue ``reply`` for a waiter already taken out of its queue."""
        self._replies.append((waiter.on_reply, reply))

    def _hand_out(self) -> None:
        """Lease queued work to the waiting processes, oldest waiter first."""
        waiting = self._waiting
        while waiting and self._queued_chunks > 0:
            waiter = next(iter(waiting))
            node = waiter.owner
            if self._nodes.get(node.node_id) is not node or waiter.slot not in \
                    node.tokens_by_slot:
                waiting.popitem(last=False)
                self._settle(waiter, None)
                continue
            leases = self._lease(node, waiter.slot, waiter.want)
            if not leases:
                # What is queued needs another Python (or was cancelled):
                # later waiters may run it.
                self._hand_out_past(waiter)
                return
            waiting.popitem(last=False)
            self._settle(waiter, self._lease_reply(node, waiter.slot, leases))

    def _hand_out_past(self, oldest: Waiter) -> None:
        """``_hand_out`` for the waiters after ``oldest``, which could take nothing."""
        waiting = self._waiting
        for waiter in list(waiting)[1:]:
            if self._queued_chunks <= 0:
                return
            node = waiter.owner
            if self._nodes.get(node.node_id) is not node:
                continue  # _hand_out answers it when it comes first
            leases = self._lease(node, waiter.slot, waiter.want)
            if leases:
                del waiting[waiter]
                self._settle(waiter, self._lease_reply(node, waiter.slot, leases))

    def _stop_waiters(self, node=None) -> None:
        """Answer None to the waiting processes of ``node`` (all, when None)."""
        for waiter in [w for w in self._waiting if node is None or w.owner is node]:
            del self._waiting[waiter]
            self._settle(waiter, None)

    # --- state changes -------------------------------------------------------------------

    def _lease(self, node: NodeState, slot: int, want: int) -> list:
        # Hand out at most a fair share of what is queued, so one process's
        # prefetch cannot leave another idle at the end of a run.
        share = max(1, math.ceil(self._queued_chunks / max(1, self._live_slots)))
        leases = []
        while len(leases) < min(want, share) and self._rotation:
            chunk = self._next_fair_chunk(node.python)
            if chunk is _NOT_HERE:
                break     # what is queued needs another Python
            if chunk is None:
                continue  # cancelled while queued; already uncounted
            client = chunk.client
            self._queued_chunks -= 1
            chunk.token = next(self._tokens)
            chunk.holder = (node, slot)
            chunk.done = 0
            self._leases[chunk.token] = chunk
            node.tokens_by_slot[slot].add(chunk.token)
            jobs = len(chunk.selection)
            client.queued_jobs -= jobs
            client.running_jobs += jobs
            leases.append(protocol.on_wire(protocol.Lease(
                chunk.token, client.client_id, chunk.chunk_id, chunk.func_keys, chunk.payload,
                chunk.selection, chunk.timeout_s, chunk.context_key)))
        return leases

    def _next_fair_chunk(self, python: str | None):
        """Take the next chunk a node running ``python`` may run, fair between
        clients by job count.

        Every client with a chunk the node may run earns credit at the same
        rate (one job per job leased); the first of them in rotation order
        whose credit covers that chunk sends it and goes to the back.  So a
        client of one-job chunks gets as many jobs through as a client of
        large chunks, and clients with equal chunks alternate.  A client's
        chunk is its next one, or for a node of another Python the first of
        its next RUNNABLE_SCAN that needs none.  Returns None for a chunk that
        was cancelled while queued, _NOT_HERE when no client has one.
        """
        rotation = self._rotation
        if len(rotation) > 1:
            eligible = []
            for candidate in rotation:
                position = _runnable_position(candidate.queue, python)
                if position is not None:
                    eligible.append((candidate, position))
            if not eligible:
                return _NOT_HERE
            shortfall = min(len(client.queue[position].selection) - client.deficit
                            for client, position in eligible)
            if shortfall > 0:  # nobody can afford a chunk yet: everybody earns
                for client, _ in eligible:
                    client.deficit += shortfall
            client, position = next(
                (client, position) for client, position in eligible
                if client.deficit >= len(client.queue[position].selection))
            rotation.remove(client)
        else:
            client = rotation[0]
            position = _runnable_position(client.queue, python)
            if position is None:
                return _NOT_HERE
            rotation.popleft()
        queue = client.queue
        if position == 0:
            chunk = queue.popleft()
        else:
            chunk = queue[position]
            del queue[position]
        cost = len(chunk.selection)
        client.deficit = max(0, client.deficit - cost)
        if queue:
            rotation.append(client)
        else:
            client.in_rotation = False
            client.deficit = 0
        return chunk if cost else None

    def _accept_report(self, node: NodeState, slot: int, fields: tuple) -> None:
        report = protocol.view(protocol.Report, fields)
        start, count = report.start, report.count
        chunk = self._leases.get(report.token)
        if chunk is None or chunk.holder != (node, slot) or start != chunk.done:
            return  # outdated lease: the jobs were handed out again or dropped
        indices = chunk.selection[start:start + count]
        chunk.done += count
        client = chunk.client
        client.running_jobs -= count
        failed = 0
        if report.failures is not None:
            failed, described = report.failures
            for offset, type_name, message, text in described[:protocol.REPORTED_FAILURES]:
                self.activity.failure(client.client_id, node.info.get("hostname"),
                                      "%s/%s" % (chunk.chunk_id, indices[offset]), "raised",
                                      "%s: %s" % (type_name, message), text)
        self._count_finished(client, node, count - failed, failed)
        self._deliver(client, protocol.Delivery(chunk.chunk_id, indices, report.results, None))
        if chunk.done >= len(chunk.selection):
            self._release(chunk)
            del client.chunks[chunk.chunk_id]

    def _end_lease(self, chunk: Chunk, culprit_position, reason: str, exit_description: str,
                   output=None, one_at_a_time: bool = False):
        """LEASED -> QUEUED / RETRIED / FAILED for a lease whose process ended.

        ``culprit_position`` is the position that was running, or None when
        the process never started this chunk, or when it is not known
        (``one_at_a_time``: it died in a batch of jobs): its jobs go back
        uncharged, in the second case as a retry, a tuple of indices, which
        a worker process runs one job at a time (worker_process._batchable).
        """
        chunk_node = chunk.holder[0] if chunk.holder is not None else None
        self._release(chunk)
        client = chunk.client
        remaining = chunk.selection[chunk.done:]
        client.running_jobs -= len(remaining)
        if culprit_position is None or culprit_position >= len(chunk.selection):
            self._requeue(chunk, tuple(remaining) if one_at_a_time else remaining)
            return
        culprit = chunk.selection[culprit_position]
        others = tuple(i for i in remaining if i != culprit)
        failure = None
        if reason == protocol.END_TIMED_OUT:
            failure = protocol.JobFailure(protocol.FAIL_TIMEOUT, chunk.timeout_s)
        elif reason == protocol.END_KILLED:
            failure = protocol.JobFailure(protocol.FAIL_CANCELLED,
                                          "killed on request while running")
        else:
            if chunk.crashes is None:
                chunk.crashes = {}
            attempts = chunk.crashes.get(culprit, 0) + 1
            chunk.crashes[culprit] = attempts
            if attempts > chunk.max_retries:
                failure = protocol.JobFailure(protocol.FAIL_CRASHED,
                                              (exit_description, attempts, output))
            else:
                log.info("job %s/%s crashed its process (%s); retry %d of %d",
                         chunk.chunk_id, culprit, exit_description, attempts, chunk.max_retries)
        if failure is None:
            self._requeue(chunk, (culprit,) + others)  # the suspect first, alone at risk
            return
        node = chunk_node
        self._count_finished(client, node, 0, 1)
        what = {protocol.FAIL_TIMEOUT: ("timed out", "over its time limit of %ss"
                                        % chunk.timeout_s),
                protocol.FAIL_CANCELLED: ("killed", "killed on request while running"),
                }.get(failure.kind, ("crashed", "its process ended (%s), %d times"
                                     % (exit_description, chunk.crashes.get(culprit, 0)
                                        if chunk.crashes else 0)))
        job = "%s/%s" % (chunk.chunk_id, culprit)
        self.activity.failure(client.client_id, node.info.get("hostname") if node else None,
                              job, what[0], what[1])
        log.info("job %s of client %d %s on node %s: %s", job, client.client_id, what[0],
                 node.node_id if node else "?", what[1])
        self._deliver(client, protocol.Delivery(chunk.chunk_id, (culprit,), None, failure))
        self._requeue(chunk, others)

    def _count_finished(self, client: ClientState, node: NodeState | None, done: int,
                        failed: int) -> None:
        """``done`` jobs of ``client`` gave a result and ``failed`` did not (on ``node``)."""
        client.done_jobs += done
        client.failed_jobs += failed
        if node is not None:
            node.jobs_done += done
            node.jobs_failed += failed
        run = client.run
        if run is not None:
            run.done += done
            run.failed += failed
        self.activity.finished(done, failed)

    def _run_of(self, client: ClientState) -> Run:
        """The client's run, started now if it was idle (logged)."""
        run = client.run
        if run is None:
            run = client.run = Run()
            log.info("client %d (%s, pid %s) started a run", client.client_id,
                     client.info.get("hostname"), client.info.get("pid"))
        run.idle_since = None
        return run

    def _end_idle_runs(self, now: float) -> None:
        """Log the end of the runs of clients idle for RUN_IDLE_S."""
        for client in self._clients.values():
            run = client.run
            if run is None or client.queued_jobs or client.running_jobs:
                continue
            if run.idle_since is None:
                run.idle_since = now
            elif now - run.idle_since >= RUN_IDLE_S:
                self._log_run_end(client, "ended")

    @staticmethod
    def _log_run_end(client: ClientState, how: str) -> None:
        run, client.run = client.run, None
        ended = run.idle_since if run.idle_since is not None else time.monotonic()
        log.info("client %d %s its run: %d jobs, %d done, %d failed, in %.1fs",
                 client.client_id, how, run.jobs, run.done, run.failed,
                 max(0.0, ended - run.started))

    def _requeue(self, chunk: Chunk, selection) -> None:
        client = chunk.client
        if not selection:
            client.chunks.pop(chunk.chunk_id, None)
            return
        chunk.selection = selection
        chunk.token = 0
        chunk.holder = None
        chunk.done = 0
        client.queue.appendleft(chunk)
        client.queued_jobs += len(selection)
        if chunk.python is not None:
            client.may_queue_bytecode = True
        self._queued_chunks += 1
        self._enter_rotation(client, front=True)
        self._hand_out()

    def _release(self, chunk: Chunk) -> None:
        """Forget the chunk's current lease."""
        self._leases.pop(chunk.token, None)
        if chunk.holder is not None:
            node, slot = chunk.holder
            node.tokens_by_slot.get(slot, set()).discard(chunk.token)
        chunk.token = 0
        chunk.holder = None

    def _enter_rotation(self, client: ClientState, front: bool) -> None:
        if client.in_rotation:
            return
        client.in_rotation = True
        if front:
            self._rotation.appendleft(client)
        else:
            self._rotation.append(client)

    def _deliver(self, client: ClientState, delivery: protocol.Delivery) -> None:
        client.delivery_seq += 1
        client.deliveries.append((client.delivery_seq, protocol.on_wire(delivery)))
        if client.fetches:
            self._fed_clients.append(client)

    def _drop_client(self, client: ClientState, why: str) -> None:
        queued_jobs, running_jobs = client.queued_jobs, client.running_jobs
        if client.run is not None:
            self._log_run_end(client, "left" if queued_jobs or running_jobs else "ended")
        del self._clients[client.client_id]
        if client.in_rotation:
            self._rotation.remove(client)
        for chunk in client.queue:
            if chunk.selection:
                self._queued_chunks -= 1
        for chunk in list(client.chunks.values()):
            if chunk.token:
                self._revoke(chunk)
        if self._blobs.release(client.client_id, client.blob_keys) >= blobs.TRIM_AFTER_BYTES:
            blobs.give_back_memory()
        self._fail_fetches(client, self._unknown_client(client.client_id))
        log.info("client %d %s; %d queued and %d running jobs dropped", client.client_id,
                 why, queued_jobs, running_jobs)

    def _fail_fetches(self, client: ClientState, error) -> None:
        """Answer every waiting fetch of the client: with ``error``, or (None)
        with what a fetch gets now."""
        while client.fetches:
            waiter = client.fetches.popleft()
            self._settle(waiter, self._reply_now(waiter) if error is None else Failure(error))

    def _drop_node(self, node: NodeState, why: str) -> None:
        del self._nodes[node.node_id]
        self._live_slots -= len(node.tokens_by_slot)
        requeued = 0
        # A node that died (not one that left) may have been killed by a job it
        # ran (it used up the machine's memory, say): the job each process was
        # running -- the first unreported one of its oldest lease -- is charged
        # a retry, so such a job takes down at most max_retries + 1 nodes.
        charged = why != "left"
        death = "its worker node %s %s" % (node.node_id, why)
        for slot, tokens in node.tokens_by_slot.items():
            for order, token in enumerate(sorted(tokens)):
                chunk = self._leases.get(token)
                if chunk is not None:
                    requeued += len(chunk.selection) - chunk.done
                    running = chunk.done if charged and order == 0 else None
                    self._end_lease(chunk, running, protocol.END_DIED, death)
        self._answer_poll(node)
        self._stop_waiters(node)
        level = logging.INFO if why == "left" else logging.WARNING
        log.log(level, "node %s %s; %d leased jobs queued again", node.node_id, why, requeued)

    # --- liveness and shutdown ---------------------------------------------------------

    def expire(self) -> None:
        """Drop nodes and clients silent for longer than the heartbeat timeout."""
        with self._changing:
            limit = time.monotonic() - self.heartbeat_timeout_s
            for node in [n for n in self._nodes.values() if n.last_seen < limit]:
                self._drop_node(node, "missed its heartbeats for %gs" % self.heartbeat_timeout_s)
            for client in [c for c in self._clients.values() if c.last_seen < limit]:
                self._drop_client(client, "went silent for %gs" % self.heartbeat_timeout_s)
            now = time.monotonic()
            self._fail_unrunnable(now)
            self._end_idle_runs(now)

    def _fail_unrunnable(self, now: float) -> None:
        """Queued chunks that need a Python no connected node runs: after
        config.python_grace_s() they fail with FAIL_NO_PYTHON (QUEUED -> FAILED)."""
        present = sorted(node.info.get("python", "?") for node in self._nodes.values())
        pythons = {node.python for node in self._nodes.values()}
        for client in list(self._clients.values()):
            needed = client.info.get("python_tag")
            if needed is None or needed in pythons or not client.may_queue_bytecode:
                client.unrunnable_since = None
                continue
            if client.unrunnable_since is None:
                client.unrunnable_since = now
            elif now - client.unrunnable_since >= config.python_grace_s():
                self._fail_queued(client, needed, present)

    def _fail_queued(self, client: ClientState, python: str, present: list) -> None:
        stuck = [chunk for chunk in client.queue if chunk.python == python and chunk.selection]
        if not stuck:
            # Only chunks any node runs: no need to look through its queue again
            # until it submits bytecode (a client of environment jobs, say).
            client.may_queue_bytecode = False
            return
        failure = protocol.JobFailure(protocol.FAIL_NO_PYTHON, (python, present))
        for chunk in stuck:
            jobs = tuple(chunk.selection)
            self._cancel_queued(chunk, None)        # out of the queue and its counts
            self._count_finished(client, None, 0, len(jobs))
            self._deliver(client, protocol.Delivery(chunk.chunk_id, jobs, None, failure))
        self.activity.failure(client.client_id, None, "%d chunks" % len(stuck), "no Python",
                              "they need %s; the nodes run %s"
                              % (python, ", ".join(present) or "nothing"))
        log.warning("client %d: %d chunks need %s and no worker node runs it (nodes: %s); "
                    "failed them", client.client_id, len(stuck), python,
                    ", ".join(present) or "none")

    def close(self) -> None:
        """Refuse new work and wake every waiting peer with the news."""
        with self._changing:
            self.closed = True
            self._stop_waiters()
            for node in self._nodes.values():
                self._answer_poll(node)
            for client in self._clients.values():
                self._fail_fetches(client, None)

    def wait_nodes_told(self, timeout_s: float) -> bool:
        """After close(): wait until every node has received CMD_SHUTDOWN."""
        deadline = time.monotonic() + timeout_s
        with self._changing:
            while not set(self._nodes) <= self._told_shutdown:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._all_told.wait(remaining)
            return True

    def _check_open(self) -> None:
        if self.closed:
            raise ClusterShutdownError("the master is shutting down")

    def _client(self, client_id: int) -> ClientState:
        client = self._clients.get(client_id)
        if client is None:
            raise self._unknown_client(client_id)
        return client

    def _unknown_client(self, client_id: int) -> MinicwError:
        if self.closed:
            return ClusterShutdownError("the master is shutting down")
        return SessionExpiredError(
            "the master does not know client %d: it closed the session or "
            "heard nothing from it for %gs" % (client_id, self.heartbeat_timeout_s))

    def list_nodes(self) -> list:
        """One record per live worker node."""
        with self._changing:
            return [self._node_record(node) for node in self._nodes.values()]

    def status(self, failures_shown: int = STATUS_FAILURES) -> dict:
        """What the cluster is doing (the ``status`` call, the status command and
        the dashboard; see status.py for the keys)."""
        with self._changing:
            now = time.time()
            activity = self.activity
            return {
                "nodes": [self._node_record(node) for node in self._nodes.values()],
                "clients": [{
                    "client_id": c.client_id, "hostname": c.info.get("hostname"),
                    "pid": c.info.get("pid"), "python": c.info.get("python"),
                    "queued": c.queued_jobs,
                    "running": c.running_jobs, "done": c.done_jobs, "failed": c.failed_jobs,
                    "connected_s": round(now - c.connected_at, 1),
                } for c in self._clients.values()],
                "queued_chunks": self._queued_chunks,
                "leased_chunks": len(self._leases),
                "blobs": len(self._blobs),
                "uptime_s": round(now - activity.started, 1),
                "jobs_done": activity.jobs_done,
                "jobs_failed": activity.jobs_failed,
                "throughput_1m": round(activity.rate(60.0), 1),
                "recent_failures": activity.failures()[:failures_shown],
            }

    def throughput_series(self, seconds: int, step_s: int) -> list:
        """``[(seconds ago, jobs/s)]`` over the last ``seconds`` (the dashboard's chart)."""
        with self._changing:
            return self.activity.series(seconds, step_s)

    @staticmethod
    def _node_record(node: NodeState) -> protocol.NodeRecord:
        info = node.info
        busy = node.busy_processes
        return protocol.NodeRecord(
            hostname=info["hostname"], nprocs=info["nprocs"], pid=info["pid"], busy=busy > 0,
            node_id=node.node_id, python=info.get("python"), platform=info.get("platform"),
            start_method=info.get("start_method"), jobs_done=node.jobs_done,
            busy_processes=busy, jobs_failed=node.jobs_failed,
            seen_s_ago=round(time.monotonic() - node.last_seen, 1))
