"""Start a master or a worker node as a child process, and know when it is ready.

    parent                                 child: python -m minicw.master / minicw.worker
    ------                                 ----------------------------------------------
    child_env(key): MINICW_AUTHKEY=key,    reads the key from the environment (never
      PYTHONPATH=package_parent():...        argv) and imports the parent's minicw
    removes a stale ready file, starts     --ready-file PATH: once listening (master) or
      the child with --ready-file PATH       joined (node) it writes PATH atomically:
    wait_ready_file(PATH, pid) <-----------  master  {"pid", "host", "port", "hostname",
      polls until PATH names the child's               "job_id" ($SLURM_JOB_ID, if set),
                                                       "dashboard_host", "dashboard_port"
                                                       (--dashboard; never its token)}
      pid; the child exiting first or a      node    {"pid", "node_id", "nprocs"}
      timeout raises MinicwError quoting     and removes PATH at shutdown if it still
      the end of the child's output          names its pid
                                           --exit-with-stdin (ChildProcess only): a
    ChildProcess.stop() closes stdin ----->  thread shuts the child down at EOF, so the
                                             child ends when the parent ends, however

Three parents use the handshake: ``ChildProcess`` here (a private temporary
ready file; stdout and stderr forwarded to the log, their last lines quoted
when the child fails to start), the detached local launcher
(launcher.py: ready files in the run directory) and the SLURM master job
(slurm.py: the run directory's master-address.json is its ready file, read by
clients too).  A ready file is data, not text to match: a restarted master in
the same run directory can never be mistaken for the previous one, because
the parent removed the old file and waits for the new child's pid.

Children are separate interpreters started from a command line, never by
``multiprocessing`` from this process: that keeps a user's script free of
``if __name__ == "__main__"`` guards, and works the same from a script, a
REPL and a notebook.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

from minicw import config, rundir
from minicw.errors import MinicwError

log = logging.getLogger(__name__)

OUTPUT_LINES_KEPT = 5     # a ChildProcess's last output lines, quoted if it fails to start
WILDCARD_HOSTS = ("0.0.0.0", "", "::")
STDIN_FD = 0              # the lifeline of --exit-with-stdin
LIFELINE_READ_BYTES = 4096
DRAIN_REQUEST = b"drain\n"   # on a worker node's lifeline: finish, then leave


# --- the child's environment -----------------------------------------------------------

def package_parent() -> str:
    """The directory holding the minicw package: children put it first on PYTHONPATH."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(authkey: str | bytes) -> dict:
    """This process's environment, plus the key and this minicw importable.

    The key travels in $MINICW_AUTHKEY, never in argv (``ps`` shows argv to
    every user); the child imports the same minicw as this process,
    installed or not.
    """
    if isinstance(authkey, bytes):
        authkey = authkey.decode("utf-8", "surrogateescape")
    env = dict(os.environ)
    env[config.ENV_AUTHKEY] = authkey
    env["PYTHONPATH"] = os.pathsep.join(
        [package_parent()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def own_session() -> dict:
    """Popen options that start a child outside this process's session (POSIX) or
    process group (Windows): the terminal's Ctrl-C goes to the foreground group,
    and a child minicw starts for the user must not receive it.  Such a child
    ends with its parent through its lifeline (--exit-with-stdin), or by PID."""
    if os.name == "posix":
        return {"start_new_session": True}
    return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}


# --- the ready file: the child's side ------------------------------------------------------

def master_ready_record(host: str, port: int, dashboard: tuple | None = None,
                        tls_fingerprint: str | None = None) -> dict:
    """What a master writes once it listens on (host, port), its dashboard on
    ``dashboard`` (host, port) if it serves one, and the SHA-256 fingerprint of
    its TLS certificate if it serves TLS (peers that find it here pin it)."""
    record = {"pid": os.getpid(), "host": host, "port": int(port),
              "hostname": socket.gethostname()}
    if tls_fingerprint is not None:
        record["tls_fingerprint"] = tls_fingerprint
    if dashboard is not None:
        # Where only: the parent has the key, and computes the page's token.
        record["dashboard_host"], record["dashboard_port"] = dashboard[0], int(dashboard[1])
    if os.environ.get("SLURM_JOB_ID"):
        record["job_id"] = os.environ["SLURM_JOB_ID"]
    return record


def worker_ready_record(node_id: str, nprocs: int) -> dict:
    """What a worker node writes once it has joined its master."""
    return {"pid": os.getpid(), "node_id": node_id, "nprocs": int(nprocs)}


def write_ready_file(ready_path: str, record: dict) -> None:
    rundir.write_json(ready_path, record)


def remove_ready_file(ready_path: str) -> None:
    """Remove the ready file if it is still this process's (a successor may own it now)."""
    try:
        record = rundir.read_json(ready_path)
    except MinicwError:
        return
    if record and record.get("pid") == os.getpid() \
            and record.get("hostname", socket.gethostname()) == socket.gethostname():
        rundir.remove_files(ready_path)


# --- the ready file: the parent's side --------------------------------------------------------

def wait_ready_file(ready_path: str, pid: int, alive: Callable[[], bool], what: str,
                    timeout_s: float, end_of_output: Callable[[], str]) -> dict:
    """The record in ``ready_path`` once it names ``pid``.

    Raises MinicwError if ``alive()`` turns false first ("the WHAT (pid N)
    exited before it was ready; ...") or after ``timeout_s``; either message
    ends with ``end_of_output()``, the end of the child's log or stdout.
    The caller ends the child.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        record = _ready_record(ready_path)
        if record is not None and record.get("pid") == pid:
            return record
        if not alive():
            raise MinicwError("the %s (pid %d) exited before it was ready; %s"
                              % (what, pid, end_of_output()))
        if time.monotonic() > deadline:
            raise MinicwError("the %s (pid %d) was not ready within %gs; %s"
                              % (what, pid, timeout_s, end_of_output()))
        time.sleep(config.READY_POLL_S)


def _ready_record(ready_path: str) -> dict | None:
    try:
        return rundir.read_json(ready_path)
    except MinicwError:  # written by hand or by something else; keep waiting for ours
        return None


def ready_address(record: dict, here: bool = False) -> tuple:
    """The (host, port) to reach the master of a ready ``record`` at.

    A master listening on all interfaces is reached at 127.0.0.1 from its own
    machine (``here``), else at its host name; one bound to a host, there.
    """
    host = record["host"]
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1" if here else record["hostname"]
    return host, int(record["port"])


# --- a child of this process --------------------------------------------------------------

def _write_line(stream, text: str) -> None:
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError, AttributeError):
        pass   # our own output is closed or gone


# A line of the log format of start_logging: "<time> <logger> LEVEL: message".
LOG_LINE_LEVEL = re.compile(r"^\S+ \S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL): ")


class ChildProcess:
    """A master or worker node started by ``start_master`` or ``start_worker``."""

    def __init__(self, role: str, argv: list, authkey: str | bytes,
                 extra_env: dict | None = None):
        self.role = role
        self._ready_dir = tempfile.mkdtemp(prefix="minicw-%s-" % role)
        self.ready_file = os.path.join(self._ready_dir, "ready.json")
        env = child_env(authkey)
        env.update(extra_env or {})
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m"] + argv
                + ["--exit-with-stdin", "--ready-file", self.ready_file],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, universal_newlines=True, bufsize=1, **own_session())
        except OSError:
            shutil.rmtree(self._ready_dir, ignore_errors=True)
            raise
        self.pid = self.popen.pid
        self.ready_record = None   # the child's ready record, once wait_ready() has it
        self._last_lines = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        # Two pipes, not one: the child's stdout says what it did (info), its
        # stderr what went wrong (its warnings, errors, tracebacks), which must
        # stay as visible as when the child wrote to our terminal.
        self._readers = [self._start_forwarding(self.popen.stdout, logging.INFO, "out"),
                         self._start_forwarding(self.popen.stderr, logging.WARNING, "err")]

    def _start_forwarding(self, stream, level: int, name: str) -> threading.Thread:
        reader = threading.Thread(target=self._forward, args=(stream, level),
                                  name="minicw-%s-%s" % (self.role, name), daemon=True)
        reader.start()
        return reader

    def _forward(self, stream, level: int) -> None:
        """Log each line of the child's ``stream``, keeping the last ones for errors.
        A line of the child's own log goes on at the level it was logged at.
        What a worker node's jobs wrote to its standard output itself (not
        through sys.stdout, which output.py sends back with each result: a C
        extension, a subprocess) goes to ours, so that none of it is lost."""
        for line in stream:
            line = line.rstrip("\n")
            self._last_lines.append(line)
            if level == logging.INFO and self.role == "worker" and not line.startswith("minicw "):
                _write_line(sys.stdout, "[%s %d] %s\n" % (self.role, self.pid, line))
                continue
            logged = LOG_LINE_LEVEL.search(line)
            line_level = getattr(logging, logged.group(1)) if logged else level
            log.log(line_level, "[%s %d] %s", self.role, self.pid, line)

    def wait_ready(self, timeout_s: float = config.READY_TIMEOUT_S) -> dict:
        """The child's ready record; MinicwError (child stopped) if it exits or stalls first."""
        try:
            record = wait_ready_file(self.ready_file, self.pid, self.alive,
                                     "%s process" % self.role, timeout_s, self._end_of_output)
        except MinicwError:
            self.stop()
            raise
        # Read: the folder goes now, so that a parent killed later leaves none
        # behind (the child's own removal of the file at exit then finds nothing).
        shutil.rmtree(self._ready_dir, ignore_errors=True)
        self.ready_record = record
        return record

    def _end_of_output(self) -> str:
        code = self.popen.poll()
        if code is not None:
            for reader in self._readers:  # let them read the last lines the child wrote
                reader.join(1.0)
        said = "; ".join(self._last_lines) or "none"
        return "exit code %s; its last output: %s" % (code, said)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = config.CHILD_STOP_TIMEOUT_S) -> int | None:
        """Ask the child to end (closing its stdin), then terminate, then kill."""
        if self.popen.poll() is None:
            self._close(self.popen.stdin)
            try:
                return self._wait(timeout_s / 2)
            except subprocess.TimeoutExpired:
                self.popen.terminate()
            try:
                return self._wait(timeout_s / 2)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self._wait(None)

    def drain(self, timeout_s: float) -> bool:
        """Ask a worker node to let its processes finish what they hold and
        leave (a line on its lifeline); True if it ended within ``timeout_s``."""
        if self.popen.poll() is not None:
            return True
        try:
            self.popen.stdin.write(DRAIN_REQUEST.decode())
            self.popen.stdin.flush()
        except (OSError, ValueError):
            return False
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _wait(self, timeout_s: float | None) -> int:
        code = self.popen.wait(timeout_s)
        # What it wrote last is still in the pipes: let the readers pass it on
        # (a process it started may hold a pipe open, hence the limit).
        for reader in self._readers:
            reader.join(config.CHILD_OUTPUT_DRAIN_S)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            self._close(stream)
        shutil.rmtree(self._ready_dir, ignore_errors=True)
        return code

    @staticmethod
    def _close(stream) -> None:
        try:
            stream.close()
        except (OSError, ValueError):
            pass


