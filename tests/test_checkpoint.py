"""Checkpoints (checkpoint.py, store.py) against a real master and worker processes:
results journaled as they arrive, resumed runs that run only the missing jobs
(counted on the worker side: each job appends a line to a file), mismatched
files refused, a second writer refused, a client SIGKILLed halfway through
10,000 jobs and run again, a writer SIGKILLed mid-batch, a million stored
results read back in flat memory, and the ``python -m minicw store`` command.
"""
import collections
import itertools
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from minicw import (CheckpointError, CheckpointLockedError, CheckpointMismatchError,
                    RemoteError, config, journal, store)
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def square(x):
    return x * x


def cube(x):
    return x * x * x


def logged_square(x, log):
    """x * x, leaving a line in ``log`` for every time it runs."""
    with open(log, "a") as handle:
        handle.write("%d\n" % x)
    return x * x


def fails_on_threes(x):
    if x % 10 == 3:
        raise ValueError("bad %d" % x)
    return x


def runs(log) -> collections.Counter:
    """How many times each job ran, from a log of logged_square."""
    if not os.path.exists(log):
        return collections.Counter()
    with open(log) as handle:
        return collections.Counter(int(line) for line in handle)


def forget(path, lost) -> int:
    """Delete the stored outcomes of the jobs at positions where ``lost(position)``
    (a ClientThread's: of storing order), as a run killed before committing them
    would have lost them; how many were deleted."""
    connection = sqlite3.connect(str(path))
    deleted = 0
    with connection:
        runs = connection.execute("SELECT first, count, keys, value FROM results").fetchall()
        for first, count, keys, value in runs:
            keys, values = store.unpack_keys(keys), pickle.loads(value)
            connection.execute("DELETE FROM results WHERE first = ?", (first,))
            for position in range(first, first + count):
                if lost(position):
                    deleted += 1
                    continue
                connection.execute("INSERT INTO results VALUES (?, 1, ?, ?)", (
                    position, store.pack_keys([keys[position - first]]),
                    store.dump_value([values[position - first]])))
        for table in ("failures", "jobs"):
            for (index,) in connection.execute("SELECT idx FROM %s" % table).fetchall():
                if lost(index):
                    connection.execute("DELETE FROM %s WHERE idx = ?" % table, (index,))
                    deleted += 1
        connection.execute("UPDATE meta SET value = 'false' WHERE name = 'complete'")
    connection.close()
    return deleted


# --- map and imap_unordered ------------------------------------------------------------------

def test_map_journals_every_result_and_a_rerun_runs_only_the_missing(executor, tmp_path):
    path, log = str(tmp_path / "run.sqlite"), str(tmp_path / "ran.log")
    n = 3000
    expected = [x * x for x in range(n)]
    assert list(executor.map(logged_square, range(n), [log] * n, checkpoint=path)) == expected
    assert runs(log) == collections.Counter(range(n))
    with store.open(path) as stored:
        assert stored.counts() == store.Counts(done=n, failed=0, missing=0, total=n)
        assert stored.meta["complete"] is True
        assert (stored.meta["kind"], stored.meta["function"]) == ("map", "logged_square")
        assert stored[2999] == 2999 ** 2
        assert stored.get(12, log).value == 144
        assert list(itertools.islice(stored.results(), 3)) == [(0, 0), (1, 1), (2, 4)]
        with pytest.raises(KeyError, match="job 3000 is not in the run, whose jobs are 0 to 2999"):
            stored[3000]
    for suffix in ("-wal", "-shm", ".lock"):   # a finished run's file is one file, read or not
        assert not os.path.exists(path + suffix), suffix

    # The same call again runs nothing.
    os.remove(log)
    assert list(executor.map(logged_square, range(n), [log] * n, checkpoint=path)) == expected
    assert runs(log) == collections.Counter()

    # Jobs missing from the file (scattered, and a tail) run again, once each, and
    # the results come in order, stored and fresh interleaved.
    deleted = forget(path, lambda x: x % 7 == 3 or x >= 2500)
    assert list(executor.map(logged_square, range(n), [log] * n, checkpoint=path)) == expected
    ran = runs(log)
    assert sum(ran.values()) == deleted == len(ran)
    assert set(ran) == {x for x in range(n) if x % 7 == 3 or x >= 2500}
    with store.open(path) as stored:
        assert stored.counts().done == n and stored.meta["complete"] is True
    forget(path, lambda x: x == 5)
    with store.open(path) as stored:
        with pytest.raises(KeyError, match="job 5 has no outcome in .* .it has not run yet."):
            stored[5]


