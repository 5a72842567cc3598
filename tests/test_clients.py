"""The program clients against a real master and real worker processes:
ClusterExecutor (concurrent.futures), ClientThread (callbacks), several
clients sharing one master, the client's cwd and sys.path on the workers,
broadcast data, function caching, cancelling and killing jobs.
"""
import asyncio
import concurrent.futures as cf
import os
import sys
import threading
import time
import warnings

import pytest

import minicw
from minicw import ClientThread, ClusterExecutor, LocalCluster, RemoteError
from minicw.errors import MinicwError


@pytest.fixture(scope="module")
def solo():
    """One worker process: the order in which jobs run is known."""
    with LocalCluster(n_workers=1) as running:
        yield running


def square(x):
    return x * x


def power(base, exponent=2):
    return base ** exponent


def divide(a, b):
    return a / b


def wait_for_file(path, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError("%s never appeared" % path)
        time.sleep(0.01)


def touch_then_sleep(path, seconds):
    with open(path, "w"):
        pass
    time.sleep(seconds)
    return "slept"


def block_until_file(path, timeout_s=30.0):
    wait_for_file(path, timeout_s)
    return "released"


# --- ClusterExecutor: the concurrent.futures contract ------------------------------------

def test_submit_with_args_and_kwargs(executor):
    assert executor.submit(power, 3).result(10) == 9
    assert executor.submit(power, 2, exponent=10).result(10) == 1024
    assert executor.submit(lambda: "closure").result(10) == "closure"


def test_map_in_order_over_several_iterables(executor):
    assert list(executor.map(power, range(10), range(10))) == [i ** i for i in range(10)]
    assert list(executor.map(square, range(5000), chunksize=64)) == [i * i for i in range(5000)]
    assert list(executor.map(square, [])) == []


def test_job_exception_is_reraised_with_its_remote_traceback(executor):
    future = executor.submit(divide, 1, 0)
    with pytest.raises(ZeroDivisionError) as caught:
        future.result(10)
    assert "Remote traceback" in str(caught.value.__cause__)
    assert "in divide" in str(caught.value.__cause__)
    assert isinstance(future.exception(), ZeroDivisionError)


def test_map_raises_at_the_failing_item(executor):
    results = executor.map(divide, [1, 2, 3, 4], [1, 1, 0, 1])
    assert next(results) == 1.0
    assert next(results) == 2.0
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_futures_work_with_wait_as_completed_and_asyncio(executor):
    futures = [executor.submit(square, i) for i in range(50)]
    done, not_done = cf.wait(futures, timeout=30)
    assert not not_done and len(done) == 50
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=30)) == \
        sorted(i * i for i in range(50))

    async def gather():
        wrapped = [asyncio.wrap_future(executor.submit(square, i)) for i in range(10)]
        return await asyncio.gather(*wrapped)
    assert asyncio.run(gather()) == [i * i for i in range(10)]


def test_wait_first_exception_on_finished_futures_does_not_deadlock(executor):
    # concurrent.futures.wait holds every future's condition while it asks the
    # finished ones cancelled() and exception(): the condition must be
    # re-entrant.  Run in a thread so a regression fails instead of hanging.
    finished_ok = executor.submit(square, 3)
    finished_failed = executor.submit(divide, 1, 0)
    assert finished_ok.result(timeout=30) == 9
    assert isinstance(finished_failed.exception(timeout=30), ZeroDivisionError)
    outcome = {}

    def wait_on_them():
        outcome["ok_only"] = cf.wait([finished_ok], return_when=cf.FIRST_EXCEPTION)
        outcome["with_failed"] = cf.wait([finished_ok, finished_failed],
                                         return_when=cf.FIRST_EXCEPTION)
    waiter = threading.Thread(target=wait_on_them, daemon=True)
    waiter.start()
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "wait(FIRST_EXCEPTION) deadlocked on a finished future"
    assert outcome["ok_only"].done == {finished_ok} and not outcome["ok_only"].not_done
    assert outcome["with_failed"].done == {finished_ok, finished_failed}


class InterruptsPickling:
    """An argument whose pickling waits for a signal, then raises KeyboardInterrupt."""

    def __init__(self, started, proceed):
        self.started, self.proceed = started, proceed

    def __reduce__(self):
        self.started.set()
        self.proceed.wait(10)
        raise KeyboardInterrupt


