"""joblib's "minicw" backend and scikit-learn's n_jobs on a real cluster.

Skipped, saying why, where joblib or scikit-learn is not installed (CI
installs both: .ci/run); minicw itself never imports either.
"""
import os
import subprocess
import sys
import time

import pytest

joblib = pytest.importorskip("joblib", reason="joblib is not installed (pip install joblib)")

import minicw.joblib  # noqa: E402  (registers the backend)
from minicw import LocalCluster  # noqa: E402
from tests import helpers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def square_and_pid(x):
    return x * x, os.getpid()


def fail_or_sleep(x):
    if x == 0:
        time.sleep(0.5)
        raise ValueError("item 0 failed")
    time.sleep(300)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2) as running:
        yield running
        minicw.joblib.shutdown()


@pytest.fixture
def on_cluster(cluster):
    host, port = cluster.address
    with joblib.parallel_config(backend="minicw", host=host, port=port,
                                authkey=cluster.authkey):
        yield cluster


def _worker_pids(cluster):
    from tests.conftest import descendants
    return descendants(cluster._worker_process.pid)


def test_parallel_runs_on_the_cluster(on_cluster):
    out = joblib.Parallel(n_jobs=2)(joblib.delayed(square_and_pid)(i) for i in range(200))
    assert [value for value, _ in out] == [i * i for i in range(200)]
    assert {pid for _, pid in out} <= _worker_pids(on_cluster)
    assert os.getpid() not in {pid for _, pid in out}
    # closures and lambdas from the caller travel too
    offset = 7
    assert joblib.Parallel(n_jobs=-1)(joblib.delayed(lambda x: x + offset)(i)
                                      for i in range(5)) == [7, 8, 9, 10, 11]


def test_effective_n_jobs_is_the_clusters_process_count(on_cluster):
    assert joblib.effective_n_jobs(-1) == 2
    assert joblib.effective_n_jobs(8) == 2
    assert joblib.effective_n_jobs(1) == 1   # joblib runs n_jobs=1 here, in order
    with pytest.raises(ValueError, match="no meaning"):
        joblib.effective_n_jobs(0)


def test_n_jobs_1_needs_no_cluster_and_shutdown_lets_the_next_call_connect(on_cluster):
    backend = minicw.joblib.MinicwBackend(host="127.0.0.1", port=1)   # nothing listens
    assert backend.effective_n_jobs(1) == 1
    assert joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(-i) for i in range(3)) == [0, 1, 2]
    minicw.joblib.shutdown()
    assert joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(-i) for i in range(3)) == [0, 1, 2]


def test_the_older_parallel_backend_works_too(cluster):
    host, port = cluster.address
    with joblib.parallel_backend("minicw", host=host, port=port, authkey=cluster.authkey):
        assert joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(-i) for i in range(4)) == [
            0, 1, 2, 3]


def test_a_failed_call_raises_and_the_others_are_stopped(on_cluster):
    started = time.monotonic()
    with pytest.raises(ValueError, match="item 0 failed"):
        joblib.Parallel(n_jobs=2, batch_size=1)(
            joblib.delayed(fail_or_sleep)(i) for i in range(4))
    assert time.monotonic() - started < 30
    # the sleeping batches were killed: the cluster's processes serve at once
    executor = on_cluster.executor()
    assert executor.submit(abs, -3).result(timeout=20) == 3
    executor.shutdown()


def test_sharedmem_calls_run_in_this_process(on_cluster):
    """joblib gives calls that require shared memory its threading backend."""
    pids = joblib.Parallel(n_jobs=2, require="sharedmem")(
        joblib.delayed(os.getpid)() for _ in "ab")
    assert pids == [os.getpid()] * 2


def test_return_as_generator(on_cluster):
    gen = joblib.Parallel(n_jobs=2, return_as="generator")(
        joblib.delayed(abs)(-i) for i in range(10))
    assert list(gen) == list(range(10))


def test_scikit_learn_cross_val_score_runs_on_the_cluster(on_cluster):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install "
                        "scikit-learn)")
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    X, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500)
    expected = cross_val_score(model, X, y, cv=5, n_jobs=1)
    before = sum(node.jobs_done for node in on_cluster.list_workers())
    scores = cross_val_score(model, X, y, cv=5, n_jobs=2)
    assert list(scores) == list(expected)
    after = sum(node.jobs_done for node in on_cluster.list_workers())
    assert after > before, "the folds ran on the cluster's nodes"


def test_a_script_with_no_master_starts_its_own_cluster(tmp_path):
    """As a user runs it: no master anywhere, the backend starts a LocalCluster of
    n_jobs processes and stops it at exit."""
    script = tmp_path / "fit.py"
    script.write_text(
        "import os, joblib\n"
        "import minicw.joblib\n"
        "def where(x):\n"
        "    return os.getppid()\n"
        "with joblib.parallel_config(backend='minicw'):\n"
        "    parents = joblib.Parallel(n_jobs=2)(joblib.delayed(where)(i) for i in range(8))\n"
        "print(len(set(parents)), os.getpid() in parents)\n")
    env = helpers.no_master_env(tmp_path / "run")
    done = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    # every call ran in a process of one worker node, not a child of the script
    assert done.stdout.split() == ["1", "False"]