def start_master(host: str, port: int, authkey: str | bytes,
                 heartbeat_timeout_s: float | None = None,
                 dashboard_port: int | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None
                 ) -> tuple[ChildProcess, tuple]:
    """Start ``python -m minicw.master``; returns the child and the (host, port) to reach it.

    ``dashboard_port`` (0: a free one): it serves its dashboard on 127.0.0.1;
    the child's ``ready_record`` says where.  ``tls_cert`` and ``tls_key``
    (paths): it serves TLS, and its ``ready_record`` holds the fingerprint.
    """
    argv = ["minicw.master", "--host", host, "--port", str(port)]
    if tls_cert is not None:
        argv += ["--tls-cert", tls_cert, "--tls-key", tls_key]
    if heartbeat_timeout_s is not None:
        argv += ["--heartbeat-timeout", str(heartbeat_timeout_s)]
    if dashboard_port is not None:
        argv += ["--dashboard", str(dashboard_port)]
    child = ChildProcess("master", argv, authkey)
    record = child.wait_ready()
    return child, ready_address(record, here=True)


def start_worker(address, authkey: str | bytes, nprocs: int | None = None,
                 start_method: str | None = None, oversubscribe: bool = False,
                 tls_settings=None, process_authkey: bytes | None = None,
                 process_setup: tuple | None = None) -> ChildProcess:
    """Start ``python -m minicw.worker`` and wait until it has registered.

    ``start_method`` None: $MINICW_START_METHOD, else spawn (config.start_method;
    a bad name raises ValueError here, before any process starts).
    ``oversubscribe``: ``nprocs`` may exceed the CPU count.  ``tls_settings``
    (a tls.Settings): how the node reaches its master, on its command line
    (files by path, a fingerprint), instead of $MINICW_TLS_CA and
    $MINICW_TLS_FINGERPRINT; None: the environment's.  ``process_authkey``:
    the node's ``multiprocessing.current_process().authkey``, which its
    processes inherit (config.ENV_PROCESS_AUTHKEY).  ``process_setup``: (blob
    key, context key) of a callable each worker process calls first.
    """
    host, port = address
    argv = ["minicw.worker", str(host), str(port), "-",
            "--start-method", config.start_method(start_method)]
    if nprocs is not None:
        argv += ["-n", str(nprocs)]
    if oversubscribe:
        argv.append("--oversubscribe")
    if process_setup is not None:
        argv += ["--process-setup", "%s,%s" % (process_setup[0], process_setup[1] or "")]
    extra_env = {}
    if process_authkey is not None:
        extra_env[config.ENV_PROCESS_AUTHKEY] = process_authkey.hex()
    if tls_settings is not None:
        extra_env.update({"MINICW_TLS_CA": "", "MINICW_TLS_FINGERPRINT": ""})
        if tls_settings.ca:
            argv += ["--tls-ca", tls_settings.ca]
        if tls_settings.fingerprint:   # not a secret: it names the master's certificate
            argv += ["--tls-fingerprint", tls_settings.fingerprint]
        if tls_settings.ca and not tls_settings.check_hostname:
            argv.append("--tls-no-check-hostname")
    child = ChildProcess("worker", argv, authkey, extra_env)
    child.wait_ready()
    return child


