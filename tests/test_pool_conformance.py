"""The standard library's own multiprocessing.Pool tests, run against minicw.Pool.

CPython ships them in ``test._test_multiprocessing``: ``_TestPool``,
``_TestPoolWorkerErrors`` and ``_TestPoolWorkerLifetime`` are combined with
a mixin whose ``Pool`` is minicw.Pool (the latter two call
``multiprocessing.Pool`` themselves: it is minicw.Pool while they run).
Nothing names a master here, so every pool starts a LocalCluster of its
own, as a script moved from multiprocessing does on a laptop.  The whole
module is skipped on a Python installed without its ``test`` package.
"""
import multiprocessing
import unittest
from unittest import mock

import pytest

import minicw

try:
    from test import _test_multiprocessing as stdlib_tests
except ImportError:
    pytest.skip("this Python has no test._test_multiprocessing (installed without its "
                "test package)", allow_module_level=True)

SKIPPED = {
    "test_make_pool": "reads multiprocessing.Pool's private list of processes (_pool); "
                      "the ValueErrors it checks first are in test_pool.py",
    "test_pool_worker_lifetime": "reads the private _pool and calls _repopulate_pool(); "
                                 "test_pool.py checks maxtasksperchild by the processes' pids",
    "test_unpickleable_result": "its result is a lambda, which minicw sends by value; a "
                                "result nothing can serialize raises MaybeEncodingError "
                                "(test_pool.py)",
    "test_worker_finalization_via_atexit_handler_of_multiprocessing":
        "runs the standard library's Pool in a child interpreter; test_pool.py runs "
        "minicw's the same way",
}


@pytest.fixture(scope="module", autouse=True)
def every_pool_starts_its_own(no_master):
    yield


class MinicwPoolMixin(stdlib_tests.BaseMixin):
    TYPE = "processes"
    Pool = staticmethod(minicw.Pool)

    def setUp(self):
        name = self._testMethodName
        if name in SKIPPED:
            self.skipTest(SKIPPED[name])
        patcher = mock.patch.object(multiprocessing, "Pool", minicw.Pool)
        patcher.start()
        self.addCleanup(patcher.stop)
        super().setUp()


# The standard library's class first, as its own test modules combine them
# (its setUpClass starts the shared pool, then calls the mixin's).
class TestPool(stdlib_tests._TestPool, MinicwPoolMixin, unittest.TestCase):
    pass


class TestPoolWorkerErrors(stdlib_tests._TestPoolWorkerErrors, MinicwPoolMixin,
                           unittest.TestCase):
    pass


class TestPoolWorkerLifetime(stdlib_tests._TestPoolWorkerLifetime, MinicwPoolMixin,
                             unittest.TestCase):
    pass
