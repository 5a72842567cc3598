"""Hardening (issue 28), each fault caused for real: a job that kills its own
worker node, malformed calls through the manager, a session's blobs, files
under a zero umask.
"""
import contextlib
import gc
import os
import re
import signal
import sys
import time

import pytest

from minicw import ClusterExecutor, WorkerCrashedError
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _threads_and_fds(pid: int) -> tuple:
    return len(os.listdir("/proc/%d/task" % pid)), len(os.listdir("/proc/%d/fd" % pid))


def _assert_back_near(pid: int, baseline: tuple, threads_slack: int = 1, fds_slack: int = 2):
    """The master's threads and descriptors come back near ``baseline`` (they may
    take a moment: a connection's thread ends after its peer has gone)."""
    deadline = time.monotonic() + 10
    while True:
        threads, fds = _threads_and_fds(pid)
        if threads <= baseline[0] + threads_slack and fds <= baseline[1] + fds_slack:
            return
        assert time.monotonic() < deadline, (baseline, (threads, fds))
        time.sleep(0.1)


def kills_its_node(x):
    """What a job that exhausts the machine's memory does to its node."""
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(30)   # the job dies with its node (its lifeline), as an OOM kill takes both


def small(x):
    time.sleep(0.005)
    return x


def test_a_job_that_kills_its_node_fails_after_max_retries_plus_one_nodes():
    master, port = helpers.start_master(extra_args=["--heartbeat-timeout", "2"])
    nodes = [helpers.start_worker(port, nprocs=1, extra_args=["--no-reconnect"])
             for _ in range(3)]
    try:
        with ClusterExecutor("127.0.0.1", port, helpers.KEY, max_retries=1) as executor:
            assert executor.submit(small, 0).result(timeout=30) == 0
            baseline = _threads_and_fds(master.pid)
            deadly = executor.submit(kills_its_node, 1)
            innocent = [executor.submit(small, i) for i in range(100)]
            with pytest.raises(WorkerCrashedError) as failed:
                deadly.result(timeout=60)
            assert failed.value.attempts == 2
            assert str(failed.value).startswith(
                "job kills_its_node(1) was running when its worker node died, on 2 attempt(s) "
                "(the last: worker node ")
            assert "missed its heartbeats for 2s" in str(failed.value)
            assert [future.result(timeout=60) for future in innocent] == list(range(100))
        assert sum(node.popen.poll() is None for node in nodes) == 1   # max_retries + 1 died
        _assert_back_near(master.pid, baseline)   # the dead nodes' links are let go
    finally:
        for node in nodes:
            node.stop()
        master.stop()


def test_malformed_calls_get_an_error_naming_the_field_and_harm_nobody_else():
    from minicw import InvalidCallError, client, protocol, transport
    master, port = helpers.start_master()
    node = helpers.start_worker(port, nprocs=2)
    try:
        with ClusterExecutor("127.0.0.1", port, helpers.KEY) as executor:
            assert list(executor.map(small, range(5))) == list(range(5))
        baseline = _threads_and_fds(master.pid)   # the node holds its blob link now
        api = transport.connect_master(("127.0.0.1", port), helpers.KEY).client()
        client_id, _ = api.hello(client.client_info())
        api.put_blobs(client_id, [("fn", protocol.pack_blob(protocol.BLOB_CALLABLE, b"x")[1])])

        def spec(chunk_id, n_jobs=1, **fields):
            fields = dict(protocol.ChunkSpec(chunk_id, ("fn",), n_jobs, b"p", None, 2, None)
                          ._asdict(), **fields)
            return tuple(fields.values())
        bad_calls = [
            (lambda: api.submit(client_id, [spec(1, n_jobs=10 ** 20)]),
             "chunk 1: n_jobs must be an integer from 1 to 2147483648, not 100000000000000000000"),
            (lambda: api.submit(client_id, [spec(2, n_jobs=-3)]), "chunk 2: n_jobs must be"),
            (lambda: api.submit(client_id, [spec(3, max_retries="2")]), "chunk 3: max_retries"),
            (lambda: api.submit(client_id, [spec(4, func_keys=("missing",))]),
             "chunk 4 names function blobs the master does not hold: missing"),
            (lambda: api.submit(client_id, [spec(5), spec(5)]),
             "chunk 5: chunk_id is already in use"),
            (lambda: api.submit(client_id, ["junk"]), "a chunk spec must be a tuple of 8 fields"),
            (lambda: api.submit("me", []), "client_id must be an integer"),
            (lambda: api.fetch(client_id, -1, 0), "fetch's timeout_s must be a number"),
            (lambda: api.cancel(client_id, [(1, "all")]), "a cancel request's indices"),
            (lambda: api.put_blobs(client_id, [("k", "not bytes")]), "blob k must be bytes"),
        ]
        for call, message in bad_calls:
            with pytest.raises(InvalidCallError, match=re.escape(message)):
                call()
        nodes = transport.connect_master(("127.0.0.1", port), helpers.KEY).node()
        for nprocs in (3_000_000, -3, "2"):
            with pytest.raises(InvalidCallError, match="worker node info 'nprocs' must be an "
                               "integer from 1 to 4096"):
                nodes.register(dict(client.client_info(), nprocs=nprocs))
        api.goodbye(client_id)     # a client that sent all that still leaves cleanly

        # Meanwhile the cluster is whole: an innocent client gets exact results.
        with ClusterExecutor("127.0.0.1", port, helpers.KEY) as executor:
            assert list(executor.map(small, range(200))) == list(range(200))
            status = executor.status()
        assert [n.nprocs for n in status["nodes"]] == [2]
        assert status["queued_chunks"] == 0
        api = nodes = None       # their connections close
        gc.collect()
        _assert_back_near(master.pid, baseline)
    finally:
        node.stop()
        master.stop()


