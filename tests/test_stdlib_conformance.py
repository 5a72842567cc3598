"""The standard library's own concurrent.futures tests, run against ClusterExecutor.

CPython ships them in its ``test`` package (a package of modules from 3.13, a
single module before).  The executor-independent mixins (ExecutorTest,
WaitTests, AsCompletedTests) are combined with a mixin that builds a
ClusterExecutor on a LocalCluster instead of a thread or process pool.  The
whole module is skipped on a Python installed without its ``test`` package.
"""
import sys
import unittest

import pytest

from minicw import ClusterExecutor, LocalCluster


def _stdlib_suites():
    try:
        from test.test_concurrent_futures import executor, test_as_completed, test_wait
        return executor.ExecutorTest, test_wait.WaitTests, test_as_completed.AsCompletedTests
    except ImportError:
        pass
    try:
        from test import test_concurrent_futures as module
    except ImportError:
        pytest.skip("this Python has no test.test_concurrent_futures (installed without "
                    "its test package)", allow_module_level=True)
    return module.ExecutorTest, module.WaitTests, module.AsCompletedTests


ExecutorTest, WaitTests, AsCompletedTests = _stdlib_suites()
_address = {}

# max_workers is a pool's size; a cluster's size is its worker nodes' business.
SKIPPED = {"test_max_workers_negative": "ClusterExecutor takes no max_workers"}
if sys.version_info < (3, 9):
    SKIPPED["test_submit_keyword"] = ("tests submit(fn=...), deprecated in 3.8 and removed "
                                      "in 3.9; ClusterExecutor follows 3.9+")


@pytest.fixture(scope="module", autouse=True)
def cluster():
    with LocalCluster(n_workers=2) as running:
        _address["args"] = running.address + (running.authkey,)
        yield running


class ClusterExecutorMixin:
    worker_count = 2   # the LocalCluster's worker processes

    def setUp(self):
        name = self._testMethodName
        if name in SKIPPED:
            self.skipTest(SKIPPED[name])
        # The stdlib's BaseTestCase.setUp also checks for stray threads; the
        # conftest leak check covers processes and ports here.
        unittest.TestCase.setUp(self)
        host, port, authkey = _address["args"]
        self.executor = ClusterExecutor(host, port, authkey)

    def tearDown(self):
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


class TestClusterExecutor(ClusterExecutorMixin, ExecutorTest, unittest.TestCase):
    pass


class TestClusterWait(ClusterExecutorMixin, WaitTests, unittest.TestCase):
    pass


class TestClusterAsCompleted(ClusterExecutorMixin, AsCompletedTests, unittest.TestCase):
    pass
