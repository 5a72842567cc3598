"""Worker nodes under each start method (spawn, forkserver, fork), and how one is chosen.

A node started by ``launch.start_worker`` (as LocalCluster and MasterNode start
theirs) watches its stdin, its lifeline to the parent (``--exit-with-stdin``).
Under fork, every worker process is a copy of the node taken while that
watcher waits for input; these tests run jobs through such nodes, including a
worker process started later to replace one that died.
"""
import contextlib
import os

import pytest

from minicw import ClusterExecutor, LocalCluster, config, launch, launcher
from tests.helpers import KEY

JOBS_TIMEOUT_S = 60   # a generous bound, so that a deadlocked node fails the test instead of hanging it
MAKERS = {b"multiprocessing.spawn": "spawn", b"multiprocessing.forkserver": "forkserver",
          b"minicw.worker": "fork"}   # what a worker process's command line shows of its maker

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")


def _start_method_of_this_process(_=None):
    """A job: how its worker process was started, read from its command line (a
    forked process keeps its node's; forkserver's and spawn's name their module)."""
    with open("/proc/self/cmdline", "rb") as handle:
        cmdline = handle.read()
    return [method for marker, method in MAKERS.items() if marker in cmdline]


def _dies_once(marker):
    """Kill the worker process the first time (the node starts a replacement), then succeed."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return "survived"


@contextlib.contextmanager
def executor_for(address):
    """A ClusterExecutor that, when the block fails, does not wait for the jobs of a stuck node."""
    executor = ClusterExecutor(address[0], address[1], KEY)
    try:
        yield executor
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown()


@pytest.fixture
def master():
    child, address = launch.start_master("127.0.0.1", 0, KEY)
    yield address
    child.stop()


@needs_proc
@pytest.mark.parametrize("start_method", config.START_METHODS)
def test_a_launched_node_runs_jobs_under_each_start_method(master, start_method, tmp_path):
    node = launch.start_worker(master, KEY, nprocs=2, start_method=start_method)
    try:
        with executor_for(master) as executor:
            made = executor.submit(_start_method_of_this_process)
            assert made.result(JOBS_TIMEOUT_S) == [start_method]
            squares = executor.map(pow, range(200), [2] * 200, timeout=JOBS_TIMEOUT_S)
            assert list(squares) == [x * x for x in range(200)]
            replaced = executor.submit(_dies_once, str(tmp_path / "died"))
            assert replaced.result(JOBS_TIMEOUT_S) == "survived"
            made = executor.map(_start_method_of_this_process, range(4), timeout=JOBS_TIMEOUT_S)
            assert list(made) == [[start_method]] * 4   # the replacement too
    finally:
        node.stop()


@needs_proc
def test_the_environment_chooses_for_the_nodes_minicw_starts(monkeypatch):
    other = "forkserver" if config.start_method() != "forkserver" else "fork"
    monkeypatch.setenv(config.ENV_START_METHOD, other)
    with LocalCluster(n_workers=1) as cluster:
        with cluster.executor() as executor:
            made = executor.submit(_start_method_of_this_process)
            assert made.result(JOBS_TIMEOUT_S) == [other]


def test_start_method_precedence(monkeypatch):
    monkeypatch.delenv(config.ENV_START_METHOD, raising=False)
    assert config.start_method() == config.DEFAULT_START_METHOD == "spawn"
    monkeypatch.setenv(config.ENV_START_METHOD, "fork")
    assert config.start_method() == "fork"
    assert config.start_method("forkserver") == "forkserver"


def test_a_bad_start_method_is_refused_before_anything_starts(monkeypatch, tmp_path):
    monkeypatch.setenv(config.ENV_START_METHOD, "vfork")
    with pytest.raises(ValueError, match="MINICW_START_METHOD='vfork': use one of spawn, "
                                         "forkserver, fork"):
        launch.start_worker(("127.0.0.1", 1), KEY)
    with pytest.raises(ValueError, match="start_method='threads'"):
        launch.start_worker(("127.0.0.1", 1), KEY, start_method="threads")
    run_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="MINICW_START_METHOD"):
        launcher.local_start(1, run_dir=run_dir)
    assert not os.path.exists(os.path.join(run_dir, "master.json"))
