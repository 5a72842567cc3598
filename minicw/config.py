"""Defaults and environment variables, documented once.

Every tunable of minicw has its default here (the launchers' timeouts
included); modules import the constant instead of repeating a literal.
Environment variables override some defaults so that one program runs
unchanged on a laptop and on a cluster, and so that tests can shorten
timeouts.
"""
from __future__ import annotations

import os
import re

# --- where the master is --------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8888            # the minimalcluster ancestor's habit; 0 picks a free port
ENV_MASTER = "MINICW_MASTER"   # "host:port" of the master, read by clients
# The multiprocessing authkey (hex) a worker node takes for itself and its
# processes: a LocalCluster's node gets its creator's, so that multiprocessing
# objects the creator passes to jobs (a Manager's proxies) connect from there,
# as from multiprocessing's own children.  Read once, then removed.
ENV_PROCESS_AUTHKEY = "MINICW_PROCESS_AUTHKEY"
ENV_AUTHKEY = "MINICW_AUTHKEY"  # the cluster's shared secret
GENERATED_AUTHKEY_BYTES = 24   # secrets.token_urlsafe(24) gives 32 characters

# --- connections --------------------------------------------------------------
CONNECT_TIMEOUT_S = 10.0       # TCP connect to the master
HANDSHAKE_TIMEOUT_S = 5.0      # authkey challenge, both directions; a silent peer is dropped after this
ENV_HANDSHAKE_TIMEOUT_S = "MINICW_HANDSHAKE_TIMEOUT_S"  # the master's whole-handshake deadline
MAX_PENDING_HANDSHAKES = 64     # connections the master authenticates at once; more are closed
ACCEPT_BACKOFF_MAX_S = 1.0      # the accept loop, out of file descriptors or threads, retries
                                # after a pause growing to this
REFUSALS_LOGGED_EVERY_S = 10.0  # refused connections are logged at most this often


def handshake_timeout_s() -> float:
    """How long a peer may take to complete the whole handshake with the master."""
    text = os.environ.get(ENV_HANDSHAKE_TIMEOUT_S)
    return float(text) if text else HANDSHAKE_TIMEOUT_S

# --- liveness -------------------------------------------------------------------
ENV_LINK_TIMEOUT_S = "MINICW_LINK_TIMEOUT_S"
MIN_LINK_TIMEOUT_S = 10.0           # a busy master may answer slowly: never less than this


def link_timeout_s() -> float:
    """How long a peer waits on its link to the master for any answer before it
    takes the link for dead and reconnects: $MINICW_LINK_TIMEOUT_S, else two
    heartbeat timeouts (at least MIN_LINK_TIMEOUT_S)."""
    text = os.environ.get(ENV_LINK_TIMEOUT_S)
    if text:
        return float(text)
    return max(MIN_LINK_TIMEOUT_S, 2 * heartbeat_timeout_s())

ENV_HEARTBEAT_TIMEOUT_S = "MINICW_HEARTBEAT_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0  # a node or client silent this long is declared dead
HEARTBEATS_PER_TIMEOUT = 4          # peers speak this many times per timeout period


def heartbeat_timeout_s(explicit: float | None = None) -> float:
    """The heartbeat timeout: ``explicit`` if given, else the environment, else the default."""
    if explicit is not None:
        return float(explicit)
    text = os.environ.get(ENV_HEARTBEAT_TIMEOUT_S)
    return float(text) if text else DEFAULT_HEARTBEAT_TIMEOUT_S


ENV_NO_WORKER_WARNING_S = "MINICW_NO_WORKER_WARNING_S"
DEFAULT_NO_WORKER_WARNING_S = 10.0  # jobs waiting this long with no worker node connected: say so


def no_worker_warning_s() -> float:
    """How long a client's jobs wait with nothing delivered before it looks whether any
    worker node is connected, and says so once if none is."""
    text = os.environ.get(ENV_NO_WORKER_WARNING_S)
    return float(text) if text else DEFAULT_NO_WORKER_WARNING_S


