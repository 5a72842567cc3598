"""Runs that survive: results journaled to a checkpoint file as they arrive, and resumed.

    map(fn, items, checkpoint=P)    Journal(P): lock P.lock, compare meta with the call
        |                           (CheckpointMismatchError naming what differs)
        v
    CheckpointedMap.missing_items:  keys of items, CHECKPOINT_LOOKUP_JOBS at a time
        items stored -------------> plan: (STORED, first, count) -- read back from P
        items missing ------------> plan: (RUN, first, count) --> the inner MapStream
                                                                      |
    receiver thread: MapStream.deliver -> CheckpointedMap.journal_segment +-> Journal.add_outcomes
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

import hashlib
import itertools
import pickle
import threading
from collections import deque

from minicw import config, store
from minicw.client import job_exception
from minicw.journal import Journal
from minicw.progress import OFF as NO_PROGRESS


# --- keys, a block at a time --------------------------------------------------------------

def identities(kind_is_star: bool, key_fn):
    """A function: item of a map (an argument, or a tuple of them) -> its identity;
    None for the default of a one-argument map, ``(item,)`` (keys_of inlines it)."""
    if key_fn is not None:
        return (lambda item: key_fn(*item)) if kind_is_star else key_fn
    return tuple if kind_is_star else None


def keys_of(items: list, identity) -> list:
    """The job keys of ``items``: store.job_key, inlined for a block of items that
    the standard pickle takes (a key per job is most of what journaling costs
    the thread that submits)."""
    dumps, digest, first_8 = pickle.dumps, hashlib.sha256, store.KEY_FORMAT.unpack_from
    try:
        if identity is None:
            return [first_8(digest(dumps((item,), 5)).digest())[0] for item in items]
        return [first_8(digest(dumps(identity(item), 5)).digest())[0] for item in items]
    except Exception:   # something pickle refuses (a lambda...): item by item
        if identity is None:
            return [store.job_key((item,)) for item in items]
        return [store.job_key(identity(item)) for item in items]


def _runs(flags: list):
    """``(flag, start, count)`` for each run of equal flags."""
    start = 0
    for flag, group in itertools.groupby(flags):
        count = sum(1 for _ in group)
        yield flag, start, count
        start += count


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
        self.progress = NO_PROGRESS     # counts stored runs (the inner stream, fresh ones)

    def missing_count(self, length: int) -> int | None:
        """How many of ``length`` jobs will run (None when not known beforehand)."""
        journal = self.journal
        if journal.empty:
            return length
        if journal.force:
            return None   # jobs whose arguments changed run again: not known yet
        return length - journal.reusable_before(length)

    # --- feeding the inner stream (the thread that tops it up) ---
    def missing_items(self):
        """The items with no reusable outcome in the file, in order (the inner map's
        items).  A block of items is looked up and planned before its first is
        yielded, so the plan always reaches past what the inner stream has."""
        inner = 0
        while True:
            block = list(itertools.islice(self._items, config.CHECKPOINT_LOOKUP_JOBS))
            if not block:
                break
            first = self._pulled
            self._pulled += len(block)
            keys = keys_of(block, self._identity)
            stored = self.journal.stored(first, keys)
            if True in stored:
                positions = [first + offset for offset, done in enumerate(stored) if not done]
                keys = [keys[position - first] for position in positions]
                block = [block[position - first] for position in positions]
                for done, start, count in _runs(stored):
                    self._plan_add(_STORED if done else _RUN, first + start, count)
            else:
                positions = range(first, first + len(block))
                self._plan_add(_RUN, first, len(block))
            self._where.update(zip(range(inner, inner + len(block)), zip(positions, keys)))
            inner += len(block)
            yield from block
            del block
        self.total = self._pulled
        self.journal.set_meta(jobs=self.total)

    def _plan_add(self, kind: int, first: int, count: int) -> None:
        if kind == _RUN and not self.ordered:
            return    # unordered: fresh results come as they finish
        with self._plan_lock:
            if self._plan:
                last = self._plan[-1]
                if last[0] == kind and last[1] + last[2] == first:
                    last[2] += count
                    return
            self._plan.append([kind, first, count])

    def _plan_take(self):
        """The oldest run of the plan, or None."""
        with self._plan_lock:
            return self._plan.popleft() if self._plan else None

    # --- results arriving (the receiver thread) ---
    def position_of(self, inner: int) -> int:
        where = self._where.get(inner)
        return inner if where is None else where[0]

    def journal_segment(self, inner_first: int, values, errors) -> None:
        """Journal the outcomes of a run of the inner stream's jobs (its positions
        ``inner_first``..), at their positions in the whole map."""
        pop = self._where.pop
        placed = [pop(inner, None) for inner in range(inner_first, inner_first + len(values))]
        if None in placed:   # delivered before (a resent chunk): journaled then
            kept = [offset for offset, where in enumerate(placed) if where is not None]
            values = [values[offset] for offset in kept]
            errors = {new: errors[old] for new, old in enumerate(kept)
                      if errors and old in errors} or None
            placed = [placed[offset] for offset in kept]
        if placed:
            positions, keys = zip(*placed)
            self.journal.add_outcomes(positions, keys, values, errors)

    # --- what the caller iterates ---
    def results(self, stream, progress=NO_PROGRESS) -> "Results":
        """The map's results: stored ones read back, fresh ones (the inner MapStream
        ``stream``'s results) for the jobs that ran, in order when ``ordered``.
        ``progress`` is the whole map's, shared with the inner stream."""
        self.progress = progress
        fresh = stream.results()
        walk = self._walk_ordered(fresh) if self.ordered else self._walk_unordered(fresh)
        return Results(walk, stream, fresh, self.journal, progress)

    def _walk_ordered(self, fresh):
        """Position by position: a stored run from the file, a fresh run from the
        inner stream (ordered: one result per RUN position)."""
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
                yield from self._stored(first, count)
                continue
            if ahead is not _NOTHING:
                value, ahead = ahead, _NOTHING
                yield value
                count -= 1
            yield from itertools.islice(fresh, count)

    def _walk_unordered(self, fresh):
        """Stored results as soon as they are planned, fresh ones as they arrive."""
        while True:
            step = self._plan_take()
            if step is not None:
                yield from self._stored(step[1], step[2])
                continue
            try:
                value = next(fresh)
            except StopIteration:
                if self._plan:
                    continue
                return
            yield value

    def _stored(self, first: int, count: int):
        self.progress.add_stored(count)
        for ok, value in self.journal.load(first, count):
            if not ok:
                raise job_exception(value)
            yield value


