"""Process helpers for the tests: start minicw command lines, stop them by PID."""
import os
import re
import subprocess
import sys
import threading
import time

from minicw import config

PY = sys.executable
KEY = "test-key-0123456789abcdefghijklmnop"


def env_with_key(key=KEY, **extra):
    env = dict(os.environ)
    env["MINICW_AUTHKEY"] = key
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Proc:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, argv, env=None, stdin=subprocess.DEVNULL, **popen_options):
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=stdin, env=env, universal_newlines=True,
                                      **popen_options)
        self.pid = self.popen.pid
        self.out, self.err = [], []
        self._open_streams = 2
        self._changed = threading.Condition()
        for stream, sink in ((self.popen.stdout, self.out), (self.popen.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    def _pump(self, stream, sink):
        for line in stream:
            with self._changed:
                sink.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._open_streams -= 1
            self._changed.notify_all()

    def wait_for(self, pattern, timeout=30, stream="out"):
        """The first match of ``pattern`` in stdout (or stderr); AssertionError on timeout."""
        sink = self.out if stream == "out" else self.err
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in sink:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._open_streams:
                    raise AssertionError("no %r in %s of pid %d; out=%r err=%r" % (
                        pattern, stream, self.pid, self.out[-10:], self.err[-10:]))
                self._changed.wait(min(remaining, 0.2))

    def wait(self, timeout=30):
        return self.popen.wait(timeout)

    def stop(self, sig=None, timeout=15):
        """Signal (default SIGTERM), wait, then SIGKILL; returns the exit code."""
        if self.popen.poll() is None:
            if sig is None:
                self.popen.terminate()
            else:
                os.kill(self.pid, sig)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


def start_master(port=0, key=KEY, extra_args=(), env=None):
    """``python -m minicw.master`` on 127.0.0.1; returns (Proc, port)."""
    proc = Proc([PY, "-m", "minicw.master", "--host", "127.0.0.1", "--port", str(port)]
                + list(extra_args), env=env or env_with_key(key))
    match = proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
    return proc, int(match.group(1))


def start_worker(port, nprocs=1, key=KEY, extra_args=(), wait=True):
    """``python -m minicw.worker`` for the master on 127.0.0.1:port, with the start
    method the suite runs under (conftest.py; ``extra_args`` may override it)."""
    proc = Proc([PY, "-m", "minicw.worker", "127.0.0.1", str(port), "-", "-n", str(nprocs),
                 "--start-method", config.start_method()]
                + list(extra_args), env=env_with_key(key))
    if wait:
        proc.wait_for(r"joined 127\.0\.0\.1:%d" % port)
    return proc


def path_without_slurm(path=None):
    """$PATH without the directories that hold SLURM's sbatch.  Clients given no
    master ask SLURM for one when sbatch is there, and a SLURM installed but
    not running makes squeue take seconds to fail: tests of "no master
    anywhere" leave SLURM out, as on a laptop."""
    path = os.environ.get("PATH", "") if path is None else path
    return os.pathsep.join(entry for entry in path.split(os.pathsep)
                           if entry and not os.path.exists(os.path.join(entry, "sbatch")))


def no_master_env(run_dir, **extra):
    """os.environ for a child that finds no master: no $MINICW_MASTER, an empty
    run directory, no SLURM on its PATH, and this checkout first on its path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MINICW_RUN_DIR=str(run_dir), PATH=path_without_slurm(),
               PYTHONPATH=root)
    env.pop("MINICW_MASTER", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def pyenv_python(version):
    """The newest pyenv CPython ``version`` ("3.12") on this machine, or None."""
    import glob
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/%s.*/bin/python"
                                                % version)))
    return found[-1] if found else None


def run_client_script(python, script_path, source, timeout=300):
    """Write ``source`` to ``script_path`` and run it with ``python``, this
    checkout first on its path; the CompletedProcess (text)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script_path.write_text(source)
    return subprocess.run([python, str(script_path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          env=dict(os.environ, PYTHONPATH=root), timeout=timeout)


class Relay:
    """A loopback TCP relay to the master at ``target_port``.

    Its links can go silent for good without closing anything
    (``silence_existing()``): what a Wi-Fi drop, a laptop's lid or a NAT that
    forgot a link look like to both ends (no FIN, no RST); links made after
    that work (the network is back, the old links are dead).  With
    ``record=True`` it keeps every byte it forwards, both ways, in
    ``recorded`` (under ``lock``): what someone watching the network sees.
    """

    def __init__(self, target_port: int, record: bool = False):
        import socket
        self.target_port = target_port
        self.record = record
        self.recorded = bytearray()
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        self.links = []          # [silenced flag, inside socket, outside socket]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def silence_existing(self) -> int:
        for link in self.links:
            link[0] = True
        return len(self.links)

    def _accept(self):
        import socket
        while not self.closed.is_set():
            try:
                inside, _ = self.listener.accept()
            except OSError:
                continue
            outside = socket.create_connection(("127.0.0.1", self.target_port))
            link = [False, inside, outside]
            self.links.append(link)
            for sock in (inside, outside):
                sock.settimeout(0.1)
            for source, target in ((inside, outside), (outside, inside)):
                thread = threading.Thread(target=self._pump, args=(link, source, target),
                                          daemon=True)
                thread.start()
                self.threads.append(thread)

    def _pump(self, link, source, target):
        import socket
        while not self.closed.is_set():
            if link[0]:
                time.sleep(0.05)      # read nothing, send nothing, close nothing
                continue
            try:
                data = source.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                try:
                    target.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if self.record:
                with self.lock:
                    self.recorded += data
            try:
                target.sendall(data)
            except OSError:
                return

    def close(self):
        self.closed.set()
        self.listener.close()
        for _, inside, outside in self.links:
            inside.close()
            outside.close()
        for thread in self.threads:
            thread.join(5)