def test_ctrl_c_while_pickling_an_argument_loses_no_other_job(cluster):
    # The submitting thread is interrupted while it packs its job; a job that
    # another thread queued meanwhile must still go out, and nothing may be
    # left outstanding.  No shutdown(wait=True) at the end: on a regression
    # it would wait for the lost job for ever instead of failing.
    executor = cluster.executor()
    started, proceed = threading.Event(), threading.Event()
    queued_meanwhile = []

    def submit_during_pickling():
        started.wait(10)
        queued_meanwhile.append(executor.submit(square, 7))
        proceed.set()
    other = threading.Thread(target=submit_during_pickling)
    other.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            executor.submit(square, InterruptsPickling(started, proceed))
        other.join(10)
        assert queued_meanwhile[0].result(timeout=10) == 49
        assert executor.submit(square, 5).result(timeout=10) == 25
        assert executor._dispatcher._outstanding == 0
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def test_a_closed_map_yields_nothing_more(executor):
    results = executor.map(square, range(100_000), chunksize=10_000)
    assert next(results) == 0
    results.close()
    assert list(results) == []


def test_timeouts_raise_timeout_error(executor, tmp_path):
    never = str(tmp_path / "never")
    future = executor.submit(block_until_file, never, 5.0)
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.2)
    results = executor.map(block_until_file, [never], timeout=0.2)
    with pytest.raises(cf.TimeoutError):
        next(results)
    assert executor.kill(future)


def test_submit_and_map_after_shutdown_raise_runtime_error(cluster):
    executor = cluster.executor()
    assert executor.submit(square, 4).result(10) == 16
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(square, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.map(square, [1])
    executor.shutdown()  # a second shutdown is harmless


def test_shutdown_waits_for_work_and_map_results_outlive_it(cluster):
    with cluster.executor() as executor:
        futures = [executor.submit(square, i) for i in range(200)]
        results = executor.map(square, range(3000))
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(200)]
    assert list(results) == [i * i for i in range(3000)]


