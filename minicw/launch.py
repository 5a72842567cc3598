"""Start a master or a worker node as a child process of this one.

    this process                         child: python -m minicw.master / minicw.worker
    ------------                         ------------------------------------------------
    Popen(..., stdin=PIPE, stdout=PIPE)  --exit-with-stdin: a thread reads stdin and
      env MINICW_AUTHKEY=key               shuts the child down at EOF, so the child
                                           ends when this process ends, however it ends
    reader thread  <---------------------  one READY line on stdout, then anything else
      parses READY, forwards the rest      the child prints (forwarded to our logger)
      to the log

Children are separate interpreters started from a command line, never by
``multiprocessing`` from this process: that keeps a user's script free of
``if __name__ == "__main__"`` guards, and works the same from a script, a
REPL and a notebook.  The key travels in the environment, never in argv.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

from minicw import config
from minicw.errors import MinicwError

log = logging.getLogger(__name__)

READY_PREFIX = "MINICW-READY "   # followed by space-separated fields
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class ChildProcess:
    """A master or worker node started by ``start_master`` or ``start_worker``."""

    def __init__(self, role: str, argv: list, authkey: bytes, extra_env: dict | None = None):
        self.role = role
        env = dict(os.environ)
        env[config.ENV_AUTHKEY] = authkey.decode("utf-8", "surrogateescape")
        # The child imports the same minicw as this process, installed or not.
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            [package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update(extra_env or {})
        self.popen = subprocess.Popen(
            [sys.executable, "-m"] + argv + ["--exit-with-stdin"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            universal_newlines=True, bufsize=1)
        self.pid = self.popen.pid
        self.ready_fields = None
        self._ready = threading.Event()
        self._lines = []
        threading.Thread(target=self._read_stdout, name="minicw-%s-out" % role,
                         daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.popen.stdout:
            line = line.rstrip("\n")
            if line.startswith(READY_PREFIX) and self.ready_fields is None:
                self.ready_fields = line[len(READY_PREFIX):].split()
                self._ready.set()
            else:
                self._lines.append(line)
                log.info("[%s %d] %s", self.role, self.pid, line)
        self._ready.set()  # EOF: the child ended, ready or not

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> list:
        """The child's READY fields; MinicwError if it exits or stalls first."""
        if not self._ready.wait(timeout_s):
            self.stop()
            raise MinicwError("the %s process (pid %d) did not become ready within %gs"
                              % (self.role, self.pid, timeout_s))
        if self.ready_fields is None:
            code = self.popen.wait()
            said = "; ".join(self._lines[-5:]) or "nothing on stdout; see stderr"
            raise MinicwError("the %s process (pid %d) exited with code %s before it "
                              "was ready: %s" % (self.role, self.pid, code, said))
        return self.ready_fields

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Ask the child to end (closing its stdin), then terminate, then kill."""
        if self.popen.poll() is None:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
            try:
                return self.popen.wait(timeout_s / 2)
            except subprocess.TimeoutExpired:
                self.popen.terminate()
            try:
                return self.popen.wait(timeout_s / 2)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        code = self.popen.wait()
        for stream in (self.popen.stdin, self.popen.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        return code


def start_master(host: str, port: int, authkey: bytes,
                 heartbeat_timeout_s: float | None = None) -> tuple[ChildProcess, tuple]:
    """Start ``python -m minicw.master``; returns the child and its (host, port)."""
    argv = ["minicw.master", "--host", host, "--port", str(port)]
    if heartbeat_timeout_s is not None:
        argv += ["--heartbeat-timeout", str(heartbeat_timeout_s)]
    child = ChildProcess("master", argv, authkey)
    fields = child.wait_ready()
    return child, (fields[0], int(fields[1]))


def start_worker(address, authkey: bytes, nprocs: int | None = None,
                 start_method: str | None = None) -> ChildProcess:
    """Start ``python -m minicw.worker`` and wait until it has registered."""
    host, port = address
    argv = ["minicw.worker", str(host), str(port), "-"]
    if nprocs is not None:
        argv += ["-n", str(nprocs)]
    if start_method is not None:
        argv += ["--start-method", start_method]
    child = ChildProcess("worker", argv, authkey)
    child.wait_ready()
    return child


def exit_with_stdin(on_eof) -> None:
    """In a child: call ``on_eof()`` when the parent closes our stdin or dies."""
    def watch():
        try:
            while sys.stdin.readline():
                pass
        except (OSError, ValueError):
            pass
        on_eof()
    threading.Thread(target=watch, name="minicw-parent-watch", daemon=True).start()