def exit_with_stdin(on_eof: Callable[[], None],
                    on_drain: Callable[[], None] | None = None) -> None:
    """In a child: call ``on_eof()`` when the parent closes our stdin or dies.

    The watcher reads file descriptor 0 itself and never touches ``sys.stdin``:
    a worker process forked (``--start-method fork``) while the watcher waits
    inside ``sys.stdin.readline()`` would inherit its buffered reader's lock
    held, and multiprocessing closes ``sys.stdin`` in every new process, which
    would then wait for that lock forever.
    """
    def watch():
        try:
            while True:
                data = os.read(STDIN_FD, LIFELINE_READ_BYTES)
                if not data:
                    break
                if on_drain is not None and DRAIN_REQUEST in data:
                    on_drain()
        except OSError:
            pass
        on_eof()
    threading.Thread(target=watch, name="minicw-parent-watch", daemon=True).start()


# --- in the child: the options and habits of a launched master or node -------------------

def add_log_options(parser: argparse.ArgumentParser) -> None:
    """-v / -q / --log-level, which every command takes (read by ``log_level``)."""
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log more: debug messages too")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="log less: warnings and errors only")
    parser.add_argument("--log-level", default=None,
                        help="debug, info (default), warning or error")


def log_level(args) -> str:
    """The level the log options ask for: --log-level, else -v or -q, else info."""
    if args.log_level:
        return args.log_level
    return "debug" if args.verbose else "warning" if args.quiet else "info"


