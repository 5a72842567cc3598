"""Defaults and environment variables, documented once.

Every tunable of minicw has its default here; modules import the constant
instead of repeating a literal.  Environment variables override some defaults
so that one program runs unchanged on a laptop and on a cluster, and so that
tests can shorten timeouts.
"""
from __future__ import annotations

import os

# --- where the master is --------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8888            # the minimalcluster ancestor's habit; 0 picks a free port
ENV_MASTER = "MINICW_MASTER"   # "host:port" of the master, read by clients
ENV_AUTHKEY = "MINICW_AUTHKEY"  # the cluster's shared secret
GENERATED_AUTHKEY_BYTES = 24   # secrets.token_urlsafe(24) gives 32 characters

# --- connections --------------------------------------------------------------
CONNECT_TIMEOUT_S = 10.0       # TCP connect to the master
HANDSHAKE_TIMEOUT_S = 5.0      # authkey challenge, both directions; a silent peer is dropped after this

# --- liveness -------------------------------------------------------------------
ENV_HEARTBEAT_TIMEOUT_S = "MINICW_HEARTBEAT_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0  # a node or client silent this long is declared dead
HEARTBEATS_PER_TIMEOUT = 4          # peers speak this many times per timeout period


def heartbeat_timeout_s(explicit: float | None = None) -> float:
    """The heartbeat timeout: ``explicit`` if given, else the environment, else the default."""
    if explicit is not None:
        return float(explicit)
    text = os.environ.get(ENV_HEARTBEAT_TIMEOUT_S)
    return float(text) if text else DEFAULT_HEARTBEAT_TIMEOUT_S


ENV_RECONNECT_TIMEOUT_S = "MINICW_RECONNECT_TIMEOUT_S"
DEFAULT_RECONNECT_TIMEOUT_S = 30.0  # a client waits this long for a lost master to return


def reconnect_timeout_s(explicit: float | None = None) -> float:
    """How long a client keeps trying to reach a lost master before its jobs fail."""
    if explicit is not None:
        return float(explicit)
    text = os.environ.get(ENV_RECONNECT_TIMEOUT_S)
    return float(text) if text else DEFAULT_RECONNECT_TIMEOUT_S


# --- work movement ---------------------------------------------------------------
DEFAULT_CHUNKSIZE = None        # jobs per chunk in MasterNode.execute; None sizes them (chunking.py)
MAX_CHUNKS_PER_CALL = 16        # chunks moved by one proxy call to or from a worker process
FIRST_SUBMIT_S = 0.005          # a stream sends its first chunks after packing this long, so
                                # work starts while the rest are packed ...
SUBMIT_BYTES_PER_CALL = 1 << 20  # ... and later ones about this many payload bytes per call
                                # (under load every call waits milliseconds for its reply)
PREFETCH_WORK_S = 0.02          # a worker process leases about this much work ahead
RESULT_FLUSH_S = 0.02           # a worker process holds finished results about this long at most
                                # (see runner.MAX_CLOCK_STRIDE)
IN_FLIGHT_CHUNKS_PER_PROCESS = 32  # client window: chunks submitted but not yet answered, per worker process
DEFAULT_MAX_RETRIES = 2         # reruns of a job whose process died under it

# --- worker nodes ------------------------------------------------------------------
DEFAULT_START_METHOD = "spawn"  # the Windows and macOS default; safe with threads
NODE_RECONNECT_MAX_S = 5.0      # longest pause between reconnect attempts to a lost master
NODE_BLOB_CACHE_BYTES = 1 << 30  # blobs (functions, broadcast data) a node keeps, least recently used dropped