def test_the_launchers_files_are_private_under_a_zero_umask(tmp_path):
    import stat
    import subprocess
    import sys
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)                      # left open by someone, or by a umask of 0
    script = os.path.join(ROOT, "scripts", "local_start.py")

    def launcher(*args):
        return subprocess.run([sys.executable, script] + list(args) + ["--run-dir", str(run_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120,
                              preexec_fn=lambda: os.umask(0), env=dict(os.environ, PYTHONPATH=ROOT))
    started = launcher("start", "-n", "1")
    try:
        assert started.returncode == 0, started.stderr
        assert "was writable by others (mode 777); made it 700" in started.stderr
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        modes = {entry.name: stat.S_IMODE(entry.stat().st_mode) for entry in run_dir.iterdir()}
        assert {"authkey", "master.json", "master.log", "master.pid"} <= set(modes)
        assert {name: mode for name, mode in modes.items() if mode & 0o077} == {}
    finally:
        assert launcher("stop").returncode == 0


def test_a_peers_raw_shutdown_request_is_refused():
    from multiprocessing.connection import Client
    master, port = helpers.start_master()
    node = helpers.start_worker(port, nprocs=1)
    try:
        raw = Client(("127.0.0.1", port), authkey=helpers.KEY.encode())
        raw.send((None, "shutdown", (), {}))
        kind, error = raw.recv()
        raw.close()
        assert kind == "#ERROR" and isinstance(error, PermissionError)
        assert "not stopped by a peer's request; stop it with SIGTERM" in str(error)
        time.sleep(0.5)
        assert master.popen.poll() is None
        with ClusterExecutor("127.0.0.1", port, helpers.KEY) as executor:
            assert executor.submit(small, 7).result(timeout=30) == 7
    finally:
        node.stop()
        master.stop()


def _trickle(port, stop):
    """A peer that announces a 200-byte answer to the challenge, then sends it one
    byte every 0.5 s: each read of the master gets a byte in time, so only a
    deadline for the whole handshake ends it."""
    import socket
    import struct
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(struct.pack("!i", 200))
        while not stop.is_set():
            try:
                sock.sendall(b"\x00")
            except OSError:
                return "closed"
            stop.wait(0.5)
        return "open"
    finally:
        sock.close()


def test_slow_and_exhausting_peers_before_authentication(tmp_path):
    import resource
    import sys
    import threading
    from concurrent.futures import ThreadPoolExecutor

    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))
    env = helpers.env_with_key(MINICW_HANDSHAKE_TIMEOUT_S="2")
    master = helpers.Proc([sys.executable, "-m", "minicw.master", "--host", "127.0.0.1",
                           "--port", "0"], env=env, preexec_fn=low_fd_limit)
    port = int(master.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    node = helpers.start_worker(port, nprocs=1)
    stop = threading.Event()
    try:
        with ClusterExecutor("127.0.0.1", port, helpers.KEY) as executor:
            assert executor.submit(small, 1).result(timeout=30) == 1
            baseline = _threads_and_fds(master.pid)
            # 120 peers that trickle bytes: more than the master has descriptors for,
            # and more than it handshakes at once.
            with ThreadPoolExecutor(120) as peers:
                started = time.monotonic()
                trickling = [peers.submit(_trickle, port, stop) for _ in range(120)]
                time.sleep(1.0)
                # The session already served goes on meanwhile.
                assert list(executor.map(small, range(50))) == list(range(50))
                outcomes = [future.result(timeout=30) for future in trickling]
                elapsed = time.monotonic() - started
            assert outcomes.count("closed") == 120 and elapsed < 15, (outcomes, elapsed)
            # ... and the master's threads and descriptors are back where they were
            deadline = time.monotonic() + 10
            while (_threads_and_fds(master.pid)[0] > baseline[0] + 2
                   and time.monotonic() < deadline):
                time.sleep(0.1)
            threads, fds = _threads_and_fds(master.pid)
            assert threads <= baseline[0] + 2 and fds <= baseline[1] + 4, (baseline, threads, fds)
            # ... and once they are gone, new clients connect again.
            with ClusterExecutor("127.0.0.1", port, helpers.KEY) as again:
                assert again.submit(small, 2).result(timeout=30) == 2
        assert master.popen.poll() is None
    finally:
        stop.set()
        node.stop()
        master.stop()


def _rss_mb(pid: int) -> float:
    import resource
    with open("/proc/%d/statm" % pid) as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 1e6


def test_a_sessions_blobs_are_freed_when_it_ends_and_bounded_while_it_lasts():
    from minicw import InvalidCallError, client, transport
    env = helpers.env_with_key(MINICW_MAX_SESSION_BLOBS="150000")
    master, port = helpers.start_master(env=env)
    try:
        baseline = _rss_mb(master.pid)
        api = transport.connect_master(("127.0.0.1", port), helpers.KEY).client()
        client_id, _ = api.hello(client.client_info())
        for first in range(0, 100_000, 10_000):   # 100,000 blobs of 1 KB, as broadcasts are
            api.put_blobs(client_id, [("blob-%d" % i, os.urandom(1000))
                                      for i in range(first, first + 10_000)])
        grown = _rss_mb(master.pid)
        assert grown - baseline > 100, (baseline, grown)
        with pytest.raises(InvalidCallError, match=re.escape(
                "this client session would keep 160000 blobs of 160000000 bytes in the master; "
                "the limit is 150000 blobs")):
            api.put_blobs(client_id, [("more-%d" % i, os.urandom(1000)) for i in range(60_000)])
        api.goodbye(client_id)
        time.sleep(0.5)
        after = _rss_mb(master.pid)
        assert after - baseline < 40, (baseline, grown, after)
    finally:
        master.stop()


def hold(seconds):
    time.sleep(seconds)
    return seconds


def test_a_master_that_never_comes_back_is_given_up_after_the_reconnect_timeout():
    from minicw import MasterLostError, config
    master, port = helpers.start_master()
    node = helpers.start_worker(port, nprocs=1)
    try:
        with ClusterExecutor("127.0.0.1", port, helpers.KEY) as executor:
            running = executor.submit(hold, 60)
            time.sleep(0.5)
            master.stop(signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(MasterLostError, match="did not come back within 5s"):
                running.result(timeout=60)
            waited = time.monotonic() - started
            # every thread of the session gives up together, not one after another
            assert waited < config.reconnect_timeout_s() + 3, waited
            with pytest.raises(MasterLostError):
                executor.submit(hold, 0).result(timeout=10)
    finally:
        node.stop()
        master.stop()


def spawn_sleepers(count, record, then_sleep=0.0):
    """Start ``count`` `sleep 300` processes, write their PIDs to ``record``, then
    sleep ``then_sleep`` seconds; their PIDs."""
    import subprocess
    pids = [subprocess.Popen(["sleep", "300"]).pid for _ in range(count)]
    with open(record, "w") as handle:
        handle.write(" ".join(map(str, pids)))
    time.sleep(then_sleep)
    return pids


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_processes_a_job_started_end_with_its_process_and_its_node(tmp_path):
    master, port = helpers.start_master()
    node = helpers.start_worker(port, nprocs=1)
    try:
        with ClusterExecutor("127.0.0.1", port, helpers.KEY, max_retries=0) as executor:
            # A job over its time limit: its process is killed, and its children too.
            record = str(tmp_path / "late.pids")
            late = executor.with_options(job_timeout=1).submit(spawn_sleepers, 5, record, 30)
            with pytest.raises(TimeoutError):
                late.result(timeout=30)
            with open(record) as handle:
                timed_out = [int(pid) for pid in handle.read().split()]
            # A job that left its children running: they end with the node's SIGTERM.
            left = executor.submit(spawn_sleepers, 5, str(tmp_path / "left.pids")).result(
                timeout=30)
        assert all(_alive(pid) for pid in left)
        assert node.stop() == 0
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in left + timed_out) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in left + timed_out if _alive(pid)]
    finally:
        node.stop()
        master.stop()


