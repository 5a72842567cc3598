"""How many jobs go in one chunk: the sizing policy of every client path.

    worker --(results, seconds the chunk took)--> client: JobTimes.record(key, seconds, jobs)
    client: next chunk of ``key`` <-- JobTimes.jobs_per_chunk(key, run jobs, processes, jobs left)
            (jobs_per_chunk of the estimate and of the jobs it rests on)

A chunk is the unit the master queues, leases and delivers, so its size
trades two costs: every chunk pays a few proxy calls (tens of microseconds
each), and a chunk is run by one process from start to end, so a large
chunk of slow jobs leaves the other processes idle at the end of a run.
Four limits decide, the smallest wins:

* work: a chunk holds about CHUNK_TARGET_S of work, which amortises the
  per-chunk calls over many fast jobs and leaves slow jobs (about half the
  target or more) one per chunk.  In a run of known length a chunk may hold
  up to CHUNK_WORK_S while much of the run is left (see tail): the fixed cost
  of a chunk, a few proxy calls and the wake-ups of three processes, is
  about half a millisecond of CPU on a small machine, which one 10 ms job
  per chunk would pay twenty times a second on every core.  Measured times
  include waits for a busy CPU, so the targets are well above a chunk's
  fixed cost, and JobTimes discounts small reports far above the estimate:
  noisy timings must not cut a run into many more chunks than it needs;
* tail: in a run of known length a chunk takes at most 1 / (TAIL_SHARES x
  processes) of the jobs not yet cut, but never less than CHUNK_TARGET_S of
  work.  So the chunks of slow jobs shrink to one job towards the end, where
  a large chunk would keep one process busy while the others idle, and
  chunks of fast jobs, whose floor is thousands of jobs, do not multiply;
* spread: when the number of jobs in the run is known, a chunk takes at
  most 1 / spread_chunks(processes) of them: one chunk for every process,
  so every process gets work, and as many again (up to MAX_SPARE_CHUNKS)
  for the first to finish, so the end of the run is balanced.  A fixed
  share of the whole run: the spares are capped because on a large cluster
  each one costs a round of calls on the master while balancing a tail that
  is already short, and there are none when one process's share of the run
  is under MIN_SPARE_WORK_S: a spare evens the end by at most one chunk, and
  a chunk of so little work costs more in calls than it could even out;
* confidence: a chunk holds at most CONFIDENCE_FACTOR times the jobs the
  estimate was measured on (decayed as the estimate is).  A first estimate
  may rest on a few jobs that happened to be quick: jobs whose times vary
  tenfold (trial division) were cut into chunks of hundreds from 20 warm-up
  jobs, a quarter of a run each, before any of them reported.  The cap
  grows with every report, about fourfold, and never binds once a function
  has reported a few chunks (the decayed count is then about three chunks);
* MAX_JOBS_PER_CHUNK, which bounds the memory of one message.

One floor: the master serves every chunk of every process (a lease, a
report, a delivery: about MASTER_CHUNK_S of its CPU), so with many worker
processes a chunk holds at least ``processes x MASTER_CHUNK_S / MASTER_LOAD``
of work (master_floor_s), which keeps the master's share of a CPU near
MASTER_LOAD however many processes there are.  Under about 50 processes the
floor is below CHUNK_TARGET_S and changes nothing; at 1,000 a chunk of 20 ms
jobs holds ten of them.  It raises the work and tail limits, not the spread.

A function never timed goes one job per chunk until a result reports its
time: slow jobs must not queue behind each other in one process.

Single calls (``submit``) have no run length: ``backlog_chunks`` cuts what
accumulated while the client was busy sending into chunks of about
CHUNK_TARGET_S of estimated work, and a few calls of a function never timed
share a chunk only in a large backlog (UNKNOWN_JOBS_PER_CHUNK), which keeps
the master's memory per queued job small.  ``window_chunks`` is how many
chunks a client keeps in flight.
"""
from __future__ import annotations

