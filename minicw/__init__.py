"""minicw: run Python functions across a cluster of ordinary machines."""
from minicw.errors import (  # noqa: F401
    ArgsError, AuthkeyMismatchError, ClusterShutdownError, EnvirError,
    HandshakeTimeoutError, IncompatiblePythonError, JobError, JobTimeoutError,
    MasterConnectionError, MasterHostUnknownError, MasterLostError,
    MasterNotListeningError, MinicwError, ProtocolVersionError, RemoteError,
    SerializationError, WorkerCrashedError,
)

__version__ = "0.1.0"
