"""Several arguments per job: pass a tuple as the one argument (the minimalcluster example 3).

Run:  python examples/multi_args.py
"""
import sys

from minicw import LocalCluster


def main():
    with LocalCluster(n_workers=2) as cluster:
        cluster.load_envir("f = lambda x: x[0] + x[1]", from_file=False)
        cluster.register_target_function("f")
        cluster.load_args([(1, 2), (3, 4), (5, 6), (7, 8)])
        result = cluster.execute()
    print(result)
    if result != {(1, 2): 3, (3, 4): 7, (5, 6): 11, (7, 8): 15}:
        print("FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
