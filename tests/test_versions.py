"""A lab with more than one Python: the client's sys.path replayed on a worker of
another version, and paths written for another operating system."""
import os
import subprocess
import sys

import pytest

from helpers import (KEY, PY, Proc, env_with_key, pyenv_python, run_client_script,
                     start_master)
from minicw import MasterNode, context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _other_python():
    """A CPython of another major.minor on this machine (pyenv's builds), or None."""
    this = "%d.%d" % sys.version_info[:2]
    for version in ("3.12", "3.11", "3.13", "3.10"):
        python = pyenv_python(version) if version != this else None
        if python:
            return python, version
    return None, None


def test_entries_of_another_versions_installation_are_not_replayed(tmp_path):
    installation = tmp_path / "python3.99"
    stdlib = installation / "lib" / "python3.99"
    project = tmp_path / "project"
    stdlib.mkdir(parents=True)
    project.mkdir()
    job_context = context.JobContext(str(project), [str(stdlib), str(project)],
                                     "cpython-3.99", (str(installation),))
    assert job_context.entries == [str(project)]
    [note] = job_context.notes
    assert "cpython-3.99" in note and context.python_tag() in note and str(stdlib) in note
    same = context.JobContext(None, [str(stdlib)], context.python_tag(),
                              (str(installation),))
    assert same.entries == [str(stdlib)] and same.notes == []   # same version: kept


def test_paths_of_the_other_operating_system_are_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    windows = "C:\\Users\\x\\proj"
    os.mkdir(windows)      # a legal relative name on POSIX: it must not be entered
    job_context = context.JobContext(windows, [windows, str(tmp_path)])
    assert job_context.cwd is None and job_context.entries == [str(tmp_path)]
    assert len(job_context.notes) == 2
    assert all("another operating system" in note for note in job_context.notes)
    assert context.other_family("\\\\server\\share\\x") and not context.other_family("/srv")


def test_a_worker_of_another_version_imports_its_own_standard_library():
    python, version = _other_python()
    if python is None:
        pytest.skip("no CPython of another version on this machine")
    master, port = start_master()
    node = Proc([python, "-m", "minicw.worker", "127.0.0.1", str(port), "-", "-n", "1"],
                env=env_with_key())
    client = MasterNode(HOST="127.0.0.1", PORT=port, AUTHKEY=KEY).connect()
    try:
        node.wait_for(r"joined 127\.0\.0\.1:%d" % port)
        client.load_envir("import fractions, sqlite3, sys\n"
                          "def where(x):\n"
                          "    return fractions.__file__, '%d.%d' % sys.version_info[:2]\n",
                          from_file=False)
        client.register_target_function("where")
        client.load_args([1])
        with pytest.warns(RuntimeWarning, match="the client runs %s.* are not used here"
                          % context.python_tag()):
            fractions_file, worker_version = client.execute()[1]
        assert worker_version == version
        assert "python%s" % version in fractions_file, fractions_file
    finally:
        client.shutdown()
        node.stop()
        master.stop()


def test_exit_codes_of_windows_crashes_are_named():
    from minicw.node import describe_exit
    assert describe_exit(3221225477) == ("exit code 0xC0000005 (STATUS_ACCESS_VIOLATION: an "
                                         "invalid memory access, like SIGSEGV)")
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by signal SIGKILL"


def test_waiting_on_more_objects_than_windows_takes_at_once():
    # WaitForMultipleObjects' limit cannot be met on Linux: the batching it needs
    # runs here with a limit of 3 instead (a stand-in for Windows' 63).
    from multiprocessing import Pipe
    from minicw.node import wait_any
    pipes = [Pipe(duplex=False) for _ in range(8)]
    readers = [reader for reader, _ in pipes]
    try:
        assert wait_any(readers, 0.05, batch_max=3) == []
        pipes[7][1].send_bytes(b"!")          # in the last batch
        assert wait_any(readers, 5, batch_max=3) == [readers[7]]
        pipes[7][0].recv_bytes()
        pipes[1][1].send_bytes(b"!")          # in the batch that is waited on
        assert wait_any(readers, 5, batch_max=3) == [readers[1]]
    finally:
        for reader, writer in pipes:
            reader.close()
            writer.close()


