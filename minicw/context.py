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
Two kinds of entries are skipped even when they exist, each with one note:
the client's own Python installation (its prefixes, standard library and
site-packages) on a worker of another Python version, where they would
shadow the worker's own standard library; and paths of the other operating
system family (``C:\\Users\\x`` on POSIX is a legal relative name, ``/home/x``
on Windows resolves on the current drive).

Undoing a job's changes must cost nothing for the millions of jobs that
make none: the process wraps ``os.chdir`` once so that a call raises a flag,
and sys.path is a TrackedPath that raises the same flag when edited in place;
after a job the worker process reads the flag and checks sys.path by identity.
"""
from __future__ import annotations

import ntpath
import os
import re
import site
import socket
import sys
import sysconfig

from minicw import protocol

# A path of the Windows family: a drive (C:\ or C:/) or a UNC share (\\host\share).
_WINDOWS_PATH = re.compile(r"^([A-Za-z]:[\\/]|\\\\[^\\])")


def python_tag() -> str:
    """This interpreter's implementation and major.minor: "cpython-3.11"."""
    return "%s-%d.%d" % ((sys.implementation.name,) + tuple(sys.version_info[:2]))


def installation_dirs() -> tuple:
    """The folders of this Python installation: its prefixes, standard library and
    site-packages (a venv's included), which another version must not import from."""
    found = {sys.prefix, sys.exec_prefix, getattr(sys, "base_prefix", sys.prefix),
             getattr(sys, "base_exec_prefix", sys.exec_prefix)}
    found.update(sysconfig.get_paths().get(name) for name in
                 ("stdlib", "platstdlib", "purelib", "platlib"))
    try:
        found.update(site.getsitepackages())
        found.add(site.getusersitepackages())
    except AttributeError:  # an old virtualenv's site module
        pass
    return tuple(sorted(os.path.abspath(path) for path in found if path))


def describe() -> tuple:
    """(cwd or None, [sys.path entries that are directories here], python_tag(),
    installation_dirs()) of this process."""
    try:
        cwd = os.getcwd()
    except OSError:  # the directory was removed under us
        cwd = None
    entries = [entry for entry in sys.path if entry and os.path.isdir(entry)]
    return cwd, entries, python_tag(), installation_dirs()


def make_blob(cwd, entries, tag: str, installation: tuple,
              output_limit: int = 0) -> tuple[str, bytes]:
    """The client's context blob; ``output_limit``: characters of each job's output
    it wants back (output.py; 0: none)."""
    return protocol.pack_blob(protocol.BLOB_CONTEXT, cwd, tuple(entries), tag,
                              tuple(installation), output_limit)


def other_family(path: str) -> bool:
    """Whether ``path`` is written for the other operating system family."""
    if os.name == "nt":
        return path.startswith("/") and not ntpath.splitdrive(path)[0]
    return bool(_WINDOWS_PATH.match(path))


def _inside(path: str, folders: tuple) -> bool:
    path = os.path.abspath(path)
    return any(path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
               for folder in folders)


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

    def __init__(self, cwd, entries, client_python: str | None = None,
                 client_installation: tuple = (), output_limit: int = 0):
        self.notes = []
        self.output_limit = output_limit   # characters of each job's output to send back
        host = socket.gethostname()
        if cwd and other_family(cwd):
            self.notes.append("the client's working directory %s is a path of another "
                              "operating system; its jobs run in %s on worker host %s"
                              % (cwd, os.getcwd(), host))
            cwd = None
        self.cwd = cwd if cwd and os.path.isdir(cwd) else None
        if cwd and self.cwd is None:
            self.notes.append("the client's working directory %s does not exist on worker "
                              "host %s; its jobs run in %s there" % (cwd, host, os.getcwd()))
        entries = self._portable(entries, client_python, client_installation, host)
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

    def _portable(self, entries, client_python, client_installation, host) -> list:
        """The entries this worker may put on its path: not of the other OS family,
        and not of the client's Python installation when it is another version."""
        other_os = [entry for entry in entries if other_family(entry)]
        if other_os:
            self.notes.append("%d of the client's sys.path entries are paths of another "
                              "operating system (%s); skipped on worker host %s"
                              % (len(other_os), other_os[0], host))
        entries = [entry for entry in entries if entry not in other_os]
        if client_python is None or client_python == python_tag():
            return entries
        foreign = [entry for entry in entries if _inside(entry, client_installation)]
        if foreign:
            self.notes.append("the client runs %s, this worker (host %s) %s: %d sys.path "
                              "entries of the client's Python installation (%s) are not used "
                              "here" % (client_python, host, python_tag(), len(foreign),
                                        foreign[0]))
        return [entry for entry in entries if entry not in foreign]

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
