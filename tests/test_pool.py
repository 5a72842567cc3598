"""minicw.Pool against real clusters: multiprocessing.Pool's methods, its errors,
initializer and maxtasksperchild, a LocalCluster of its own or a running one.

Most tests share one pool of 2 worker processes that started its own
LocalCluster (no master is named: MINICW_MASTER unset and an empty run
directory); the tests of a running cluster start one and name it.
"""
import collections
import itertools
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import CancelledError
from multiprocessing.pool import MaybeEncodingError, RemoteTraceback

import pytest

from minicw import LocalCluster, Pool, WorkerCrashedError
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- what the workers run (module level: the workers import this module) ----------------------

def square(x):
    return x * x


def add(x, y):
    return x + y


def pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


def fail_on(x, bad=3):
    if x == bad:
        raise KeyError("bad item %d" % x)   # a comment the remote traceback quotes
    return x


def return_lock(_):
    return threading.Lock()


def slow_square(x, seconds=0.2):
    time.sleep(seconds)
    return x * x


def crash_process(_):
    os._exit(13)


STATE = None


def set_state(tag):
    global STATE
    STATE = "%s-%d" % (tag, os.getpid())


def read_state(_=None):
    return STATE


def count_initializer(path):
    with open(path, "a") as handle:
        handle.write("%d\n" % os.getpid())


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle Unpicklable")


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool(no_master):
    with Pool(2) as running:
        yield running


def _pool_processes(pool):
    """PIDs of the pool's own cluster: its master and its node with their children."""
    from tests.conftest import descendants
    cluster = pool._cluster
    pids = {cluster._master_process.pid, cluster._worker_process.pid}
    for pid in list(pids):
        pids |= descendants(pid)
    return pids


# --- the methods ----------------------------------------------------------------------------

def test_apply_and_apply_async(pool):
    assert pool.apply(square, (5,)) == 25
    assert pool.apply(add, (), {"x": 2, "y": 3}) == 5
    seen = []
    result = pool.apply_async(add, (1, 2), callback=seen.append)
    assert result.get(timeout=10) == 3
    assert seen == [3]
    assert result.ready() and result.successful()
    result.wait()   # returns at once when ready


def test_map_starmap_and_their_async_forms(pool):
    assert pool.map(square, range(10)) == [x * x for x in range(10)]
    assert pool.map(square, range(100), chunksize=7) == [x * x for x in range(100)]
    assert pool.map(square, iter(range(33))) == [x * x for x in range(33)]   # no len()
    assert pool.map(square, {3, 1, 2}) == [square(x) for x in {3, 1, 2}]  # no slicing
    pairs = list(zip(range(20), range(20, 0, -1)))
    assert pool.starmap(add, pairs) == [a + b for a, b in pairs]
    assert pool.starmap(add, pairs, chunksize=3) == [a + b for a, b in pairs]
    assert pool.starmap_async(add, pairs).get(10) == [a + b for a, b in pairs]
    seen = []
    assert pool.map_async(square, [1, 2, 3], callback=seen.append).get(10) == [1, 4, 9]
    assert seen == [[1, 4, 9]]


def test_imap_and_imap_unordered(pool):
    assert list(pool.imap(square, range(10))) == [x * x for x in range(10)]
    it = pool.imap(square, range(1000), chunksize=100)
    assert [next(it) for _ in range(1000)] == [x * x for x in range(1000)]
    with pytest.raises(StopIteration):
        next(it)
    assert sorted(pool.imap_unordered(square, range(50))) == [x * x for x in range(50)]
    assert sorted(pool.imap_unordered(square, range(50), chunksize=7)) == [
        x * x for x in range(50)]
    with pytest.raises(ValueError, match="Chunksize must be 1\\+"):
        pool.imap(square, range(3), chunksize=0)


