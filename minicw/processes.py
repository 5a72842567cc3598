"""Processes by PID on every operating system: are they alive, when did they start,
ask them to stop.  The local launcher (launcher.py) stops exactly the processes
it recorded, never by name, so it must tell a recorded process from a later one
that got the same PID.

    question            Linux                 macOS, BSD                Windows
    --------            -----                 ----------                -------
    alive(pid)          kill(pid, 0) and not  kill(pid, 0) and not a    OpenProcess +
                        a zombie (/proc)      zombie (ps -o stat=)      GetExitCodeProcess
    start_time(pid)     /proc/PID/stat        ps -o lstart=             GetProcessTimes
    ask_to_stop(pid)    SIGTERM               SIGTERM                   CTRL_BREAK_EVENT to its
                                                                        process group (it was
                                                                        started in one)
    kill(pid)           SIGKILL to its group  SIGKILL to its group      TerminateProcess

(``os.kill(pid, 0)`` on Windows is not a probe: signal 0 is CTRL_C_EVENT.)
A start time is an opaque value compared for equality; None means the
process is gone, or the platform offers no way to ask.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

WINDOWS = sys.platform == "win32"
HAVE_PROC = os.path.isdir("/proc/self")        # Linux: ask /proc, not ps
_STILL_ACTIVE = 259                            # GetExitCodeProcess of a running process
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_PS_TIMEOUT_S = 10.0


def proc_stat(pid: int) -> list | None:
    """The fields of /proc/PID/stat after the command name (Linux), None if unreadable."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _ps(pid: int, field: str) -> str | None:
    """``ps -o FIELD= -p PID`` (macOS, BSD), None if it cannot say."""
    try:
        done = subprocess.run(["ps", "-o", field + "=", "-p", str(pid)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              universal_newlines=True, timeout=_PS_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    answer = done.stdout.strip()
    return answer if done.returncode == 0 and answer else None


# --- Windows, through the kernel32 API ------------------------------------------------------

def _with_windows_handle(pid: int, use):
    import ctypes
    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return None
    try:
        return use(ctypes, kernel32, handle)
    finally:
        kernel32.CloseHandle(handle)


def _windows_alive(pid: int) -> bool:
    def running(ctypes, kernel32, handle):
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) \
            and code.value == _STILL_ACTIVE
    return bool(_with_windows_handle(pid, running))


def _windows_start_time(pid: int) -> int | None:
    def created(ctypes, kernel32, handle):
        times = [ctypes.c_ulonglong() for _ in range(4)]  # creation, exit, kernel, user
        if not kernel32.GetProcessTimes(handle, *[ctypes.byref(t) for t in times]):
            return None
        return times[0].value
    return _with_windows_handle(pid, created)


# --- the questions ---------------------------------------------------------------------------

def start_time(pid: int, stat_fields: list | None = None) -> int | str | None:
    """When ``pid`` started, to tell it from a later process with the same PID;
    ``stat_fields``: its /proc stat fields, when already read (Linux)."""
    if WINDOWS:
        return _windows_start_time(pid)
    if not HAVE_PROC:
        return _ps(pid, "lstart")
    fields = stat_fields if stat_fields is not None else proc_stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def alive(pid: int, recorded_start_time=None) -> bool:
    """Whether ``pid`` runs (a zombie does not), and, when ``recorded_start_time``
    is given, is still the process that was recorded."""
    if WINDOWS:
        if not _windows_alive(pid):
            return False
        now = None
    else:
        try:
            os.kill(pid, 0)
        except OSError:  # gone, or another user's process: the PID was reused
            return False
        if HAVE_PROC:
            fields = proc_stat(pid)
            state = fields[0] if fields else ""
        else:
            fields = None
            state = _ps(pid, "stat") or ""
        if state.startswith("Z"):
            return False  # ended, not yet reaped
        now = fields
    if recorded_start_time is None:
        return True
    return start_time(pid, now) in (None, recorded_start_time)


def ask_to_stop(pid: int) -> None:
    """Ask ``pid`` to stop (a worker node then finishes the jobs it holds)."""
    with contextlib.suppress(OSError):
        if WINDOWS:
            # SIGTERM would be TerminateProcess; Ctrl-Break reaches the process
            # group it leads (started with CREATE_NEW_PROCESS_GROUP) as SIGBREAK.
            os.kill(pid, signal.CTRL_BREAK_EVENT)
        else:
            os.kill(pid, signal.SIGTERM)


def kill(pid: int, group: bool = False) -> None:
    """End ``pid`` now (and, POSIX, with ``group``, the process group it leads)."""
    with contextlib.suppress(OSError):
        if group and hasattr(os, "killpg"):
            os.killpg(pid, signal.SIGKILL)
        elif WINDOWS:
            os.kill(pid, signal.SIGTERM)   # TerminateProcess
        else:
            os.kill(pid, signal.SIGKILL)