def test_links_that_go_silent_are_noticed_and_rejoined(monkeypatch):
    monkeypatch.setenv("MINICW_LINK_TIMEOUT_S", "4")
    monkeypatch.setenv("MINICW_RECONNECT_TIMEOUT_S", "40")
    master, port = helpers.start_master(extra_args=["--heartbeat-timeout", "2"])
    relay = helpers.Relay(port)
    node = helpers.Proc([sys.executable, "-m", "minicw.worker", "127.0.0.1", str(relay.port),
                         "-", "-n", "1"],
                        env=helpers.env_with_key(MINICW_LINK_TIMEOUT_S="4"))
    try:
        node.wait_for(r"joined 127\.0\.0\.1:%d" % relay.port)
        with ClusterExecutor("127.0.0.1", relay.port, helpers.KEY) as executor:
            assert executor.submit(small, 0).result(timeout=30) == 0
            futures = [executor.submit(hold, 0.3) for _ in range(10)]
            silenced = relay.silence_existing()
            started = time.monotonic()
            # The master drops both after its 2 s heartbeat timeout; they notice
            # within their 4 s link timeout and come back on new links.
            assert [future.result(timeout=60) for future in futures] == [0.3] * 10
            assert time.monotonic() - started < 30
            assert len(relay.links) > silenced
            deadline = time.monotonic() + 30
            while len(executor.list_workers()) != 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            [record] = executor.list_workers()
            assert record.pid == node.pid and record.seen_s_ago < 5
    finally:
        node.stop()
        master.stop()
        relay.close()


