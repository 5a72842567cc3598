"""minicw the way a lab runs it: the ancestors' lines pasted into scripts with
no ``if __name__ == "__main__":`` guard, run as ``python script.py``, and
processes started in the order people start them."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import KEY, PY, Proc, env_with_key, start_master, start_worker
from minicw import ClusterExecutor

START_METHODS = ["spawn", "forkserver"]


def _script(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def _nodes(executor):
    return executor.list_workers()


def _wait_nodes(executor, count, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while len(_nodes(executor)) != count:
        assert time.monotonic() < deadline, "nodes: %r" % (_nodes(executor),)
        time.sleep(0.05)


def _square(x):
    return x * x


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_worker_node_script_without_a_main_guard(tmp_path, start_method):
    # The minimalcluster README's worker lines at the top level of worker.py.
    master, port = start_master()
    script = _script(tmp_path, "worker.py", """
        from minicw import WorkerNode
        WorkerNode("127.0.0.1", %d, %r, nprocs=2, start_method=%r).join_cluster()
        """ % (port, KEY, start_method))
    worker = Proc([PY, script], env=env_with_key(), stdin=subprocess.DEVNULL)
    try:
        executor = ClusterExecutor("127.0.0.1", port, KEY)
        try:
            _wait_nodes(executor, 1)
            assert list(executor.map(_square, range(50), timeout=60)) == [x * x for x in range(50)]
            [node] = _nodes(executor)   # one node: its processes did not run the script
            assert node["nprocs"] == 2 and node["jobs_done"] == 50
        finally:
            executor.shutdown()
        assert not any("bootstrapping phase" in line for line in worker.err), worker.err[-5:]
    finally:
        worker.stop()
        master.stop()


def test_a_master_node_script_without_a_main_guard(tmp_path):
    # The minimalcluster README's master lines, with its own local worker node.
    script = _script(tmp_path, "master.py", """
        from minicw import MasterNode
        master = MasterNode(HOST="127.0.0.1", PORT=0, AUTHKEY=%r)
        master.start_master_server(nprocs=2)
        master.load_envir("def f(x):\\n    return x + 1\\n", from_file=False)
        master.register_target_function("f")
        master.load_args(range(30))
        result = master.execute()
        print("NODES", len(master.list_workers()), "SUM", sum(result.values()))
        master.shutdown()
        """ % KEY)
    done = subprocess.run([PY, script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env_with_key(), timeout=120,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "NODES 1 SUM 465" in done.stdout


def _free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_worker_started_before_its_master_waits_and_joins():
    port = _free_port()
    worker = start_worker(port, nprocs=2, wait=False)   # the master is not up yet
    master = None
    try:
        worker.wait_for(r"waiting for the master at 127\.0\.0\.1:%d" % port, stream="err")
        assert worker.popen.poll() is None
        master, _ = start_master(port=port)
        worker.wait_for(r"joined 127\.0\.0\.1:%d" % port)
        executor = ClusterExecutor("127.0.0.1", port, KEY)
        try:
            assert sum(executor.map(_square, range(20), timeout=60)) == 2470
        finally:
            executor.shutdown()
        said = [line for line in worker.err if "waiting for the master" in line]
        assert len(said) == 1, worker.err   # said once, not at every try
    finally:
        worker.stop()
        if master is not None:
            master.stop()



def test_jobs_sent_before_any_worker_node_wait_and_say_so_once(monkeypatch, caplog):
    monkeypatch.setenv("MINICW_NO_WORKER_WARNING_S", "0.3")
    master, port = start_master()
    worker = None
    try:
        executor = ClusterExecutor("127.0.0.1", port, KEY)
        try:
            future = executor.submit(_square, 7)
            squares = executor.map(_square, range(10))
            said = "no worker node is connected to the master at 127.0.0.1:%d" % port
            deadline = time.monotonic() + 30
            while said not in caplog.text:
                assert time.monotonic() < deadline and not future.done(), caplog.text
                time.sleep(0.05)
            worker = start_worker(port, nprocs=2)
            assert future.result(60) == 49
            assert list(squares) == [x * x for x in range(10)]
            assert caplog.text.count(said) == 1
        finally:
            executor.shutdown()
    finally:
        if worker is not None:
            worker.stop()
        master.stop()


def test_more_processes_than_cpus_are_capped_unless_asked_for_on_purpose(caplog):
    from minicw import WorkerNode
    cpus = os.cpu_count() or 1
    capped = WorkerNode("127.0.0.1", 1, KEY, nprocs=cpus + 2)
    assert capped.nprocs == cpus
    assert "--oversubscribe" in caplog.text and "oversubscribe=True" in caplog.text
    assert WorkerNode("127.0.0.1", 1, KEY, nprocs=cpus + 2, oversubscribe=True).nprocs == cpus + 2


def test_a_local_cluster_oversubscribes_only_on_purpose(caplog):
    from minicw import LocalCluster
    cpus = os.cpu_count() or 1
    with LocalCluster(n_workers=cpus + 1) as capped:
        assert [node.nprocs for node in capped.list_workers()] == [cpus]
    assert "oversubscribe=True" in caplog.text   # the node's warning, forwarded
    with LocalCluster(n_workers=cpus + 1, oversubscribe=True) as asked:
        assert [node.nprocs for node in asked.list_workers()] == [cpus + 1]


SCRIPT_CLIENTS = """
from minicw import LocalCluster
cluster = LocalCluster(n_workers=2).start()
executor = cluster.executor()
print("MAP", sum(executor.map(lambda x: x + 1, range(100))), flush=True)
executor.shutdown()
got = []
def callback(jobid, result):
    got.append(result)
thread = cluster.client_thread(callback)
thread.start()
for x in range(20):
    thread.submit(abs, -x)
thread.wait()
thread.stop()
print("CALLBACKS", sum(got), flush=True)
print("NODES", len(cluster.list_workers()), flush=True)
cluster.shutdown()
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_client_scripts_without_a_main_guard(tmp_path, start_method):
    script = _script(tmp_path, "clients.py", SCRIPT_CLIENTS)
    env = dict(env_with_key(), MINICW_START_METHOD=start_method)
    done = subprocess.run([PY, script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, timeout=120, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "MAP 5050" in done.stdout and "CALLBACKS 190" in done.stdout
    assert "NODES 1" in done.stdout, done.stdout
