"""Every call's arguments, checked where they enter the master.

    peer --call(args)--> reactor --> server.<Role>API.<call> --> validate.<what>(args)
                                                                   |        |
                                            InvalidCallError <-----+        v
                                            (the reply to that caller    Scheduler: only
                                            only, naming the field)      well-formed records

An authenticated peer may still be buggy, out of date or hostile.  So every
argument is checked for its type, range and size before the Scheduler sees
it, and what the Scheduler keeps is built from checked values.  What needs
the Scheduler's state (a known client or node, a chunk id not in use, a
blob that is there) the Scheduler checks itself, under its lock, before it
changes anything, with the same error.  The checks cost a few type tests per
call and per chunk, never per job.
"""
from __future__ import annotations

from minicw import config, protocol
from minicw.errors import InvalidCallError

_INT_TYPES = (int,)


def integer(name: str, value, low: int, high: int) -> int:
    if type(value) not in _INT_TYPES or not low <= value <= high:
        raise InvalidCallError("%s must be an integer from %d to %d, not %s"
                               % (name, low, high, _shown(value)))
    return value


def number(name: str, value, low: float, high: float) -> float:
    if type(value) not in (int, float) or not low <= value <= high:
        raise InvalidCallError("%s must be a number from %g to %g, not %s"
                               % (name, low, high, _shown(value)))
    return value


def text(name: str, value, max_chars: int = config.MAX_NAME_CHARS, optional: bool = False):
    if value is None and optional:
        return None
    if type(value) is not str or len(value) > max_chars:
        raise InvalidCallError("%s must be a string of at most %d characters, not %s"
                               % (name, max_chars, _shown(value)))
    return value


def data(name: str, value, max_bytes: int) -> bytes:
    if type(value) is not bytes or len(value) > max_bytes:
        raise InvalidCallError("%s must be bytes, at most %d of them, not %s"
                               % (name, max_bytes, _shown(value)))
    return value


def sequence(name: str, value, max_items: int) -> list:
    if not isinstance(value, (list, tuple)) or len(value) > max_items:
        raise InvalidCallError("%s must be a list of at most %d items, not %s"
                               % (name, max_items, _shown(value)))
    return value


def _shown(value) -> str:
    """A short description of a bad value (never its whole repr: it may be huge)."""
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return "%s (%s)" % (shown, type(value).__name__)


# --- the client's calls -----------------------------------------------------------------------

def peer_info(info, role: str) -> dict:
    if type(info) is not dict or len(info) > 64:
        raise InvalidCallError("a %s's info must be a dict, not %s" % (role, _shown(info)))
    for key in ("hostname", "python", "python_tag", "platform", "start_method", "cwd"):
        if key in info:
            text("%s info %r" % (role, key), info[key], config.MAX_PATH_CHARS, optional=True)
    if "pid" in info:
        integer("%s info 'pid'" % role, info["pid"], 0, 2 ** 63 - 1)
    return info


def node_info(info) -> dict:
    peer_info(info, "worker node")
    text("worker node info 'hostname'", info.get("hostname"))
    integer("worker node info 'pid'", info.get("pid"), 0, 2 ** 63 - 1)
    integer("worker node info 'nprocs'", info.get("nprocs"), 1, config.MAX_NODE_PROCESSES)
    return info


def chunk_specs(specs) -> list:
    """The specs of a submit, each checked (as they travel: plain tuples)."""
    sequence("submit's specs", specs, config.MAX_CHUNKS_PER_SUBMIT)
    max_bytes = config.max_message_bytes()
    return [fields if _plain_spec(fields, max_bytes) else chunk_spec(fields)
            for fields in specs]


_SPEC_FIELDS = len(protocol.ChunkSpec._fields)


def _plain_spec(fields, max_bytes: int) -> bool:
    """The common spec, checked without naming anything: a tuple of the right
    types and ranges, of one function (a submit's chunks come here by the
    thousand; one that is not, chunk_spec checks field by field, naming the
    field at fault)."""
    if type(fields) is not tuple or len(fields) != _SPEC_FIELDS:
        return False
    chunk_id, func_keys, n_jobs, payload, timeout_s, max_retries, context_key, python = fields
    return (type(chunk_id) is int and 0 <= chunk_id < 2 ** 63
            and type(func_keys) is tuple and len(func_keys) == 1
            and type(func_keys[0]) is str and len(func_keys[0]) <= config.MAX_NAME_CHARS
            and type(n_jobs) is int and 1 <= n_jobs <= config.MAX_JOBS_PER_CHUNK
            and type(payload) is bytes and len(payload) <= max_bytes
            and timeout_s is None
            and type(max_retries) is int and 0 <= max_retries <= config.MAX_RETRIES_ALLOWED
            and (context_key is None or type(context_key) is str
                 and len(context_key) <= config.MAX_NAME_CHARS)
            and (python is None or type(python) is str and len(python) <= config.MAX_NAME_CHARS))