def test_imap_unordered_resumes_and_a_generator_gets_its_length_at_the_end(executor, tmp_path):
    path, log = str(tmp_path / "run.sqlite"), str(tmp_path / "ran.log")
    n = 2000
    items = lambda: ((x, log) for x in range(n))  # noqa: E731 - a fresh generator each run
    got = executor.map(logged_square, *zip(*items()), checkpoint=path, ordered=False)
    assert sorted(got) == [x * x for x in range(n)]
    forget(path, lambda x: x >= 1500 or x < 100)
    with store.open(path) as stored:
        assert stored.counts().missing == 600
    os.remove(log)
    got = list(executor.imap_unordered(logged_square, (x for x in range(n)), itertools.repeat(log),
                                       checkpoint=path))
    assert sorted(got) == [x * x for x in range(n)]
    assert set(runs(log)) == set(range(100)) | set(range(1500, n))
    with store.open(path) as stored:
        assert stored.meta["jobs"] == n and stored.meta["complete"] is True


def test_failures_are_stored_and_run_again_unless_rerun_failed_is_false(executor, tmp_path):
    path = str(tmp_path / "run.sqlite")
    with pytest.raises(ValueError, match="bad 3"):
        list(executor.map(fails_on_threes, range(100), checkpoint=path))
    with store.open(path) as stored:
        failure = next(stored.failures())
        assert (failure.index, failure.ok, failure.error) == (3, False, "ValueError: bad 3")
        assert isinstance(failure.value, RemoteError)
        with pytest.raises(RemoteError, match="bad 3"):
            stored[3]
    # rerun_failed=False: the stored failure is raised where the iteration reaches it,
    # as an uninterrupted run would (the job does not run again).
    results = executor.map(fails_on_threes, range(100), checkpoint=path, rerun_failed=False)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad 3") as raised:
        next(results)
    assert "fails_on_threes" in str(raised.value.__cause__)   # the remote traceback
    # By default failed jobs run again (and fail again here).
    with pytest.raises(ValueError, match="bad 3"):
        list(executor.map(fails_on_threes, range(100), checkpoint=path))


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(executor, tmp_path):
    path = str(tmp_path / "run.sqlite")
    assert list(executor.map(square, range(100), checkpoint=path)) == [x * x for x in range(100)]
    cases = [
        (lambda: executor.map(cube, range(100), checkpoint=path),
         "written for the function 'square' and this call runs 'cube'"),
        (lambda: executor.map(square, range(101), checkpoint=path),
         "written for 100 jobs and this call has 101"),
        (lambda: executor.map(square, range(100), checkpoint=path, key=str),
         "keyed by arguments and this call keys them by key function str"),
    ]
    for call, message in cases:
        with pytest.raises(CheckpointMismatchError, match=message):
            call()
    changed = list(range(100))
    changed[40] = -40
    with pytest.raises(CheckpointMismatchError, match="the arguments of job 40 differ"):
        list(executor.map(square, changed, checkpoint=path))

    # resume="force": the stored results are used; only the job whose arguments changed runs.
    assert list(executor.map(square, changed, checkpoint=path, resume="force")) == [
        x * x for x in changed]
    # ... also for fewer jobs: the file then holds this run's jobs only, and says it was forced.
    assert list(executor.map(square, range(30), checkpoint=path, resume="force")) == [
        x * x for x in range(30)]
    with store.open(path) as stored:
        assert stored.counts() == store.Counts(done=30, failed=0, missing=0, total=30)
        assert [forced["differences"] for forced in stored.meta["forced"]] == [
            ["it was written for 100 jobs and this call has 30"]]
        assert "  forced       %s: resumed with resume='force' although it was written for 100 " \
               "jobs and this call has 30" % stored.meta["forced"][0]["at"] in store.describe(stored)
    # resume=False starts the file over: a new function, and nothing from before.
    assert list(executor.map(cube, range(10), checkpoint=path, resume=False)) == [
        x ** 3 for x in range(10)]
    with store.open(path) as stored:
        assert stored.meta["function"] == "cube"
        assert stored.counts() == store.Counts(done=10, failed=0, missing=0, total=10)
    with pytest.raises(ValueError, match="resume must be"):
        executor.map(cube, range(10), checkpoint=path, resume="yes")
    with pytest.raises(CheckpointError, match="cannot use .* as a checkpoint: it is a directory; "
                       "name a file, such as .*run.sqlite"):
        executor.map(cube, range(10), checkpoint=str(tmp_path))


