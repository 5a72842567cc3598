"""Shared fixtures: short timeouts, and a check that no test leaves a process or port behind.

The worker nodes the tests start run their processes under the start method
named by $MINICW_START_METHOD (spawn, forkserver or fork; default spawn), as
a user's would (config.start_method): ``MINICW_START_METHOD=fork pytest``
runs the suite under fork.  The header of pytest's report names it.

The check walks /proc (Linux only; elsewhere it is skipped): every process
descended from this pytest process, and every listening TCP socket held by
this process or a descendant, must be gone when a test ends.  A leftover is
killed (by PID) so it cannot spoil later tests, and the test fails.
"""
import os
import signal
import sys
import time

import pytest

# Short liveness timeouts for every master the tests start (children inherit it).
os.environ.setdefault("MINICW_HEARTBEAT_TIMEOUT_S", "3")
os.environ.setdefault("MINICW_RECONNECT_TIMEOUT_S", "5")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Children started by the tests import minicw from this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

from minicw import config as minicw_config  # noqa: E402  (once sys.path holds this checkout)

START_METHOD = minicw_config.start_method()  # a bad $MINICW_START_METHOD stops the run here


def pytest_report_header(config):
    return "minicw worker nodes start their processes with %s ($%s)" % (
        START_METHOD, minicw_config.ENV_START_METHOD)

HAVE_PROC = os.path.isdir("/proc/self/fd")

if HAVE_PROC:
    # multiprocessing starts one helper per process on first spawn and keeps
    # it for the session; start it now so that it is never counted as a leak.
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()
    _TRACKER_PID = resource_tracker._resource_tracker._pid
else:
    _TRACKER_PID = None
LEAK_GRACE_S = 10.0


def _parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # a zombie holds nothing; its parent reaps it
    return int(fields[1])


def descendants(root=None):
    """PIDs of live processes below ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            parent = _parent_of(int(name))
            if parent is not None:
                children.setdefault(parent, []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return set(found)


def _socket_inodes(pid):
    inodes = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def listening_ports(pids):
    """Ports of listening TCP sockets held by any of ``pids``."""
    inodes = set()
    for pid in pids:
        inodes |= _socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def _wait_gone(before_pids, before_ports):
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        # A process that a fixture's long-lived process started (a worker node
        # replacing a killed worker process) is that fixture's business.
        pids = {pid for pid in descendants() - before_pids
                if _parent_of(pid) not in before_pids}
        ports = listening_ports(pids | {os.getpid()}) - before_ports
        if (not pids and not ports) or time.monotonic() > deadline:
            return pids, ports
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_leftovers():
    """Fail a test that leaves a process or a listening port behind."""
    if not HAVE_PROC:
        yield
        return
    before_pids = descendants()
    before_ports = listening_ports(before_pids | {os.getpid()})
    yield
    pids, ports = _wait_gone(before_pids, before_ports)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not pids, "test left processes running: %s" % sorted(pids)
    assert not ports, "test left ports listening: %s" % sorted(ports)


def pytest_sessionfinish(session, exitstatus):
    if HAVE_PROC:
        left = descendants() - {_TRACKER_PID}
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if left:
            print("\nconftest: killed leftover processes %s" % sorted(left), file=sys.stderr)
            session.exitstatus = 1


@pytest.fixture
def master():
    """A Master in this process on 127.0.0.1, a free port, a 3 s heartbeat timeout."""
    from minicw.master import Master
    from tests.helpers import KEY
    running = Master("127.0.0.1", 0, KEY, heartbeat_timeout_s=3)
    running.start()
    yield running
    running.shutdown()


@pytest.fixture(scope="module")
def no_master(tmp_path_factory):
    """Nothing names a master (no $MINICW_MASTER, an empty run directory, no
    SLURM on the PATH): each Pool starts a LocalCluster of its own."""
    from tests.helpers import path_without_slurm
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MINICW_MASTER", raising=False)
        patch.setenv("MINICW_RUN_DIR", str(tmp_path_factory.mktemp("run")))
        patch.setenv("PATH", path_without_slurm())
        yield


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes, shared by the tests of a module (a
    module that needs another cluster defines its own ``cluster``)."""
    from minicw import LocalCluster
    with LocalCluster(n_workers=2) as running:
        yield running


@pytest.fixture
def executor(cluster):
    """A ClusterExecutor on ``cluster``, shut down after the test."""
    with cluster.executor() as running:
        yield running
