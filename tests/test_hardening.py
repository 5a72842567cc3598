"""Hardening (issue 28), each fault caused for real: a job that kills its own
worker node, malformed calls through the manager, a session's blobs, files
under a zero umask.
"""
import os
import signal
import time

import pytest

from minicw import ClusterExecutor, WorkerCrashedError
from tests import helpers


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
    finally:
        for node in nodes:
            node.stop()
        master.stop()
