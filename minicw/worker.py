"""``python -m minicw.worker HOST PORT KEY -n N``: run a worker node from the command line.

The node itself is ``minicw.node.WorkerNode``; this module is its command
line (``cli.worker_main``) and keeps ``from minicw.worker import WorkerNode``,
the import path of the first release, working.
"""
import sys

from minicw.node import WorkerNode  # noqa: F401  (public import path)

if __name__ == "__main__":
    from minicw.cli import worker_main
    sys.exit(worker_main())