ENV_PYTHON_GRACE_S = "MINICW_PYTHON_GRACE_S"
DEFAULT_PYTHON_GRACE_S = 30.0   # jobs with bytecode wait this long for a node of their Python


def python_grace_s() -> float:
    """How long the master keeps jobs whose bytecode no connected node can run
    before it fails them with NoMatchingPythonError (a node may still join)."""
    text = os.environ.get(ENV_PYTHON_GRACE_S)
    return float(text) if text else DEFAULT_PYTHON_GRACE_S


ENV_RECONNECT_TIMEOUT_S = "MINICW_RECONNECT_TIMEOUT_S"
DEFAULT_RECONNECT_TIMEOUT_S = 30.0  # a client waits this long for a lost master to return


def reconnect_timeout_s(explicit: float | None = None) -> float:
    """How long a client keeps trying to reach a lost master before its jobs fail."""
    if explicit is not None:
        return float(explicit)
    text = os.environ.get(ENV_RECONNECT_TIMEOUT_S)
    return float(text) if text else DEFAULT_RECONNECT_TIMEOUT_S


# --- job output (output.py) -------------------------------------------------------
ENV_FORWARD_OUTPUT = "MINICW_FORWARD_OUTPUT"  # 0: off; 1: on; a number: on, with that limit
DEFAULT_OUTPUT_LIMIT = 64 * 1024  # characters of one job's output sent back; the rest is cut


def output_limit(forward_output=None) -> int:
    """Characters of each job's output a client gets back (0: none, the output
    stays on the worker node): ``forward_output`` (True, False, or a limit),
    else $MINICW_FORWARD_OUTPUT, else on with DEFAULT_OUTPUT_LIMIT."""
    if forward_output is None:
        text = os.environ.get(ENV_FORWARD_OUTPUT, "").strip()
        if not text:
            return DEFAULT_OUTPUT_LIMIT
        try:
            forward_output = int(text)
        except ValueError:
            raise ValueError("%s=%r: use 0 (off), 1 (on) or a limit in characters"
                             % (ENV_FORWARD_OUTPUT, text)) from None
    if forward_output is True or forward_output == 1:
        return DEFAULT_OUTPUT_LIMIT
    if not forward_output:
        return 0
    if forward_output < 0:
        raise ValueError("forward_output must be True, False or a positive limit, not %r"
                         % (forward_output,))
    return int(forward_output)


