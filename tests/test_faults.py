"""Fault tolerance, each failure caused for real: worker nodes killed or frozen,
jobs that kill their process or overrun, clients killed or interrupted, the
master killed and restarted, orderly shutdowns.

Every scenario checks complete and exact results (counts and values) and
stops every process it started by PID.  Heartbeat and reconnect timeouts are
short (conftest: MINICW_HEARTBEAT_TIMEOUT_S=3, MINICW_RECONNECT_TIMEOUT_S=5,
raised here where a restart needs longer).
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import CancelledError
from itertools import repeat

import pytest

from minicw import (
    ClusterExecutor, ClusterShutdownError, WorkerCrashedError, chunking, config,
)
from tests.helpers import KEY, PY, Proc, start_master, start_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slow_square(x):
    time.sleep(0.0005)
    return x * x


def crash_with(how):
    if how == "exit":
        os._exit(3)
    if how == "segfault":
        import ctypes
        ctypes.string_at(0)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


def crash_first_time(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return "second attempt"


def exit_at(x, crash_x):
    """x, except at ``crash_x``, where the process exits."""
    if x == crash_x:
        os._exit(3)
    return x


def nap_at(x, nap_x, marker):
    """x, except at ``nap_x``, which says so in ``marker`` and sleeps."""
    if x == nap_x:
        open(marker, "w").close()
        time.sleep(600)
    return x


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def logged_nap(path, i):
    with open(path, "a") as handle:
        handle.write("%d\n" % i)
    time.sleep(0.01)
    return i


@pytest.fixture
def master_and_two_nodes():
    master, port = start_master()
    nodes = [start_worker(port, nprocs=1) for _ in range(2)]
    try:
        yield master, port, nodes
    finally:
        for proc in nodes + [master]:
            proc.stop(signal.SIGKILL)


def client_done_count(executor):
    mine = [c for c in executor.status()["clients"] if c["done"] or c["running"] or c["queued"]]
    return mine


# --- worker nodes come and go ------------------------------------------------------------

def test_sigkill_of_a_worker_node_mid_run_loses_and_repeats_nothing(master_and_two_nodes):
    master, port, nodes = master_and_two_nodes
    with ClusterExecutor("127.0.0.1", port, KEY) as executor:
        results = []
        for i, value in enumerate(executor.map(slow_square, range(10_000))):
            results.append(value)
            if i == 2_000:
                nodes[0].stop(signal.SIGKILL)
        assert results == [i * i for i in range(10_000)]
        [client] = executor.status()["clients"]
        assert client["done"] == 10_000 and client["failed"] == 0
        assert len(executor.list_workers()) == 1


def test_frozen_node_is_declared_dead_and_its_late_results_are_dropped(master_and_two_nodes):
    master, port, nodes = master_and_two_nodes
    frozen = nodes[0]
    with ClusterExecutor("127.0.0.1", port, KEY) as executor:
        results = []
        try:
            for i, value in enumerate(executor.map(slow_square, range(10_000))):
                results.append(value)
                if i == 2_000:
                    # A frozen machine: the node and its process stop at once.
                    for pid in [frozen.pid] + _children(frozen.pid):
                        os.kill(pid, signal.SIGSTOP)
        finally:
            for pid in [frozen.pid] + _children(frozen.pid):
                os.kill(pid, signal.SIGCONT)
        assert results == [i * i for i in range(10_000)]
        # The node wakes up, its late reports are refused, it registers again.
        deadline = time.monotonic() + 20
        while len(executor.list_workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(executor.list_workers()) == 2
        [client] = executor.status()["clients"]
        assert client["done"] == 10_000 and client["failed"] == 0
        assert list(executor.map(slow_square, range(500))) == [i * i for i in range(500)]


def _children(pid):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except OSError:
                pass
    return found


def test_sigterm_to_a_worker_node_drains_its_jobs(master_and_two_nodes):
    master, port, nodes = master_and_two_nodes
    with ClusterExecutor("127.0.0.1", port, KEY) as executor:
        results = []
        for i, value in enumerate(executor.map(slow_square, range(5_000))):
            results.append(value)
            if i == 1_000:
                nodes[0].popen.send_signal(signal.SIGTERM)
        assert results == [i * i for i in range(5_000)]
        assert nodes[0].wait(20) == 0
        [client] = executor.status()["clients"]
        assert client["done"] == 5_000


# --- jobs that kill their process ---------------------------------------------------------------

@pytest.mark.parametrize("how, described", [
    ("exit", "exit code 3"), ("segfault", "signal SIGSEGV"), ("sigkill", "signal SIGKILL")])
def test_a_job_that_kills_its_process_fails_after_its_retries(cluster, how, described):
    with cluster.executor() as executor:
        others = [executor.submit(slow_square, i) for i in range(100)]
        victim = executor.submit(crash_with, how)
        with pytest.raises(WorkerCrashedError) as caught:
            victim.result(60)
        assert caught.value.attempts == 3   # the first run and max_retries=2 reruns
        assert described in str(caught.value)
        assert [f.result(60) for f in others] == [i * i for i in range(100)]
        assert executor.submit(slow_square, 7).result(30) == 49
        [node] = executor.list_workers()
        assert node["nprocs"] == 2


def test_a_crash_is_retried_and_the_rerun_succeeds(cluster, tmp_path):
    with cluster.executor() as executor:
        assert executor.submit(crash_first_time, str(tmp_path / "once")).result(60) == \
            "second attempt"
        with pytest.raises(WorkerCrashedError, match="1 attempt"):
            executor.with_options(max_retries=0).submit(crash_with, "exit").result(60)


# A chunk of fast jobs runs in batches, each one C-level map over its jobs
# (worker_process._run_batched); these check that crashes and kills are still
# charged to exactly the job they belong to.

def _warm_up(executor, fn=None):
    """``fn`` (exit_at) run by both processes and timed as fast: chunks of it then run
    in batches (10 chunks of 100 jobs: each process takes some)."""
    fn = fn or exit_at
    assert sum(executor.map(fn, range(1000), repeat(-1), chunksize=100)) == 499500


def test_a_crash_among_fast_jobs_is_charged_to_the_job_that_crashed(cluster):
    with cluster.executor() as executor:
        _warm_up(executor)
        got = []
        with pytest.raises(WorkerCrashedError, match="1 attempt") as caught:
            for value in executor.map(exit_at, range(100), repeat(37), chunksize=100,
                                      max_retries=0):
                got.append(value)
        assert got == list(range(37))   # the jobs before it ran, the culprit alone failed
        assert "item 37" in str(caught.value)
        # again, in a process that has run the function in batches before
        _warm_up(executor)
        with pytest.raises(WorkerCrashedError, match="item 37 .* on 1 attempt"):
            list(executor.map(exit_at, range(100), repeat(37), chunksize=100, max_retries=0))
        [node] = executor.list_workers()
        assert node["nprocs"] == 2


def stop_at(x, stop_x):
    if x == stop_x:
        raise StopIteration   # e.g. next() on an exhausted iterator, in the job
    return x


def test_a_job_raising_stop_iteration_in_a_batch_fails_in_its_place(cluster):
    # map() inside a batch would end quietly at it, shifting every later result
    with cluster.executor() as executor:
        _warm_up(executor, stop_at)
        for _ in range(2):   # in a batch, then one at a time
            got = []
            with pytest.raises(RuntimeError) as caught:   # a generator's StopIteration,
                for value in executor.map(stop_at, range(200), repeat(70), chunksize=200,
                                          timeout=30):
                    got.append(value)                     # as concurrent.futures gives it
            assert got == list(range(70))
            assert isinstance(caught.value.__cause__, StopIteration)
        assert sum(executor.map(exit_at, range(100), repeat(-1), chunksize=100)) == 4950


def test_a_job_killed_while_its_batch_runs_ends_at_once(cluster, tmp_path):
    marker = str(tmp_path / "napping")
    with cluster.executor() as executor:
        _warm_up(executor)
        # timeout: had the kill not reached the napping job, TimeoutError, not a hang
        results = executor.map(nap_at, range(40), repeat(20), repeat(marker), chunksize=40,
                               timeout=60)
        deadline = time.monotonic() + 30
        while not os.path.exists(marker):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # map has no per-job kill of its own: the session's, as kill() uses for a future
        [stream] = executor._dispatcher.active_streams()
        [chunk_id] = list(stream._in_flight)
        assert executor._dispatcher.session.kill(chunk_id, 20) == "killing"
        assert [next(results) for _ in range(20)] == list(range(20))   # run again
        with pytest.raises(CancelledError, match="killed on request while running"):
            next(results)
        assert sum(executor.map(exit_at, range(100), repeat(-1), chunksize=100)) == 4950


def test_a_job_over_its_time_limit_is_killed_and_fails_with_timeout_error(cluster):
    with cluster.executor() as executor:
        limited = executor.with_options(job_timeout=0.5)
        slow = limited.submit(sleep_for, 30)
        fast = limited.submit(sleep_for, 0.01)
        with pytest.raises(TimeoutError, match="time limit of 0.5s"):
            slow.result(30)
        assert fast.result(30) == 0.01
        with pytest.raises(TimeoutError):
            list(executor.map(sleep_for, [0.01, 30, 0.01], job_timeout=0.5))
        assert executor.submit(slow_square, 3).result(30) == 9
    cluster.load_envir("import time\ndef nap(s):\n    time.sleep(s)\n    return s\n",
                       from_file=False)
    cluster.register_target_function("nap")
    cluster.load_args([0.01, 30])
    with pytest.raises(TimeoutError):
        cluster.execute(job_timeout=0.5)
    cluster.load_args([0.01, 0.02])
    assert cluster.execute(job_timeout=5) == {0.01: 0.01, 0.02: 0.02}


# --- clients go away -------------------------------------------------------------------------------

CLIENT_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from minicw import ClusterExecutor
    from tests.test_faults import logged_nap
    executor = ClusterExecutor("127.0.0.1", {port}, {key!r})
    futures = [executor.submit(logged_nap, {log!r}, i) for i in range(2000)]
    print("submitted", flush=True)
    time.sleep(600)
""")


