"""``ClientThread``: the cluster-workers ancestor's callback client.

    thread = ClientThread(callback)        host/port/key from arguments or the environment
    thread.start()                         connects (errors raise here), starts the thread
    jobid = thread.submit(fn, *args)       or the ancestor's submit(jobid, fn, *args)
        |
        v  Dispatcher (dispatch.py): batched submits, routed results
    receiver thread --(jobid, ok, value)--> this thread's queue --> callback(jobid, result)
    thread.wait()                          blocks until every job is done; raises the
                                           first RemoteError; a long wait shows its
                                           progress on stderr (progress.py)
    thread.stop()                          ends the session (jobs not done are dropped)

Callbacks run in this thread, one at a time, in completion order, as in the
ancestor.  A job that raised does not call the callback and does not stop
the thread: its error is kept for ``wait()`` (and passed to ``errback`` when
one is given).

With ``checkpoint="run.sqlite"`` every outcome is journaled to that file by
job id (checkpoint.py); run again, a submit whose job id has an outcome
there (from the same function and arguments) is not sent: its callback runs
with the stored result.  Auto-numbered job ids (1, 2, ...) follow the order
of submits, so the same program resumes where it stopped.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import CancelledError

from minicw import config, discover, dispatch, transport
from minicw.errors import MinicwError
from minicw.progress import start_progress

log = logging.getLogger(__name__)

_STOP = object()


class ClientThread(threading.Thread):
    """A thread that submits jobs to a minicw master and runs ``callback(jobid, result)``."""

    def __init__(self, callback, host: str | None = None, port: int | None = None,
                 authkey=None, errback=None, job_timeout: float | None = None,
                 max_retries: int = config.DEFAULT_MAX_RETRIES, checkpoint=None,
                 resume=True, rerun_failed: bool = True, forward_output=None,
                 tls_ca: str | None = None, tls_fingerprint: str | None = None):
        super().__init__(name="minicw-client", daemon=True)
        self.callback = callback
        self.errback = errback
        self.address = discover.master_address(host, port)
        transport.choose_tls(self.address, tls_ca, tls_fingerprint)
        self._authkey = discover.authkey(authkey)
        self._job_timeout = job_timeout
        self._max_retries = max_retries
        self._dispatcher = None
        self._completed = queue.SimpleQueue()
        self._jobids = itertools.count(1)
        self._jobs = {}                      # jobid -> dispatch.Job, until its callback ran
        self._lock = threading.Lock()
        self._all_done = threading.Condition(self._lock)
        self._errors = []                    # (jobid, exception) of failed jobs and callbacks
        self._jobs_finished = 0              # callbacks run (or skipped), ever: for progress
        self._jobs_failed = 0                # ... of jobs that failed
        self._stopped = False
        self._checkpoint = (checkpoint, resume, rerun_failed)
        self._forward_output = forward_output
        self._journal = None                 # checkpoint.Journal, by job id

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Connect to the master (and open the checkpoint), then start the callback thread."""
        path, resume, rerun_failed = self._checkpoint
        if path is not None:
            from minicw import journal, store
            self._journal = journal.Journal(path, journal.run_meta(
                store.KIND_JOBS, None, None, None, store.KEY_BY_JOB_ID, None),
                resume, rerun_failed)
        try:
            self._dispatcher = dispatch.Dispatcher(self.address, self._authkey,
                                                   self._job_timeout, self._max_retries,
                                                   self._forward_output)
        except BaseException:
            if self._journal is not None:
                self._journal.close()
            raise
        super().start()

    def run(self) -> None:
        while True:
            item = self._completed.get()
            if item is _STOP:
                return
            jobid, ok, value = item
            try:
                if ok:
                    self.callback(jobid, value)
                elif self.errback is not None and not isinstance(value, CancelledError):
                    self.errback(jobid, value)
            except Exception as exc:  # a broken callback must not kill the thread
                log.exception("callback for job %r raised", jobid)
                with self._lock:
                    self._errors.append((jobid, exc))
            finally:
                self._finish(jobid, ok, value)

    def _finish(self, jobid, ok, value) -> None:
        with self._lock:
            self._jobs.pop(jobid, None)
            self._jobs_finished += 1
            if not ok and not isinstance(value, CancelledError):
                self._errors.append((jobid, value))
                self._jobs_failed += 1
            if not self._jobs:
                self._all_done.notify_all()

    def wait(self, timeout: float | None = None, progress: bool | None = None) -> None:
        """Block until every submitted job is done and its callback has run.

        Raises the first job error (a RemoteError, WorkerCrashedError, ...)
        or callback error since the last ``wait()``; TimeoutError if jobs
        are still running after ``timeout`` seconds.

        A wait longer than 2 s shows its progress on stderr: the jobs done
        during this wait out of those plus the ones still outstanding (jobs
        submitted meanwhile included), and how many failed.  ``progress=``
        and $MINICW_PROGRESS as for ``executor.map``.
        """
        self._require_started()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            finished_before, failed_before = self._jobs_finished, self._jobs_failed
            outstanding = len(self._jobs)
        run_progress = start_progress(outstanding, progress, "wait")
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                with self._lock:
                    all_done = self._all_done.wait_for(lambda: not self._jobs,
                                                       run_progress.wait_s(left))
                    done = self._jobs_finished - finished_before
                    failed = self._jobs_failed - failed_before
                    outstanding = len(self._jobs)
                    if all_done:
                        errors, self._errors = self._errors, []
                run_progress.update(done, failed, done + outstanding)
                if all_done:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("%d jobs still running after %gs" % (outstanding, timeout))
        finally:
            run_progress.finish()
        if errors:
            raise errors[0][1]

    def stop(self) -> None:
        """End the session and the thread; jobs not done yet are dropped."""
        if self._stopped:
            return
        self._stopped = True
        if self._dispatcher is not None:
            self._dispatcher.close()
            self._completed.put(_STOP)
            if self.is_alive() and threading.current_thread() is not self:
                self.join()
        with self._lock:
            self._jobs.clear()
            self._all_done.notify_all()
        if self._journal is not None:
            self._journal.close()

    def __enter__(self) -> "ClientThread":
        if self._dispatcher is None:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self.stop()

    # --- jobs ---------------------------------------------------------------------------

    def submit(self, *call, **kwargs):
        """``submit(fn, *args, **kwargs) -> jobid``; or ``submit(jobid, fn, *args)``.

        The second form (a non-callable first argument followed by a
        callable) is the ancestor's: the given jobid is passed to the callback.
        """
        self._require_started()
        if not call:
            raise TypeError("submit() needs a function to run")
        if not callable(call[0]) and len(call) > 1 and callable(call[1]):
            jobid, fn, args = call[0], call[1], call[2:]
        else:
            jobid, fn, args = next(self._jobids), call[0], call[1:]
            if not callable(fn):
                raise TypeError("submit() needs a callable, not %s" % type(fn).__name__)
        with self._lock:
            if jobid in self._jobs:
                raise ValueError("job id %r is already in use by a job not finished" % (jobid,))
            self._jobs[jobid] = None
        try:
            on_done = self._on_done(jobid, fn, args, kwargs)
            if on_done is None:       # its outcome is in the checkpoint already
                return jobid
            job = self._dispatcher.submit_job(fn, args, kwargs, on_done,
                                              label="job %s" % (jobid,))
        except BaseException:
            with self._lock:
                self._jobs.pop(jobid, None)
            raise
        with self._lock:
            if jobid in self._jobs:
                self._jobs[jobid] = job
        return jobid

    def _on_done(self, jobid, fn, args, kwargs):
        """What the dispatcher calls with the job's outcome; with a checkpoint, the
        outcome is journaled first, and None is returned (the job is not
        submitted) when the checkpoint holds its outcome already."""
        completed = self._completed
        journal = self._journal
        if journal is None:
            return lambda ok, value: completed.put((jobid, ok, value))
        from minicw import store
        key = store.job_key((self._dispatcher.function_key(fn),
                             store.call_identity(args, kwargs)))
        stored = journal.stored_job(jobid, key)
        if stored is not None:
            completed.put((jobid,) + stored)
            return None

        def on_done(ok, value):
            if ok or not isinstance(value, CancelledError):
                journal.add_job(jobid, key, ok, value)
            completed.put((jobid, ok, value))
        return on_done

    def kill(self, jobid) -> bool:
        """Stop a job, queued or running; its callback is not called.  False if it had finished."""
        self._require_started()
        with self._lock:
            job = self._jobs.get(jobid)
        if job is None:
            return False
        if not self._dispatcher.kill_job(job):
            return False
        if job.settled:  # cancelled before it ran: no delivery will come
            self._completed.put((jobid, False, CancelledError()))
        return True

    # The ancestor's name: unlike Future.cancel, it stops a running job too.
    cancel = kill

    def broadcast(self, obj):
        """Send ``obj`` to the cluster once; pass the returned handle as a job argument."""
        self._require_started()
        return self._dispatcher.broadcast(obj)

    def list_workers(self) -> list:
        self._require_started()
        return self._dispatcher.session.list_nodes()

    def status(self) -> dict:
        self._require_started()
        return self._dispatcher.session.status()

    def _require_started(self) -> None:
        if self._dispatcher is None:
            raise MinicwError("call start() before using the ClientThread")
        if self._stopped:
            raise MinicwError("this ClientThread was stopped")