def start_tool_logging(args) -> None:
    """Logging for a command whose output is what it prints (status, store, the
    launcher scripts): warnings and errors, unless -v or --log-level asks for more."""
    start_logging(log_level(args) if args.verbose or args.log_level else "warning")


def add_child_options(parser: argparse.ArgumentParser) -> None:
    """The options every launched command takes: the log options, --ready-file,
    and --exit-with-stdin (hidden: only ChildProcess passes it)."""
    add_log_options(parser)
    parser.add_argument("--ready-file", metavar="PATH",
                        help="once ready, write a JSON record here (for a program that "
                        "started this one; see minicw/launch.py); removed at exit")
    parser.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)


EXIT_USAGE = 2   # a launched command's exit code for bad arguments or a refused start


def command_error(program: str, message) -> int:
    """Say what went wrong on stderr, as argparse does; returns EXIT_USAGE."""
    print("%s: error: %s" % (program, message), file=sys.stderr)
    return EXIT_USAGE


def start_logging(level: str) -> None:
    """Log to stderr at ``level`` (a name: debug, info, warning, error)."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


# The signals that ask a launched master or node to stop: SIGBREAK (Windows only)
# is how processes.ask_to_stop reaches a process group there.
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGBREAK")


def on_signals(handler, names=STOP_SIGNALS) -> None:
    """Call ``handler(signum, frame)`` on each signal of ``names`` this platform has."""
    for name in names:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)