def test_a_killed_client_has_its_jobs_dropped_and_others_get_the_cluster(tmp_path):
    master, port = start_master()
    node = start_worker(port, nprocs=1)
    log = str(tmp_path / "runs.log")
    script = CLIENT_SCRIPT.format(root=ROOT, port=port, key=KEY, log=log)
    doomed = Proc([PY, "-c", script])
    try:
        doomed.wait_for("submitted", timeout=60)
        time.sleep(0.3)
        doomed.stop(signal.SIGKILL)
        with ClusterExecutor("127.0.0.1", port, KEY) as executor:
            # Within the heartbeat timeout the master notices and drops the dead client.
            deadline = time.monotonic() + 20
            while len(executor.status()["clients"]) > 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            [me] = executor.status()["clients"]
            assert executor.status()["queued_chunks"] == 0
            # the dead client's running chunk is abandoned at its process's next
            # flush of results, at most RESULT_FLUSH_S after its last
            time.sleep(config.RESULT_FLUSH_S + 0.2)
            with open(log) as handle:
                ran = len(handle.read().split())
            assert [f.result(30) for f in [executor.submit(slow_square, i) for i in range(10)]] \
                == [i * i for i in range(10)]
            time.sleep(0.3)
            with open(log) as handle:
                ran_later = len(handle.read().split())
        # The dead client's backlog (2000 x 10 ms) was dropped, not run to the end.
        assert 0 < ran < 2000 and ran_later == ran
    finally:
        doomed.stop(signal.SIGKILL)
        node.stop(signal.SIGKILL)
        master.stop(signal.SIGKILL)