@contextlib.contextmanager
def _behind_a_relay(monkeypatch, nprocs):
    """A master with a worker node of ``nprocs`` processes, reached by clients
    through a loopback relay whose links can go silent; a link timeout (30 s)
    longer than the run's timeout, so that only the run's deadline can end it."""
    monkeypatch.setenv("MINICW_LINK_TIMEOUT_S", "30")
    master, port = helpers.start_master()
    relay = helpers.Relay(port)
    node = helpers.start_worker(port, nprocs=nprocs)
    try:
        yield relay
    finally:
        node.stop()
        master.stop()
        relay.close()


def test_a_maps_timeout_holds_whatever_the_link_does(monkeypatch):
    from concurrent.futures import TimeoutError as FuturesTimeoutError
    with _behind_a_relay(monkeypatch, nprocs=1) as relay:
        with ClusterExecutor("127.0.0.1", relay.port, helpers.KEY) as executor:
            assert list(executor.map(small, range(5), timeout=10)) == list(range(5))
            relay.silence_existing()
            started = time.monotonic()
            with pytest.raises(FuturesTimeoutError):
                list(executor.map(small, range(5), timeout=2))   # its submit gets no answer
            assert time.monotonic() - started < 4
            executor.shutdown(wait=False, cancel_futures=True)


