"""A long run that survives being stopped: every result journaled to a checkpoint file.

    python examples/resume.py                # stop it partway: Ctrl-C, or kill -9
    python examples/resume.py                # again: only the jobs with no result run
    python -m minicw store resume.sqlite     # what the file holds

The checkpoint is ``resume.sqlite`` in the current directory (the second
argument names another); delete it to start over.  The first argument is the
number of jobs (default 5000, about 10 s on 2 cores).
"""
import os
import sys
import time

from minicw import LocalCluster, store


def slow_square(x):
    time.sleep(0.002)   # stands for real work
    return x * x


if __name__ == "__main__":
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    path = sys.argv[2] if len(sys.argv) > 2 else "resume.sqlite"
    if os.path.exists(path):
        with store.open(path) as previous:
            print("%s holds %d results of an earlier run" % (path, previous.counts().done))
    started = time.monotonic()
    try:
        with LocalCluster() as cluster, cluster.executor() as executor:
            total = sum(executor.map(slow_square, range(jobs), checkpoint=path))
    except KeyboardInterrupt:
        print("stopped: %s keeps the results so far; run the same command again to go on"
              % path)
        sys.exit(130)
    assert total == sum(x * x for x in range(jobs)), total
    print("%d jobs, sum of squares %d, in %.1f s" % (jobs, total, time.monotonic() - started))