def test_empty_iterables(pool):
    assert pool.map(square, []) == []
    assert list(pool.imap(square, [])) == []
    assert list(pool.imap_unordered(square, [])) == []
    called = []
    result = pool.map_async(square, [], callback=called.append)
    assert result.get(1) == [] and result.successful()
    assert pool.starmap(add, []) == []


def test_callbacks_run_before_wait_returns(pool):
    seen = []
    pool.map_async(int, ["1"], callback=seen.append, error_callback=seen.append).wait()
    assert seen == [[1]]
    pool.map_async(int, ["a"], callback=seen.append, error_callback=seen.append).wait()
    assert len(seen) == 2 and isinstance(seen[1], ValueError)
    errors = []
    result = pool.apply_async(fail_on, (3,), error_callback=errors.append)
    with pytest.raises(KeyError):
        result.get(10)
    assert isinstance(errors[0], KeyError) and not result.successful()


def test_a_callback_that_raises_does_not_hang_the_result(pool, caplog):
    def broken(_):
        raise RuntimeError("the callback is broken")
    result = pool.apply_async(square, (3,), callback=broken)
    assert result.get(10) == 9
    assert "callback raised" in caplog.text


def test_a_result_keeps_its_pool_alive(tmp_path):
    """As multiprocessing's: a pool nobody holds lives until its results are in
    (in a script: pytest's own warning capture would keep the pool alive)."""
    script = tmp_path / "temporary_pool.py"
    script.write_text(textwrap.dedent("""\
        import time
        from minicw import Pool
        def slow_square(x):
            time.sleep(0.3)
            return x * x
        print(Pool(1).apply_async(slow_square, (3,)).get(timeout=20))
        print(list(Pool(1).imap(slow_square, range(4))))
        """))
    env = helpers.no_master_env(tmp_path / "run")
    done = subprocess.run([sys.executable, "-W", "ignore::ResourceWarning", str(script)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["9", "[0, 1, 4, 9]"]


def raise_system_exit(_):
    raise SystemExit("a callback that exits")


def test_a_callback_that_raises_system_exit_does_not_stop_the_results(pool):
    first = pool.apply_async(square, (2,), callback=raise_system_exit)
    assert first.get(10) == 4
    assert pool.apply(square, (5,)) == 25   # the receiver thread went on


def test_iterators_are_multiprocessings_kinds(pool):
    assert isinstance(pool.imap(square, [1]), multiprocessing.pool.IMapIterator)
    assert isinstance(pool.imap_unordered(square, [1]),
                      multiprocessing.pool.IMapUnorderedIterator)
    assert isinstance(pool.apply_async(square, (1,)), multiprocessing.pool.AsyncResult)


# --- errors, as multiprocessing raises them ----------------------------------------------------

def test_a_jobs_exception_comes_back_with_its_remote_traceback(pool):
    with pytest.raises(KeyError) as caught:
        pool.apply(fail_on, (3,))
    assert caught.value.args == ("bad item 3",)
    cause = caught.value.__cause__
    assert type(cause) is RemoteTraceback
    assert "a comment the remote traceback quotes" in cause.tb
    with pytest.raises(KeyError):
        pool.map(fail_on, range(10))


def test_map_raises_the_first_failure_after_every_chunk_came_back(pool):
    started = time.monotonic()
    with pytest.raises(KeyError):
        pool.map(fail_on, [3, 0, 0, 0], chunksize=1)
    # the other chunks still ran: the pool's cache holds nothing afterwards
    assert len(pool._cache) == 0
    assert time.monotonic() - started < 30


def test_a_result_that_cannot_be_pickled_is_a_maybe_encoding_error(pool):
    for _ in range(5):   # no process is lost to it
        errors = []
        result = pool.apply_async(return_lock, (1,), error_callback=errors.append)
        with pytest.raises(MaybeEncodingError) as caught:
            result.get(10)
        assert "lock" in caught.value.value and caught.value.exc
        assert errors and isinstance(errors[0], MaybeEncodingError)
    with pytest.raises(MaybeEncodingError):
        pool.map(return_lock, range(4))
    assert pool.apply(square, (4,)) == 16


def test_an_argument_that_cannot_be_pickled_raises_the_picklers_own_error(pool):
    with pytest.raises(RuntimeError, match="cannot pickle Unpicklable"):
        pool.map(square, [Unpicklable()] * 10)
    with pytest.raises(RuntimeError, match="cannot pickle Unpicklable"):
        pool.apply(square, (Unpicklable(),))
    with pytest.raises(RuntimeError, match="cannot pickle Unpicklable"):
        list(pool.imap(square, [Unpicklable()]))
    # what the C pickler refuses: its TypeError, not minicw's SerializationError
    with pytest.raises(TypeError, match="cannot pickle '_thread.lock' object") as caught:
        pool.apply(square, (threading.Lock(),))
    assert type(caught.value) is TypeError
    with pytest.raises(TypeError, match="_thread.lock"):
        pool.map(square, [threading.Lock()])
    assert pool.apply(square, (6,)) == 36


def _raise_at(total, when):
    for i in range(total):
        if i == when:
            raise ZeroDivisionError("the input ran out at %d" % when)
        yield i


def test_an_exception_from_the_input_is_raised_unwrapped(pool):
    with pytest.raises(ZeroDivisionError) as caught:
        pool.map(square, _raise_at(10, 3))
    assert caught.value.__cause__ is None
    # imap: the results of the whole chunks before it, then the exception
    it = pool.imap(square, _raise_at(20, 7), 2)
    assert [next(it) for _ in range(6)] == [x * x for x in range(6)]
    with pytest.raises(ZeroDivisionError):
        next(it)
    it = pool.imap(square, _raise_at(1, 0))
    with pytest.raises(ZeroDivisionError):
        next(it)
    got = []
    with pytest.raises(ZeroDivisionError):
        for value in pool.imap_unordered(square, _raise_at(10, 3)):
            got.append(value)
    assert sorted(got) == [0, 1, 4]


def test_get_and_next_time_out_with_multiprocessings_timeout_error(pool):
    result = pool.apply_async(slow_square, (3, 1.5))
    started = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.3)
    assert time.monotonic() - started < 1.4
    assert not result.ready()
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    assert result.get(timeout=10) == 9
    it = pool.imap(slow_square, [1, 2], 1)
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.05)
    assert it.next(timeout=10) == 1   # the iterator goes on after a timeout
    assert list(it) == [4]


