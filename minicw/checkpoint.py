"""Runs that survive: results journaled to a checkpoint file as they arrive, and resumed.

    map(fn, items, checkpoint=P)    Journal(P): lock P.lock, compare meta with the call
        |                           (CheckpointMismatchError naming what differs)
        v
    CheckpointedMap.missing_items:  keys of items, CHECKPOINT_LOOKUP_JOBS at a time
        items stored -------------> plan: (STORED, first, count) -- read back from P
        items missing ------------> plan: (RUN, first, count) --> the inner MapStream
                                                                      |
    receiver thread: MapStream.deliver -> CheckpointedMap.journal_segment +-> Journal.add_many
                                                                      v
    Journal writer thread: a transaction per batch (CHECKPOINT_BATCH_JOBS results, or
    CHECKPOINT_BATCH_S, or CHECKPOINT_BATCH_BYTES), WAL mode
        |
    CheckpointedMap.results: the plan walked in order -- stored values from the file,
        fresh ones from the MapStream -- so a resumed map yields what an uninterrupted
        one would, in the same order

``execute()`` (``resumed_execute``) and ``ClientThread`` (``Journal.stored_job``)
use the same Journal (journal.py): execute by position in its args, a
ClientThread by job id.  The file's format and the job key rule are in store.py.
"""
from __future__ import annotations

import itertools
import threading
from collections import deque

from minicw import config, store
from minicw.client import job_exception
from minicw.journal import Journal


# --- keys, a block at a time --------------------------------------------------------------

def identities(kind_is_star: bool, key_fn):
    """A function: item of a map (an argument, or a tuple of them) -> its identity."""
    if key_fn is not None:
        return (lambda item: key_fn(*item)) if kind_is_star else key_fn
    return tuple if kind_is_star else (lambda item: (item,))


def keys_of(items: list, identity) -> list:
    key = store.job_key
    return [key(identity(item)) for item in items]


# --- map and imap_unordered ------------------------------------------------------------------

_STORED, _RUN = 0, 1
_NOTHING = object()


class CheckpointedMap:
    """A map over ``items`` whose jobs already in the checkpoint are read back instead
    of run; the rest run in an inner MapStream (see the module docstring)."""

    def __init__(self, journal: Journal, items, identity, ordered: bool):
        self.journal = journal
        self._items = iter(items)
        self._identity = identity
        self.ordered = ordered
        self._plan = deque()            # [kind, first position, count], in position order
        self._plan_lock = threading.Lock()
        self._where = {}                # inner position -> (position, key), until journaled
        self._pulled = 0                # positions pulled from items
        self.total = None               # positions in all, once items ran out

    def missing_count(self, length: int) -> int | None:
        """How many of ``length`` jobs will run (None when not known beforehand)."""
        journal = self.journal
        if journal.empty:
            return length
        if journal.force:
            return None   # jobs whose arguments changed run again: not known yet
        [(reusable,)] = journal._read(
            "SELECT COUNT(*) FROM jobs WHERE idx < ? AND (ok = 1 OR ?)",
            (length, 0 if journal.rerun_failed else 1))
        return length - reusable

    # --- feeding the inner stream (the thread that tops it up) ---
    def missing_items(self):
        """The items with no reusable outcome in the file, in order (the inner map's items)."""
        inner = 0
        block_size = config.CHECKPOINT_LOOKUP_JOBS
        while True:
            block = list(itertools.islice(self._items, block_size))
            if not block:
                break
            first = self._pulled
            keys = keys_of(block, self._identity)
            stored = self.journal.stored(first, keys)
            self._pulled += len(block)
            for offset, item in enumerate(block):
                if stored[offset]:
                    self._plan_add(_STORED, first + offset)
                    continue
                self._where[inner] = (first + offset, keys[offset])
                self._plan_add(_RUN, first + offset)
                inner += 1
                yield item
            del block
        self.total = self._pulled
        self.journal.set_meta(jobs=self.total)

    def _plan_add(self, kind: int, position: int) -> None:
        if kind == _RUN and not self.ordered:
            return    # unordered: fresh results come as they finish
        with self._plan_lock:
            if self._plan:
                last = self._plan[-1]
                if last[0] == kind and last[1] + last[2] == position:
                    last[2] += 1
                    return
            self._plan.append([kind, position, 1])

    def _plan_take(self):
        """The oldest run of the plan, or None."""
        with self._plan_lock:
            return self._plan.popleft() if self._plan else None

    # --- results arriving (the receiver thread) ---
    def position_of(self, inner: int) -> int:
        where = self._where.get(inner)
        return inner if where is None else where[0]

    def journal_segment(self, inner_first: int, values, errors) -> None:
        entries = []
        where = self._where
        for offset, value in enumerate(values):
            placed = where.pop(inner_first + offset, None)
            if placed is None:
                continue
            position, key = placed
            error = errors.get(offset) if errors else None
            if error is None:
                entries.append((position, key, None, True, value))
            else:
                entries.append((position, key, None, False, error))
        self.journal.add_many(entries)

    # --- what the caller iterates ---
    def results(self, fresh):
        """Yield the map's results: stored ones read back, ``fresh`` ones (the inner
        MapStream's results) for the jobs that ran, in order when ``ordered``."""
        try:
            run = self._walk_ordered(fresh) if self.ordered else self._walk_unordered(fresh)
            for ok, value in run:
                if not ok:
                    raise job_exception(value)
                yield value
        finally:
            fresh.close()
            self.journal.close()

    def _walk_ordered(self, fresh):
        """``(ok, value)`` position by position: a stored run from the file, a
        fresh run from the inner stream (ordered: one result per RUN position)."""
        ahead = _NOTHING    # a fresh result taken to make the inner stream pull items
        while True:
            step = self._plan_take()
            if step is None:
                # Nothing planned yet: the next fresh result pulls items (and
                # plans the stored ones before it).
                try:
                    ahead = next(fresh)
                except StopIteration:
                    if not self._plan:
                        return
                continue
            kind, first, count = step
            if kind == _STORED:
                yield from self.journal.load(first, count)
                continue
            for _ in range(count):
                if ahead is _NOTHING:
                    yield True, next(fresh)
                else:
                    value, ahead = ahead, _NOTHING
                    yield True, value

    def _walk_unordered(self, fresh):
        """Stored results as soon as they are planned, fresh ones as they arrive."""
        while True:
            step = self._plan_take()
            if step is not None:
                yield from self.journal.load(step[1], step[2])
                continue
            try:
                value = next(fresh)
            except StopIteration:
                if self._plan:
                    continue
                return
            yield True, value