def test_a_changed_closure_is_refused(executor, tmp_path):
    path = str(tmp_path / "run.sqlite")

    def run(offset):   # the same line of code, as a script run twice
        return list(executor.map(lambda x: x + offset, range(5), checkpoint=path))
    assert run(1) == [1, 2, 3, 4, 5]
    assert run(1) == [1, 2, 3, 4, 5]
    with pytest.raises(CheckpointMismatchError, match="<lambda>' has changed since it was "
                       "written .its serialized code, defaults, globals or closure differ"):
        run(2)


def test_key_function_identifies_jobs(executor, tmp_path):
    path = str(tmp_path / "run.sqlite")
    words = [frozenset({"a%d" % i, "b%d" % i}) for i in range(20)]

    def label(pair):
        return ",".join(sorted(pair))
    assert list(executor.map(len, words, checkpoint=path, key=label)) == [2] * 20
    assert list(executor.map(len, words, checkpoint=path, key=label)) == [2] * 20
    with store.open(path) as stored:
        assert stored.meta["key_rule"] == "key function test_key_function_identifies_jobs." \
                                          "<locals>.label"
        assert stored.get("a7,b7").index == 7
        assert stored.get("nothing") is None
    words[3] = frozenset({"c3"})
    with pytest.raises(CheckpointMismatchError, match="the key of job 3 differs from the one it "
                       "stored .* the argument list changed, or the key function's value "
                       "does not pickle"):
        list(executor.map(len, words, checkpoint=path, key=label))


def test_a_second_writer_is_refused_while_the_first_runs(executor, tmp_path):
    path = str(tmp_path / "run.sqlite")
    first = executor.map(square, range(1000), checkpoint=path)
    assert next(first) == 0   # the run is under way and holds the file
    with pytest.raises(CheckpointLockedError, match=r"in use by another client \(pid %d on "
                       % os.getpid()):
        executor.map(square, range(1000), checkpoint=path)
    other = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            from minicw import journal, store
            try:
                journal.Journal(sys.argv[1], journal.run_meta(
                    store.KIND_MAP, "square", "k", None, "arguments", 1000))
            except Exception as exc:
                print(type(exc).__name__, exc)
            """), path], stdout=subprocess.PIPE, universal_newlines=True,
        env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert other.stdout.startswith("CheckpointLockedError checkpoint %s is in use by another "
                                   "client (pid %d" % (path, os.getpid())), other.stdout
    with store.open(path) as reading:   # readers are welcome meanwhile
        assert reading.meta["function"] == "square"
        assert "  in use by    pid %d on " % os.getpid() in store.describe(
            reading, writer=journal.writer_of(path))
    assert list(first) == [x * x for x in range(1, 1000)]
    assert not os.path.exists(path + ".lock")
    assert len(list(executor.map(square, range(1000), checkpoint=path))) == 1000


def test_a_map_dropped_before_its_first_result_releases_the_file(executor, tmp_path):
    path = str(tmp_path / "run.sqlite")
    executor.map(square, range(1000), checkpoint=path)    # never iterated
    assert not os.path.exists(path + ".lock")
    results = executor.map(square, range(1000), checkpoint=path)
    for value in results:
        if value > 100:
            break
    del results                                           # abandoned halfway
    assert not os.path.exists(path + ".lock")
    assert list(executor.map(square, range(1000), checkpoint=path)) == [
        x * x for x in range(1000)]


def test_files_that_are_not_checkpoints(executor, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, but long enough to have a header........\n" * 4)
    with pytest.raises(CheckpointError, match="notes.txt: it is not an SQLite file"):
        executor.map(square, range(3), checkpoint=str(text))
    other = tmp_path / "other.sqlite"
    connection = sqlite3.connect(str(other))
    connection.execute("CREATE TABLE users (name TEXT)")
    connection.commit()
    connection.close()
    with pytest.raises(CheckpointError, match="an SQLite file of another program"):
        executor.map(square, range(3), checkpoint=str(other))
    with pytest.raises(CheckpointError, match="its directory .*nowhere does not exist"):
        executor.map(square, range(3), checkpoint=str(tmp_path / "nowhere" / "run.sqlite"))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        store.open(tmp_path / "missing.sqlite")
    assert list(executor.map(square, range(3))) == [0, 1, 4]   # the executor is still fine


# --- execute() and ClientThread ----------------------------------------------------------------

ENVIR = """
def work(x):
    with open(LOG, "a") as handle:
        handle.write("%d\\n" % x)
    if x == FAIL:
        raise ValueError("no %d" % x)
    return x + 1000
