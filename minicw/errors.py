"""Every error a minicw user can see.

One module, so that a user can read what may go wrong in one place and catch
it by type.  The hierarchy::

    MinicwError
     +-- MasterConnectionError (also ConnectionError)
     |    +-- MasterHostUnknownError      the master's host name does not resolve
     |    +-- MasterNotListeningError     nothing listens at host:port
     |    +-- AuthkeyMismatchError        the peer rejected our key, or we its
     |    +-- HandshakeTimeoutError       the peer accepted but never answered
     |    +-- TlsError                    TLS expected and not spoken, or a certificate refused
     |    +-- MasterLostError             an established connection went away
     +-- TlsSetupError (also ValueError)   TLS settings that cannot be used (a file, a fingerprint)
     +-- ClusterShutdownError             the master was shut down on purpose
     +-- SessionExpiredError              the master forgot this client (silent too long)
     +-- ProtocolVersionError             peers speak different minicw protocols
     +-- InvalidCallError (also ValueError)  a call the master refuses (names the field)
     +-- JobError                         one job did not produce a result
     |    +-- RemoteError                 the job raised; carries type, message, traceback
     |    +-- WorkerCrashedError          the job took its process down, retries used up
     |    +-- JobTimeoutError (also TimeoutError)   over its per-job time limit
     |    +-- NoMatchingPythonError       no worker node runs the Python its bytecode needs
     |    +-- ResultTooLargeError         its pickled result is over the message size limit
     |    +-- UnpicklableResultError (also TypeError)   its result cannot be serialized
     +-- SerializationError               a payload could not be written or read
     |    +-- IncompatiblePythonError     payload written by another Python version
     +-- EnvirError                       the environment source failed or lacks a name
     +-- ArgsError (also ValueError)      load_args() input that cannot be keyed
     +-- CheckpointError                  a checkpoint file cannot be opened, read or written
     |    +-- CheckpointMismatchError     it was written for another function or arguments
     |    +-- CheckpointLockedError       another client is writing it now
     +-- SlurmError                       SLURM missing, or the master job not usable
          +-- SlurmCommandError           sbatch, squeue or scancel failed (quotes its stderr)
          +-- SlurmMasterNotFoundError    the user has no minicw master job in the queue

Not an error: ``RetireProcess`` (a BaseException, as SystemExit is), raised
by a job's code to have its worker process replaced after it.

Errors that cross the wire (raised in the master and re-raised in a client by
the manager's '#ERROR' reply) must stay picklable: every class here keeps its
constructor arguments in ``self.args``.
"""
from __future__ import annotations

import multiprocessing


class MinicwError(Exception):
    """Base class of every error minicw raises on purpose."""


# --- connections ------------------------------------------------------------

class MasterConnectionError(MinicwError, ConnectionError):
    """No usable connection to the master at ``address``."""

    def __init__(self, message: str, address=None):
        super().__init__(message, address)
        self.message = message
        self.address = address

    def __str__(self) -> str:
        return self.message


class MasterHostUnknownError(MasterConnectionError):
    """The host name of the master does not resolve."""


class MasterNotListeningError(MasterConnectionError):
    """The host answered, but nothing accepts connections on the port."""


class AuthkeyMismatchError(MasterConnectionError, multiprocessing.AuthenticationError):
    """The two ends hold different authkeys."""


class HandshakeTimeoutError(MasterConnectionError):
    """The peer accepted the TCP connection but did not complete the handshake."""


class TlsError(MasterConnectionError):
    """The TLS layer refused the link: one side speaks TLS and the other does not,
    the master's certificate is not the pinned one, or it does not verify."""


class TlsSetupError(MinicwError, ValueError):
    """TLS settings that cannot be used: a certificate or key file missing or
    unreadable, a malformed fingerprint, a setting that needs another."""


class MasterLostError(MasterConnectionError):
    """An established connection to the master broke."""


class ClusterShutdownError(MinicwError):
    """The master is shutting down and accepts no more work."""


class SessionExpiredError(MinicwError):
    """The master dropped this client session (closed, or silent too long)."""


class InvalidCallError(MinicwError, ValueError):
    """A peer's call the master refuses: an argument of the wrong type, out of
    range, too large, or naming something unknown (the message names it)."""


class ProtocolVersionError(MinicwError):
    """The peer speaks another version of the minicw wire protocol."""


# --- jobs -------------------------------------------------------------------

class JobError(MinicwError):
    """A job finished without a result."""