def test_imap_reads_its_input_lazily(pool):
    pulled = itertools.count()

    def numbers():
        for i in range(10 ** 9):
            next(pulled)
            yield i

    it = pool.imap(square, numbers(), chunksize=10)
    assert [next(it) for _ in range(25)] == [x * x for x in range(25)]
    del it
    read = next(pulled)
    assert read < 10 ** 5, "imap read %d items ahead of 25 taken" % read


def test_a_pool_that_is_not_running_refuses_work(no_master):
    pool = Pool(1)
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply_async(square, (1,))
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(square, [1])
    with pytest.raises(ValueError, match="Pool not running"):
        with pool:
            pass
    pool.join()
    with Pool(1) as entered:
        assert entered.map(square, [2]) == [4]
    with pytest.raises(ValueError, match="Pool not running"):
        entered.imap(square, [1])
    entered.join()
    running = Pool(1)
    with pytest.raises(ValueError, match="still running"):
        running.join()
    running.terminate()
    running.join()


def test_bad_arguments_are_refused_as_multiprocessing_refuses_them(no_master):
    for processes in (0, -1):
        with pytest.raises(ValueError, match="at least 1"):
            Pool(processes)
    for value in (0, -1, 0.5, "12"):
        with pytest.raises(ValueError, match="maxtasksperchild"):
            Pool(1, maxtasksperchild=value)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        Pool(1, initializer=1)
    with pytest.raises(NotImplementedError):
        import pickle
        with Pool(1) as running:
            pickle.dumps(running)


