"""The core cluster end to end: REPL flow, command-line flow, LocalCluster, errors."""
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from minicw import MasterNode, LocalCluster, RemoteError
from minicw.errors import ArgsError, EnvirError, MinicwError
from tests.helpers import KEY, PY, Proc, start_master, start_worker

DOUBLE = "f = lambda x: x * 2"


def test_local_cluster_runs_envir_function(cluster):
    cluster.load_envir(DOUBLE, from_file=False)
    cluster.register_target_function("f")
    cluster.load_args(list(range(500)))
    assert cluster.execute() == {x: 2 * x for x in range(500)}


def test_hundred_thousand_args(cluster):
    cluster.load_envir("def square(x):\n    return x * x\n", from_file=False)
    cluster.register_target_function("square")
    cluster.load_args(range(100_000))
    result = cluster.execute()
    assert len(result) == 100_000
    assert all(result[x] == x * x for x in range(100_000))


def test_a_range_of_args_travels_as_ranges(cluster):
    # Its chunks are ranges on the wire (a few bytes each), and the results
    # are keyed by its ints as for a list.
    from minicw import master_node, protocol
    args = range(10, 5010, 5)
    assert master_node.check_args(args) is args
    payload = protocol.pack_payload(protocol.CALL_ONE, args[:1000])
    assert len(payload) < 200
    assert pickle.loads(payload) == (protocol.CALL_ONE, range(10, 5010, 5))
    cluster.load_envir("def square(x):\n    return x * x\n", from_file=False)
    cluster.register_target_function("square")
    cluster.load_args(args)
    assert cluster.execute() == {x: x * x for x in args}


def test_list_workers_reports_the_node(cluster):
    [node] = cluster.list_workers()
    assert node["nprocs"] == 2
    assert node["busy"] is False
    assert node["hostname"] and node["pid"] > 0
    assert node["python"].endswith("%d.%d.%d" % sys.version_info[:3])


def test_environment_change_between_runs_takes_effect(cluster):
    cluster.load_envir("def g(x):\n    return x + 1\n", from_file=False)
    cluster.register_target_function("g")
    cluster.load_args([1, 2, 3])
    assert cluster.execute() == {1: 2, 2: 3, 3: 4}
    cluster.load_envir("def g(x):\n    return x - 1\n", from_file=False)
    cluster.register_target_function("g")
    assert cluster.execute() == {1: 0, 2: 1, 3: 2}


def test_remote_error_names_type_message_arg_and_traceback(cluster):
    cluster.load_envir(textwrap.dedent("""
        def pick(x):
            if x == 7:
                raise KeyError("no seven here")
            return x
    """), from_file=False)
    cluster.register_target_function("pick")
    cluster.load_args(list(range(20)))
    with pytest.raises(RemoteError) as caught:
        cluster.execute()
    error = caught.value
    assert error.type_name == "KeyError"
    assert "no seven here" in error.message
    assert error.arg == 7
    assert "raise KeyError" in error.remote_traceback
    assert isinstance(error.exception, KeyError)
    assert "arg 7" in str(error)
    # The cluster stays usable.
    cluster.load_args([1, 2])
    assert cluster.execute() == {1: 1, 2: 2}


def test_unpicklable_exception_still_reported(cluster):
    cluster.load_envir(textwrap.dedent("""
        import threading
        class Odd(Exception):
            def __init__(self):
                super().__init__("odd")
                self.lock = threading.Lock()
        def boom(x):
            raise Odd()
    """), from_file=False)
    cluster.register_target_function("boom")
    cluster.load_args([1])
    with pytest.raises(RemoteError) as caught:
        cluster.execute()
    assert caught.value.type_name.endswith("Odd")
    assert caught.value.exception is None


def test_envir_classes_pickle_back_to_the_client(cluster):
    cluster.load_envir(textwrap.dedent("""
        class Point:
            def __init__(self, x):
                self.x = x
        def make(x):
            return Point(x)
    """), from_file=False)
    cluster.register_target_function("make")
    cluster.load_args([3, 4])
    result = cluster.execute()
    assert result[3].x == 3 and type(result[4]).__name__ == "Point"


def test_envir_from_file(cluster, tmp_path):
    path = tmp_path / "envir.py"
    path.write_text("import math\ndef root(x):\n    return math.isqrt(x)\n")
    cluster.load_envir(str(path))
    cluster.register_target_function("root")
    cluster.load_args([16, 81])
    assert cluster.execute() == {16: 4, 81: 9}