BIG_CLIENT = r"""
import sys
from minicw import ClusterExecutor

def big(n):
    return b"r" * n

with ClusterExecutor("127.0.0.1", int(sys.argv[1]), sys.argv[2]) as executor:
    result = executor.submit(big, int(sys.argv[3])).result(timeout=120)
    assert result == b"r" * int(sys.argv[3])
    print("got", len(result), flush=True)
"""


def _peak_rss_mb(pid: int) -> float:
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM for pid %d" % pid)


def test_a_600_mb_result_neither_stalls_the_master_nor_is_copied_there(tmp_path):
    size = 600_000_000
    master, port = helpers.start_master(extra_args=["--heartbeat-timeout", "3"])
    nodes = [helpers.start_worker(port, nprocs=1) for _ in range(2)]
    script = tmp_path / "big_client.py"
    script.write_text(BIG_CLIENT)
    try:
        with ClusterExecutor("127.0.0.1", port, helpers.KEY) as executor:
            assert executor.submit(small, -1).result(timeout=30) == -1
            baseline_mb = _peak_rss_mb(master.pid)
            threads_fds = _threads_and_fds(master.pid)
            big = helpers.Proc([sys.executable, str(script), str(port), helpers.KEY, str(size)],
                               cwd=ROOT)
            # An innocent client goes on with small jobs while 600 MB cross the master.
            done = []
            while big.popen.poll() is None:
                done.append(executor.submit(small, len(done)).result(timeout=30))
            assert big.wait(60) == 0, big.err[-10:]
            assert big.out == ["got %d" % size]
            assert done == list(range(len(done))) and len(done) > 20
        # The master held the result once (it peaked at 1.8 GB, three copies, before),
        # and its loop never stalled long enough for a 3 s heartbeat to miss:
        # no node and no client was declared dead.
        grown_mb = _peak_rss_mb(master.pid) - baseline_mb
        assert size / 1e6 * 0.9 < grown_mb < size / 1e6 * 1.25, grown_mb
        assert all(node.popen.poll() is None for node in nodes)
        logged = "\n".join(master.err)
        assert "missed its heartbeats" not in logged and "expired" not in logged, logged
        deadline = time.monotonic() + 10
        while _threads_and_fds(master.pid)[0] > threads_fds[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        threads, fds = _threads_and_fds(master.pid)
        assert threads <= threads_fds[0] and fds <= threads_fds[1] + 2, (threads_fds, threads, fds)
    finally:
        for node in nodes:
            node.stop()
        master.stop()


def five_mb(x):
    return bytes([x]) * 5_000_000


def thirty_mb_at_one(x):
    return b"t" * 30_000_000 if x == 1 else x


def test_over_large_results_and_messages_fail_alone_with_a_clear_error(monkeypatch):
    from minicw import InvalidCallError, ResultTooLargeError, client, transport
    monkeypatch.setenv("MINICW_MAX_MESSAGE_BYTES", "20000000")   # for the master and the node
    master, port = helpers.start_master(env=helpers.env_with_key(
        MINICW_MAX_MESSAGE_BYTES="20000000"))
    node = helpers.Proc([sys.executable, "-m", "minicw.worker", "127.0.0.1", str(port), "-",
                         "-n", "1"], env=helpers.env_with_key(MINICW_MAX_MESSAGE_BYTES="20000000"))
    try:
        node.wait_for(r"joined 127\.0\.0\.1:%d" % port)
        with ClusterExecutor("127.0.0.1", port, helpers.KEY) as executor:
            # Ten 5 MB results in one chunk are 50 MB: they come in reports under the limit.
            assert list(executor.map(five_mb, range(10), chunksize=10)) == \
                [bytes([x]) * 5_000_000 for x in range(10)]
            # A 30 MB result fails its own job; the job before it in its chunk arrives.
            results = executor.map(thirty_mb_at_one, range(4), chunksize=4, timeout=30)
            assert next(results) == 0
            with pytest.raises(ResultTooLargeError, match=re.escape(
                    "the job's result is 30000009 bytes pickled, over the limit of 20000000 "
                    "bytes for one message (MINICW_MAX_MESSAGE_BYTES, read by the master and "
                    "the worker nodes); return less, or write the result to a shared file")):
                next(results)
            assert executor.submit(small, 3).result(timeout=30) == 3
        # A message over the limit is read and thrown away, and its call refused;
        # the connection goes on.
        api = transport.connect_master(("127.0.0.1", port), helpers.KEY).client()
        client_id, _ = api.hello(client.client_info())
        before_mb = _peak_rss_mb(master.pid)
        with pytest.raises(InvalidCallError, match=re.escape(
                "a message of 40000") + r"\d+ bytes is over the master's limit of 20000000 "
                "bytes for one payload, result or blob \\(MINICW_MAX_MESSAGE_BYTES\\)"):
            api.put_blobs(client_id, [("huge", b"h" * 40_000_000)])
        assert _peak_rss_mb(master.pid) - before_mb < 10
        assert api.list_nodes()[0].pid == node.pid
        api.goodbye(client_id)
    finally:
        node.stop()
        master.stop()


ENVIR_SLEEPS = """
import time

def nap(seconds):
    time.sleep(seconds)
    return seconds
"""


def test_executes_timeout_holds_whatever_the_link_does(monkeypatch):
    import threading
    from minicw import MasterNode
    with _behind_a_relay(monkeypatch, nprocs=2) as relay:
        cluster = MasterNode(HOST="127.0.0.1", PORT=relay.port, AUTHKEY=helpers.KEY).connect()
        cluster.load_envir(ENVIR_SLEEPS, from_file=False)
        cluster.register_target_function("nap")
        cluster.load_args([0.01, 0.02, 0.03, 0.04, 5.0])
        # On a healthy link: the run stops at its timeout, says how far it got,
        # and its last job is cancelled.
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=re.escape(
                "execute() did not finish within its timeout of 2s: 4 of the 5 jobs it ran "
                "were done; the rest were cancelled")):
            cluster.execute(timeout=2, progress=False)
        assert time.monotonic() - started < 4
        cluster.load_args([0.1, 0.2])
        assert cluster.execute(timeout=30, progress=False) == {0.1: 0.1, 0.2: 0.2}
        # On a link that goes silent during the run: the same, on time.
        cluster.load_args([0.5 + i / 1000 for i in range(10)])
        silencer = threading.Timer(1.0, relay.silence_existing)
        silencer.start()
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"within its timeout of 3s: \d of the 10 jobs"):
            cluster.execute(timeout=3, progress=False)
        assert time.monotonic() - started < 5
        silencer.join()
        cluster.shutdown()