# --- close, join, terminate -----------------------------------------------------------------

def test_close_and_join_wait_for_every_task_and_stop_the_cluster(no_master):
    pool = Pool(2)
    processes = _pool_processes(pool)
    results = [pool.apply_async(slow_square, (i, 0.2)) for i in range(6)]
    it = pool.imap(square, range(40), chunksize=3)   # not consumed before join
    pool.close()
    pool.join()
    assert [r.get(0) for r in results] == [i * i for i in range(6)]
    assert list(it) == [x * x for x in range(40)]
    _assert_gone(processes)


def test_terminate_stops_running_tasks_at_once(no_master):
    pool = Pool(2)
    processes = _pool_processes(pool)
    result = pool.map_async(time.sleep, [300] * 1000, chunksize=1)
    applied = pool.apply_async(time.sleep, (300,))
    time.sleep(0.5)
    started = time.monotonic()
    pool.terminate()
    pool.join()
    assert time.monotonic() - started < 15
    for pending in (result, applied):
        with pytest.raises(CancelledError, match="terminated"):
            pending.get(0)
    _assert_gone(processes)


def test_an_unclosed_pool_warns_when_collected(no_master):
    pool = Pool(1)
    processes = _pool_processes(pool)
    with pytest.warns(ResourceWarning, match="unclosed running multiprocessing pool"):
        del pool
        import gc
        gc.collect()
    _assert_gone(processes)