import math

from minicw import config

CHUNK_TARGET_S = 0.01       # a chunk holds about this much work ...
CHUNK_WORK_S = 0.05         # ... or up to this much, early in a run of known length ...
TAIL_SHARES = 2             # ... taking at most 1/(this x processes) of the jobs left
MAX_JOBS_PER_CHUNK = 4096   # and never more jobs than this
SPREAD_PER_PROCESS = 2      # chunks per worker process of a run of known length ...
MAX_SPARE_CHUNKS = 32       # ... but no more than this beyond one per process,
MIN_SPARE_WORK_S = 0.002    # ... and none when a process's share is under this
CONFIDENCE_FACTOR = 4       # a chunk holds at most this many times the jobs timed so far
EMA_WEIGHT = 0.3            # how much of a function's timings each new report displaces
SMALL_REPORT_SHARE = 4      # a report of under 1/4 of the jobs behind an estimate ...
OUTLIER_FACTOR = 4.0        # ... counts as at most 4 times the estimate
UNKNOWN_JOBS_PER_CHUNK = 32  # calls of an untimed function sharing a chunk in a large backlog
LARGE_BACKLOG = 64          # ... a backlog of at least this many calls
MIN_WINDOW_CHUNKS = 16      # chunks a client keeps in flight, at least
MASTER_CHUNK_S = 50e-6      # the master's CPU per chunk (lease, report, delivery) ...
MASTER_LOAD = 0.25          # ... and the share of a CPU its chunks may take with every
                            # process busy (see master_floor_s)


class JobTimes:
    """Seconds per job of each function (by blob key), from reported runs.

    Each report adds its seconds and its jobs to sums that decay by
    EMA_WEIGHT per report; the estimate is their ratio.  So a chunk counts by
    its jobs: a chunk of one job, whose time is mostly the fixed cost of a
    chunk or a wait for a busy CPU, barely moves an estimate built on chunks
    of hundreds (left to an unweighted average, such outliers made the next
    chunks small, and small chunks then measured as slow again).  A small
    report far slower than the estimate is believed only in part.
    """

    def __init__(self):
        self._sums = {}   # key -> (decayed seconds, decayed jobs)

    def estimate(self, func_key) -> float | None:
        sums = self._sums.get(func_key)
        return None if sums is None else sums[0] / sums[1]

    def timed_jobs(self, func_key) -> float | None:
        """The (decayed) number of jobs the estimate rests on; None if never timed."""
        sums = self._sums.get(func_key)
        return None if sums is None else sums[1]

    def jobs_per_chunk(self, func_key, run_jobs: int | None = None, processes: int = 0,
                       jobs_left: int | None = None) -> int:
        """``jobs_per_chunk`` for ``func_key`` from its estimate and what it rests on."""
        sums = self._sums.get(func_key)
        if sums is None:
            return jobs_per_chunk(None, run_jobs, processes, jobs_left)
        return jobs_per_chunk(sums[0] / sums[1], run_jobs, processes, jobs_left, sums[1])

    def record(self, func_keys, seconds: float, jobs: int) -> None:
        jobs = max(1, jobs)
        keep = 1 - EMA_WEIGHT
        for key in func_keys:
            old = self._sums.get(key)
            if old is None:
                self._sums[key] = (seconds, jobs)
                continue
            old_seconds, old_jobs = old
            if jobs * SMALL_REPORT_SHARE < old_jobs:
                # A report of a few jobs (the part of a chunk sent early, right
                # after its process lost the CPU for a while) counts as at most
                # OUTLIER_FACTOR times the estimate; a report of a whole chunk
                # is believed at once, so a function that got slower is seen.
                seconds = min(seconds, OUTLIER_FACTOR * jobs * old_seconds / old_jobs)
            self._sums[key] = (keep * old_seconds + seconds, keep * old_jobs + jobs)