class Results:
    """The iterator a checkpointed map returns.  Unlike a generator it also ends its
    run when dropped before its first ``next()``: the inner stream's jobs are
    cancelled and the checkpoint is committed and released (its lock is not
    held until the program exits)."""

    def __init__(self, walk, stream, fresh, journal: Journal, progress=NO_PROGRESS):
        self._walk = walk
        self._stream = stream    # closed itself: a generator never started ignores close()
        self._fresh = fresh
        self._journal = journal
        self._progress = progress

    def __iter__(self) -> "Results":
        return self

    def __next__(self):
        try:
            return next(self._walk)
        except BaseException:   # the end, a job's exception, a timeout, an interrupt
            self.close()
            raise

    def close(self) -> None:
        self._walk.close()
        self._fresh.close()
        self._stream.close()
        self._journal.close()
        self._progress.finish()

    def __del__(self):
        self.close()


# --- execute() ------------------------------------------------------------------------------

def resumed_execute(journal: Journal, args, key_fn, run_missing, failure_of,
                    progress=NO_PROGRESS) -> dict:
    """execute() with a checkpoint: {arg: result} for every arg, the stored ones read
    back and the rest run by ``run_missing(missing_args, on_segment)``; a stored
    failure reused (not ``rerun_failed``) raises ``failure_of(error, arg)``.
    ``progress`` (the whole run's) counts the stored ones."""
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
        progress.add_stored(len(stored_positions))

        def on_segment(items, values, errors) -> None:
            positions, keys = zip(*(position_of[arg] for arg in items))
            journal.add_outcomes(positions, keys, values, errors)

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