def _assert_gone(pids, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive:
            return
        assert time.monotonic() < deadline, "still running: %s" % alive
        time.sleep(0.05)


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- initializer and maxtasksperchild ----------------------------------------------------------

def test_the_initializer_sets_globals_the_tasks_read(no_master):
    with Pool(2, initializer=set_state, initargs=("ready",)) as pool:
        states = pool.map(read_state, range(20), chunksize=1)
        assert all(state is not None and state.startswith("ready-") for state in states)
        pids = {int(state.split("-")[1]) for state in states}
        assert pids <= _pool_processes(pool)
        assert pool.apply(read_state).startswith("ready-")
        # a function sent later still sees what the initializer set
        later = pool.map(read_state, [None] * 4)
        assert all(state is not None and state.startswith("ready-") for state in later)
        assert {int(state.split("-")[1]) for state in later} <= _pool_processes(pool)


def test_the_initializer_runs_once_per_process_and_again_in_a_replacement(no_master,
                                                                           tmp_path):
    log = tmp_path / "initialized"
    with Pool(2, initializer=count_initializer, initargs=(str(log),)) as pool:
        pids = set(pool.map(pid_after, [0.05] * 20, chunksize=1))
        ran = collections.Counter(int(line) for line in log.read_text().split())
        assert set(ran) >= pids and set(ran.values()) == {1}
        with pytest.raises(WorkerCrashedError):
            pool.apply(crash_process, (1,))
        after = set(pool.map(pid_after, [0.05] * 20, chunksize=1))
        ran = collections.Counter(int(line) for line in log.read_text().split())
        assert set(ran) >= after and set(ran.values()) == {1}
        assert after - pids, "a replacement process ran tasks"


def test_the_own_clusters_processes_run_the_initializer_when_they_start(no_master, tmp_path):
    """As multiprocessing's: no task needed, and join() returns after it ran."""
    log = tmp_path / "initialized"
    pool = Pool(2, initializer=count_initializer, initargs=(str(log),))
    processes = _pool_processes(pool)
    pool.close()
    pool.join()
    ran = [int(line) for line in log.read_text().split()]
    assert len(ran) == 2 and len(set(ran)) == 2
    assert set(ran) <= processes
    _assert_gone(processes)


def broken_initializer():
    raise OSError("the initializer cannot open its data")


def test_an_initializer_that_fails_fails_the_tasks_with_its_error(no_master):
    with Pool(1, initializer=broken_initializer) as pool:
        with pytest.raises(OSError, match="cannot open its data") as caught:
            pool.apply(square, (2,))
        assert "broken_initializer" in caught.value.__cause__.tb
        with pytest.raises(OSError):
            pool.map(square, range(3))


def test_maxtasksperchild_replaces_a_process_after_that_many_tasks(no_master):
    with Pool(2, maxtasksperchild=3) as pool:
        pids = collections.Counter(r.get(20) for r in [pool.apply_async(pid_after, (0.01,))
                                                       for _ in range(12)])
        assert sorted(pids.values()) == [3, 3, 3, 3]
        # a map's task is a chunk: 24 items in chunks of 2 are 12 tasks
        per_pid = collections.Counter(pool.map(pid_after, [0.01] * 24, chunksize=2))
        assert sorted(per_pid.values()) == [6, 6, 6, 6]
        assert not set(per_pid) & set(pids)


def test_maxtasksperchild_with_an_initializer_and_early_close(no_master):
    pool = Pool(1, initializer=set_state, initargs=("w",), maxtasksperchild=1)
    results = [pool.apply_async(read_state) for _ in range(4)]
    pool.close()
    pool.join()
    states = [r.get(0) for r in results]
    assert len(set(states)) == 4 and all(s.startswith("w-") for s in states)


# --- a running cluster ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def running_cluster():
    with LocalCluster(n_workers=2) as cluster:
        yield cluster


def test_a_named_cluster_is_used_and_left_running(running_cluster):
    host, port = running_cluster.address
    with Pool(host=host, port=port, authkey=running_cluster.authkey) as pool:
        assert pool._cluster is None and pool.address == (host, port)
        assert pool.map(square, range(30)) == [x * x for x in range(30)]
        assert pool._pool_size() == 2
    assert running_cluster.executor().submit(square, 3).result(10) == 9


def test_minicw_master_names_the_cluster(running_cluster, monkeypatch):
    host, port = running_cluster.address
    monkeypatch.setenv("MINICW_MASTER", "%s:%d" % (host, port))
    monkeypatch.setenv("MINICW_AUTHKEY", running_cluster.authkey.decode())
    with Pool() as pool:
        assert pool._cluster is None and pool.address == (host, port)
        assert pool.apply(square, (9,)) == 81


def test_terminate_on_a_shared_cluster_kills_only_this_pools_tasks(running_cluster):
    host, port = running_cluster.address
    key = running_cluster.authkey
    other = running_cluster.executor()
    pool = Pool(host=host, port=port, authkey=key)
    sleeping = pool.map_async(time.sleep, [300] * 4, chunksize=1)
    _wait_until_busy(running_cluster, 2)   # both processes hold a sleeping task
    started = time.monotonic()
    pool.terminate()
    pool.join()
    with pytest.raises(CancelledError):
        sleeping.get(0)
    # the cluster's processes are free again at once, and serve others
    assert other.submit(square, 7).result(timeout=20) == 49
    assert time.monotonic() - started < 20
    other.shutdown()


def test_terminate_on_a_shared_cluster_ends_imap_iterators(running_cluster):
    host, port = running_cluster.address
    pool = Pool(host=host, port=port, authkey=running_cluster.authkey)
    it = pool.imap(slow_square, range(40))
    assert next(it) == 0
    pool.terminate()
    with pytest.raises(CancelledError, match="terminated"):
        for _ in it:
            pass
    pool.join()


def _wait_until_busy(cluster, processes, timeout=20):
    deadline = time.monotonic() + timeout
    while sum(node.busy_processes for node in cluster.list_workers()) < processes:
        assert time.monotonic() < deadline, "the tasks never started"
        time.sleep(0.05)


def test_two_pools_share_a_cluster(running_cluster):
    host, port = running_cluster.address
    key = running_cluster.authkey
    with Pool(host=host, port=port, authkey=key) as first, \
            Pool(host=host, port=port, authkey=key) as second:
        a = first.map_async(slow_square, [(i) for i in range(20)], chunksize=1)
        b = second.map_async(slow_square, [(i) for i in range(20)], chunksize=1)
        assert a.get(60) == b.get(60) == [i * i for i in range(20)]


# --- as people run it: a script whose only change is its import ---------------------------------

SCRIPT = """\
{import_line}
import os

def work(x):
    return x * x, len(str(x))

def star(a, b):
    return a - b

pool = Pool(2)
print(pool.map(work, range(12)))
print(sorted(pool.imap_unordered(work, range(5))))
print(list(pool.imap(work, range(5), 2)))
print(pool.starmap(star, [(5, 2), (9, 4)]))
print(pool.apply(divmod, (17, 5)))
result = pool.map_async(work, [3, 4])
print(result.get(30), result.successful())
try:
    pool.apply(int, ("x",))
except ValueError as exc:
    print("ValueError:", exc)
pool.close()
pool.join()
with Pool(2) as pool:
    print(pool.map(abs, [-1, -2]))
"""


def test_a_script_without_a_main_guard_gives_multiprocessings_output(tmp_path):
    """The same script, without ``if __name__ == "__main__"``, with its import
    changed: the standard library's (under fork: spawn and forkserver would
    run the unguarded top level again in each child) and minicw's print the
    same lines."""
    env = helpers.no_master_env(tmp_path / "run")
    outputs = {}
    for name, line in (("with_stdlib", "from multiprocessing import Pool\nimport multiprocessing\n"
                                  "multiprocessing.set_start_method('fork')"),
                       ("with_minicw", "from minicw import Pool")):
        script = tmp_path / ("%s.py" % name)
        script.write_text(SCRIPT.format(import_line=line))
        done = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, env=env,
                              timeout=120, cwd=str(tmp_path))
        assert done.returncode == 0, done.stderr
        outputs[name] = done.stdout
    assert outputs["with_minicw"] == outputs["with_stdlib"]
    assert "[(0, 1), (1, 1), (4, 1)" in outputs["with_minicw"]
    assert "ValueError: invalid literal" in outputs["with_minicw"]


