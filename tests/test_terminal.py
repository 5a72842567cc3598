"""minicw at a real terminal: an interactive interpreter on a pseudo-terminal,
code typed into it, and Ctrl-C typed as a person types it (the terminal's
interrupt character, which the line discipline turns into SIGINT for the
whole foreground process group)."""
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import descendants
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = b">>> "
STEP_TIMEOUT_S = float(os.environ.get("MINICW_TEST_TERMINAL_TIMEOUT_S", "60"))

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")


# Runs first in the child: a session of its own with the pty as its controlling
# terminal, then the interpreter.  (pty.fork() would fork this multi-threaded
# test process, which Python warns may deadlock the child.)
ON_ITS_OWN_TERMINAL = ("import fcntl, os, sys, termios; os.setsid(); "
                       "fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                       "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


class Terminal:
    """``python3 -i`` (or ``python3 ARGS``) on a pty of its own: its session, its
    controlling terminal."""

    def __init__(self, args=("-q", "-i")):
        env = dict(os.environ, PYTHONPATH=ROOT, TERM="dumb", PYTHONSTARTUP="")
        env.pop("MINICW_MASTER", None)
        self.fd, terminal_side = os.openpty()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", ON_ITS_OWN_TERMINAL] + list(args), env=env,
                stdin=terminal_side, stdout=terminal_side, stderr=terminal_side)
        finally:
            os.close(terminal_side)
        self.pid = self.popen.pid
        self.output = b""
        self.exit_status = None

    def read_until(self, wanted: bytes, timeout_s: float = STEP_TIMEOUT_S) -> bytes:
        """Everything read up to and including ``wanted``; AssertionError on timeout."""
        deadline = time.monotonic() + timeout_s
        start = len(self.output)
        while wanted not in self.output[start:]:
            left = deadline - time.monotonic()
            assert left > 0, "no %r; the terminal shows: %r" % (wanted, self.output[-800:])
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:   # EIO: the interpreter is gone
                    chunk = b""
                assert chunk, "the interpreter ended: %r" % self.output[-800:]
                self.output += chunk
        return self.output[start:]

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def run(self, line: str) -> bytes:
        """Type a line and wait for the next prompt; what was printed."""
        mark = len(self.output)
        self.type(line)
        self.read_until(PROMPT)
        return self.output[mark:]

    def descendants(self) -> list:
        return sorted(descendants(self.pid))

    def wait_exit(self) -> int:
        """The interpreter's exit status, once it has ended by itself."""
        self.exit_status = self.popen.wait(STEP_TIMEOUT_S)
        return self.exit_status

    def close(self) -> None:
        """Kill (by PID) whatever of it still runs, the interpreter last."""
        pids = self.descendants() + ([self.pid] if self.exit_status is None else [])
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.exit_status is None:
            self.wait_exit()
        os.close(self.fd)


@pytest.fixture
def terminal():
    term = Terminal()
    try:
        term.read_until(PROMPT)
        yield term
    finally:
        term.close()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the cluster's processes in /proc")