"""


def test_execute_with_a_checkpoint(cluster, tmp_path):
    path, log = str(tmp_path / "run.sqlite"), str(tmp_path / "ran.log")
    envir = "LOG = %r\nFAIL = 17\n%s" % (log, ENVIR)
    cluster.load_envir(envir, from_file=False)
    cluster.register_target_function("work")
    cluster.load_args(list(range(200)))
    with pytest.raises(RemoteError, match="no 17") as raised:
        cluster.execute(checkpoint=path)
    assert raised.value.arg == 17
    with store.open(path) as stored:
        kept = len(stored)          # what arrived before execute() raised
        assert stored.counts().failed == 1 and stored.get(17).error == "ValueError: no 17"
    before = sum(runs(log).values())
    with pytest.raises(RemoteError, match="no 17") as raised:   # not run again
        cluster.execute(checkpoint=path, rerun_failed=False)
    assert raised.value.arg == 17 and runs(log)[17] == 1
    assert sum(runs(log).values()) - before == 200 - kept   # only the missing ones ran

    cluster.load_envir(envir.replace("FAIL = 17", "FAIL = -1"), from_file=False)
    cluster.register_target_function("work")
    with pytest.raises(CheckpointMismatchError, match="the environment differs"):
        cluster.execute(checkpoint=path)
    os.remove(log)
    assert cluster.execute(checkpoint=path, resume="force") == {x: x + 1000 for x in range(200)}
    assert runs(log) == collections.Counter([17])   # the failed job, and nothing else
    with store.open(path) as stored:
        assert stored.counts() == store.Counts(done=200, failed=0, missing=0, total=200)
        assert stored.get(17).value == 1017


def test_client_thread_resumed_by_job_id(cluster, tmp_path):
    path, log = str(tmp_path / "run.sqlite"), str(tmp_path / "ran.log")

    def run():
        got = {}
        with cluster.client_thread(got.__setitem__, checkpoint=path) as thread:
            for x in range(50):
                thread.submit(logged_square, x, log)           # job ids 1..50
            thread.submit("named", logged_square, 7, log)
        return got

    expected = {x + 1: x * x for x in range(50)}
    expected["named"] = 49
    assert run() == expected
    assert sum(runs(log).values()) == 51
    deleted = forget(path, lambda x: x % 5 == 0)
    os.remove(log)
    assert run() == expected
    assert sum(runs(log).values()) == deleted == 10   # only those ran again
    with store.open(path) as stored:
        assert len(stored) == 51
        assert stored.get("named").value == 49 and stored.get(50).value == 49 * 49
        assert stored["named"] == 49
        with pytest.raises(KeyError, match="no job with id 0 is stored"):
            stored[0]

    # The same job id for another call is refused.
    with cluster.client_thread(lambda *_: None, checkpoint=path) as thread:
        with pytest.raises(CheckpointMismatchError, match="job id 1 was stored for another call"):
            thread.submit(logged_square, 1000, log)


# --- killed clients and writers ---------------------------------------------------------------

KILLED_CLIENT = """
import json, sys, time
from minicw import ClusterExecutor

LOG, CHECKPOINT, OUT, PORT, KEY = sys.argv[1:6]


def job(x):
    with open(LOG, "a") as handle:
        handle.write("%d\\n" % x)
    time.sleep(0.0005)
    return x * 3


executor = ClusterExecutor("127.0.0.1", int(PORT), KEY)
results = list(executor.map(job, range(10000), checkpoint=CHECKPOINT, buffersize=WINDOW))
with open(OUT, "w") as handle:
    json.dump(results, handle)
