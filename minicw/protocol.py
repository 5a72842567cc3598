"""The wire contract: what travels between client, master, worker node and worker process.

Every peer reaches the master through one manager typeid per role; this
module lists each typeid's calls (arguments, reply, whether the call may
wait), the records inside them, and the constants they carry.  The master's
role APIs (server.py), its event loop (reactor.py) and the peers' proxies
(transport.connect) are all built from ``ROLES``; ARCHITECTURE.md's message
table is ``message_table()``, checked by a test.

    client --submit([ChunkSpec])------> master --exchange(): ([Lease], revoked)--> worker process
    client <--fetch(): (last, [Delivery])-- master <--exchange([Report], want, wait)-- worker process
    node   --register / poll / get_blob / process_ended / unregister--> master

The master never looks inside job payloads or results: it moves them as
opaque ``bytes`` (serialized once by the producer, loaded once by the
consumer).  The records around them are ``NamedTuple`` classes, read by
field name.  The four that every job crosses (ChunkSpec, Lease, Report,
Delivery) travel as plain tuples: pickle writes a tuple subclass through
its reduce protocol, about a microsecond more per record each way, and on
a one-job round trip (four records, three processes) that was 20 to 30 us
of a 250 us median.  Their sender hands ``on_wire(record)`` to the proxy
and their receiver reads ``view(RecordType, fields)``, each in one place
(named beside each record below).  Command and JobFailure, rare, travel as
they are.  Changing a record's fields, or a call's arguments, means bumping
PROTOCOL_VERSION.

ChunkSpec  One unit of scheduling: ``n_jobs`` jobs of one client.  ``payload``
           is ``pack_payload(kind, items)``; ``func_keys`` name the function
           blobs the jobs call (index into it for CALL_FULL items);
           ``context_key`` names the client's BLOB_CONTEXT (or is None);
           ``python``, when the jobs carry bytecode, the only Python that may
           run them (serialize.PYTHON_TAG).
Lease      A chunk handed to one worker process.  ``selection`` lists the job
           indices to run (a ``range`` when all of them), ``token`` identifies
           this lease: results under an outdated token are dropped, which is
           what makes delivery exactly-once when a chunk is handed out again.
Report     Results of positions ``start .. start+count-1`` of a lease's
           selection; ``results`` is ``pack_results(values, errors, seconds,
           notes)``: ``seconds`` is the time the jobs took (clients size their
           chunks from it), ``notes`` warnings for the client, or None.
Delivery   What a client receives: either ``results`` bytes for the job
           indices ``indices``, or ``results`` None and a ``failure``
           (JobFailure) that applies to every index in ``indices``.  An index
           is None in a delivery the client has already seen (client.py).
Command    What a node's poll returns: CMD_SHUTDOWN, CMD_REREGISTER, or
           CMD_KILL with the slot, lease token and position of the job to end.

Function blobs (stored in the master under a content key, fetched by worker
nodes once and cached):
    (BLOB_CALLABLE, serialized_callable)      a function shipped by value
    (BLOB_ENVIR_NAME, envir_key, name)        a name in an environment source
    (BLOB_ENVIR_SOURCE, source_text, label)   the environment source itself
    (BLOB_CONTEXT, cwd, sys_path, python,     where the client's jobs run: its working
     installation, output_limit)              directory and sys.path entries to prepend,
                                              and how much of each job's output it wants
    (BLOB_DATA, serialized_object)            an object broadcast once (broadcast.py)
"""
from __future__ import annotations

import hashlib
import pickle
import traceback
from typing import NamedTuple, Optional

PROTOCOL_VERSION = 4    # 2: named records, no missing_blobs, leased(); 3: Report.failures,
                        # NodeRecord.jobs_failed and seen_s_ago; 4: process_ended's
                        # position None (a process died in a batch of jobs)
PICKLE_PROTOCOL = 5  # every supported Python (3.8+) reads it

# --- records ---------------------------------------------------------------------------

def on_wire(record: tuple) -> tuple:
    """A per-job record as it travels: the plain tuple of its fields."""
    return tuple(record)


def view(record_type: type, fields: tuple):
    """A per-job record that travelled as a plain tuple, read by field name again."""
    return tuple.__new__(record_type, fields)


class ChunkSpec(NamedTuple):      # client.Session.submit -> Scheduler.submit (Chunk)
    chunk_id: int
    func_keys: tuple
    n_jobs: int
    payload: bytes
    timeout_s: Optional[float]
    max_retries: int
    context_key: Optional[str]
    python: Optional[str] = None  # serialize.PYTHON_TAG when the functions or the
                                  # payload carry bytecode: only nodes of that Python
                                  # may run it; None: any node


class Lease(NamedTuple):          # Scheduler._lease -> Runner.run_next_lease
    token: int
    client_id: int
    chunk_id: int
    func_keys: tuple
    payload: bytes
    selection: object        # a range, or a tuple of job indices
    timeout_s: Optional[float]
    context_key: Optional[str]


