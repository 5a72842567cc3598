"""A lab with more than one Python: the client's sys.path replayed on a worker of
another version, and paths written for another operating system."""
import glob
import os
import sys

import pytest

from helpers import KEY, PY, Proc, env_with_key, start_master
from minicw import MasterNode, context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _other_python():
    """A CPython of another major.minor on this machine (pyenv's builds), or None."""
    this = "%d.%d" % sys.version_info[:2]
    for version in ("3.12", "3.11", "3.13", "3.10"):
        if version == this:
            continue
        found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/%s.*/bin/python"
                                                    % version)))
        if found:
            return found[-1], version
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
