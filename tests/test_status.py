"""Seeing the cluster from the command line: ``python -m minicw status`` (text,
JSON, --watch) against a real master, worker node and client, and the log
lines the master and a node write when a node joins, a job fails, a run
starts and ends, and a node is SIGKILLed.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from minicw import ClusterExecutor
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status_command(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "minicw", "status"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout,
                          env=env or helpers.env_with_key(PYTHONPATH=ROOT))


def sleepy(seconds):
    time.sleep(seconds)
    return seconds


def hold(seconds):
    """A function not timed before: each call goes in a chunk of its own."""
    time.sleep(seconds)


def fails(x):
    raise ValueError("on purpose %d" % x)


@pytest.fixture
def cluster():
    master, port = helpers.start_master(extra_args=["--heartbeat-timeout", "2"])
    worker = helpers.start_worker(port, nprocs=2)
    try:
        yield master, port, worker
    finally:
        worker.stop()
        master.stop()


def test_status_text_and_json_of_a_busy_cluster(cluster):
    master, port, worker = cluster
    address = "127.0.0.1:%d" % port
    with ClusterExecutor("127.0.0.1", port, helpers.KEY) as executor:
        assert list(executor.map(sleepy, [0.001] * 200)) == [0.001] * 200
        with pytest.raises(ValueError, match="on purpose 7"):
            executor.submit(fails, 7).result()
        running = [executor.submit(hold, 3) for _ in range(4)]   # 2 run, 2 wait
        time.sleep(0.5)

        text = status_command(address)
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0].startswith("minicw master %s, up " % address)
        assert lines[0].endswith(": 1 worker node (2 processes, 2 busy), 1 client")
        assert "; 200 done and 1 failed since the start" in lines[1]
        [node_line] = [line for line in lines if " pid %d " % worker.pid in line]
        assert node_line.split()[-6:-2] == ["2", "2", "200", "1"]   # procs, busy, done, failed
        [client_line] = [line for line in lines if " pid %d " % os.getpid() in line]
        queued, running_now, done, failed = map(int, client_line.split()[5:9])
        # running: held by a worker process (one may hold the next job as well)
        assert (queued + running_now, done, failed) == (4, 200, 1) and running_now >= 2
        assert "client 1  job " in text.stdout and "raised on %s: ValueError: on purpose 7" \
            % node_line.split()[1] in text.stdout

        document = json.loads(status_command(address, "--json").stdout)
        assert set(document) == {"master", "uptime_s", "throughput_1m", "jobs_done",
                                 "jobs_failed", "queued_chunks", "leased_chunks", "blobs",
                                 "nodes", "clients", "recent_failures"}
        [node] = document["nodes"]
        assert node["pid"] == worker.pid and node["processes"] == 2
        assert (node["busy_processes"], node["jobs_done"], node["jobs_failed"]) == (2, 200, 1)
        assert node["seen_s_ago"] < 3 and node["python"].startswith("CPython 3.")
        [client] = document["clients"]
        assert client["pid"] == os.getpid() and client["queued"] + client["running"] == 4
        assert document["jobs_done"] == 200 and document["throughput_1m"] > 0
        [failure] = document["recent_failures"]
        assert failure["kind"] == "raised" and failure["error"] == "ValueError: on purpose 7"
        assert "in fails" in failure["traceback"]
        for future in running:
            future.cancel()


def test_status_finds_the_key_and_says_what_is_wrong(cluster, tmp_path):
    master, port, worker = cluster
    key_file = tmp_path / "key"
    key_file.write_text(helpers.KEY)
    key_file.chmod(0o600)
    env = dict(os.environ, PYTHONPATH=ROOT, MINICW_MASTER="127.0.0.1:%d" % port)
    env.pop("MINICW_AUTHKEY", None)
    found = status_command("--authkey-file", str(key_file), env=env)   # address from the env
    assert found.returncode == 0 and "1 worker node (2 processes" in found.stdout
    wrong = status_command("127.0.0.1:%d" % port, env=dict(env, MINICW_AUTHKEY="wrong"))
    assert wrong.returncode == 1 and wrong.stdout == ""
    assert wrong.stderr.startswith("minicw status: ") and "key" in wrong.stderr
    assert len(wrong.stderr.splitlines()) == 1, wrong.stderr
    nobody = status_command("127.0.0.1:1")
    assert nobody.returncode == 1 and nobody.stderr.startswith("minicw status: ")
    assert "Traceback" not in wrong.stderr + nobody.stderr


def test_status_watch_repeats_until_ctrl_c(cluster):
    master, port, worker = cluster
    watching = helpers.Proc([sys.executable, "-m", "minicw", "status", "127.0.0.1:%d" % port,
                             "--watch", "0.3"], env=helpers.env_with_key(PYTHONPATH=ROOT))
    try:
        deadline = time.monotonic() + 30
        while sum(line.startswith("minicw master ") for line in watching.out) < 3:
            assert time.monotonic() < deadline, watching.err
            time.sleep(0.05)
        watching.popen.send_signal(signal.SIGINT)
        assert watching.wait(timeout=10) == 0
    finally:
        watching.stop()
    assert not watching.err


def test_the_master_and_the_node_log_what_happens(tmp_path):
    master, port = helpers.start_master(extra_args=["--heartbeat-timeout", "2"])
    worker = helpers.start_worker(port, nprocs=1)
    try:
        joined = master.wait_for(r"node (\S+) joined with 1 processes \(Python CPython 3",
                                 stream="err")
        node_id = joined.group(1)
        with ClusterExecutor("127.0.0.1", port, helpers.KEY) as executor:
            master.wait_for(r"client (\d+) connected from \S+ \(pid %d\)" % os.getpid(),
                            stream="err")
            assert executor.submit(sleepy, 0).result() == 0
            master.wait_for(r"client \d+ \(\S+, pid %d\) started a run" % os.getpid(),
                            stream="err")
            crash = executor.with_options(max_retries=0).submit(os._exit, 3)
            with pytest.raises(Exception, match="exit code 3"):
                crash.result(timeout=30)
            master.wait_for(r"job \d+/0 of client \d+ crashed on node %s: its process ended "
                            r"\(exit code 3\)" % node_id, stream="err")
            worker.wait_for(r"worker process 0 \(pid \d+\) ended: exit code 3", stream="err")
            master.wait_for(r"client \d+ ended its run: 2 jobs, 1 done, 1 failed, in ",
                            timeout=15, stream="err")
        master.wait_for(r"client \d+ ended its run|client \d+ closed its session", stream="err")
        worker.stop(signal.SIGKILL)
        master.wait_for(r"node %s missed its heartbeats for 2s; 0 leased jobs queued again"
                        % node_id, timeout=15, stream="err")
    finally:
        worker.stop()
        master.stop()
    assert not [line for line in master.out if "INFO" in line]   # logs go to stderr only


def test_python_m_minicw_lists_its_commands_and_runs_the_roles():
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "minicw"] + list(args), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT))
    bare = run()
    assert bare.returncode == 2
    for command in ("master", "worker", "status", "store"):
        assert "\n    %s " % command in bare.stdout
    master = run("master", "--help")
    assert master.returncode == 0 and "--heartbeat-timeout" in master.stdout
    assert "-v, --verbose" in master.stdout and "-q, --quiet" in master.stdout
    worker = run("worker", "--help")
    assert worker.returncode == 0 and "--nprocs" in worker.stdout
    unknown = run("nonsense")
    assert unknown.returncode == 2 and "invalid choice: 'nonsense'" in unknown.stderr