def test_ctrl_c_at_the_terminal_cancels_the_run_and_the_cluster_lives_on(terminal):
    terminal.run("import time; from minicw import LocalCluster")
    terminal.run("c = LocalCluster(n_workers=2).start(); ex = c.executor()")
    cluster = terminal.descendants()
    assert len(cluster) >= 4   # master, worker node, its two worker processes
    terminal.type("list(ex.map(time.sleep, [0.5] * 40))")
    time.sleep(1.5)            # a person waits a moment, then presses Ctrl-C
    os.write(terminal.fd, b"\x03")
    interrupted = terminal.read_until(PROMPT)
    assert b"KeyboardInterrupt" in interrupted
    assert [pid for pid in cluster if not os.path.exists("/proc/%d" % pid)] == []
    printed = terminal.run("print('SUM', sum(ex.map(abs, range(-5, 5))))")
    assert b"SUM 25" in printed, printed
    assert b"Error" not in printed
    terminal.run("ex.shutdown(); c.shutdown()")
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while terminal.descendants() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert terminal.descendants() == []


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the cluster's processes in /proc")
def test_ctrl_c_during_a_pools_map_ends_its_tasks_and_the_pool_goes_on(terminal, tmp_path):
    """A multiprocessing user's session: Pool(2) starts its own cluster; Ctrl-C
    during a map of long tasks returns the prompt, and the next call runs at
    once (the interrupted map's tasks were ended, not left to finish)."""
    terminal.run("import os, time; os.environ['MINICW_RUN_DIR'] = %r; os.environ['PATH'] = %r"
                 % (str(tmp_path), helpers.path_without_slurm()))
    terminal.run("from minicw import Pool; p = Pool(2)")
    assert b"[5, 4, 3" in terminal.run("p.map(abs, range(-5, 5))")
    terminal.type("p.map(time.sleep, [30] * 4)")
    time.sleep(1.5)
    os.write(terminal.fd, b"\x03")
    assert b"KeyboardInterrupt" in terminal.read_until(PROMPT)
    printed = terminal.run("t = time.time(); print('GOT', p.apply(abs, (-42,)), "
                           "time.time() - t < 10)")
    assert b"GOT 42 True" in printed, printed
    terminal.run("p.close(); p.join()")
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while _workers(terminal.descendants()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _workers(terminal.descendants()) == []


def _workers(pids: list) -> list:
    """``(pid, command line)`` of the processes among ``pids`` that are not
    multiprocessing's helpers: the resource tracker and the fork server live
    as long as the interpreter that started them."""
    workers = []
    for pid in pids:
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                command = handle.read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"resource_tracker" not in command and b"forkserver import main" not in command:
            workers.append((pid, command))
    return workers


def _slow_echo(x):
    import time
    time.sleep(0.5)
    return x


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the node's processes in /proc")
def test_ctrl_c_on_an_interactive_worker_node_takes_it_out_at_once(terminal):
    from helpers import KEY, start_master, start_worker
    from minicw import ClusterExecutor
    # A long heartbeat timeout: the node can only leave this soon by saying so.
    master, port = start_master(extra_args=["--heartbeat-timeout", "60"])
    other = None
    executor = ClusterExecutor("127.0.0.1", port, KEY)
    try:
        terminal.run("from minicw import WorkerNode")
        terminal.run("n = WorkerNode('127.0.0.1', %d, %r, nprocs=2)" % (port, KEY))
        terminal.type("n.join_cluster()")
        futures = [executor.submit(_slow_echo, i) for i in range(6)]
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not any(node["busy"] for node in executor.list_workers()):
            assert time.monotonic() < deadline, "the node never took a job"
            time.sleep(0.05)
        os.write(terminal.fd, b"\x03")
        assert b"KeyboardInterrupt" in terminal.read_until(PROMPT)
        while executor.list_workers():   # gone long before the 60 s timeout
            assert time.monotonic() < deadline, executor.list_workers()
            time.sleep(0.05)
        while _workers(terminal.descendants()):    # its worker processes ended
            assert time.monotonic() < deadline, _workers(terminal.descendants())
            time.sleep(0.05)
        other = start_worker(port, nprocs=2)   # the jobs it held run elsewhere
        assert sorted(f.result(timeout=STEP_TIMEOUT_S) for f in futures) == list(range(6))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        if other is not None:
            other.stop()
        master.stop()


SCRIPT_CATCHING_CTRL_C = """
import time
from minicw import LocalCluster
with LocalCluster(n_workers=2) as cluster:
    executor = cluster.executor()
    print("RUNNING", flush=True)
    try:
        list(executor.map(time.sleep, [0.5] * 40))
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
    print("SUM", sum(executor.map(abs, range(-5, 5))), flush=True)
    executor.shutdown()
print("DONE", flush=True)
"""


def test_ctrl_c_in_a_script_that_catches_it_leaves_the_cluster_usable(tmp_path):
    script = tmp_path / "catching.py"
    script.write_text(SCRIPT_CATCHING_CTRL_C)   # no main guard, as users write it
    term = Terminal([str(script)])
    try:
        term.read_until(b"RUNNING")
        time.sleep(1.0)            # the map is under way when the person presses Ctrl-C
        os.write(term.fd, b"\x03")
        term.read_until(b"DONE")
        assert b"INTERRUPTED" in term.output and b"SUM 25" in term.output, term.output
        assert b"Traceback" not in term.output, term.output
        assert term.wait_exit() == 0
    finally:
        term.close()
