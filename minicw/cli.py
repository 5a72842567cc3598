"""The console scripts ``minicw-master`` and ``minicw-worker`` (setup.cfg).

Each role's command line lives in its ``python -m`` module: ``master_main``
in master.py, ``worker_main`` in worker.py; the console scripts point there.
This module keeps ``minicw.cli:master_main`` and ``minicw.cli:worker_main``,
the entry points of the first release, working.  It loads both roles, so no
minicw process imports it: a worker node must never load the master's modules.
"""
from minicw.master import master_main, master_parser  # noqa: F401
from minicw.worker import worker_main, worker_parser  # noqa: F401
