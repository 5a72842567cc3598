"""Factorize numbers with ``ClusterExecutor.map``: concurrent.futures on a cluster.

Run:  python examples/executor.py
      MINICW_MASTER=host:port MINICW_AUTHKEY=key python examples/executor.py

Without MINICW_MASTER it starts a LocalCluster (a master and workers on
127.0.0.1) for the run; with it, it uses that cluster's master.
"""
import os
import sys

from minicw import ClusterExecutor, LocalCluster

NUMBERS = range(10**6, 10**6 + 2000)


def smallest_factor(n):
    factor = 2
    while factor * factor <= n:
        if n % factor == 0:
            return factor
        factor += 1
    return n


def run(executor):
    with executor:
        factors = list(executor.map(smallest_factor, NUMBERS))
        primes = [n for n, factor in zip(NUMBERS, factors) if factor == n]
    print("%d numbers from %d: %d primes, the first %s" % (
        len(factors), NUMBERS[0], len(primes), primes[:3]))
    expected = [smallest_factor(n) for n in NUMBERS]
    if factors != expected:
        print("FAILED: results differ from a local run")
        return 1
    return 0


def main():
    if os.environ.get("MINICW_MASTER"):
        return run(ClusterExecutor())   # host, port and key from the environment
    with LocalCluster(n_workers=2) as cluster:
        return run(cluster.executor())


if __name__ == "__main__":
    sys.exit(main())