# --- worker process recycling (WorkerNode max_jobs_per_process, max_memory_per_process) ---
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number, optionally followed by K, M, G or T (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if match is None:
        raise ValueError("%r is not a size: give bytes, or a number with K, M, G or T "
                         "(as in 2G or 500M)" % (text,))
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


# --- what the master accepts (validate.py) ----------------------------------------
ENV_MAX_MESSAGE_BYTES = "MINICW_MAX_MESSAGE_BYTES"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30   # one payload, result or blob: larger ones are refused


def max_message_bytes() -> int:
    """The largest payload, result or blob a peer may send the master."""
    text = os.environ.get(ENV_MAX_MESSAGE_BYTES)
    return int(text) if text else DEFAULT_MAX_MESSAGE_BYTES


ENV_MAX_SESSION_BLOB_BYTES = "MINICW_MAX_SESSION_BLOB_BYTES"
DEFAULT_MAX_SESSION_BLOB_BYTES = 4 << 30  # blobs (functions, broadcast data) one client
ENV_MAX_SESSION_BLOBS = "MINICW_MAX_SESSION_BLOBS"  # session may keep in the master, in
DEFAULT_MAX_SESSION_BLOBS = 1_000_000                # bytes and in number


def max_session_blobs() -> tuple:
    """(bytes, count) of blobs one client session may keep in the master."""
    size = os.environ.get(ENV_MAX_SESSION_BLOB_BYTES)
    count = os.environ.get(ENV_MAX_SESSION_BLOBS)
    return (int(size) if size else DEFAULT_MAX_SESSION_BLOB_BYTES,
            int(count) if count else DEFAULT_MAX_SESSION_BLOBS)


MAX_NAME_CHARS = 1024           # a key, a host name, a Python tag
MAX_PATH_CHARS = 4096           # a working directory
MAX_NODE_PROCESSES = 4096       # worker processes one node may register
MAX_JOBS_PER_CHUNK = 1 << 31    # jobs in one chunk (a range of args may be long)
MAX_FUNCTIONS_PER_CHUNK = 100_000  # distinct functions in one chunk of submits
MAX_CHUNKS_PER_SUBMIT = 1_000_000  # chunks in one submit or cancel call
MAX_BLOBS_PER_CALL = 1_000_000
MAX_REPORTS_PER_CALL = 100_000
MAX_RETRIES_ALLOWED = 1000
MAX_WAIT_S = 86400.0            # a waiting call's timeout


# --- work movement ---------------------------------------------------------------
DEFAULT_CHUNKSIZE = None        # jobs per chunk in MasterNode.execute; None sizes them (chunking.py)
MAX_CHUNKS_PER_CALL = 16        # chunks moved by one proxy call to or from a worker process
FIRST_SUBMIT_S = 0.005          # a stream sends its first chunks after packing this long, so
                                # work starts while the rest are packed ...
SUBMIT_BYTES_PER_CALL = 1 << 20  # ... and later ones about this many payload bytes per call
                                # (under load every call waits milliseconds for its reply)
PREFETCH_WORK_S = 0.02          # a worker process leases about this much work ahead
RESULT_FLUSH_S = 0.25           # a worker process holds finished results about this long at most
                                # (see worker_process.MAX_CLOCK_STRIDE); each flush of a running
                                # chunk is one more call on the master: chunks are sized to
                                # end before it (chunking.py)
IN_FLIGHT_CHUNKS_PER_PROCESS = 32  # client window: chunks submitted but not yet answered, per worker process
NODE_COUNT_TTL_S = 2.0          # how long a client trusts its count of worker processes
DEFAULT_MAX_RETRIES = 2         # reruns of a job whose process died under it

# --- worker nodes ------------------------------------------------------------------
DEFAULT_START_METHOD = "spawn"  # the Windows and macOS default; safe with threads
NODE_RECONNECT_MAX_S = 5.0      # longest pause between reconnect attempts to a lost master
NODE_BLOB_CACHE_BYTES = 1 << 30  # blobs (functions, broadcast data) a node keeps, least recently used dropped
ENV_START_METHOD = "MINICW_START_METHOD"  # overrides DEFAULT_START_METHOD for a node given none
START_METHODS = ("spawn", "forkserver", "fork")


def start_method(explicit: str | None = None) -> str:
    """How a worker node starts its processes: ``explicit`` if given, else the
    environment, else the default.  ValueError for a name not in START_METHODS.

    The environment reaches the nodes minicw starts for a user who has no
    argument to give (LocalCluster, MasterNode, the launchers' workers).
    """
    method = explicit or os.environ.get(ENV_START_METHOD) or DEFAULT_START_METHOD
    if method not in START_METHODS:
        source = "start_method" if explicit else ENV_START_METHOD
        raise ValueError("%s=%r: use one of %s" % (source, method, ", ".join(START_METHODS)))
    return method


# --- launchers: launch.py, launcher.py, slurm.py ------------------------------------
ENV_RUN_DIR = "MINICW_RUN_DIR"  # the run directory of the launchers (rundir.py) ...
DEFAULT_RUN_DIR = "~/.minicw/run"  # ... when it is not set and no --run-dir is given
READY_TIMEOUT_S = 60.0          # a started master must listen, a worker node join, within this
READY_POLL_S = 0.01             # how often a parent looks for its child's ready file
CHILD_STOP_TIMEOUT_S = 10.0     # launch.py: EOF on stdin, then SIGTERM, then SIGKILL, over this
CHILD_OUTPUT_DRAIN_S = 2.0      # launch.py: after a child ended, its last output is read this long
LOCAL_STOP_GRACE_S = 10.0       # local launcher: SIGTERM, then SIGKILL to the group after this
                                # (a worker node finishes the jobs it holds meanwhile)
GROUP_LINGER_S = 2.0            # a process group's members may outlive its leader this long
STOP_POLL_S = 0.05              # how often the local launcher looks whether a process ended
SLURM_COMMAND_TIMEOUT_S = 30.0  # one sbatch / squeue / scancel call
SLURM_RETRY_S = 60.0            # discover.py: a client that saw squeue fail does not
                                # run it again for this long
SLURM_MASTER_TIMEOUT_S = 120.0  # the master job must write its ready file within this
                                # (it may wait in the queue meanwhile)
SLURM_STOP_TIMEOUT_S = 60.0     # cancelled jobs must leave the queue within this
SLURM_POLL_S = 0.2              # how often slurm.py looks at the run directory while waiting
SQUEUE_EVERY_S = 1.0            # ... and asks squeue, at most


# --- checkpoints: checkpoint.py, store.py ------------------------------------------
CHECKPOINT_BATCH_JOBS = 1000        # results are committed to a checkpoint in batches of
CHECKPOINT_BATCH_S = 0.5            # at most this many, or at least this often ...
CHECKPOINT_BATCH_BYTES = 32 << 20   # ... or once this many bytes of results are waiting
CHECKPOINT_BACKLOG_BYTES = 256 << 20  # results waiting to be written beyond this hold
                                      # up the thread that delivers them (a slow disk)
CHECKPOINT_LOOKUP_JOBS = 512        # a resumed run looks up the stored jobs this many at a time
CHECKPOINT_UNWAL_WAIT_MS = 200      # a finished run's file leaves WAL mode unless a reader
                                    # holds it longer than this


# --- the dashboard: dashboard.py ---------------------------------------------------
DASHBOARD_HOST = "127.0.0.1"     # the page is served on this interface unless told otherwise
DASHBOARD_TOKEN_LABEL = b"minicw dashboard token v1"  # HMAC'd with the key: the page's token
DASHBOARD_TOKEN_CHARS = 32       # hex characters of that HMAC-SHA256 kept (128 bits)
DASHBOARD_REFRESH_S = 2          # the page reloads itself this often
DASHBOARD_CHART_S = 600          # the throughput chart covers this much of the past ...
DASHBOARD_CHART_STEP_S = 10      # ... one bar per this many seconds
DASHBOARD_FAILURES_SHOWN = 20    # newest failures on the page (status.json has all kept)
DASHBOARD_STOP_POLL_S = 0.2      # its server looks this often whether it must stop
DASHBOARD_REQUEST_TIMEOUT_S = 10.0  # a browser silent this long mid-request is dropped


# --- progress display: progress.py -------------------------------------------------
ENV_PROGRESS = "MINICW_PROGRESS"   # "1": show progress (plain lines when stderr is not a
                                   # terminal), "0": never; progress=True/False on a call wins
PROGRESS_DELAY_S = 2.0             # a run shows nothing before it has taken this long
PROGRESS_TERMINAL_EVERY_S = 0.25   # the line on a terminal is rewritten at most this often
PROGRESS_NOTEBOOK_EVERY_S = 0.5    # ... a notebook's display updated at most this often
PROGRESS_PLAIN_EVERY_S = 30.0      # stderr not a terminal (a pipe, a log): a line at most
                                   # this often, the first after this long too (forced on:
                                   # after PROGRESS_DELAY_S)
PROGRESS_WAKE_S = 0.5              # a caller waiting for results wakes this often to keep
                                   # the elapsed time and ETA current


def progress_setting(explicit: bool | None = None) -> bool | None:
    """Whether runs show their progress: ``explicit`` (a call's ``progress=``) if
    given, else $MINICW_PROGRESS ("1" on, "0" off), else None: the default
    (shown, where it fits: see progress.py)."""
    if explicit is not None:
        return bool(explicit)
    text = os.environ.get(ENV_PROGRESS, "").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    return None
