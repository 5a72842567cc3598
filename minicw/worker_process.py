"""A worker process: lease chunks from the master, run them, report results.

One of these runs per slot of a worker node.  It talks to the master
directly (leasing through the node would add a hop and two wake-ups per
job), and to its node only for blobs and lifecycle:

    master <--exchange(reports, want, wait)-- run_process() --> slot_state (shared memory,
           --(leases, revoked)------------->     |                 read by the node:
                                                  |                 token, position, deadline)
    node   <--(MSG_BLOB, key)---- control pipe ---+
           --(MSG_BLOB, key, data) / (MSG_ERROR, key, why) / (MSG_DRAIN,) -->

The loop holds a small local queue of leases.  It asks for more only when
the queue is empty, and then for about PREFETCH_WORK_S of work judged from
how long recent chunks took: one call per many fast chunks, one call per
chunk when chunks are slow (so slow work never sits in a busy process's
queue while another process idles).  Results of a chunk are reported with
the next exchange; a long chunk flushes partial results every RESULT_FLUSH_S
so callers see results as they are produced (the clock is read every few
jobs, so when jobs turn slow after a fast start a flush may wait for up to
MAX_CLOCK_STRIDE of them).

Before each job the process writes its position into ``slot_state``; when
the process dies, the node reads which job was running, so the master can
charge exactly that job with the crash.

Before a lease the client's working directory and sys.path are applied
(context.py; they stay applied until a lease of another context comes), and
whatever a job changes of them is undone after every job.  A lease the master revoked (its
client cancelled it) is skipped, or abandoned at the next flush.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from multiprocessing import connection, parent_process

from minicw import broadcast, config, context, envir, output, protocol, serialize, transport
from minicw.errors import EnvirError, ResultTooLargeError, RetireProcess, UnpicklableResultError

log = logging.getLogger(__name__)

# slot_state fields (a shared array of signed 64-bit integers)
STATE_TOKEN = 0        # lease being run, 0 when none
STATE_POSITION = 1     # position in the lease's selection, -1 when none
STATE_DEADLINE_NS = 2  # time.monotonic_ns() limit of the running job, 0 when none
STATE_EXIT = 3         # why the process is leaving on its own (EXIT_*), 0 otherwise
STATE_DRAIN = 4        # set by the node: finish the leases held, take no more, exit
STATE_BATCH_END = 5    # running a batch of jobs: the position after its last, 0 otherwise
                       # (STATE_POSITION is then the batch's first; see _run_batched)
STATE_FIELDS = 6

IDLE_WAIT_S = 1.0      # a process waiting for work re-checks its node this often
REPORT_ROOM_BYTES = 1 << 16  # a report's own fields besides its results, at most
FUNCTIONS_PER_PROCESS = 256  # loaded functions and contexts a process keeps
CLOCK_CHECKS_PER_FLUSH = 8   # a running chunk reads the clock this often per RESULT_FLUSH_S ...
MAX_CLOCK_STRIDE = 64        # ... and at least every this many jobs (a fast start must
                             # not hide later slow jobs for long); also the longest batch
BATCH_AFTER_CLEAN_JOBS = 64  # a function runs in batches after this many jobs, one at a
                             # time, that left the cwd and sys.path as they were

# Messages on the control pipe between a node and its process.
MSG_BLOB = "blob"      # process -> node (MSG_BLOB, key); node -> process (MSG_BLOB, key, data)
MSG_ERROR = "error"    # node -> process (MSG_ERROR, key, why): the blob cannot be had
MSG_DRAIN = "drain"    # node -> process (MSG_DRAIN,): finish what is held, then exit

# Exit reasons.  A job may call os._exit() with any code, so the node reads
# the reason from STATE_EXIT, never from the exit code alone.
EXIT_STOPPED = 0       # drained or told to stop
EXIT_NODE_UNKNOWN = 3  # the master no longer knows this node, or is closing
EXIT_MASTER_LOST = 4   # the connection to the master broke
EXIT_RECYCLED = 5      # reached its node's max jobs or memory per process: replace it
EXIT_RETIRED = 6       # a job asked for a new process after it (a Pool's maxtasksperchild);
                       # the leases it held and had not finished go back to the queue


def run_process(spec: dict) -> None:
    """Entry point of a worker process (the target of the node's Process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the node's business
    if hasattr(os, "setpgid"):
        # A group of its own: the processes its jobs start end with it (the node
        # kills the group, and so does the lifeline below).
        os.setpgid(0, 0)
    _exit_with_parent()
    _whole_lines()
    runner = Runner(spec)
    code = runner.run()
    runner.state[STATE_EXIT] = code
    sys.exit(code)


def _whole_lines() -> None:
    """Job output that is not sent back (forwarding off, or written before a lease)
    goes to the node's output a line at a time: the processes of a node share it,
    and a pipe takes a line in one write whole, where unbuffered pieces of two
    processes' prints interleave; a killed process leaves no whole line behind."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True, write_through=False)
            except (ValueError, OSError):
                pass


def _exit_with_parent() -> None:
    """End this process at once when its node dies, whatever it is doing."""
    parent = parent_process()
    if parent is None:
        return

    def watch():
        connection.wait([parent.sentinel])
        if hasattr(os, "killpg"):   # the processes of its job too (its own group)
            os.killpg(os.getpgid(0), signal.SIGKILL)
        os._exit(EXIT_MASTER_LOST)
    threading.Thread(target=watch, name="minicw-lifeline", daemon=True).start()


class Runner:
    """The lease-run-report loop of one worker process."""

    def __init__(self, spec: dict):
        self.node_id = spec["node_id"]
        self.slot = spec["slot"]
        self.control = spec["control"]
        self.state = memoryview(spec["slot_state"]).cast("B").cast("q")
        self.address = spec["address"]
        self.tls = spec.get("tls")
        self.authkey = spec["authkey"]
        self.functions = OrderedDict()  # blob key -> callable (or the EnvirError it raises)
        self.contexts = OrderedDict()   # blob key -> context.JobContext
        self.active_context = None      # the JobContext applied now
        self.notes = []                 # for the client, sent with the next report
        self.leases = deque()
        self.reports = []
        self.reports_bytes = 0       # results bytes in self.reports
        self.max_message_bytes = config.max_message_bytes()
        self.revoked = set()
        self.chunk_seconds = 0.0     # moving average of the time one chunk takes
        self.draining = False
        self.retiring = False        # a job asked for a new process: give back what is held
        self.exit_when_drained = EXIT_STOPPED
        self.max_jobs, self.max_rss = spec.get("recycle") or (0, 0)
        self.setup = spec.get("setup")   # (blob key, context key): called first, or None
        self.jobs_run = 0
        # function key -> jobs run one at a time without changing the cwd or
        # sys.path (-1: seen changing them); see _batchable
        self.clean_jobs = {}
        # What jobs print, for clients that want it back (output.py); the node
        # reads the slot's file when this process dies under a job.
        self.capture = output.Capture(self.state, STATE_POSITION, spec.get("output_file"))
        self.origin = "%s:%d" % (socket.gethostname(), os.getpid())

    def run(self) -> int:
        if self.tls is not None:
            transport.use_tls(self.address, self.tls)
        broadcast.set_fetcher(self._fetch_blob)
        context.install_chdir_tracker()
        try:
            self.api = transport.connect_master(self.address, self.authkey).process()
        except Exception as exc:
            log.error("worker process %s/%d cannot reach the master: %s",
                      self.node_id, self.slot, exc)
            return EXIT_MASTER_LOST
        try:
            if self.setup is not None:
                self._run_setup()
            return self._loop()
        except (EOFError, ConnectionError, OSError) as exc:
            log.warning("worker process %s/%d lost the master: %s", self.node_id, self.slot, exc)
            return EXIT_MASTER_LOST

    def _loop(self) -> int:
        while True:
            self._check_control()
            if self.retiring:
                self._exchange(want=0, wait_s=0)   # the reports; the node gives back the rest
                return EXIT_RETIRED
            if not self.leases:
                if self.draining:
                    self._exchange(want=0, wait_s=0)
                    return self.exit_when_drained
                if not self._exchange(want=self.want(), wait_s=IDLE_WAIT_S):
                    return EXIT_NODE_UNKNOWN
                continue
            self.run_next_lease()

    def _run_setup(self) -> None:
        """Call the node's process setup, a broadcast callable (a Pool's
        initializer), in its client's context, before any lease.  A failure is
        logged; the pool tries again before its first task here, and that
        task fails with the initializer's error."""
        key, context_key = self.setup
        try:
            self._switch_context(self._context(context_key))
            broadcast.resolve(key)()
        except (EOFError, ConnectionError):
            raise
        except BaseException:
            log.warning("worker process %s/%d: its setup (a pool's initializer) failed",
                        self.node_id, self.slot, exc_info=True)

    # The steps of the loop, which benchmarks/workloads.py also drives itself
    # for many simulated nodes in one thread.

    def run_next_lease(self) -> None:
        """Run the first lease held (unless its client cancelled it)."""
        lease = self.next_lease()
        if lease is None:
            return
        started = time.perf_counter()
        self._run_lease(lease)
        self.chunk_took(time.perf_counter() - started)
        if self.max_jobs or self.max_rss:
            self._check_recycle(len(lease.selection))

    def next_lease(self):
        """The first lease held, taken off the queue; None when its client has
        cancelled it."""
        lease = protocol.view(protocol.Lease, self.leases.popleft())
        if lease.token in self.revoked:
            self.revoked.discard(lease.token)
            return None
        return lease

    def chunk_took(self, seconds: float) -> None:
        """A lease ran for ``seconds``: the moving average ``want`` goes by."""
        self.chunk_seconds = seconds if not self.chunk_seconds else (
            0.7 * self.chunk_seconds + 0.3 * seconds)

    def _check_recycle(self, jobs: int) -> None:
        """Past the node's max jobs or memory per process: finish the leases
        held, take no more, and leave to be replaced."""
        self.jobs_run += jobs
        if self.draining:
            return
        if (self.max_jobs and self.jobs_run >= self.max_jobs) or (
                self.max_rss and rss_bytes() >= self.max_rss):
            self.draining = True
            if self.exit_when_drained == EXIT_STOPPED and not self.state[STATE_DRAIN]:
                self.exit_when_drained = EXIT_RECYCLED

    def want(self) -> int:
        """How many chunks to ask for: about PREFETCH_WORK_S of work (one at a time
        under a job limit, so that the process stops close to it)."""
        if not self.chunk_seconds or self.max_jobs:
            return 1
        return max(1, min(config.MAX_CHUNKS_PER_CALL,
                          int(config.PREFETCH_WORK_S / self.chunk_seconds)))

    def exchange_args(self, want: int, wait_s: float) -> tuple:
        """The arguments of the next exchange call, taking the reports held."""
        reports, self.reports = self.reports, []
        self.reports_bytes = 0
        return self.node_id, self.slot, reports, want, wait_s

    def take_reply(self, reply) -> bool:
        """Hold the leases of an exchange reply; False when the master no longer knows us."""
        if reply is None:
            return False
        leases, revoked = reply
        self.leases.extend(leases)
        if revoked:
            self.revoked.update(revoked)
        return True

    def _exchange(self, want: int, wait_s: float) -> bool:
        return self.take_reply(self.api.exchange(*self.exchange_args(want, wait_s)))

    def _check_control(self) -> None:
        # A flag in shared memory, not a pipe message: polling a pipe costs a
        # selector per call, and this runs once per lease.
        if self.state[STATE_DRAIN]:
            self.draining = True

    # --- running a lease ------------------------------------------------------------

    def _run_lease(self, lease: protocol.Lease) -> None:
        token, selection = lease.token, lease.selection
        state = self.state
        state[STATE_TOKEN] = token
        state[STATE_POSITION] = 0
        started = time.perf_counter()
        try:
            # The context first: the payload may name modules on the client's path.
            job_context = self._context(lease.context_key)
            self._switch_context(job_context)
            kind, items = serialize.loads(lease.payload)
            functions = [self._resolve(key) for key in lease.func_keys]
        except BaseException as exc:  # every job of the chunk fails the same way
            description = protocol.describe_exception(exc)
            errors = {pos: description for pos in range(len(selection))}
            self._report(token, 0, [None] * len(selection), errors, 0.0)
            self._finish_lease()
            return
        output_limit = job_context.output_limit if job_context is not None else 0
        if output_limit:
            self.capture.install(output_limit)
        try:
            self._run_jobs(token, selection, items, kind, functions, lease, job_context, started)
        finally:
            if output_limit:
                self.capture.uninstall()

    def _run_jobs(self, token, selection, items, kind, functions, lease, job_context,
                  started) -> None:
        """Run a lease's jobs in batches when it allows (see _run_batched), else one
        at a time; report their results at least every RESULT_FLUSH_S."""
        pending = _Pending(started)
        position = 0
        if self._batchable(selection, items, lease):
            try:
                position = self._run_batched(token, selection, items, kind, functions, lease,
                                             job_context, pending)
            finally:   # however it ended (a flush that found the lease cancelled, ...)
                self.capture.batch = None
                self.state[STATE_BATCH_END] = 0
            if position is None:
                return
        if self._run_singly(token, selection, items, _caller(kind, functions), lease.timeout_s,
                            job_context, 1 if kind == protocol.CALL_ONE else 2, position,
                            pending):
            self._never_batch(lease.func_keys)
            return
        clean_jobs = self.clean_jobs
        for key in lease.func_keys:
            jobs = clean_jobs.get(key, 0)
            if jobs >= 0:
                clean_jobs[key] = jobs + len(selection) - position

    def _never_batch(self, func_keys) -> None:
        """These functions changed the cwd or sys.path (or hid a failure from a
        batch): they run one job at a time in this process from now on."""
        for key in func_keys:
            self.clean_jobs[key] = -1

    def _batchable(self, selection, items, lease) -> bool:
        """Whether a lease's jobs may run in batches: no time limit (its deadline is
        set per job), a fresh run of consecutive jobs (a tuple of indices is a
        retry after a crash, which runs one job at a time to find the culprit),
        and functions that ran BATCH_AFTER_CLEAN_JOBS jobs here one at a time
        without changing the working directory or sys.path (which is undone
        after each job: a job in a batch would see the change of the one before)."""
        if lease.timeout_s or type(selection) is not range or selection.step != 1:
            return False
        if type(items) not in (list, tuple, range):
            return False
        clean_jobs = self.clean_jobs
        return all(clean_jobs.get(key, 0) >= BATCH_AFTER_CLEAN_JOBS for key in lease.func_keys)

    def _run_batched(self, token, selection, items, kind, functions, lease, job_context,
                     pending):
        """Run jobs a batch at a time, each batch one C-level ``map`` over a slice of
        the items: about a third of the cost per job of the loop in
        ``_run_singly``, which no-op jobs feel.

        A batch is as long as the clock stride (MAX_CLOCK_STRIDE jobs at most).
        The slot state holds the batch's first position and its end: the node
        kills a job to cancel when the batch holding it runs, and when the
        process dies within a batch of several jobs, the master, not knowing
        which one killed it, puts the lease's jobs back uncharged as a retry,
        which runs them one at a time (``_batchable``).  The running job's
        position is the batch's first plus the results it added: a failure is
        recorded there, and what a job prints is captured there
        (``Capture.batch``).  Context changes are looked for after each batch:
        a function that changes the working directory or sys.path after all
        runs one job at a time from then on in this process (the jobs after it
        in that batch saw the change).

        Returns the position at which ``_run_singly`` goes on, or None when the
        lease is done (or abandoned, or the process retires).
        """
        state = self.state
        capture = self.capture if self.capture.installed else None
        flags = context.flags
        job_path = job_context.job_path if job_context is not None else None
        perf_counter = time.perf_counter
        if kind == protocol.CALL_STAR:      # starmap calls the function itself: no frame of ours
            mapper, call, frames = itertools.starmap, functions[0], 1
        else:
            mapper, call = map, _caller(kind, functions)
            frames = 1 if kind == protocol.CALL_ONE else 2
        first = selection.start
        last = len(selection)
        position = 0
        stride = 1             # the first job alone: its time sets the stride
        start, values, errors = pending.start, pending.values, pending.errors
        if capture is not None:   # again after each flush, which starts a new list
            capture.batch = (start, values)
        while position < last:
            end = min(last, position + stride)
            state[STATE_POSITION] = position
            state[STATE_BATCH_END] = end
            try:
                values.extend(mapper(call, items[first + position:first + end]))
                if start + len(values) < end:
                    # A job raised StopIteration, which ends a map quietly: it is
                    # the job's failure all the same (its traceback is lost here:
                    # the function runs one job at a time from now on).
                    self._never_batch(lease.func_keys)
                    raise StopIteration("raised by the job (its traceback is not kept when "
                                        "it runs in a batch of jobs)")
            except RetireProcess as retire:
                self._retire_after(token, start, start + len(values), values, errors, retire,
                                   perf_counter() - pending.started)
                return None
            except BaseException as exc:
                end = start + len(values)    # the position of the job that raised
                values.append(None)
                if errors is None:
                    errors = {}
                errors[end - start] = protocol.describe_exception(exc, skip_frames=frames)
                end += 1
            position = end
            if job_path is not None and (flags.touched or sys.path is not job_path):
                job_context.after_job()
                self._never_batch(lease.func_keys)
                pending.start, pending.values, pending.errors = start, values, errors
                return position
            if position == last:
                break
            now = perf_counter()
            stride = _clock_stride(now - pending.started, position - start)
            if now > pending.flush_at:
                state[STATE_BATCH_END] = 0
                if self._flush(token, start, values, errors, now, pending):
                    return None
                start, values, errors = position, [], None
                if capture is not None:
                    capture.batch = (start, values)
        self._finish_lease()
        self._report(token, start, values, errors, perf_counter() - pending.started)
        return None

    def _flush(self, token, start, values, errors, now, pending) -> bool:
        """Report the results of a running lease so far; True when its client has
        cancelled it meanwhile (the rest is abandoned)."""
        self._report(token, start, values, errors, now - pending.started)
        self._exchange(want=0, wait_s=0)
        pending.started = now
        pending.flush_at = now + config.RESULT_FLUSH_S
        if token in self.revoked:
            self.revoked.discard(token)
            self._finish_lease()
            return True
        return False

    def _run_singly(self, token, selection, items, call, timeout_s, job_context, own_frames,
                    first, pending) -> bool:
        """Run jobs from position ``first`` one at a time; True when one of them
        changed the working directory or sys.path."""
        # The inner loop runs once per job: names are bound locally, and the
        # context check is inlined, because each attribute lookup here costs
        # a measurable share of a no-op job.  The clock, which costs more than
        # a no-op job, is read every ``stride`` jobs: about CLOCK_CHECKS_PER_FLUSH
        # times per RESULT_FLUSH_S at the pace seen so far, and at least every
        # MAX_CLOCK_STRIDE jobs.  So results wait at most RESULT_FLUSH_S, or,
        # when jobs turn slow after a fast start, at most MAX_CLOCK_STRIDE jobs.
        state = self.state
        timeout_ns = int(timeout_s * 1e9) if timeout_s else 0
        perf_counter = time.perf_counter
        flags = context.flags
        job_path = job_context.job_path if job_context is not None else None
        last = len(selection) - 1
        start, values, errors = pending.start, pending.values, pending.errors
        append = values.append
        check_at = first   # the position after which the clock is read next
        touched = False
        for position, index in enumerate(selection[first:], first):
            state[STATE_POSITION] = position
            if timeout_ns:
                state[STATE_DEADLINE_NS] = time.monotonic_ns() + timeout_ns
            try:
                append(call(items[index]))
            except RetireProcess as retire:
                self._retire_after(token, start, position, values, errors, retire,
                                   perf_counter() - pending.started)
                return touched
            except BaseException as exc:
                append(None)
                if errors is None:
                    errors = {}
                # the traceback starts in the job: our frames (this loop, and
                # the caller of a job with several arguments) are left out
                errors[position - start] = protocol.describe_exception(exc, skip_frames=own_frames)
            if job_path is not None and (flags.touched or sys.path is not job_path):
                job_context.after_job()
                touched = True
            if position < check_at or position == last:
                continue
            now = perf_counter()
            check_at = position + _clock_stride(now - pending.started, position + 1 - start)
            if now > pending.flush_at:
                if self._flush(token, start, values, errors, now, pending):
                    return touched
                start, values, errors = position + 1, [], None
                append = values.append
        self._finish_lease()
        self._report(token, start, values, errors, perf_counter() - pending.started)
        return touched

    def _retire_after(self, token, start, position, values, errors, retire, seconds) -> None:
        """A job raised RetireProcess: report it and the jobs before it in this
        lease, and stop taking work (the loop then leaves with EXIT_RETIRED)."""
        if retire.failure is None:
            values.append(retire.outcome)
        else:
            values.append(None)
            errors = errors or {}
            # its traceback starts in the frame that caught it (pool_task's)
            errors[position - start] = protocol.describe_exception(retire.failure,
                                                                   skip_frames=1)
        self._finish_lease()
        self._report(token, start, values, errors, seconds)
        self.retiring = True

    def _finish_lease(self) -> None:
        state = self.state
        state[STATE_BATCH_END] = 0
        state[STATE_DEADLINE_NS] = 0
        state[STATE_POSITION] = -1
        state[STATE_TOKEN] = 0

    def _report(self, token, start, values, errors, seconds) -> None:
        notes, self.notes = self.notes or None, []
        printed = self.capture.take(start, len(values))
        if printed is not None:
            printed = (self.origin, printed)
        try:
            results = protocol.pack_results(values, errors, seconds, notes, printed)
        except Exception:
            values, errors = _picklable_results(values, errors)
            results = protocol.pack_results(values, errors, seconds, notes, printed)
        if len(results) > self.max_message_bytes:
            self._report_in_parts(token, start, values, errors, seconds, notes, printed)
            return
        self._hold(protocol.Report(token, start, len(values), results,
                                   protocol.report_failures(errors)))

    def _hold(self, report: protocol.Report) -> None:
        """Keep ``report`` for the next exchange; one exchange carries at most
        one message's worth of results (the master refuses larger messages)."""
        size = len(report.results)
        if self.reports and self.reports_bytes + size > self.max_message_bytes:
            self._exchange(want=0, wait_s=0)
        self.reports.append(protocol.on_wire(report))
        self.reports_bytes += size

    def _report_in_parts(self, token, start, values, errors, seconds, notes, printed) -> None:
        """Results over one message's size limit: a result too large alone
        fails its job with ResultTooLargeError; the others go in consecutive
        reports, each under the limit."""
        limit = self.max_message_bytes - REPORT_ROOM_BYTES
        errors = dict(errors or {})
        jobs_printed = printed[1] if printed is not None else {}
        sizes = []
        for position, value in enumerate(values):
            size = len(serialize.dumps(value, protocol.PICKLE_PROTOCOL))
            if size > limit:
                errors[position] = protocol.describe_exception(
                    ResultTooLargeError(size, self.max_message_bytes))
                values[position] = None
                size = 0
            if position in errors:
                size += len(pickle.dumps(errors[position], protocol.PICKLE_PROTOCOL))
            size += sum(len(text) for _, text in jobs_printed.get(position, ()))
            sizes.append(size)
        first = held = 0
        for position, size in enumerate(sizes):
            if position > first and held + size > limit:
                self._report_part(token, start, values, errors, jobs_printed, first, position,
                                  seconds, notes)
                first, held, seconds, notes = position, 0, 0.0, None
            held += size
        self._report_part(token, start, values, errors, jobs_printed, first, len(values),
                          seconds, notes)

    def _report_part(self, token, start, values, errors, jobs_printed, first, end, seconds,
                     notes) -> None:
        """The report of jobs ``first``..``end`` of a report made in parts."""
        part_errors = {position - first: described for position, described in errors.items()
                       if first <= position < end} or None
        part_printed = {position - first: entries for position, entries in jobs_printed.items()
                        if first <= position < end}
        results = protocol.pack_results(values[first:end], part_errors, seconds, notes,
                                        (self.origin, part_printed) if part_printed else None)
        self._hold(protocol.Report(token, start + first, end - first, results,
                                   protocol.report_failures(part_errors)))

    # --- functions -------------------------------------------------------------------

    def _resolve(self, key: str):
        function = self.functions.get(key)
        if function is None:
            function = self.functions[key] = self._load_function(key)
            if len(self.functions) > FUNCTIONS_PER_PROCESS:
                self.functions.popitem(last=False)
        if isinstance(function, BaseException):
            raise function
        return function

    def _context(self, key):
        """The JobContext for a BLOB_CONTEXT key (None: run where the process is)."""
        if key is None:
            return None
        job_context = self.contexts.get(key)
        if job_context is None:
            _, cwd, entries, python, installation, output_limit = pickle.loads(
                self._fetch_blob(key))
            job_context = self.contexts[key] = context.JobContext(cwd, entries, python,
                                                                  installation, output_limit)
            if len(self.contexts) > FUNCTIONS_PER_PROCESS:
                self.contexts.popitem(last=False)
        return job_context

    def _switch_context(self, job_context) -> None:
        """Make ``job_context`` the one applied (it stays applied between leases of
        the same client: entering and leaving cost more than a fast chunk)."""
        if job_context is self.active_context:
            if job_context is not None and not job_context.cwd_still_there():
                self._take_notes(job_context)
            return
        if self.active_context is not None:
            self.active_context.leave()
            self.active_context = None
        if job_context is not None:
            self._enter(job_context)
            self.active_context = job_context

    def _enter(self, job_context) -> None:
        job_context.enter()
        self._take_notes(job_context)

    def _take_notes(self, job_context) -> None:
        if job_context.notes:
            for note in job_context.notes:
                log.warning("%s", note)
            self.notes.extend(job_context.notes)
            job_context.notes = []

    def _load_function(self, key: str):
        kind, *fields = pickle.loads(self._fetch_blob(key))
        try:
            if kind == protocol.BLOB_CALLABLE:
                return serialize.loads(fields[0])
            if kind == protocol.BLOB_ENVIR_NAME:
                envir_key, name = fields
                if not envir.is_loaded(envir_key):
                    _, source, label = pickle.loads(self._fetch_blob(envir_key))
                    envir.register(envir_key, source, label)
                return envir.lookup(envir_key, name)
        except EnvirError as exc:
            return exc
        raise ValueError("unknown function blob kind %r" % (kind,))

    def _fetch_blob(self, key: str) -> bytes:
        self.control.send((MSG_BLOB, key))
        while True:
            kind, *fields = self.control.recv()
            if kind == MSG_DRAIN:
                self.draining = True
                continue
            if kind == MSG_ERROR:
                raise RuntimeError(fields[1])
            return fields[1]