def test_missing_target_function_is_named(cluster):
    cluster.load_envir(DOUBLE, from_file=False)
    with pytest.raises(EnvirError, match="'nope'"):
        cluster.register_target_function("nope")
    cluster.load_envir("value = 3", from_file=False)
    with pytest.raises(EnvirError, match="'value' .* not a callable"):
        cluster.register_target_function("value")


def test_bad_envir_is_reported(cluster, tmp_path):
    with pytest.raises(EnvirError, match="line 1"):
        cluster.load_envir("def broken(:\n", from_file=False)
    with pytest.raises(EnvirError, match="cannot read environment file"):
        cluster.load_envir(str(tmp_path / "missing.py"))


def test_bad_args_rejected_before_sending(cluster):
    with pytest.raises(ArgsError, match="more than once"):
        cluster.load_args([1, 2, 1])
    with pytest.raises(ArgsError, match="unhashable"):
        cluster.load_args([[1], [2]])
    with pytest.raises(ArgsError, match="list of arguments"):
        cluster.load_args(5)


def test_multi_argument_tuples(cluster):
    cluster.load_envir("f = lambda x: x[0] + x[1]", from_file=False)
    cluster.register_target_function("f")
    cluster.load_args([(1, 2), (3, 4), (5, 6), (7, 8)])
    assert cluster.execute() == {(1, 2): 3, (3, 4): 7, (5, 6): 11, (7, 8): 15}


def test_cluster_address_lets_other_processes_join(cluster):
    host, port = cluster.address
    worker = start_worker(port, key=cluster.authkey.decode())
    try:
        assert len(cluster.list_workers()) == 2
    finally:
        assert worker.stop() == 0
    assert len(cluster.list_workers()) == 1


def test_repl_flow_master_node_and_worker_node_process():
    master = MasterNode(HOST="127.0.0.1", PORT=0, AUTHKEY="repl-key")
    master.start_master_server(if_join_as_worker=False)
    host, port = master.address
    script = textwrap.dedent("""
        import threading
        from minicw import WorkerNode
        worker = WorkerNode(%r, %d, "repl-key", nprocs=1)
        def announce():
            if worker.wait_registered(30):
                print("registered", flush=True)
        threading.Thread(target=announce, daemon=True).start()
        worker.join_cluster()
    """ % (host, port))
    worker = Proc([PY, "-c", script])
    try:
        worker.wait_for("registered")
        assert len(master.list_workers()) == 1
        master.load_envir(DOUBLE, from_file=False)
        master.register_target_function("f")
        master.load_args(list(range(100)))
        assert master.execute() == {x: 2 * x for x in range(100)}
    finally:
        master.shutdown()
        # The master's shutdown tells the worker node, which then returns.
        assert worker.wait(20) == 0


def test_master_node_join_and_stop_as_worker(monkeypatch, caplog):
    monkeypatch.setenv("MINICW_NO_WORKER_WARNING_S", "0.3")
    master = MasterNode(HOST="127.0.0.1", PORT=0)
    try:
        master.start_master_server()
        assert len(master.list_workers()) == 1
        master.stop_as_worker()
        assert master.list_workers() == []
        master.load_envir(DOUBLE, from_file=False)
        master.register_target_function("f")
        master.load_args([1])
        results = []
        waiting = threading.Thread(target=lambda: results.append(master.execute()))
        waiting.start()          # no worker node: execute() waits, and says so once
        deadline = time.monotonic() + 30
        said = "no worker node is connected to the master at 127.0.0.1:%d" % master.PORT
        while said not in caplog.text:
            assert time.monotonic() < deadline and waiting.is_alive(), caplog.text
            time.sleep(0.05)
        master.join_as_worker(nprocs=1)     # a node joins: the run finishes
        waiting.join(30)
        assert results == [{1: 2}] and caplog.text.count(said) == 1
        assert master.execute() == {1: 2}
    finally:
        master.shutdown()


def test_cli_flow_master_and_two_workers():
    master, port = start_master()
    workers = []
    try:
        workers = [start_worker(port), start_worker(port)]
        node = MasterNode(HOST="127.0.0.1", PORT=port, AUTHKEY=KEY).connect()
        try:
            assert sorted(w["pid"] for w in node.list_workers()) == sorted(
                w.pid for w in workers)
            node.load_envir(DOUBLE, from_file=False)
            node.register_target_function("f")
            node.load_args(list(range(5000)))
            assert node.execute() == {x: 2 * x for x in range(5000)}
            done = [w["jobs_done"] for w in node.list_workers()]
            assert sum(done) == 5000
        finally:
            node.shutdown()
        # SIGTERM shuts the master down cleanly and the workers say so.
        assert master.stop(signal.SIGTERM) == 0
        for worker in workers:
            assert worker.wait(20) == 0
            worker.wait_for("master at 127.0.0.1:%d shut down" % port, stream="err")
    finally:
        for proc in workers + [master]:
            proc.stop()