class Report(NamedTuple):         # Runner._report -> Scheduler._accept_report
    token: int
    start: int
    count: int
    results: bytes
    failures: object         # None, or (jobs that raised, [(offset, type, message,
                             # traceback)] of the first REPORTED_FAILURES): for the master,
                             # which never opens ``results``


class JobFailure(NamedTuple):
    kind: str                # FAIL_*
    detail: object           # see each FAIL_* constant


class Delivery(NamedTuple):       # Scheduler._deliver -> client.Session._first_time
    chunk_id: int
    indices: object          # a range, or a tuple of job indices (None: seen already)
    results: Optional[bytes]
    failure: Optional[JobFailure]


class Command(NamedTuple):
    kind: str                # CMD_*
    slot: int = -1           # CMD_KILL: the process slot,
    token: int = 0           # its lease,
    position: int = -1       # and the position of the job to end


class NodeRecord(NamedTuple):
    """A worker node, as ``list_workers()`` and ``status()`` show it: first the
    minimalcluster ancestor's ``(hostname, number of processes, pid, busy)``,
    then minicw's own fields.  ``record["nprocs"]`` works too (minicw 0.1
    returned dicts)."""
    hostname: str
    nprocs: int
    pid: int
    busy: bool               # any of its processes holds a job (1/0 in the ancestor)
    node_id: str
    python: Optional[str]    # e.g. "CPython 3.11.7"
    platform: Optional[str]
    start_method: Optional[str]
    jobs_done: int
    busy_processes: int
    jobs_failed: int         # jobs that raised, crashed or timed out on it
    seen_s_ago: float        # since its last heartbeat

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._fields:
                raise KeyError(key)
            return getattr(self, key)
        return tuple.__getitem__(self, key)


# --- calls, by role --------------------------------------------------------------------

class Call(NamedTuple):
    """One method a role calls on the master."""
    name: str
    args: tuple              # argument names, in order (a trailing "=..." has a default)
    reply: str               # what it returns
    waits: bool = False      # may wait in the master for a state change (the role
                             # API's method then takes ``on_reply`` first; reactor.py)


CLIENT_CALLS = (
    Call("hello", ("info",), "(client_id, {protocol, heartbeat_timeout_s})"),
    Call("put_blobs", ("client_id", "blobs"), "None"),
    Call("submit", ("client_id", "specs"), "None"),
    Call("fetch", ("client_id", "timeout_s", "ack=0"), "(last, [Delivery])", waits=True),
    Call("cancel", ("client_id", "requests"), "[(chunk_id, [index])]"),
    Call("kill", ("client_id", "chunk_id", "index"), "KILL_*"),
    Call("leased", ("client_id", "jobs"), "[bool]: which (chunk_id, index) a process holds"),
    Call("touch", ("client_id",), "None"),
    Call("goodbye", ("client_id",), "None"),
    Call("list_nodes", (), "[NodeRecord]"),
    Call("status", (), "{nodes: [NodeRecord], clients, throughput_1m, recent_failures, ...} "
                       "(status.py)"),
    Call("blob_transfers", ("keys",), "{key: (times put, times fetched)}"),
)
NODE_CALLS = (
    Call("register", ("info",), "(node_id, heartbeat_timeout_s)"),
    Call("poll", ("node_id", "timeout_s"), "[Command]", waits=True),
    Call("get_blob", ("key",), "bytes"),
    Call("process_ended", ("node_id", "slot", "token", "position", "reason",
                           "exit_description", "output"), "None"),
    Call("unregister", ("node_id",), "None"),
)
PROCESS_CALLS = (
    Call("exchange", ("node_id", "slot", "reports", "want", "timeout_s"),
         "([Lease], revoked tokens), or None: stop", waits=True),
)
ROLES = {"client": CLIENT_CALLS, "node": NODE_CALLS, "process": PROCESS_CALLS}
ROLE_CALLERS = {"client": "clients", "node": "worker nodes", "process": "worker processes"}


def call_names(role: str) -> tuple:
    """The method names of a role's typeid."""
    return tuple(call.name for call in ROLES[role])


def message_table() -> str:
    """The contract as the Markdown table of ARCHITECTURE.md."""
    rows = ["| typeid | caller | call | reply |", "|---|---|---|---|"]
    for role, calls in ROLES.items():
        for call in calls:
            name = "`%s(%s)`%s" % (call.name, ", ".join(call.args),
                                  " (waits)" if call.waits else "")
            rows.append("| `%s` | %s | %s | %s |" % (role, ROLE_CALLERS[role], name,
                                                    call.reply.replace("|", "\\|")))
    return "\n".join(rows)