executor.shutdown()
"""


def test_a_client_killed_halfway_runs_only_the_missing_jobs_again(tmp_path):
    """The acceptance run: SIGKILL a client halfway through 10,000 jobs, run it again."""
    window = 400
    script = tmp_path / "client.py"
    script.write_text(KILLED_CLIENT.replace("WINDOW", str(window)))   # no __main__ guard
    path, log, out = (str(tmp_path / name) for name in ("run.sqlite", "ran.log", "out.json"))
    master, port = helpers.start_master(extra_args=["--heartbeat-timeout", "2"])
    worker = helpers.start_worker(port, nprocs=2)
    clients = []
    try:
        argv = [sys.executable, str(script), log, path, out, str(port), helpers.KEY]
        env = dict(os.environ, PYTHONPATH=ROOT)
        first = helpers.Proc(argv, env=env)
        clients.append(first)
        deadline = time.monotonic() + 120
        while _stored(path) < 4000:
            assert first.popen.poll() is None, first.err
            assert time.monotonic() < deadline, "the first run stored %d" % _stored(path)
            time.sleep(0.05)
        first.stop(signal.SIGKILL)
        committed = _stored(path)
        ran_before = sum(runs(log).values())
        assert 4000 <= committed < 10000 and not os.path.exists(out)
        with store.open(path) as stored:
            assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert stored.counts() == store.Counts(committed, 0, 10000 - committed, 10000)

        second = helpers.Proc(argv, env=env)
        clients.append(second)
        assert second.wait(timeout=120) == 0, second.err
        with open(out) as handle:
            assert json.load(handle) == [x * 3 for x in range(10000)]
        ran = runs(log)
        assert set(ran) == set(range(10000))
        duplicates = sum(ran.values()) - 10000
        # Lost: the batch not yet committed when the client died, and the jobs
        # it had in flight (which its node finished anyway).
        assert duplicates <= config.CHECKPOINT_BATCH_JOBS + window, duplicates
        ran_again = sum(ran.values()) - ran_before
        assert 10000 - committed <= ran_again <= 10000 - committed + window
        print("committed at the kill %d; jobs run twice %d; run by the second client %d"
              % (committed, duplicates, ran_again))
    finally:
        for proc in clients + [worker, master]:
            proc.stop()


def _stored(path) -> int:
    try:
        with store.open(path) as stored:
            return len(stored)
    except CheckpointError:
        return 0


WRITER = """
import sys
from minicw import journal, store
opened = journal.Journal(sys.argv[1], journal.run_meta(
    store.KIND_MAP, "f", "k", None, "arguments", None), resume="force")
position = 0
while True:
    opened.add_outcomes(range(position, position + 500), range(500),
                        [bytes(2000) + str(position + i).encode() for i in range(500)])
    position += 500
"""


@pytest.mark.parametrize("delay", [0.3, 0.55, 0.8])
def test_the_file_is_consistent_after_a_writer_is_killed_at_any_moment(tmp_path, delay):
    path = str(tmp_path / "run.sqlite")
    writer = helpers.Proc([sys.executable, "-c", WRITER, path],
                          env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        deadline = time.monotonic() + 60
        while _stored(path) == 0:
            assert writer.popen.poll() is None, writer.err
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        writer.stop(signal.SIGKILL)
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    connection.close()
    with store.open(path) as stored:
        count = 0
        for count, record in enumerate(stored.records(), 1):
            assert record.value == bytes(2000) + str(record.index).encode()
        assert count == len(stored) > 0
        assert count % 500 == 0   # whole runs: a run is written in one transaction


READER = """
import resource, sys
from minicw import store

def rss_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 1e6

with store.open(sys.argv[1]) as stored:
    before = rss_mb()
    total = count = 0
    for index, value in stored.results():
        total += value[1]
        count += 1
    counts = stored.counts()
    print(count, total, counts.done, counts.missing, round(rss_mb() - before, 1))