def test_master_generates_and_prints_a_key_once():
    env = dict(os.environ)
    env.pop("MINICW_AUTHKEY", None)
    master, port = start_master(env=env)
    try:
        key = master.wait_for(r"authkey \(generated, shown once\): (\S+)").group(1)
        assert len(key) >= 32
        worker = start_worker(port, key=key)
        assert worker.stop() == 0
        assert sum(1 for line in master.out if key in line) == 1
    finally:
        assert master.stop(signal.SIGINT) == 0


def test_import_has_no_side_effects():
    code = ("import threading, minicw; "
            "assert threading.active_count() == 1; "
            "import multiprocessing; assert not multiprocessing.active_children()")
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_local_cluster_cleans_up_when_body_raises():
    with pytest.raises(ZeroDivisionError):
        with LocalCluster(n_workers=1) as running:
            pids = [running._master_process.pid, running._worker_process.pid]
            1 / 0
    for pid in pids:
        with pytest.raises(OSError):
            os.kill(pid, 0)


ANCESTOR_SCRIPT = '''
from minicw import MasterNode

your_host = "127.0.0.1"
your_port = %d
your_authkey = "ancestor-key"

master = MasterNode(HOST = your_host, PORT = your_port, AUTHKEY = your_authkey)
master.start_master_server()

envir_statement = """
from random import random
example_pi_estimate_throw = lambda x: 1 if (random() * 2 - 1)**2 + (random() * 2 - 1)**2 < 1 else 0
"""
master.load_envir(envir_statement, from_file = False)
master.register_target_function("example_pi_estimate_throw")

N = int(1e5)
master.load_args(range(N))
result = master.execute()
print("Pi is roughly %%f" %% (4.0 * sum([x2 for x1, x2 in result.items()]) / N))
master.shutdown()
'''


def test_ancestor_usage_runs_unchanged_as_a_script(tmp_path):
    """The minimalcluster README, module-level code and no __main__ guard."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "ancestor.py"
    script.write_text(ANCESTOR_SCRIPT % port)
    done = subprocess.run([PY, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    estimate = float(done.stdout.split("roughly")[1])
    assert abs(estimate - 3.1416) < 0.05


def test_args_travel_through_the_closure_serializer(cluster):
    offset = 10
    cluster.load_envir("call = lambda pair: pair[0](pair[1])", from_file=False)
    cluster.register_target_function("call")
    add = lambda v: v + offset  # noqa: E731 - a closure the workers cannot import
    cluster.load_args([(add, 1), (add, 2)])
    assert cluster.execute() == {(add, 1): 11, (add, 2): 12}


def test_list_workers_records_are_the_ancestors_tuples_with_names(cluster):
    # minimalcluster documents (hostname, number of processes, pid, busy 1/0).
    [node] = cluster.list_workers()
    hostname, nprocs, pid, busy = node[:4]
    assert (hostname, nprocs, busy) == (socket.gethostname(), 2, False)
    assert pid == node.pid and pid != os.getpid()
    assert node.nprocs == node["nprocs"] == 2
    assert node.python.endswith("%d.%d.%d" % sys.version_info[:3])
    assert node.start_method in ("spawn", "forkserver", "fork") and node.platform
    assert node.node_id.startswith(hostname) and node.busy_processes == 0


def test_start_master_server_replaces_a_master_that_died():
    master = MasterNode(HOST="127.0.0.1", PORT=0, AUTHKEY=KEY)
    master.start_master_server(nprocs=1)
    try:
        with pytest.raises(MinicwError, match="already running"):
            master.start_master_server(nprocs=1)
        first = master._master_process
        port = master.PORT
        os.kill(first.pid, signal.SIGKILL)
        first.popen.wait(30)
        master.start_master_server(nprocs=1)
        assert master._master_process.pid != first.pid and master.PORT == port
        master.load_envir("def f(x):\n    return -x\n", from_file=False)
        master.register_target_function("f")
        master.load_args([1, 2, 3])
        assert master.execute() == {1: -1, 2: -2, 3: -3}
    finally:
        master.shutdown()