def rss_bytes() -> int:
    """This process's resident memory now (its peak, where the platform tells only that)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        pass
    if sys.platform == "win32":
        return _windows_rss_bytes()
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # bytes on macOS, else KB


def _windows_rss_bytes() -> int:
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):   # PROCESS_MEMORY_COUNTERS
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
            (name, ctypes.c_size_t) for name in (
                "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage",
                "QuotaPagedPoolUsage", "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage",
                "PagefileUsage", "PeakPagefileUsage")]
    kernel32 = ctypes.WinDLL("kernel32")
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    query = kernel32.K32GetProcessMemoryInfo
    query.argtypes = [wintypes.HANDLE, ctypes.POINTER(Counters), wintypes.DWORD]
    counters = Counters()
    counters.cb = ctypes.sizeof(counters)
    if not query(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
        return 0
    return counters.WorkingSetSize


class _Pending:
    """The results of a running lease not reported yet, from position ``start``,
    and when they started to accumulate (a flush reports them and starts over)."""

    __slots__ = ("start", "values", "errors", "started", "flush_at")

    def __init__(self, started: float):
        self.start = 0
        self.values = []
        self.errors = None
        self.started = started
        self.flush_at = started + config.RESULT_FLUSH_S


def _clock_stride(seconds: float, jobs: int) -> int:
    """Jobs to run before the clock is read again, ``jobs`` having taken ``seconds``."""
    if seconds <= 0:
        return MAX_CLOCK_STRIDE
    stride = int(config.RESULT_FLUSH_S / CLOCK_CHECKS_PER_FLUSH * jobs / seconds)
    return max(1, min(MAX_CLOCK_STRIDE, stride))


def _caller(kind: int, functions: list):
    """A one-argument callable that applies one payload item."""
    if kind == protocol.CALL_ONE:
        return functions[0]
    if kind == protocol.CALL_STAR:
        function = functions[0]
        return lambda item: function(*item)

    def call_full(item):
        which, args, kwargs = item
        return functions[which](*args, **kwargs)
    return call_full


def _picklable_results(values: list, errors: dict | None):
    """Replace results that cannot be serialized by an error naming them."""
    errors = dict(errors or {})
    for position, value in enumerate(values):
        try:
            serialize.dumps(value, protocol.PICKLE_PROTOCOL)
        except Exception as exc:
            problem = UnpicklableResultError(type(value).__name__, repr(exc),
                                             _short_repr(value))
            errors[position] = protocol.describe_exception(problem)
            values[position] = None
    return values, errors


def _short_repr(value) -> str:
    """The start of ``repr(value)`` (which may itself fail)."""
    try:
        text = repr(value)
    except Exception as exc:
        return "<%s object: repr() failed: %r>" % (type(value).__name__, exc)
    limit = UnpicklableResultError.REPR_CHARS
    return text if len(text) <= limit else text[:limit - 3] + "..."
