"""minicw: run Python functions across a cluster of ordinary machines.

Importing minicw starts nothing and prints nothing.  The names below are
loaded on first use, so ``import minicw`` stays cheap in worker processes.
"""
from minicw.errors import (  # noqa: F401
    ArgsError, AuthkeyMismatchError, CheckpointError, CheckpointLockedError,
    CheckpointMismatchError, ClusterShutdownError, EnvirError,
    HandshakeTimeoutError, IncompatiblePythonError, InvalidCallError, JobError, JobTimeoutError,
    MasterConnectionError, MasterHostUnknownError, MasterLostError,
    MasterNotListeningError, MinicwError, NoMatchingPythonError, ProtocolVersionError,
    RemoteError, ResultTooLargeError, UnpicklableResultError,
    SerializationError, SessionExpiredError, TlsError, TlsSetupError, WorkerCrashedError,
)

__version__ = "0.1.0"

_LAZY = {
    "MasterNode": "minicw.master_node",
    "WorkerNode": "minicw.node",
    "LocalCluster": "minicw.local",
    "Master": "minicw.server",
    "ClientThread": "minicw.client_thread",
    "ClusterExecutor": "minicw.executor",
    "Pool": "minicw.pool",
    "start": "minicw.launcher",
    "stop": "minicw.launcher",
    "allocate": "minicw.launcher",
    "slurm_master_host": "minicw.slurm",
}


_SUBMODULES = {"store"}   # minicw.store.open(path) without importing minicw.store first


def __getattr__(name):
    import importlib
    if name in _SUBMODULES:
        return importlib.import_module("minicw." + name)
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError("module 'minicw' has no attribute %r" % name)
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))