# --- how the items of a payload are applied -------------------------------------------
CALL_ONE = 0    # fn(item)                        (execute, map with one iterable)
CALL_STAR = 1   # fn(*item)                       (map over several iterables)
CALL_FULL = 2   # func_keys[item[0]](*item[1], **item[2])   (submit)

# --- synthesized failures --------------------------------------------------------------
FAIL_CRASHED = "crashed"      # detail: (exit description, attempts, (origin, [(stream,
                              # text)]) the job wrote before its process died (output.py),
                              # or None)
FAIL_TIMEOUT = "timeout"      # detail: timeout_s
FAIL_CANCELLED = "cancelled"  # detail: why
FAIL_LOST = "lost"            # detail: why (e.g. the function blob is unknown)
FAIL_NO_PYTHON = "no python"  # detail: (the Python the jobs need, [the nodes' Pythons])

# --- why a worker process ended, as its node reports it ----------------------------------
END_DIED = "died"            # exited or was killed by something else
END_TIMED_OUT = "timed out"  # its node killed it: a job ran over its limit
END_KILLED = "killed"        # its node killed it on request (kill a running job)

# --- commands from the master to a node, returned by its poll ------------------------------
CMD_SHUTDOWN = "shutdown"    # the master is going away: stop all processes and exit
CMD_KILL = "kill"            # end the process at (slot, token, position) when it runs that job
CMD_REREGISTER = "reregister"  # the master does not know this node: register again

# --- what kill() answers ----------------------------------------------------------------
KILL_CANCELLED = "cancelled"  # the job was still queued: it will not run
KILL_KILLING = "killing"      # its process is told to end when it runs it (fails as cancelled)
KILL_UNKNOWN = "unknown"      # done already, or never submitted

# --- blob kinds ---------------------------------------------------------------------
BLOB_CALLABLE = "callable"
BLOB_ENVIR_NAME = "envir-name"
BLOB_ENVIR_SOURCE = "envir-source"
BLOB_CONTEXT = "context"
BLOB_DATA = "data"


def content_key(data: bytes) -> str:
    """A content hash naming a blob; equal bytes give equal keys."""
    return hashlib.sha256(data).hexdigest()[:40]


def pack_blob(*fields) -> tuple[str, bytes]:
    """Pickle a blob tuple and return ``(key, bytes)``."""
    data = pickle.dumps(fields, PICKLE_PROTOCOL)
    return content_key(data), data


def pack_payload(kind: int, items: list, namespace: str | None = None) -> bytes:
    """Job arguments; through minicw.serialize, so lambdas and __main__ objects travel
    too (``namespace``: see serialize.dumps)."""
    if type(items) is range:
        # A slice of a range of args (execute, map over a range): plain ints,
        # the same bytes at half the cost, paid once per chunk.
        return pickle.dumps((kind, items), PICKLE_PROTOCOL)
    from minicw import serialize
    return serialize.dumps((kind, items), PICKLE_PROTOCOL, namespace)


def pack_results(values: list, errors: dict | None, seconds: float = 0.0,
                 notes: list | None = None, output: tuple | None = None) -> bytes:
    """Results of consecutive jobs: ``values[i]``, or ``errors[i]`` when job i raised;
    ``output``: None, or (origin, {i: [(stream, text)]}) of the jobs that printed."""
    from minicw import serialize
    return serialize.dumps((values, errors, seconds, notes, output), PICKLE_PROTOCOL)


# --- exceptions across the wire ---------------------------------------------------------

REPORTED_FAILURES = 8      # failures a report describes to the master (it counts them all)
REPORTED_TRACEBACK_CHARS = 4000


def report_failures(errors: dict | None):
    """Report.failures for a report's ``errors`` ({offset: describe_exception(...)})."""
    if not errors:
        return None
    first = sorted(errors)[:REPORTED_FAILURES]
    return len(errors), [(offset, errors[offset][0], errors[offset][1],
                          errors[offset][2][-REPORTED_TRACEBACK_CHARS:]) for offset in first]


def describe_exception(exc: BaseException, skip_frames: int = 0) -> tuple:
    """(type name, message, traceback text, pickled exception or None).

    ``skip_frames`` leaves minicw's own frames (the caller's) out of the text.
    """
    exc_type = type(exc)
    type_name = exc_type.__qualname__
    if exc_type.__module__ not in ("builtins", "__main__"):
        type_name = "%s.%s" % (exc_type.__module__, type_name)
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    try:
        pickled = pickle.dumps(exc, PICKLE_PROTOCOL)
    except Exception:
        pickled = None
    return type_name, str(exc), text, pickled


def load_exception(description: tuple) -> BaseException | None:
    """The original exception object, when it can be unpickled here."""
    pickled = description[3]
    if pickled is None:
        return None
    try:
        exc = pickle.loads(pickled)
    except Exception:
        return None
    return exc if isinstance(exc, BaseException) else None