def test_the_platform_is_described_without_asking_the_system_slowly():
    from minicw.node import describe_platform
    system = os.uname()
    assert describe_platform() == "%s-%s-%s" % (system.sysname, system.release, system.machine)


def _version_of_worker(x):
    import sys
    return x, "%d.%d" % sys.version_info[:2]


@pytest.mark.filterwarnings("ignore:the client runs .* are not used here")
def test_a_mixed_version_cluster_routes_bytecode_to_its_own_python(monkeypatch):
    this = "%d.%d" % sys.version_info[:2]
    other, other_version = _other_python()
    if other is None:
        pytest.skip("no CPython of another version on this machine")
    master, port = start_master()
    nodes = [Proc([python, "-m", "minicw.worker", "127.0.0.1", str(port), "-", "-n", "1"],
                  env=env_with_key()) for python in (PY, other)]
    from minicw import ClusterExecutor
    executor = ClusterExecutor("127.0.0.1", port, KEY)
    envir = MasterNode(HOST="127.0.0.1", PORT=port, AUTHKEY=KEY).connect()
    try:
        for node in nodes:
            node.wait_for(r"joined 127\.0\.0\.1:%d" % port)
        # By value (defined in this test module's namespace as a closure): this Python only.
        offset = 1000
        results = list(executor.map(lambda x: _version_of_worker(x + offset), range(200),
                                    timeout=120))
        assert [x for x, _ in results] == list(range(1000, 1200))
        assert {version for _, version in results} == {this}
        by_python = {node.python.split()[1].rsplit(".", 1)[0]: node
                     for node in executor.list_workers()}
        assert by_python[other_version].jobs_done == 0
        # From an environment source: any Python runs it; both nodes take some.
        envir.load_envir("import sys, time\ndef f(x):\n    time.sleep(0.02)\n"
                         "    return x, '%d.%d' % sys.version_info[:2]\n", from_file=False)
        envir.register_target_function("f")
        envir.load_args(range(60))
        done = envir.execute()
        assert {x: result[0] for x, result in done.items()} == {x: x for x in range(60)}
        assert {result[1] for result in done.values()} == {this, other_version}
    finally:
        executor.shutdown()
        envir.shutdown()
        for node in nodes:
            node.stop()
        master.stop()


CLIENT_OF_ANOTHER_PYTHON = """
import time
from minicw import ClusterExecutor, NoMatchingPythonError
executor = ClusterExecutor("127.0.0.1", {port}, {key!r})
started = time.monotonic()
future = executor.submit(lambda x: x + 1, 1)
try:
    future.result(60)
except NoMatchingPythonError as exc:
    print("ERROR", exc)
    print("WAITED %.1f" % (time.monotonic() - started))
executor.shutdown()
"""


def test_a_client_whose_python_no_node_runs_gets_one_clear_error(tmp_path):
    lone = pyenv_python("3.13") if sys.version_info[:2] != (3, 13) else pyenv_python("3.12")
    if lone is None:
        pytest.skip("no CPython of a third version on this machine")
    master, port = start_master(env=dict(env_with_key(), MINICW_PYTHON_GRACE_S="1"))
    node = Proc([PY, "-m", "minicw.worker", "127.0.0.1", str(port), "-", "-n", "1"],
                env=env_with_key())
    try:
        node.wait_for(r"joined 127\.0\.0\.1:%d" % port)
        done = run_client_script(lone, tmp_path / "client.py",
                                 CLIENT_OF_ANOTHER_PYTHON.format(port=port, key=KEY))
        assert done.returncode == 0, done.stderr
        [error] = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
        lone_version = subprocess.run([lone, "-c", "import sys; print('%d.%d' % "
                                       "sys.version_info[:2])"], stdout=subprocess.PIPE,
                                      universal_newlines=True).stdout.strip()
        assert "needs a worker node running CPython %s" % lone_version in error
        assert "CPython %d.%d" % sys.version_info[:2] in error   # the node that is there
        assert "WAITED" in done.stdout
    finally:
        node.stop()
        master.stop()