"""


def test_a_million_stored_results_are_read_in_flat_memory(tmp_path):
    path = str(tmp_path / "big.sqlite")
    n = 1000000
    opened = journal.Journal(path, journal.run_meta(
        store.KIND_MAP, "f", "k", None, "arguments", n))
    for first in range(0, n, 10000):
        for start in range(first, first + 10000, 1000):   # runs of 1,000, as chunks come
            opened.add_outcomes(range(start, start + 1000), range(start, start + 1000),
                                [("result number %d" % i, i) for i in range(start, start + 1000)])
    opened.close()
    reader = subprocess.run([sys.executable, "-c", READER, path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True,
                            env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    count, total, done, missing, growth = reader.stdout.split()
    assert (int(count), int(total), int(done), int(missing)) == (n, n * (n - 1) // 2, n, 0)
    assert float(growth) < 50, "reading %d results grew the reader by %s MB" % (n, growth)


# --- python -m minicw store --------------------------------------------------------------------

def test_the_store_command(executor, tmp_path):
    path = str(tmp_path / "run.sqlite")
    with pytest.raises(ValueError):
        list(executor.map(fails_on_threes, range(40), checkpoint=path, buffersize=40))
    command = subprocess.run([sys.executable, "-m", "minicw", "store", path],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, env=dict(os.environ, PYTHONPATH=ROOT),
                             timeout=60)
    assert command.returncode == 0, command.stderr
    with store.open(path) as stored:
        counts = stored.counts()
    lines = command.stdout.splitlines()
    assert lines[0] == "checkpoint %s" % path
    assert "  function     fails_on_threes" in lines
    # (", complete" follows when every outcome arrived before the map raised)
    assert [line for line in lines if line.startswith("  jobs         40")]
    assert "  done         %d" % counts.done in lines
    assert "  failed       %d" % counts.failed in lines and counts.failed >= 1
    assert "  missing      %d" % counts.missing in lines
    assert "  job 3: ValueError: bad 3" in lines
    missing = subprocess.run([sys.executable, "-m", "minicw", "store", path + ".nope"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, env=dict(os.environ, PYTHONPATH=ROOT),
                             timeout=60)
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "minicw store: no checkpoint at %s.nope\n" % path


# --- the example, as the README tells it -------------------------------------------------------

def test_the_resume_example_stopped_with_ctrl_c_and_run_again(tmp_path):
    example = os.path.join(ROOT, "examples", "resume.py")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MINICW_MASTER", None)
    path = str(tmp_path / "resume.sqlite")
    first = helpers.Proc([sys.executable, example, "3000", path], env=env)
    try:
        deadline = time.monotonic() + 60
        while _stored(path) < 500:
            assert first.popen.poll() is None, first.err
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGINT)     # Ctrl-C
        assert first.wait(timeout=30) == 130
    finally:
        first.stop()
    assert first.out[-1] == ("stopped: %s keeps the results so far; run the same command "
                             "again to go on" % path)
    kept = _stored(path)
    assert 500 <= kept < 3000
    again = subprocess.run([sys.executable, example, "3000", path], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert lines[0] == "%s holds %d results of an earlier run" % (path, kept)
    assert lines[1].startswith("3000 jobs, sum of squares 8995500500, in ")
    assert "Traceback" not in again.stderr


EXITING_CLIENT = """
import sys
from minicw import ClusterExecutor
CHECKPOINT, PORT, KEY = sys.argv[1:4]


def triple(x):
    return 3 * x


executor = ClusterExecutor("127.0.0.1", int(PORT), KEY)
results = executor.map(triple, range(3000), checkpoint=CHECKPOINT, buffersize=100)
print(next(results), flush=True)
# The script ends with the map unfinished: at exit the executor lets it finish,
# and every result still reaches the file.
"""


def test_a_script_that_exits_with_its_map_unfinished_still_journals_it(tmp_path):
    script = tmp_path / "client.py"
    script.write_text(EXITING_CLIENT)
    path = str(tmp_path / "run.sqlite")
    master, port = helpers.start_master()
    worker = helpers.start_worker(port, nprocs=2)
    try:
        done = subprocess.run([sys.executable, str(script), path, str(port), helpers.KEY],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, env=dict(os.environ, PYTHONPATH=ROOT),
                              timeout=120)
        assert (done.returncode, done.stdout, done.stderr) == (0, "0\n", "")
        with store.open(path) as stored:
            assert stored.counts() == store.Counts(3000, 0, 0, 3000)
            assert stored.meta["complete"] is True and stored[2999] == 8997
        assert not os.path.exists(path + ".lock")
    finally:
        worker.stop()
        master.stop()