def jobs_per_chunk(seconds: float | None, run_jobs: int | None = None,
                   processes: int = 0, jobs_left: int | None = None,
                   timed_jobs: float | None = None) -> int:
    """Jobs for the next chunk of a function taking ``seconds`` per job (None: untimed).

    ``run_jobs`` is how many jobs the whole run has (None when unknown, as
    for a generator), ``jobs_left`` how many of them are not cut into chunks
    yet (default: all); ``processes`` the worker processes connected (0 when
    unknown); ``timed_jobs`` how many jobs ``seconds`` was measured on
    (JobTimes.timed_jobs; None: no confidence limit).
    """
    if seconds is None:
        return 1
    floor_s = master_floor_s(processes)
    size = MAX_JOBS_PER_CHUNK if seconds <= 0 else int(max(CHUNK_TARGET_S, floor_s) / seconds)
    if run_jobs is not None and processes > 0:
        if seconds > 0:   # jobs too fast to time have no work or tail limit
            left = run_jobs if jobs_left is None else jobs_left
            tail = max(size, math.ceil(left / (TAIL_SHARES * processes)))
            size = min(int(max(CHUNK_WORK_S, floor_s) / seconds), tail)
        share_s = max(seconds, 0.0) * run_jobs / processes
        size = min(size, math.ceil(run_jobs / spread_chunks(processes, share_s)))
    if timed_jobs is not None:
        size = min(size, math.ceil(CONFIDENCE_FACTOR * timed_jobs))
    return max(1, min(MAX_JOBS_PER_CHUNK, size))


def master_floor_s(processes: int) -> float:
    """The least work in one chunk when ``processes`` worker processes share a
    master: at one chunk per process every this many seconds, its chunks
    cost the master MASTER_LOAD of a CPU."""
    return processes * MASTER_CHUNK_S / MASTER_LOAD


def spread_chunks(processes: int, share_s: float | None = None) -> int:
    """Into how many chunks, at least, a run of known length is cut, when each
    process's share of its work is ``share_s`` seconds (None: unknown)."""
    if share_s is not None and share_s < MIN_SPARE_WORK_S:
        return processes
    return processes + min((SPREAD_PER_PROCESS - 1) * processes, MAX_SPARE_CHUNKS)


def window_chunks(processes: int) -> int:
    """Chunks a client keeps in flight (submitted, not yet answered) for
    ``processes`` connected worker processes."""
    return max(MIN_WINDOW_CHUNKS, config.IN_FLIGHT_CHUNKS_PER_PROCESS * processes)


def backlog_chunks(calls: list, job_times: JobTimes, processes: int = 0) -> list:
    """Sizes of the chunks that a backlog of single calls is cut into, in order.

    ``calls`` lists ``(func_key, limits)`` per call; consecutive calls with
    equal limits share a chunk of about CHUNK_TARGET_S of estimated work.  A
    call of a function never timed counts as a whole chunk's work, unless the
    backlog is large (LARGE_BACKLOG): then a few share a chunk, at most
    UNKNOWN_JOBS_PER_CHUNK with several chunks per worker process left
    (``processes``, needed only for a large backlog).
    """
    unknown_share = 1
    if len(calls) >= LARGE_BACKLOG:
        unknown_share = max(1, min(UNKNOWN_JOBS_PER_CHUNK,
                                   len(calls) // (8 * max(1, processes))))
    unknown_cost = CHUNK_TARGET_S / unknown_share
    sizes = []
    size, budget, chunk_limits = 0, 0.0, None
    for func_key, limits in calls:
        seconds = job_times.estimate(func_key)
        cost = unknown_cost if seconds is None else seconds
        if size and (limits != chunk_limits or budget + cost > CHUNK_TARGET_S
                     or size >= MAX_JOBS_PER_CHUNK):
            sizes.append(size)
            size, budget = 0, 0.0
        size += 1
        budget += cost
        chunk_limits = limits
    if size:
        sizes.append(size)
    return sizes
