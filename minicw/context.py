"""The client's working directory and sys.path, replayed around its jobs.

    client (Session)                         worker process (worker_process.py)
    ----------------                         --------------------------
    describe(): (cwd, sys.path entries  ---> BLOB_CONTEXT, fetched once per process
                 that exist on the client)    |
                                              v
                                           JobContext.enter()   before a lease: chdir to
                                              |                  the client's cwd, prepend
                                              |                  its path entries
                                           JobContext.after_job()  after each job: undo what
                                              |                  the job changed (chdir,
                                              |                  sys.path edits)
                                           JobContext.leave()   when another context comes: back to the
                                                                 process's own cwd and path

This assumes a shared filesystem, as the cluster-workers ancestor did.  A
directory that does not exist on the worker is skipped, and reported once
per context as a note that travels back to the client with the results.

Undoing a job's changes must cost nothing for the millions of jobs that
make none: the process wraps ``os.chdir`` once so that a call raises a flag,
and sys.path is a TrackedPath that raises the same flag when edited in place;
after a job the worker process reads the flag and checks sys.path by identity.
"""
from __future__ import annotations

import os
import socket
import sys

from minicw import protocol


def describe() -> tuple:
    """(cwd or None, [sys.path entries that are directories here]) of this process."""
    try:
        cwd = os.getcwd()
    except OSError:  # the directory was removed under us
        cwd = None
    entries = [entry for entry in sys.path if entry and os.path.isdir(entry)]
    return cwd, entries


def make_blob(cwd, entries) -> tuple[str, bytes]:
    return protocol.pack_blob(protocol.BLOB_CONTEXT, cwd, tuple(entries))


# --- in the worker process ---------------------------------------------------------

class _Flags:
    """Module state read in the worker process's inner loop (one attribute lookup)."""
    touched = False        # a job called os.chdir or edited sys.path in place


flags = _Flags()
_original_chdir = os.chdir


def _tracking_chdir(path):
    flags.touched = True
    return _original_chdir(path)


def _edits(name):
    edit = getattr(list, name)

    def tracked(self, *args, **kwargs):
        flags.touched = True
        return edit(self, *args, **kwargs)
    tracked.__name__ = name
    return tracked


class TrackedPath(list):
    """sys.path while a client's jobs run: a list that raises ``flags.touched``
    when it is edited in place.

    The worker process checks after every job whether sys.path changed.  Comparing
    the lists entry by entry cost a sixth of a no-op job; with this, the
    check is a flag and an identity test (a job that rebinds sys.path is seen
    by identity).
    """

    def reset(self, entries) -> None:
        """Hold ``entries`` again, without raising the flag."""
        list.__setitem__(self, slice(None), entries)

    def __reduce__(self):   # a job that returns sys.path returns a plain list
        return list, (list(self),)


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend",
              "insert", "pop", "remove", "clear", "sort", "reverse"):
    setattr(TrackedPath, _name, _edits(_name))
del _name


def install_chdir_tracker() -> None:
    """Make ``os.chdir`` record that a job called it; remember the process's own
    directory (done once per process, at its start)."""
    global _home_cwd
    _home_cwd = os.getcwd()
    os.chdir = _tracking_chdir


_home_cwd = None   # the worker process's own working directory


class JobContext:
    """A client's context as one worker process applies it.

    ``notes`` collects what the client should hear (a missing directory);
    the worker process takes them after ``enter()``.
    """

    def __init__(self, cwd, entries):
        self.notes = []
        host = socket.gethostname()
        self.cwd = cwd if cwd and os.path.isdir(cwd) else None
        if cwd and self.cwd is None:
            self.notes.append("the client's working directory %s does not exist on worker "
                              "host %s; its jobs run in %s there" % (cwd, host, os.getcwd()))
        self.entries = []
        for entry in entries:
            if os.path.isdir(entry):
                # Interned, so that checking sys.path after every job compares
                # strings by identity even when several Runners share a process.
                self.entries.append(sys.intern(entry))
            else:
                self.notes.append("the client's sys.path entry %s does not exist on worker "
                                  "host %s; skipped" % (entry, host))
        self._home_cwd = None
        self._home_path = None
        self._job_entries = None
        self.job_path = None    # sys.path while the client's jobs run (a TrackedPath)

    def enter(self) -> None:
        self._home_cwd = _home_cwd or os.getcwd()
        self._home_path = sys.path
        # The client's entries first, then the worker's own, without repeats.
        mine = [entry for entry in self._home_path if entry not in self.entries]
        self._job_entries = self.entries + mine
        self.job_path = TrackedPath(self._job_entries)
        sys.path = self.job_path
        if self.cwd is not None:
            try:
                _original_chdir(self.cwd)
            except OSError as exc:  # removed since: skip it from now on
                self.notes.append("the client's working directory %s does not exist on worker "
                                  "host %s (%s); its jobs run in %s there"
                                  % (self.cwd, socket.gethostname(), exc.strerror,
                                     self._home_cwd))
                self.cwd = None
        flags.touched = False

    def cwd_still_there(self) -> bool:
        """Check, between leases, that the directory was not removed meanwhile;
        if it was, move to the process's own directory and note it."""
        if self.cwd is None or os.path.isdir(self.cwd):
            return True
        self.notes.append("the client's working directory %s does not exist on worker "
                          "host %s any more; its jobs run in %s there"
                          % (self.cwd, socket.gethostname(), self._home_cwd))
        self.cwd = None
        _original_chdir(self._home_cwd)
        return False

    def after_job(self) -> None:
        """Undo a job's changes to the working directory and sys.path (called only
        when ``flags`` says there are some)."""
        _original_chdir(self.cwd if self.cwd is not None else self._home_cwd)
        self.job_path.reset(self._job_entries)
        sys.path = self.job_path
        flags.touched = False

    def leave(self) -> None:
        sys.path = self._home_path
        if self.cwd is not None or flags.touched:
            _original_chdir(self._home_cwd)
        flags.touched = False