def pid_of(x):
    return os.getpid()


_LEAKED = []


def leaks_50_mb(x):
    _LEAKED.append(b"l" * 50_000_000)   # a job that keeps what it allocated
    return os.getpid()


@pytest.mark.parametrize("limit, job, expected_runs", [
    (["--max-jobs-per-process", "5"], pid_of, [5, 5, 5, 5]),
    (["--max-memory-per-process", "120M"], leaks_50_mb, [2, 2, 2, 2]),
])
def test_worker_processes_are_replaced_after_their_jobs_or_memory_limit(limit, job,
                                                                         expected_runs):
    from collections import Counter
    master, port = helpers.start_master()
    node = helpers.start_worker(port, nprocs=1, extra_args=limit)
    try:
        with ClusterExecutor("127.0.0.1", port, helpers.KEY) as executor:
            pids = list(executor.map(job, range(sum(expected_runs)), timeout=60))
        runs = Counter(pids)
        assert [runs[pid] for pid in sorted(set(pids), key=pids.index)] == expected_runs
        assert node.pid not in runs
        node.wait_for(r"worker process 0 \(pid %d\) was replaced after reaching its limit"
                      % pids[0], stream="err")
        assert not any("ended:" in line for line in node.err), node.err   # no crash charged
    finally:
        node.stop()
        master.stop()


def test_a_bad_recycling_limit_is_refused_by_name():
    for args, message in ((["--max-memory-per-process", "lots"], "'lots' is not a size"),
                          (["--max-jobs-per-process", "0"], "max_jobs_per_process must be a "
                                                            "positive whole number, not 0")):
        worker = helpers.Proc([sys.executable, "-m", "minicw.worker", "127.0.0.1", "1", "-"]
                              + args, env=helpers.env_with_key())
        assert worker.wait(30) == 2   # a usage error, as argparse gives
        assert any(message in line for line in worker.err), worker.err