class RemoteError(JobError):
    """A job raised an exception on a worker.

    Attributes: ``type_name`` (qualified name of the remote exception's type),
    ``message`` (its ``str()``), ``arg`` (the argument of the job that failed,
    when known), ``remote_traceback`` (the formatted traceback from the worker)
    and ``exception`` (the original exception object when it could be
    unpickled here, else None).
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "",
                 arg=None, exception: BaseException | None = None, has_arg: bool = False):
        super().__init__(type_name, message, remote_traceback, arg, exception, has_arg)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.arg = arg
        self.has_arg = has_arg
        self.exception = exception

    def __str__(self) -> str:
        where = " (arg %r)" % (self.arg,) if self.has_arg else ""
        text = "%s: %s%s" % (self.type_name, self.message, where)
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class WorkerCrashedError(JobError):
    """A job ended its worker process on every allowed attempt.

    ``exit_description`` names the exit code or the signal, ``attempts`` counts
    the runs that ended this way, ``output`` is what the job printed before
    its last crash ("" when nothing, or when output is not forwarded).
    """

    def __init__(self, job: str, exit_description: str, attempts: int = 1, output: str = ""):
        super().__init__(job, exit_description, attempts, output)
        self.job = job
        self.exit_description = exit_description
        self.attempts = attempts
        self.output = output

    def __str__(self) -> str:
        if self.exit_description.startswith("its worker node "):   # the node died under it
            text = "job %s was running when its worker node died, on %d attempt(s) (the " \
                   "last: %s)" % (self.job, self.attempts, self.exit_description[4:])
        else:
            text = "job %s crashed its worker process (%s) on %d attempt(s)" % (
                self.job, self.exit_description, self.attempts)
        if self.output:
            text += "; its output before the crash:\n" + self.output.rstrip("\n")
        return text


class JobTimeoutError(JobError, TimeoutError):
    """A job ran longer than its ``timeout``; its process was killed and replaced."""

    def __init__(self, job: str, timeout_s: float):
        super().__init__(job, timeout_s)
        self.job = job
        self.timeout_s = timeout_s

    def __str__(self) -> str:
        return "job %s exceeded its time limit of %gs" % (self.job, self.timeout_s)


class NoMatchingPythonError(JobError):
    """A job carries bytecode (a function or argument sent by value) of one Python,
    and no connected worker node ran that Python for the grace period."""

    def __init__(self, job: str, python: str, present: list):
        super().__init__(job, python, present)
        self.job = job
        self.python = python
        self.present = present

    def __str__(self) -> str:
        nodes = ", ".join(self.present) if self.present else "no worker node at all"
        return ("job %s needs a worker node running %s (its function or arguments were "
                "sent as %s bytecode), and none is connected (nodes: %s); start a node with "
                "that Python, or make the function importable on the workers (a module on "
                "their path, or load_envir), which any Python runs"
                % (self.job, self.python, self.python, nodes))


class ResultTooLargeError(JobError):
    """A job's pickled result is larger than one message may be
    (``MINICW_MAX_MESSAGE_BYTES``); the worker did not send it."""

    def __init__(self, size: int, limit: int):
        super().__init__(size, limit)
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        return ("the job's result is %d bytes pickled, over the limit of %d bytes for one "
                "message (MINICW_MAX_MESSAGE_BYTES, read by the master and the worker nodes); "
                "return less, or write the result to a shared file and return its path"
                % (self.size, self.limit))


class UnpicklableResultError(JobError, TypeError):
    """A job's result could not be serialized on the worker, so it was not sent.

    ``reason`` is the serializer's error, ``value_repr`` the start of the
    result's ``repr()`` (what ``multiprocessing.pool.MaybeEncodingError``
    carries; ``minicw.Pool`` raises that instead).  A TypeError, as before.
    """

    REPR_CHARS = 2000   # of the result's repr kept

    def __init__(self, type_name: str, reason: str, value_repr: str):
        super().__init__(type_name, reason, value_repr)
        self.type_name = type_name
        self.reason = reason
        self.value_repr = value_repr

    def __str__(self) -> str:
        return "the job's result of type %s cannot be pickled: %s" % (self.type_name,
                                                                      self.reason)


class RetireProcess(BaseException):
    """Not an error: raised by a job's code to have its worker process replaced
    after the job (minicw.Pool's maxtasksperchild, pool_task.py).  ``outcome``
    is the job's own result, or ``failure`` the exception it raised.

    The process reports the jobs it ran and leaves (EXIT_RETIRED); the rest of
    its lease and the leases it held go back to the queue uncharged.  An
    exception rather than a flag: the run loop pays for an ``except`` clause
    only when one is raised, where a flag would be read after every job.
    """

    def __init__(self, outcome=None, failure: BaseException | None = None):
        super().__init__()
        self.outcome = outcome
        self.failure = failure


# --- data -------------------------------------------------------------------

class SerializationError(MinicwError):
    """A payload could not be serialized or deserialized."""


class IncompatiblePythonError(SerializationError):
    """A payload holds bytecode of another Python implementation or version."""

    def __init__(self, payload_python: str, this_python: str):
        super().__init__(payload_python, this_python)
        self.payload_python = payload_python
        self.this_python = this_python

    def __str__(self) -> str:
        return ("payload was serialized by %s but is being loaded by %s; bytecode "
                "is specific to one Python version, so run the same Python on "
                "both ends" % (self.payload_python, self.this_python))


class EnvirError(MinicwError):
    """The environment source cannot be run, or does not define a requested name."""


class ArgsError(MinicwError, ValueError):
    """Arguments given to ``load_args`` cannot be used as result keys."""


# --- launchers --------------------------------------------------------------

class CheckpointError(MinicwError):
    """A checkpoint file (``checkpoint=``, ``minicw.store``) cannot be used."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint holds the results of another function, environment or
    argument list than the call that would resume it (``resume="force"``
    reuses them anyway)."""


class CheckpointLockedError(CheckpointError):
    """Another client is journaling to this checkpoint now."""


class SlurmError(MinicwError):
    """SLURM is missing, a SLURM command failed, or the master job is not usable."""


class SlurmCommandError(SlurmError):
    """sbatch, squeue or scancel failed or did not answer; the message quotes its stderr."""


class SlurmMasterNotFoundError(SlurmError):
    """The current user has no minicw master job in the queue."""