def test_shutdown_cancel_futures_cancels_queued_jobs(solo, tmp_path):
    release = str(tmp_path / "release")
    started = str(tmp_path / "started")
    executor = solo.executor()
    blocker = executor.submit(touch_then_sleep, started, 0.5)
    wait_for_file(started)
    queued = [executor.submit(square, i) for i in range(20)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert blocker.result() == "slept"
    assert all(f.cancelled() for f in queued)
    assert not os.path.exists(release)


def test_cancel_of_a_queued_future_removes_it_from_the_master(solo, tmp_path):
    release = str(tmp_path / "release")
    started = str(tmp_path / "started")
    marker = str(tmp_path / "marker")
    with solo.executor() as executor:
        blocker = executor.submit(touch_then_sleep, started, 0.1)
        wait_for_file(started)
        blocker.result(10)
        blocker = executor.submit(block_until_file, release)
        time.sleep(0.3)   # let it be leased and start
        victim = executor.submit(touch_then_sleep, marker, 0)
        assert victim.cancel() is True
        assert victim.cancelled()
        with pytest.raises(cf.CancelledError):
            victim.result()
        [client] = [c for c in executor.status()["clients"] if c["queued"] or c["running"]]
        assert client["queued"] == 0
        open(release, "w").close()
        assert blocker.result(20) == "released"
        assert blocker.cancel() is False   # finished
        assert executor.submit(square, 3).result(10) == 9
    assert not os.path.exists(marker)


def test_kill_ends_a_running_job_and_the_cluster_goes_on(solo, tmp_path):
    started = str(tmp_path / "started")
    with solo.executor() as executor:
        victim = executor.submit(touch_then_sleep, started, 60)
        wait_for_file(started)
        assert executor.kill(victim) is True
        with pytest.raises(cf.CancelledError):
            victim.result(20)
        assert executor.kill(victim) is False
        assert executor.submit(square, 5).result(20) == 25
        [node] = executor.list_workers()
        assert node["nprocs"] == 1


# --- streaming map ------------------------------------------------------------------------

class CountingItems:
    """A generator-like iterable that counts how far it has been pulled."""

    def __init__(self, n):
        self.n = n
        self.pulled = 0

    def __iter__(self):
        for i in range(self.n):
            self.pulled += 1
            yield i


def test_map_over_a_generator_keeps_a_bounded_window(executor):
    items = CountingItems(100_000)
    results = executor.map(square, items, buffersize=500)
    most_ahead = 0
    for consumed, value in enumerate(results, 1):
        assert value == (consumed - 1) ** 2
        most_ahead = max(most_ahead, items.pulled - consumed)
    assert consumed == 100_000 and items.pulled == 100_000
    assert most_ahead <= 500


def test_closing_a_map_early_stops_pulling_and_cancels(executor):
    items = CountingItems(1_000_000)
    results = executor.map(square, items, buffersize=200)
    assert [next(results) for _ in range(10)] == [i * i for i in range(10)]
    results.close()
    pulled = items.pulled
    assert pulled <= 210
    assert executor.submit(square, 2).result(10) == 4
    assert items.pulled == pulled


def test_imap_unordered_yields_every_result(executor):
    assert sorted(executor.imap_unordered(square, range(2000))) == \
        [i * i for i in range(2000)]


# --- ClientThread: the callback client ----------------------------------------------------------

def test_client_thread_calls_back_once_per_job(cluster):
    seen = {}
    lock = threading.Lock()

    def callback(jobid, result):
        with lock:
            assert jobid not in seen
            seen[jobid] = result
    with cluster.client_thread(callback) as thread:
        jobids = [thread.submit(square, i) for i in range(300)]
        thread.submit("my-job", power, 2, 5)   # the ancestor's submit(jobid, func, *args)
        thread.wait()
        assert thread.ident != threading.get_ident()
    assert seen == dict({jobid: i * i for i, jobid in enumerate(jobids)}, **{"my-job": 32})


def test_client_thread_survives_remote_errors_and_wait_raises_the_first(cluster):
    results = []
    thread = cluster.client_thread(lambda jobid, result: results.append(result))
    thread.start()
    try:
        thread.submit(divide, 1, 0)
        for i in range(20):
            thread.submit(divide, i, 1)
        with pytest.raises(RemoteError, match="ZeroDivisionError") as caught:
            thread.wait()
        assert "in divide" in caught.value.remote_traceback
        assert sorted(results) == [float(i) for i in range(20)]
        thread.submit(square, 6)
        thread.wait()    # the error was reported once
        assert results[-1] == 36
        assert thread.is_alive()
    finally:
        thread.stop()
    assert not thread.is_alive()


def test_client_thread_reads_master_and_key_from_the_environment(cluster, monkeypatch):
    host, port = cluster.address
    monkeypatch.setenv("MINICW_MASTER", "%s:%d" % (host, port))
    monkeypatch.setenv("MINICW_AUTHKEY", cluster.authkey.decode())
    results = []
    with ClientThread(lambda jobid, result: results.append(result)) as thread:
        thread.submit(square, 9)
    assert results == [81]
    with ClusterExecutor() as executor:
        assert executor.submit(square, 3).result(10) == 9


def test_client_thread_cancel_stops_a_running_job(solo, tmp_path):
    started = str(tmp_path / "started")
    results = []
    with solo.client_thread(lambda jobid, result: results.append((jobid, result))) as thread:
        victim = thread.submit(touch_then_sleep, started, 60)
        wait_for_file(started)
        assert thread.cancel(victim) is True
        thread.submit("after", square, 4)
        thread.wait()
    assert results == [("after", 16)]


def test_client_thread_needs_start_and_a_callable(cluster):
    thread = cluster.client_thread(lambda jobid, result: None)
    with pytest.raises(MinicwError, match="call start"):
        thread.submit(square, 1)
    with thread:
        with pytest.raises(TypeError, match="callable"):
            thread.submit(3, 4)


# --- many clients, one master ------------------------------------------------------------------

def tagged(tag, i):
    return (tag, i, os.getpid())


def test_two_clients_get_only_their_own_results(cluster):
    outcomes = {}

    def run(tag):
        with cluster.executor() as executor:
            futures = [executor.submit(tagged, tag, i) for i in range(500)]
            outcomes[tag] = [f.result(30)[:2] for f in futures]
    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes["a"] == [("a", i) for i in range(500)]
    assert outcomes["b"] == [("b", i) for i in range(500)]


def nap(seconds):
    time.sleep(seconds)
    return seconds


def test_a_late_small_client_gets_its_fair_share(solo):
    with solo.executor() as big, solo.executor() as small:
        backlog = [big.submit(nap, 0.005) for _ in range(400)]
        time.sleep(0.2)   # the big client's backlog is queued on the master
        quick = [small.submit(square, i) for i in range(10)]
        assert [f.result(30) for f in quick] == [i * i for i in range(10)]
        done_before_small_finished = sum(f.done() for f in backlog)
        statuses = {c["client_id"]: c for c in small.status()["clients"]}
        assert len(statuses) >= 2
        big.shutdown(cancel_futures=True)
    # Round robin: the small client waited for about its share, not the backlog.
    assert done_before_small_finished < 150, done_before_small_finished


def test_status_shows_nodes_and_per_client_counts(cluster):
    with cluster.executor() as executor:
        assert [f.result(10) for f in [executor.submit(square, i) for i in range(30)]] == \
            [i * i for i in range(30)]
        status = executor.status()
        [node] = status["nodes"]
        assert node["nprocs"] == 2 and "busy_processes" in node._fields
        mine = [c for c in status["clients"] if c["done"] >= 30]
        assert mine and mine[0]["queued"] == 0 and mine[0]["failed"] == 0
        assert executor.list_workers()[0]["nprocs"] == 2


# --- the client's environment on the workers ---------------------------------------------------

def where_am_i():
    import importlib
    module = importlib.import_module("minicw_test_helper_module")
    return os.getcwd(), module.VALUE


def wander_off():
    os.chdir("/")
    sys.path.append("/wander-off")
    return os.getcwd()


def look_around():
    return os.getcwd(), "/wander-off" in sys.path


def test_jobs_run_in_the_clients_cwd_with_its_sys_path(solo, tmp_path, monkeypatch):
    library = tmp_path / "lib"
    library.mkdir()
    (library / "minicw_test_helper_module.py").write_text("VALUE = 'found on the path'\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(library))
    with solo.executor() as executor:
        assert executor.submit(where_am_i).result(20) == (str(workdir), "found on the path")
        # A job's chdir and sys.path edits do not leak into the next job.
        first, second = executor.submit(wander_off), executor.submit(look_around)
        assert first.result(20) == "/"
        assert second.result(20) == (str(workdir), False)
        assert list(executor.map(lambda _: os.getcwd(), range(5))) == [str(workdir)] * 5


PATH_EDITS = {
    "append": lambda path: path.append("/edited"),
    "insert": lambda path: path.insert(0, "/edited"),
    "setitem": lambda path: path.__setitem__(0, "/edited"),
    "slice": lambda path: path.__setitem__(slice(None), ["/edited"]),
    "delitem": lambda path: path.__delitem__(0),
    "iadd": lambda path: path.__iadd__(["/edited"]),
    "pop": lambda path: path.pop(),
    "remove": lambda path: path.remove(path[0]),
    "clear": lambda path: path.clear(),
    "sort": lambda path: path.sort(key=len),
    "reverse": lambda path: path.reverse(),
    "rebind": lambda path: setattr(sys, "path", ["/edited"]),
}


def edit_path_then_look(edit):
    """Edit sys.path the way named (None: only look); return sys.path as a job saw it."""
    if edit is not None:
        PATH_EDITS[edit](sys.path)
    return list(sys.path)


def current_path():
    return sys.path


def test_every_kind_of_sys_path_edit_is_undone_before_the_next_job(solo):
    # In-place edits are seen through a flag, not by comparing the lists, so
    # each kind of edit is checked: the job after it must see the path intact.
    steps = [None] + [step for edit in PATH_EDITS for step in (edit, None)]
    with solo.executor() as executor:
        seen = list(executor.map(edit_path_then_look, steps, chunksize=len(steps)))
        returned = executor.submit(current_path).result(20)
    intact = seen[0]
    assert "/edited" not in intact and len(intact) > 1
    for position, (edit, path) in enumerate(zip(steps, seen)):
        if edit is None:
            assert path == intact, "the job after %r saw %r" % (steps[position - 1], path)
    assert type(returned) is list and returned == intact  # sys.path itself, returned


def test_missing_cwd_on_the_worker_is_skipped_with_one_warning(solo, tmp_path, monkeypatch):
    doomed = tmp_path / "doomed"
    doomed.mkdir()
    monkeypatch.chdir(doomed)
    with solo.executor() as executor:
        assert executor.submit(os.getcwd).result(20) == str(doomed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            os.rmdir(str(doomed))   # still our cwd, but gone from the (shared) disk
            cwds = [f.result(20) for f in [executor.submit(os.getcwd) for _ in range(5)]]
            assert executor.submit(square, 2).result(20) == 4
        assert all(cwd != str(doomed) for cwd in cwds)
        notes = [w for w in caught if "does not exist on worker" in str(w.message)]
        assert len(notes) == 1, [str(w.message) for w in caught]
        assert str(doomed) in str(notes[0].message)


# --- broadcast and function caching ----------------------------------------------------------------

def byte_at(data, i):
    return len(data), data[i]


def test_broadcast_sends_large_data_once_per_node(cluster):
    data = bytes(range(256)) * (50 * 1024 * 1024 // 256)   # 50 MB
    with cluster.executor() as executor:
        handle = executor.broadcast(data)
        assert "50" not in repr(len(repr(handle)))  # the handle itself is small
        results = list(executor.map(byte_at, [handle] * 1000, range(1000)))
        assert results == [(len(data), i % 256) for i in range(1000)]
        transfers = executor._dispatcher.session.blob_transfers([handle.key])
        assert transfers == {handle.key: (1, 1)}   # put once, fetched by the one node once


def test_broadcast_through_client_thread_and_master_node(cluster):
    results = []
    with cluster.client_thread(lambda jobid, result: results.append(result)) as thread:
        handle = thread.broadcast({"weights": [1, 2, 3]})
        thread.submit(lambda table, i: table["weights"][i], handle, 2)
    assert results == [3]
    handle = cluster.broadcast(list(range(100)))
    cluster.load_envir("def total(arg):\n    data, n = arg\n    return sum(data[:n])\n",
                       from_file=False)
    cluster.register_target_function("total")
    cluster.load_args([(handle, 10), (handle, 100)])
    assert cluster.execute() == {(handle, 10): 45, (handle, 100): 4950}


def test_a_closure_is_sent_once_for_ten_thousand_jobs(cluster):
    offset = 7

    def shifted(x):
        return x + offset
    with cluster.executor() as executor:
        futures = [executor.submit(shifted, i) for i in range(10_000)]
        assert [f.result(60) for f in futures] == [i + 7 for i in range(10_000)]
        key = executor._dispatcher.function_key(shifted)
        assert executor._dispatcher.session.blob_transfers([key]) == {key: (1, 1)}


def test_unpicklable_argument_fails_only_its_job(executor):
    good = executor.submit(square, 3)
    bad = executor.submit(square, threading.Lock())
    with pytest.raises(minicw.SerializationError, match="arguments"):
        bad.result(10)
    assert good.result(10) == 9


def _fast_then_slow(x, marker):
    # Jobs 0-1999 take no time, 2000-2199 take 2 ms each, job 2200 waits (up
    # to 10 s) for the client to have seen a result: it can only if the
    # results of the chunk's first jobs were sent before the chunk ended.
    if 2000 <= x < 2200:
        time.sleep(0.002)
    if x == 2200:
        deadline = time.monotonic() + 10
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.01)
        return os.path.exists(marker)
    return x


def test_a_long_chunk_sends_its_first_results_before_it_ends(solo, tmp_path):
    # One chunk of 2201 jobs on one process.  The fast start makes the
    # process read its clock rarely; the slow jobs after it (0.4 s, more than
    # RESULT_FLUSH_S) must still make it flush within a few jobs.
    marker = str(tmp_path / "seen")
    jobs = 2201
    with solo.executor() as executor:
        # Warm-up: the function is loaded before the chunk that is watched.
        assert list(executor.map(_fast_then_slow, range(3), [marker] * 3)) == [0, 1, 2]
        results = executor.map(_fast_then_slow, range(jobs), [marker] * jobs, chunksize=jobs)
        first = next(results)
        open(marker, "w").close()
        rest = list(results)
    assert first == 0
    assert rest == list(range(1, 2200)) + [True]


def _nap(x):
    import time
    time.sleep(0.6)
    return x


def test_future_running_is_true_while_a_process_holds_its_job(solo):
    with solo.executor() as executor:
        first, second = executor.submit(_nap, 1), executor.submit(_nap, 2)
        deadline = time.monotonic() + 30
        while not first.running():
            assert time.monotonic() < deadline and not first.done()
            time.sleep(0.01)
        assert not first.done() and first.cancel() is False   # running: not cancellable
        assert second.running() is False                       # queued behind it
        assert first.result(30) == 1 and first.running() is False
        assert second.result(30) == 2 and not second.running()
        assert not first.cancelled()


def _long_nap(x):
    import time
    time.sleep(30)
    return x


def test_a_running_future_that_is_killed_ends_cancelled(solo):
    with solo.executor() as executor:
        future = executor.submit(_long_nap, 1)
        deadline = time.monotonic() + 30
        while not future.running():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert executor.kill(future) is True
        with pytest.raises(cf.CancelledError):
            future.result(30)
        assert future.cancelled() and not future.running()
