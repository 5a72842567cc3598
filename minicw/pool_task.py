"""What a ``minicw.Pool``'s tasks run in a worker process.

    client (pool.py)                                  worker process
    ----------------                                  --------------
    Setup(pool_id, initializer, initargs,             resolved once per process (a
          maxtasksperchild) --broadcast once-->       broadcast.Handle in the task)
    Task(func, setup)       --a function blob-->      Task(*args, **kwargs):
    MapChunk(func, star, setup)                       MapChunk(items): [func(x) for x]
                                                         |
                                                         +-- first task of this pool in
                                                         |   this process: initializer(*initargs)
                                                         +-- its maxtasksperchild-th task:
                                                             raise RetireProcess(outcome)
                                                             (worker_process.py: report it,
                                                             give back the rest, leave)

A Pool's worker processes are shared with every other client of the
cluster, so "once per worker process" is kept here, per process, by the
pool's id: a replacement process (a crash, a recycle) starts with nothing
and runs the initializer again before its first task of that pool.  On the
LocalCluster a pool starts for itself, every process calls the Setup when it
starts (its node's ``process_setup``), as multiprocessing's processes do.  A task
counts as one whatever it holds: an ``apply`` call, or one chunk of a map
(``chunksize`` items), as in ``multiprocessing.pool``.

A pool with neither an initializer nor ``maxtasksperchild`` sends its
functions as they are for ``apply``, and MapChunk with no setup.
"""
from __future__ import annotations

import itertools

from minicw.errors import RetireProcess

_initialized = set()   # ids of the pools whose initializer ran in this process
_tasks_run = {}        # pool id -> tasks of that pool run in this process (maxtasksperchild)


class Setup:
    """What every task of one pool needs once per process."""

    __slots__ = ("pool_id", "initializer", "initargs", "maxtasksperchild")

    def __init__(self, pool_id: str, initializer, initargs: tuple, maxtasksperchild):
        self.pool_id = pool_id
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self.maxtasksperchild = maxtasksperchild

    def __reduce__(self):
        return Setup, (self.pool_id, self.initializer, self.initargs, self.maxtasksperchild)

    def __call__(self) -> None:
        """Run the initializer now: a worker process of the pool's own cluster,
        when it starts (its node's process setup), as multiprocessing's do."""
        _prepare(self)


def _prepare(setup: Setup) -> None:
    """Run the pool's initializer if this process has not yet."""
    if setup.pool_id in _initialized:
        return
    if setup.initializer is not None:
        setup.initializer(*setup.initargs)   # raising: the task fails, and the next retries
    _initialized.add(setup.pool_id)


def _count(setup: Setup, outcome, failure) -> None:
    """One more task of the pool ran here; at its maxtasksperchild-th, ask for a
    new process (the outcome travels with the request)."""
    limit = setup.maxtasksperchild
    if not limit:
        return
    done = _tasks_run.get(setup.pool_id, 0) + 1
    _tasks_run[setup.pool_id] = done
    if done >= limit:
        raise RetireProcess(outcome, failure)


def _run(setup: Setup, call, *args):
    """``call(*args)`` as one task of the pool whose ``setup`` it is."""
    _prepare(setup)
    try:
        outcome = call(*args)
    except Exception as exc:
        _count(setup, None, exc)
        raise
    _count(setup, outcome, None)
    return outcome


class Task:
    """A pool's function for ``apply``: one call is one task."""

    __slots__ = ("func", "setup")

    def __init__(self, func, setup):
        self.func = func
        self.setup = setup    # a Setup (a broadcast.Handle of one in the client)

    def __reduce__(self):
        return Task, (self.func, self.setup)

    def __call__(self, *args, **kwargs):
        return _run(self.setup, _apply, self.func, args, kwargs)


def _apply(func, args, kwargs):
    return func(*args, **kwargs)


class MapChunk:
    """A pool's function for ``map`` and its kin: one call runs a chunk of items
    (a list; each item a tuple of arguments when ``star``) and returns their results."""

    __slots__ = ("func", "star", "setup")

    def __init__(self, func, star: bool, setup=None):
        self.func = func
        self.star = star
        self.setup = setup

    def __reduce__(self):
        return MapChunk, (self.func, self.star, self.setup)

    def __call__(self, items: list) -> list:
        if self.setup is None:
            return _map(self.func, self.star, items)
        return _run(self.setup, _map, self.func, self.star, items)


def _map(func, star: bool, items: list) -> list:
    if star:
        return list(itertools.starmap(func, items))
    return list(map(func, items))
