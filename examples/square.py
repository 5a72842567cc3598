"""Square numbers with callbacks: the cluster-workers ``square.py`` example.

Run:  python examples/square.py
      MINICW_MASTER=host:port MINICW_AUTHKEY=key python examples/square.py

Without MINICW_MASTER it starts a LocalCluster (a master and workers on
127.0.0.1) for the run; with it, it uses that cluster's master.
"""
import contextlib
import os
import sys
import threading

from minicw import ClientThread, LocalCluster

N_JOBS = 1000


def square(x):
    return x * x


def run(thread_factory):
    results = {}
    lock = threading.Lock()

    def callback(jobid, result):   # runs in the ClientThread, once per finished job
        with lock:
            results[jobid] = result

    with thread_factory(callback) as thread:
        numbers_by_jobid = {thread.submit(square, n): n for n in range(N_JOBS)}
        thread.wait()
    wrong = [jobid for jobid, n in numbers_by_jobid.items() if results.get(jobid) != n * n]
    print("%d jobs, %d callbacks, sum of squares %d" % (N_JOBS, len(results), sum(results.values())))
    if wrong or len(results) != N_JOBS:
        print("FAILED: %d wrong or missing results" % len(wrong))
        return 1
    return 0


def main():
    if os.environ.get("MINICW_MASTER"):
        return run(ClientThread)   # host, port and key from the environment
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(LocalCluster(n_workers=2))
        return run(cluster.client_thread)


if __name__ == "__main__":
    sys.exit(main())
