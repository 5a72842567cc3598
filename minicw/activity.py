"""What the master has seen happen: throughput over time, recent failures, runs.

    Scheduler (under its lock)                      Activity
    --------------------------                      --------
    _accept_report: count jobs, failures in it ---> finished(count, failed): per-second buckets
    a job raised / crashed / timed out / no Python -> failure(...): the last RECENT_FAILURES
                                                    |
    status(), the status command, the dashboard <---+ rate(60 s), series(minutes), failures()

Nothing here is per job: a report of a chunk of jobs is one call, so the
master's cost per job does not change.  The buckets cover HISTORY_S seconds
(older ones are dropped as time moves on).
"""
from __future__ import annotations

import time
from collections import deque

HISTORY_S = 600          # throughput kept for the last ten minutes, one bucket a second
RECENT_FAILURES = 50     # failures kept for status() and the dashboard
TRACEBACK_CHARS = 4000   # of each failure's traceback


class Activity:
    """The master's record of completed jobs and failures; called under the
    Scheduler's lock (not thread-safe by itself)."""

    def __init__(self):
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        self._buckets = deque()          # [second (int, monotonic), done, failed], oldest first
        self._failures = deque(maxlen=RECENT_FAILURES)
        self.jobs_done = 0
        self.jobs_failed = 0

    # --- recording ---
    def finished(self, done: int, failed: int, now: float | None = None) -> None:
        """``done`` jobs gave a result and ``failed`` did not, just now."""
        self.jobs_done += done
        self.jobs_failed += failed
        second = int(time.monotonic() if now is None else now)
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            bucket = buckets[-1]
            bucket[1] += done
            bucket[2] += failed
        else:
            buckets.append([second, done, failed])
            while buckets[0][0] <= second - HISTORY_S:
                buckets.popleft()

    def failure(self, client_id: int, node: str | None, job: str, kind: str, error: str,
                traceback_text: str = "") -> None:
        """Keep a failed job for status() and the dashboard (the newest RECENT_FAILURES)."""
        self._failures.append({
            "time": time.time(), "client_id": client_id, "node": node, "job": job,
            "kind": kind, "error": error, "traceback": traceback_text[-TRACEBACK_CHARS:]})

    # --- reading ---
    def rate(self, window_s: float = 60.0, now: float | None = None) -> float:
        """Jobs finished (done or failed) per second over the last ``window_s`` (or
        since the master started, when that is shorter)."""
        now = time.monotonic() if now is None else now
        window_s = max(1.0, min(window_s, now - self._started_monotonic))
        since = now - window_s
        # a bucket counts when its second overlaps the window (its start may not)
        total = sum(done + failed for second, done, failed in self._buckets
                    if second + 1 > since)
        return total / window_s

    def series(self, seconds: int = HISTORY_S, step_s: int = 10,
               now: float | None = None) -> list:
        """Jobs finished per second, averaged over each ``step_s`` of the last
        ``seconds``, oldest first: ``[(seconds ago, rate)]``."""
        now = int(time.monotonic() if now is None else now)
        steps = max(1, seconds // step_s)
        counts = [0] * steps
        for second, done, failed in self._buckets:
            age = now - second
            if 0 <= age < steps * step_s:
                counts[steps - 1 - age // step_s] += done + failed
        return [((steps - index) * step_s, count / step_s) for index, count in enumerate(counts)]

    def failures(self) -> list:
        """The recent failures, newest first."""
        return list(reversed(self._failures))
