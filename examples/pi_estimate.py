"""Estimate pi by throwing random darts, on a LocalCluster (the minimalcluster example 1).

Run:  python examples/pi_estimate.py
"""
import math
import sys

from minicw import LocalCluster

ENVIRONMENT = '''
import random

def throw(seed):
    """Throw 1000 darts at the unit square; count those inside the quarter circle."""
    rng = random.Random(seed)
    return sum(1 for _ in range(1000) if rng.random() ** 2 + rng.random() ** 2 < 1)
'''

N_BATCHES = 2000  # 2,000,000 darts


def main():
    with LocalCluster() as cluster:
        cluster.load_envir(ENVIRONMENT, from_file=False)
        cluster.register_target_function("throw")
        cluster.load_args(list(range(N_BATCHES)))
        hits = cluster.execute()
    estimate = 4.0 * sum(hits.values()) / (N_BATCHES * 1000)
    print("pi is roughly %f (from %d darts on %d jobs)" % (estimate, N_BATCHES * 1000, len(hits)))
    if len(hits) != N_BATCHES or abs(estimate - math.pi) > 0.01:
        print("FAILED: expected %d results and an estimate within 0.01 of pi" % N_BATCHES)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