def test_what_tasks_print_comes_back_as_they_wrote_it(no_master, capfd):
    with Pool(1) as pool:
        pool.map(print, ["printed by a task"])
    lines = [line for line in capfd.readouterr().out.splitlines() if "by a task" in line]
    assert lines == ["printed by a task"]   # no "[host:pid job]" prefix


def test_pool_module_terminates_live_pools_at_exit(tmp_path):
    """A pool kept in a global and never closed: the interpreter exits at once,
    and takes its cluster with it."""
    script = tmp_path / "left_open.py"
    script.write_text(textwrap.dedent("""\
        import os, sys
        from minicw import Pool
        class Holder:
            def __init__(self):
                self.pool = Pool(processes=1)
        holder = Holder()
        print(holder.pool.map(float, tuple(range(10)))[-1])
        cluster = holder.pool._cluster
        print(cluster._master_process.pid, cluster._worker_process.pid, flush=True)
        """))
    env = helpers.no_master_env(tmp_path / "run")
    done = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines[0] == "9.0"
    _assert_gone([int(lines[1]), int(lines[2])])


def put_square(arguments):
    shared, key = arguments
    shared[key] = key * key


def test_a_managers_proxies_reach_the_pools_own_workers(no_master):
    """The pool's own worker processes share this process's multiprocessing
    authkey, as multiprocessing's children do: a Manager's dict passed to
    the tasks is written from there."""
    with multiprocessing.get_context("spawn").Manager() as manager:
        shared = manager.dict()
        with Pool(2) as pool:
            pool.map(put_square, [(shared, key) for key in range(6)])
        assert dict(shared) == {key: key * key for key in range(6)}