# --- execute() ------------------------------------------------------------------------------

def resumed_execute(journal: Journal, args, key_fn, run_missing, failure_of) -> dict:
    """execute() with a checkpoint: {arg: result} for every arg, the stored ones read
    back and the rest run by ``run_missing(missing_args, on_segment)``; a stored
    failure reused (not ``rerun_failed``) raises ``failure_of(error, arg)``."""
    identity = identities(False, key_fn)
    position_of = {}
    stored_positions = []
    try:
        for first in range(0, len(args), config.CHECKPOINT_LOOKUP_JOBS):
            block = args[first:first + config.CHECKPOINT_LOOKUP_JOBS]
            keys = keys_of(block, identity)
            for offset, (arg, key, done) in enumerate(
                    zip(block, keys, journal.stored(first, keys))):
                if done:
                    stored_positions.append(first + offset)
                else:
                    position_of[arg] = (first + offset, key)
        journal.set_meta(jobs=len(args))

        def on_segment(items, values, errors) -> None:
            entries = []
            for offset, (arg, value) in enumerate(zip(items, values)):
                position, key = position_of[arg]
                error = errors.get(offset) if errors else None
                entries.append((position, key, None, error is None,
                                value if error is None else error))
            journal.add_many(entries)

        fresh = run_missing([arg for arg in args if arg in position_of], on_segment)
        stored = _load_positions(journal, stored_positions)
        first_failure = None
        results = {}
        for position, arg in enumerate(args):
            if arg in fresh:
                results[arg] = fresh[arg]
                continue
            ok, value = stored[position]
            if not ok and first_failure is None:
                first_failure = (arg, value)
            results[arg] = value
        if first_failure is not None:
            raise failure_of(*first_failure[::-1])
        return results
    finally:
        journal.close()


def _load_positions(journal: Journal, positions: list) -> dict:
    """{position: (ok, value)} for stored positions, read a run of positions at a time."""
    loaded = {}
    start = 0
    while start < len(positions):
        end = start
        while end + 1 < len(positions) and positions[end + 1] == positions[end] + 1:
            end += 1
        first = positions[start]
        for offset, outcome in enumerate(journal.load(first, end - start + 1)):
            loaded[first + offset] = outcome
        start = end + 1
    return loaded