def chunk_spec(fields) -> tuple:
    if not isinstance(fields, (tuple, list)) or len(fields) != len(protocol.ChunkSpec._fields):
        raise InvalidCallError("a chunk spec must be a tuple of %d fields (%s), not %s"
                               % (len(protocol.ChunkSpec._fields),
                                  ", ".join(protocol.ChunkSpec._fields), _shown(fields)))
    spec = protocol.view(protocol.ChunkSpec, tuple(fields))
    where = "chunk %s" % _shown(spec.chunk_id) if type(spec.chunk_id) is not int \
        else "chunk %d" % spec.chunk_id
    integer("%s: chunk_id" % where, spec.chunk_id, 0, 2 ** 63 - 1)
    keys = sequence("%s: func_keys" % where, spec.func_keys, config.MAX_FUNCTIONS_PER_CHUNK)
    if not keys:
        raise InvalidCallError("%s: func_keys must name at least one function" % where)
    for key in keys:
        text("%s: a func_key" % where, key, config.MAX_NAME_CHARS)
    integer("%s: n_jobs" % where, spec.n_jobs, 1, config.MAX_JOBS_PER_CHUNK)
    data("%s: payload" % where, spec.payload, config.max_message_bytes())
    if spec.timeout_s is not None:
        number("%s: timeout_s" % where, spec.timeout_s, 0.0, 10.0 ** 9)
    integer("%s: max_retries" % where, spec.max_retries, 0, config.MAX_RETRIES_ALLOWED)
    text("%s: context_key" % where, spec.context_key, optional=True)
    text("%s: python" % where, spec.python, optional=True)
    return tuple(fields)


def pairs(name: str, items, max_items: int, what: str) -> list:
    """``items``: a list of at most ``max_items`` pairs, each described as ``what``."""
    for item in sequence(name, items, max_items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidCallError("%s must be a %s pair, not %s" % (name, what, _shown(item)))
    return items


def blobs(blobs_in) -> list:
    for key, value in pairs("put_blobs's blobs", blobs_in, config.MAX_BLOBS_PER_CALL,
                            "(key, bytes)"):
        text("a blob key", key)
        data("blob %s" % key[:40], value, config.max_message_bytes())
    return blobs_in


def cancel_requests(requests) -> list:
    for chunk_id, indices in pairs("cancel's requests", requests, config.MAX_CHUNKS_PER_SUBMIT,
                                   "(chunk_id, indices or None)"):
        integer("a cancel request's chunk_id", chunk_id, 0, 2 ** 63 - 1)
        if indices is not None:
            for index in sequence("a cancel request's indices", indices,
                                  config.MAX_JOBS_PER_CHUNK):
                integer("a cancel request's index", index, 0, config.MAX_JOBS_PER_CHUNK)
    return requests


def job_refs(jobs) -> list:
    for chunk_id, index in pairs("leased's jobs", jobs, config.MAX_JOBS_PER_CHUNK,
                                 "(chunk_id, index)"):
        integer("a job's chunk_id", chunk_id, 0, 2 ** 63 - 1)
        integer("a job's index", index, 0, config.MAX_JOBS_PER_CHUNK)
    return jobs


def wait_s(name: str, value) -> float:
    return number(name, value, 0.0, config.MAX_WAIT_S)


# --- the node's and its processes' calls --------------------------------------------------------

def reports(reports_in) -> list:
    sequence("exchange's reports", reports_in, config.MAX_REPORTS_PER_CALL)
    max_bytes = config.max_message_bytes()
    for fields in reports_in:
        if _plain_report(fields, max_bytes):
            continue
        if not isinstance(fields, (tuple, list)) or len(fields) != len(protocol.Report._fields):
            raise InvalidCallError("a report must be a tuple of %d fields, not %s"
                                   % (len(protocol.Report._fields), _shown(fields)))
        token, start, count, results, failures = fields
        integer("a report's token", token, 0, 2 ** 63 - 1)
        integer("a report's start", start, 0, config.MAX_JOBS_PER_CHUNK)
        integer("a report's count", count, 0, config.MAX_JOBS_PER_CHUNK)
        data("a report's results", results, max_bytes)
        if failures is not None:
            if not isinstance(failures, (tuple, list)) or len(failures) != 2:
                raise InvalidCallError("a report's failures must be (count, described), not %s"
                                       % _shown(failures))
            integer("a report's failure count", failures[0], 0, count)
            for described in sequence("a report's described failures", failures[1],
                                      protocol.REPORTED_FAILURES):
                if (not isinstance(described, (tuple, list)) or len(described) != 4
                        or type(described[0]) is not int or not 0 <= described[0] < count
                        or not all(type(part) is str for part in described[1:])):
                    raise InvalidCallError("a described failure must be (offset, type, "
                                           "message, traceback), not %s" % _shown(described))
    return reports_in


_REPORT_FIELDS = len(protocol.Report._fields)


def _plain_report(fields, max_bytes: int) -> bool:
    """The common report, checked without naming anything: every field's type and
    range, no failures (one that is not, ``reports`` checks field by field)."""
    if type(fields) is not tuple or len(fields) != _REPORT_FIELDS:
        return False
    token, start, count, results, failures = fields
    return (failures is None and type(token) is int and 0 <= token < 2 ** 63
            and type(start) is int and 0 <= start <= config.MAX_JOBS_PER_CHUNK
            and type(count) is int and 0 <= count <= config.MAX_JOBS_PER_CHUNK
            and type(results) is bytes and len(results) <= max_bytes)


def process_output(printed):
    """process_ended's output: None, or (origin, [(stream, text)])."""
    if printed is None:
        return None
    if (not isinstance(printed, (tuple, list)) or len(printed) != 2
            or type(printed[0]) is not str or not isinstance(printed[1], (list, tuple))
            or not all(isinstance(entry, (tuple, list)) and len(entry) == 2
                       and all(type(part) is str for part in entry) for entry in printed[1])):
        raise InvalidCallError("process_ended's output must be (origin, [(stream, text)]), "
                               "not %s" % _shown(printed))
    return printed


END_REASONS = (protocol.END_DIED, protocol.END_TIMED_OUT, protocol.END_KILLED)


def end_reason(reason) -> str:
    if reason not in END_REASONS:
        raise InvalidCallError("process_ended's reason must be one of %s, not %s"
                               % (", ".join(END_REASONS), _shown(reason)))
    return reason
