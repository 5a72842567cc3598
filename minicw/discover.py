"""Where the master is and what its key is, for clients given neither.

    ClientThread(cb) / ClusterExecutor()       (host, port, authkey all None)
        |
        v
    master_address(host, port):  explicit host
                                 >  $MINICW_MASTER ("host:port")
                                 >  the local launcher's record, if its master
                                    runs on this machine (launcher.recorded_master())
                                 >  the user's SLURM master job, when sbatch is on
                                    PATH (slurm.master_address(); none found or
                                    squeue failing: fall through)
                                 >  127.0.0.1 and the default port
                                 (an explicit port always wins over a found one)
    authkey(explicit):           explicit  >  $MINICW_AUTHKEY
                                 >  the mode-600 key file of the run directory
                                    (rundir.read_authkey())  >  MinicwError

The run directory is $MINICW_RUN_DIR, else ~/.minicw/run: where
scripts/local_start.py and scripts/slurm_start.py record what they started.
So one program runs unchanged on a laptop and on a cluster: the launchers
record the master and the key, or the program is given them explicitly.

The local record comes before SLURM: it costs a file read where squeue costs
a round trip to slurmctld (seconds when that is down), and the two cannot
disagree about one run directory (each launcher refuses to start while the
other's record is there), so a live local master is the cluster whose key
``authkey()`` reads from that run directory; a SLURM master found by name in
squeue would not take it.  A failing squeue is said once per process (per
squeue program) at WARNING, later at DEBUG, and is not run again for
config.SLURM_RETRY_S: every client constructed meanwhile would wait for it
(up to config.SLURM_COMMAND_TIMEOUT_S) to learn the same thing.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time

from minicw import config, launcher, rundir, slurm, transport
from minicw.errors import MinicwError

log = logging.getLogger(__name__)

# When squeue last failed, by its path (another PATH may hold a working SLURM).
_squeue_failed_at: dict = {}
_squeue_failed_lock = threading.Lock()


def parse_master(text: str) -> tuple:
    """("host", port) from "host:port" (a bare "host" gets the default port)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        return text or config.DEFAULT_HOST, config.DEFAULT_PORT
    try:
        return host.strip("[]") or config.DEFAULT_HOST, int(port)
    except ValueError:
        raise MinicwError("%s=%r is not host:port" % (config.ENV_MASTER, text)) from None


def master_address(host: str | None = None, port: int | None = None) -> tuple:
    """The master's (host, port): the arguments, $MINICW_MASTER, a launched master, or the default.

    Raises MinicwError for a malformed $MINICW_MASTER, and SlurmError when
    SLURM shows a master that cannot be used (several, or one still pending).
    """
    found = found_master(host, port)
    if found is not None:
        return found
    return config.DEFAULT_HOST, int(port) if port is not None else config.DEFAULT_PORT


def found_master(host: str | None = None, port: int | None = None) -> tuple | None:
    """``master_address``, but None when nothing names a master: no host or
    port given, no $MINICW_MASTER, and no master the launchers started
    (minicw.Pool then starts a LocalCluster of its own)."""
    if host is None:
        text = os.environ.get(config.ENV_MASTER)
        found = parse_master(text) if text else launched_master()
        if found is not None:
            return found[0], int(port) if port is not None else int(found[1])
        if port is None:
            return None
        host = config.DEFAULT_HOST
    return host, int(port) if port is not None else config.DEFAULT_PORT


def launched_master() -> tuple | None:
    """(host, port) of a master the launchers started: local first, then SLURM; else
    None.  When the launcher recorded the fingerprint of the master's TLS
    certificate, connections to it pin that."""
    found = launcher.recorded_master()
    fingerprint = launcher.recorded_fingerprint() if found else None
    if found is None:
        found = _slurm_master()
        fingerprint = slurm.recorded_fingerprint() if found else None
    if found is not None and fingerprint:
        transport.choose_tls(found, fingerprint=fingerprint)
    return found


def _slurm_master() -> tuple | None:
    """(host, port) of the user's SLURM master job, when sbatch is on the PATH; None
    when there is none, or squeue fails (or failed less than SLURM_RETRY_S ago).

    Raises SlurmError when SLURM shows a master that cannot be used.
    """
    squeue = shutil.which("squeue")
    if not slurm.available() or squeue is None or _failed_recently(squeue):
        return None
    try:
        return slurm.master_address()
    except slurm.SlurmMasterNotFoundError as exc:
        log.debug("%s", exc)
    except slurm.SlurmCommandError as exc:
        _remember_failure(squeue, exc)
    return None


def _failed_recently(squeue: str) -> bool:
    with _squeue_failed_lock:
        failed_at = _squeue_failed_at.get(squeue)
    return failed_at is not None and time.monotonic() - failed_at < config.SLURM_RETRY_S


def _remember_failure(squeue: str, exc: Exception) -> None:
    with _squeue_failed_lock:
        first = squeue not in _squeue_failed_at
        _squeue_failed_at[squeue] = time.monotonic()
    log.log(logging.WARNING if first else logging.DEBUG,
            "looking for a SLURM master: %s (not asked again for %gs; set %s=host:port "
            "to name the master)", exc, config.SLURM_RETRY_S, config.ENV_MASTER)


def authkey(explicit=None) -> bytes:
    """The cluster's key: the argument, $MINICW_AUTHKEY, or the run directory's key file.

    Raises MinicwError naming all three if none is there, or if the key file
    is readable by group or others.
    """
    if explicit is not None:
        return transport.as_authkey(explicit)
    text = os.environ.get(config.ENV_AUTHKEY)
    if text:
        return transport.as_authkey(text)
    key = rundir.read_authkey()
    if key is not None:
        return key
    raise MinicwError("no authkey: pass authkey=..., set %s to the cluster's key, or start "
                      "the cluster with scripts/local_start.py or scripts/slurm_start.py "
                      "(they write %s)" % (config.ENV_AUTHKEY, rundir.authkey_path()))