INTERRUPT_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from minicw import LocalCluster
    with LocalCluster(n_workers=2) as cluster:
        cluster.load_envir("import time\\ndef nap(x):\\n    time.sleep(0.02)\\n    return x\\n",
                           from_file=False)
        cluster.register_target_function("nap")
        cluster.load_args(range(2000))
        print("running", flush=True)
        try:
            cluster.execute()
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        status = [c for c in cluster.status()["clients"]]
        print("queued after interrupt", sum(c["queued"] for c in status), flush=True)
        cluster.load_args(range(10))
        result = cluster.execute()
        print("next run", sorted(result.values()) == list(range(10)), flush=True)
""")


def test_ctrl_c_during_execute_cancels_the_run_and_the_next_one_works():
    proc = Proc([PY, "-c", INTERRUPT_SCRIPT.format(root=ROOT)])
    try:
        proc.wait_for("running", timeout=60)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGINT)
        proc.wait_for("interrupted", timeout=30)
        proc.wait_for("queued after interrupt 0", timeout=30)
        proc.wait_for("next run True", timeout=30)
        assert proc.wait(30) == 0
        assert "not interrupted" not in proc.out
    finally:
        proc.stop(signal.SIGKILL)


# --- the master restarts, or shuts down --------------------------------------------------------------

def test_master_killed_and_restarted_mid_run_completes_without_duplicates(monkeypatch):
    monkeypatch.setenv("MINICW_RECONNECT_TIMEOUT_S", "30")
    master, port = start_master()
    node = start_worker(port, nprocs=2)
    replacement = None
    try:
        with ClusterExecutor("127.0.0.1", port, KEY) as executor:
            results = []
            for i, value in enumerate(executor.map(slow_square, range(10_000))):
                results.append(value)
                if i == 3_000:
                    master.stop(signal.SIGKILL)
                    replacement, _ = start_master(port=port)
            assert results == [i * i for i in range(10_000)]
            [client] = executor.status()["clients"]
            # The new master ran only what the old one had not delivered, save
            # the delivered part of a chunk that was running in each of the 2
            # processes: a resubmitted chunk runs whole (the client drops what
            # it already has), and holds at most CHUNK_WORK_S of these jobs.
            partly_delivered = 2 * int(chunking.CHUNK_WORK_S / 0.0005)
            assert 0 < client["done"] <= 10_000 - 3_000 + partly_delivered
        node.wait_for("reconnected to the master", stream="err", timeout=30)
    finally:
        node.stop(signal.SIGKILL)
        master.stop(signal.SIGKILL)
        if replacement is not None:
            replacement.stop(signal.SIGKILL)


def test_sigterm_to_the_master_is_reported_to_clients_and_nodes():
    master, port = start_master()
    node = start_worker(port, nprocs=1)
    try:
        executor = ClusterExecutor("127.0.0.1", port, KEY)
        running = executor.submit(sleep_for, 30)
        time.sleep(0.5)
        master.popen.send_signal(signal.SIGTERM)
        assert master.wait(20) == 0
        with pytest.raises(ClusterShutdownError, match="shutting down"):
            running.result(20)
        with pytest.raises(ClusterShutdownError):
            executor.submit(sleep_for, 0)
        assert node.wait(20) == 0
        assert any("shut down" in line for line in node.err + node.out)
        executor.shutdown(wait=False)
    finally:
        node.stop(signal.SIGKILL)
        master.stop(signal.SIGKILL)
