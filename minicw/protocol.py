"""What travels between client, master, worker node and worker process.

The master never looks inside job payloads or results: it moves them as
opaque ``bytes`` (pickled once by the producer, unpickled once by the
consumer).  The metadata around them are plain tuples, because a tuple of
builtins pickles fastest and needs no class on the other side.  Each tuple's
field order is fixed here, and changing it means bumping PROTOCOL_VERSION.

    client --submit([ChunkSpec...])--> master --exchange()--> worker process
    client <--fetch(): [Delivery...]-- master <--exchange([Report...])-- worker process

ChunkSpec  (chunk_id, func_keys, n_jobs, payload, timeout_s, max_retries, context_key)
           One unit of scheduling: ``n_jobs`` jobs of one client.  ``payload``
           is ``pack_payload(kind, items)``; ``func_keys`` name the function
           blobs the jobs call (index into it for CALL_FULL items);
           ``context_key`` names the client's BLOB_CONTEXT (or is None).
Lease      (token, client_id, chunk_id, func_keys, payload, selection, timeout_s,
            context_key)
           A chunk handed to one worker process.  ``selection`` lists the job
           indices to run (a ``range`` when all of them), ``token`` identifies
           this lease: results under an outdated token are dropped, which is
           what makes delivery exactly-once when a chunk is handed out again.
Report     (token, start, count, results)
           Results of positions ``start .. start+count-1`` of a lease's
           selection; ``results`` is ``pack_results(values, errors, seconds,
           notes)``: ``seconds`` is the time the jobs took (clients size their
           chunks from it), ``notes`` warnings for the client, or None.
Delivery   (chunk_id, indices, results, failure)
           What a client receives: either ``results`` bytes for the job
           indices ``indices``, or ``results`` None and a ``failure`` tuple
           (FAIL_*, detail) that applies to every index in ``indices``.

Function blobs (stored in the master under a content key, fetched by worker
nodes once and cached):
    (BLOB_CALLABLE, serialized_callable)      a function shipped by value
    (BLOB_ENVIR_NAME, envir_key, name)        a name in an environment source
    (BLOB_ENVIR_SOURCE, source_text, label)   the environment source itself
    (BLOB_CONTEXT, cwd, sys_path)             where the client's jobs run: its working
                                              directory and sys.path entries to prepend
    (BLOB_DATA, serialized_object)            an object broadcast once (broadcast.py)
"""
from __future__ import annotations

import hashlib
import pickle
import traceback

PROTOCOL_VERSION = 1
PICKLE_PROTOCOL = 5  # every supported Python (3.8+) reads it

# --- how the items of a payload are applied -------------------------------------------
CALL_ONE = 0    # fn(item)                        (execute, map with one iterable)
CALL_STAR = 1   # fn(*item)                       (map over several iterables)
CALL_FULL = 2   # func_keys[item[0]](*item[1], **item[2])   (submit)

# --- synthesized failures --------------------------------------------------------------
FAIL_CRASHED = "crashed"      # detail: (exit description, attempts)
FAIL_TIMEOUT = "timeout"      # detail: timeout_s
FAIL_CANCELLED = "cancelled"  # detail: why
FAIL_LOST = "lost"            # detail: why (e.g. the function blob is unknown)

# --- why a worker process ended, as its node reports it ----------------------------------
END_DIED = "died"            # exited or was killed by something else
END_TIMED_OUT = "timed out"  # its node killed it: a job ran over its limit
END_KILLED = "killed"        # its node killed it on request (kill a running job)

# --- commands from the master to a node, returned by its poll ------------------------------
CMD_SHUTDOWN = "shutdown"    # the master is going away: stop all processes and exit
CMD_KILL = "kill"            # (CMD_KILL, slot, token, position): end the process when it runs it
CMD_REREGISTER = "reregister"  # the master does not know this node: register again

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


def pack_payload(kind: int, items: list) -> bytes:
    """Job arguments; through minicw.serialize, so lambdas and __main__ objects travel too."""
    if type(items) is range:
        # A slice of a range of args (execute, map over a range): plain ints,
        # the same bytes at half the cost, paid once per chunk.
        return pickle.dumps((kind, items), PICKLE_PROTOCOL)
    from minicw import serialize
    return serialize.dumps((kind, items), PICKLE_PROTOCOL)


def pack_results(values: list, errors: dict | None, seconds: float = 0.0,
                 notes: list | None = None) -> bytes:
    """Results of consecutive jobs: ``values[i]``, or ``errors[i]`` when job i raised."""
    from minicw import serialize
    return serialize.dumps((values, errors, seconds, notes), PICKLE_PROTOCOL)


# --- exceptions across the wire ---------------------------------------------------------

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
