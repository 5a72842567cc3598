"""minicw side by side with the standard library's pools (and minimalcluster,
when installed), on this machine, in one run: the targets of the performance
issue, measured and checked.

    python benchmarks/run.py [--quick] [--repeat N] [--only NAME[,NAME]] [--json PATH]
                             [--step-timeout SECONDS]

Method
------
* Two worker processes everywhere: ``LocalCluster(n_workers=2)``,
  ``ProcessPoolExecutor(max_workers=2)``, ``Pool(2)``, a 2-process
  minimalcluster worker node.  The jobs are the functions of ``workloads.py``
  (importable, so they travel by reference in every system).
* Each workload starts its contenders, warms each one up (processes started,
  functions imported and cached), then measures them in turns, interleaved:
  A, B, C, A, B, C, ... ``--repeat`` times (default 3).  A slow moment of the
  machine therefore hits every contender alike.  Short workloads with targets
  on ratios near 1 measure more often whatever ``--repeat`` says: batched,
  roundtrip and tls at least 5 times, progress, output and scale 15.
* A row of the table compares minicw with one peer: the median of each
  side's repeats, and their ratio (minicw / peer).  A target is either on that
  ratio or on minicw's own value; rows without a target are references.
  ``--quick`` runs smaller sizes and leaves out factorize's reference peers.
* Other load on the machine skews every figure: the 1-minute load average
  before and after the run is printed with the table.
* Results are checked (sums, counts, products of factors): a fast wrong
  answer raises instead of passing.
* Every raw measurement, the table and the machine go to a JSON file
  (default ``benchmarks/results.json``; ``results-quick.json`` with --quick).
* Every process is started by this script and stopped by its PID at the end
  of its workload, also on Ctrl-C, SIGTERM or an error (``with`` blocks); a
  last sweep kills any child left over, by PID.  A step (a measurement or a
  warm-up) still running after ``--step-timeout`` seconds is reported as an
  error instead of hanging the run.

Workloads (full size; --quick in brackets) and the issue's targets
------------------------------------------------------------------
batched    no-op map over 1,000,000 items [200,000]; tasks/s.  ``executor.map()``
           with its default chunk size >= 1.0x ``multiprocessing.Pool.map``
           with its default chunks, for these no-op jobs and for 500,000
           [100,000] jobs of 1 us of CPU; ``executor.map(chunksize=1000)`` and
           ``execute()`` (chunksize 1000) >= 1.0x
           ``ProcessPoolExecutor.map(chunksize=1000)``; ``execute()`` with its
           default chunk sizing >= 20x minimalcluster's ``execute()`` (chunks of 50).
submit     20,000 [5,000] ``submit()`` calls in a loop, then wait for all:
           ClusterExecutor and ClientThread >= 50,000 tasks/s and >= 7x PPE.
roundtrip  submit one job, wait for its result, 500 [200] times: median
           latency <= 1.25x ``ProcessPoolExecutor.submit().result()``'s, 90th
           percentile <= 1.5x its.
factorize  minimalcluster's README factorization of numbers from 999999999999
           stepping by 2, as many as take ~4 s [~1 s] serially here, through
           ``execute()``: parallel efficiency = serial time / (2 x time),
           >= 0.97x ProcessPoolExecutor.map()'s in the same run,
           each parallel run against the serial runs just before and after it,
           5 repeats at least [3].  Two bare processes that get their shares of
           the numbers in one message, balanced by the serial run's job times,
           show about what the machine allows; the share of CPU time the
           hypervisor took during the parallel runs is noted.
memory     (a) a master with no worker: RSS growth per queued job after
           200,000 [50,000] ``submit()`` calls <= 500 bytes; (b) streaming
           ``executor.map`` over a generator of 10,000,000 [1,000,000] items:
           master peak RSS < 100 MB (sampled every 0.5 s).
scale      200 [50] simulated worker nodes (in 4 processes, each driving
           its nodes' ``minicw.worker_process.Runner`` slots from one thread; see
           workloads.py) while a client maps 100,000 [20,000] no-op jobs, and
           beside it the same messages over bare sockets (a hub and 200
           connections in 4 processes, no minicw; workloads.py floorhub): the
           master's CPU per chunk (a lease and its report) <= 1.5x the hub's
           per chunk, both read from /proc/PID/task/*/schedstat around each
           run; no node without jobs.  A run lasts tens of milliseconds, so
           scale measures at least 15 times.  References: the throughput
           against one real node of 2 processes, and how much more CPU each
           role (master or hub, node processes, client) spent per run for 200
           nodes than for 1.
processes  1,000 simulated worker processes (100 nodes of 10, in 4 OS
           processes; workloads.py simprocs: each one leases, "sleeps" its
           jobs on a timer and reports, as a real process's loop would) on
           one master, a map of 20 ms jobs lasting about 4 s [200 processes,
           2 s]: >= 0.9x the ideal 50,000 jobs/s, no process without jobs in
           any run, master peak RSS (VmHWM) < 200 MB; the same for 2,000
           processes as a reference.
checkpoint ``executor.map`` of 100,000 [20,000] jobs of 100 us of CPU with
           ``checkpoint=`` (a new file each run) against the same map without:
           >= 0.95x (journaling costs at most 5%).  Beside it, the same with
           no-op jobs: what journaling a result costs by itself, per result.
progress   the batched ``executor.map(chunksize=1000)`` of no-op jobs, 1,000,000
           [200,000], with its progress line drawn (``progress=True``, shown
           from the start instead of after 2 s, rewritten every 0.25 s on a
           stderr that says it is a terminal and writes to os.devnull) against
           the same map with ``progress=False``: >= 0.98x (the display costs at
           most 2%); 15 repeats at least.
output     jobs that print nothing, with output forwarding on (the default)
           and off (``forward_output=False``), two executors on one cluster:
           the batched map of ``progress`` (>= 0.98x) and the round trip of
           ``roundtrip`` (median <= 1.02x); 15 repeats at least.
tls        two clusters side by side, one over TLS (a self-signed certificate
           made by the openssl command, pinned by fingerprint) and one plain:
           the batched ``executor.map(chunksize=1000)`` of 1,000,000 [200,000]
           no-op jobs (>= 0.75x: TLS costs at most 25%) and the round trip of
           ``roundtrip`` (median <= 1.25x); n/a where openssl is missing.
pool       ``minicw.Pool(2)`` (on the LocalCluster it starts itself) against
           ``multiprocessing.Pool(2)``, the same calls: ``map`` of 1,000,000
           [200,000] no-op jobs with the default chunks, ``imap`` of 100,000
           [20,000] with its default chunksize of 1, and the
           ``apply_async().get()`` round trip of ``roundtrip``; references.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import platform
import queue
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import workloads  # noqa: E402
from workloads import factorize_naive, inc, spin, spin_1us  # noqa: E402
from minicw import ClusterExecutor, LocalCluster, chunking  # noqa: E402
from minicw import config as minicw_config  # noqa: E402

WORKERS = 2
WORKLOADS_PY = os.path.join(HERE, "workloads.py")

SIZES = {
    "full": {"batched": 1_000_000, "batched_1us": 500_000, "submit": 20_000, "roundtrip": 500, "factorize_s": 4.0,
             "queued": 200_000, "stream": 10_000_000, "scale_nodes": 200,
             "scale_jobs": 100_000, "checkpoint": 100_000, "progress": 1_000_000,
             "tls": 1_000_000, "pool": 1_000_000, "pool_imap": 100_000,
             "sim_processes": (1000, 2000), "sim_seconds": 4.0},
    "quick": {"batched": 200_000, "batched_1us": 100_000, "submit": 5_000, "roundtrip": 200, "factorize_s": 1.0,
              "queued": 50_000, "stream": 1_000_000, "scale_nodes": 50,
              "scale_jobs": 20_000, "checkpoint": 20_000, "progress": 200_000,
              "tls": 200_000, "pool": 200_000, "pool_imap": 20_000,
              "sim_processes": (200,), "sim_seconds": 2.0},
}
SIM_PROCESSES = 4            # processes the simulated nodes are spread over (of 2, 3,
                             # 4 and 8 measured side by side, 4 went fastest)
SIM_PER_NODE = 10            # simulated worker processes per simulated node (processes)
SAMPLE_PERIOD_S = 0.5        # RSS sampling period while streaming
RSS_RATIO_FLOOR = 1e6        # RSS figures under this are page noise: no ratio to them
QUEUED_SETTLE_S = 1.0        # pause before reading the master's RSS after submitting
SCALE_MIN_REPEAT = 15        # a scale run lasts tens of milliseconds: measure it more often
TARGET_MIN_REPEAT = 5        # short workloads with targets on ratios near 1 (batched,
                             # roundtrip, tls): medians of more runs
PROGRESS_MIN_REPEAT = 15     # a 2% target on runs that differ by 10% here: many runs a side
FACTORIZE_MIN_REPEAT = 5     # serial runs here differ by up to 40% within a minute: a
                             # median of 3 efficiencies is mostly that drift (full mode)
STEP_LIMIT_S = 300.0         # a measurement or warm-up taking longer is stuck: it fails and
                             # the run goes on (--step-timeout)
WORKLOAD_LIMIT_S = 1200.0    # the same for a whole workload (warm-ups included)
RECONNECT_TIMEOUT_S = "5"    # how long our clients wait for a master that went away


class BenchmarkError(RuntimeError):
    """A contender failed, or gave a wrong answer."""


# Ctrl-C raises KeyboardInterrupt, which Python drops when it lands in a weakref
# callback or a __del__ (freeing thousands of futures takes a while): the flag
# makes the run stop at the next measurement anyway.
_interrupted = threading.Event()


def _on_sigint(signum, frame):
    _interrupted.set()
    raise KeyboardInterrupt


def _default_signals() -> None:
    """In a pool's forked worker: the default SIGINT and SIGTERM, not this script's
    handlers (Pool.terminate() sends SIGTERM, which must end the worker quietly)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def check_interrupted() -> None:
    if _interrupted.is_set():
        raise KeyboardInterrupt


class Watchdog:
    """``with Watchdog(what, limit_s):`` a block that overruns is interrupted (a SIGINT
    to this process wakes even a blocked wait) and raises BenchmarkError instead."""

    def __init__(self, what: str, limit_s: float):
        self.what = what
        self.limit_s = limit_s
        self.fired = False
        self._timer = threading.Timer(limit_s, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        os.kill(os.getpid(), signal.SIGINT)

    def __enter__(self) -> "Watchdog":
        self._timer.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._timer.cancel()
        if self.fired and exc_type is KeyboardInterrupt:
            _interrupted.clear()
            raise BenchmarkError("%s did not finish within %gs" % (self.what, self.limit_s))


# --- rows and targets ------------------------------------------------------------------

class Target(NamedTuple):
    """``on`` "ratio" (minicw / peer) or "value" (minicw's own), compared by ``op``."""
    on: str
    op: str
    limit: float

    def check(self, value, ratio):
        subject = ratio if self.on == "ratio" else value
        if subject is None:
            return None
        return {">=": subject >= self.limit, "<=": subject <= self.limit,
                "<": subject < self.limit, "==": subject == self.limit}[self.op]

    def text(self, unit: str) -> str:
        if self.on == "ratio":
            return "%s %gx" % (self.op, self.limit)
        return "%s %s" % (self.op, format_value(self.limit, unit))


def make_row(workload, case, value, unit, peer=None, peer_value=None, target=None,
             note="") -> dict:
    ratio = value / peer_value if value is not None and peer_value else None
    if unit == "MB" and peer_value is not None and peer_value < RSS_RATIO_FLOOR:
        ratio = None
    passed = target.check(value, ratio) if target else None
    return {"workload": workload, "case": case, "minicw": value, "unit": unit,
            "peer": peer, "peer_value": peer_value, "ratio": ratio,
            "target": target.text(unit) if target else None,
            "result": None if target is None else ("n/a" if passed is None
                                                    else "PASS" if passed else "FAIL"),
            "note": note}


def format_value(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "tasks/s":
        return "{:,.0f}/s".format(value)
    if unit == "us":
        return "{:,.0f} us".format(value)
    if unit == "B/job":
        return "{:,.0f} B/job".format(value)
    if unit == "MB":
        return "{:,.1f} MB".format(value / 1e6)
    if unit == "efficiency":
        return "%.3f" % value
    return "{:,.0f} {}".format(value, unit).strip()


def format_table(rows: list) -> str:
    header = ("workload", "case", "minicw", "peer", "peer value", "ratio", "target", "result")
    cells = [header]
    for row in rows:
        cells.append((row["workload"], row["case"], format_value(row["minicw"], row["unit"]),
                      row["peer"] or "-", format_value(row["peer_value"], row["unit"]),
                      "-" if row["ratio"] is None else "%.2fx" % row["ratio"],
                      row["target"] or "-", row["result"] or "-"))
    widths = [max(len(str(line[i])) for line in cells) for i in range(len(header))]
    lines = []
    for number, line in enumerate(cells):
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths))
                     .rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    notes = ["  %s / %s: %s" % (row["workload"], row["case"], row["note"])
             for row in rows if row["note"]]
    if notes:
        lines += ["", "notes:"] + notes
    return "\n".join(lines)


# --- the run: sizes, raw measurements, interleaving ----------------------------------------

class Run:
    """What every workload shares: sizes, repeat count, the raw measurements."""

    def __init__(self, quick: bool, repeat: int, step_limit_s: float = STEP_LIMIT_S):
        self.quick = quick
        self.repeat = repeat
        self.step_limit_s = step_limit_s
        self.sizes = SIZES["quick" if quick else "full"]
        self.measurements = []

    def record(self, workload: str, contender: str, repeat, values: dict) -> dict:
        raw = dict(workload=workload, contender=contender, repeat=repeat, **values)
        self.measurements.append(raw)
        return raw

    def guard(self, what: str) -> Watchdog:
        """A watchdog for one step: a measurement or a warm-up."""
        return Watchdog(what, self.step_limit_s)

    def interleave(self, workload: str, contenders: dict, min_repeat: int = 1) -> dict:
        """Measure each contender ``repeat`` times (at least ``min_repeat``), in turns;
        returns {name: [values, ...]}."""
        runs = {name: [] for name in contenders}
        for repeat in range(max(self.repeat, min_repeat)):
            for name, measure in contenders.items():
                self._measure(workload, name, measure, repeat, runs)
        return runs

    def bracket(self, workload: str, reference: str, measure_reference, contenders: dict,
                min_repeat: int = 1) -> dict:
        """Like ``interleave``, with ``reference`` measured before the first
        contender and after every contender.

        These machines drift by tens of percent in speed within a minute, so
        a ratio to one reference run measured earlier says more about the
        drift than about the contender.  Each contender's values get
        ``reference_s``: the mean of the reference runs just before and just
        after it.  Returns {name: [values, ...]}, the reference's runs included.
        """
        runs = {name: [] for name in [reference, *contenders]}
        before, _ = self._measure(workload, reference, measure_reference, 0, runs)
        for repeat in range(max(self.repeat, min_repeat)):
            for name, measure in contenders.items():
                values, raw = self._measure(workload, name, measure, repeat, runs)
                after, _ = self._measure(workload, reference, measure_reference, repeat, runs)
                values["reference_s"] = raw["reference_s"] = (
                    before["seconds"] + after["seconds"]) / 2
                before = after
        return runs

    def _measure(self, workload: str, name: str, measure, repeat: int, runs: dict) -> tuple:
        """One measurement, guarded, recorded and shown: (values, raw record)."""
        check_interrupted()
        with self.guard("%s: %s" % (workload, name)):
            values = measure()
        raw = self.record(workload, name, repeat, values)
        runs[name].append(values)
        progress("[%s] %s #%d: %s" % (workload, name, repeat + 1, _brief(values)))
        return values, raw


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _brief(values: dict) -> str:
    shown = []
    for key, value in values.items():
        if isinstance(value, float):
            shown.append("%s=%.4g" % (key, value))
        elif isinstance(value, int):
            shown.append("%s=%d" % (key, value))
    return " ".join(shown[:5])


def median(runs: dict, name: str, key: str):
    if name not in runs:
        return None
    return statistics.median(values[key] for values in runs[name])


def timed(call) -> tuple:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def throughput(count: int, call, check, roles=None) -> dict:
    """Time ``call()`` (which must produce all ``count`` results); ``check`` its result.
    With ``roles`` ({role: [pid]}), also the CPU each spent meanwhile: "cpu_ms"."""
    cpu_before = _cpu_by_role(roles) if roles else None
    seconds, result = timed(call)
    values = {"seconds": seconds, "tasks_per_s": count / seconds}
    if roles:
        values["cpu_ms"] = _cpu_spent(cpu_before, _cpu_by_role(roles))
    check(result)
    return values


def expect(what: str, got, wanted) -> None:
    if got != wanted:
        raise BenchmarkError("%s: got %r, expected %r" % (what, got, wanted))


# --- processes ---------------------------------------------------------------------------

class Child:
    """A process started here: its stdout lines read by a thread, stopped by its PID.

    ``ends_at_eof``: the child ends by itself when its stdin closes (else
    SIGTERM stops it).  ``own_group`` starts it in a session of its own, so
    that processes it starts itself (minimalcluster's) end with it, by its
    group id.
    """

    def __init__(self, argv, env=None, ends_at_eof=True, own_group=False):
        self.ends_at_eof = ends_at_eof
        self.own_group = own_group
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, env=env, text=True, bufsize=1,
                                      start_new_session=own_group)
        self.pid = self.popen.pid
        self._lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def readline(self, timeout_s: float) -> str:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise BenchmarkError("pid %d said nothing for %gs; stderr: %s"
                                 % (self.pid, timeout_s, self.stderr_tail())) from None
        if line is None:
            raise BenchmarkError("pid %d exited (code %s); stderr: %s"
                                 % (self.pid, self.popen.wait(), self.stderr_tail()))
        return line

    def wait_for(self, pattern: str, timeout_s: float = 60.0):
        deadline = time.monotonic() + timeout_s
        while True:
            match = re.search(pattern, self.readline(max(0.01, deadline - time.monotonic())))
            if match:
                return match

    def send(self, text: str) -> None:
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def stderr_tail(self, lines: int = 8) -> str:
        self._stderr.seek(0)
        return " | ".join(self._stderr.read().strip().splitlines()[-lines:]) or "(empty)"

    def stop(self, grace_s: float = 5.0) -> None:
        """Close its stdin, then SIGTERM, then SIGKILL, each by PID."""
        try:
            self.popen.stdin.close()
        except OSError:
            pass
        steps = (None, signal.SIGTERM, signal.SIGKILL) if self.ends_at_eof else (
            signal.SIGTERM, signal.SIGKILL)
        for signum in steps:
            if signum is not None and self.popen.poll() is None:
                self.popen.send_signal(signum)
            try:
                self.popen.wait(grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.own_group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self._stderr.close()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def minicw_env(authkey: str) -> dict:
    env = dict(os.environ, MINICW_AUTHKEY=authkey)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "")
                                                   .split(os.pathsep) if p])
    return env


def start_master(stack: contextlib.ExitStack, authkey: str) -> tuple:
    """``python -m minicw.master`` alone on 127.0.0.1; returns (Child, port)."""
    child = stack.enter_context(Child(
        [sys.executable, "-m", "minicw.master", "--host", "127.0.0.1", "--port", "0"],
        env=minicw_env(authkey), ends_at_eof=False))
    port = int(child.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    return child, port


def parent_pids() -> dict:
    """{pid: parent pid} of every process, read from /proc ({} without /proc)."""
    parents = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open("/proc/%s/stat" % entry) as stat:
                parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
    return parents


def children() -> dict:
    """{pid: command line} of this process's children, read from /proc."""
    found = {}
    me = os.getpid()
    for pid, parent in parent_pids().items():
        if parent != me:
            continue
        with contextlib.suppress(OSError):
            with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
                found[pid] = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    return found


def new_child(before: dict, marker: str) -> int:
    """The PID of a child started since ``before`` whose command line has ``marker``."""
    pids = [pid for pid, cmdline in children().items()
            if pid not in before and marker in cmdline]
    if len(pids) != 1:
        raise BenchmarkError("expected one new child running %s, found %s" % (marker, pids))
    return pids[0]


def kill_leftover_children() -> None:
    for pid, cmdline in children().items():
        progress("stopping leftover child %d (%s)" % (pid, cmdline[:80]))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def on_error(stop):
    """An ExitStack exit callback that calls ``stop()`` when the block is left by an
    exception: servers then stop before the clients that might wait on them."""
    def exit_callback(exc_type, exc, tb):
        if exc_type is not None:
            stop()
        return False
    return exit_callback


def start_cluster(stack: contextlib.ExitStack) -> tuple:
    """A LocalCluster of 2 worker processes and an executor on it."""
    cluster = stack.enter_context(LocalCluster(n_workers=WORKERS))
    executor = stack.enter_context(cluster.executor())
    stack.push(on_error(cluster.shutdown))
    return cluster, executor


# --- peers -------------------------------------------------------------------------------

def start_pools(stack: contextlib.ExitStack) -> tuple:
    """A warmed ProcessPoolExecutor and Pool of 2 processes (started before any
    minicw client thread exists, since both fork this process)."""
    ppe = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
        max_workers=WORKERS, initializer=_default_signals))
    pool = stack.enter_context(multiprocessing.Pool(WORKERS, initializer=_default_signals))
    expect("PPE warm-up", sum(ppe.map(inc, range(10_000), chunksize=100)), 50_005_000)
    expect("Pool warm-up", sum(pool.map(inc, range(10_000))), 50_005_000)
    return ppe, pool


class BareProcesses:
    """WORKERS processes that each factorize a share of the numbers sent in one
    message, the shares balanced by the job times of a serial run: parallel
    work with no tool in the way and a schedule no tool can know in advance,
    so their efficiency is about what this machine allows."""

    def __init__(self, stack: contextlib.ExitStack):
        self.connections = []
        for _ in range(WORKERS):
            mine, theirs = multiprocessing.Pipe()
            process = multiprocessing.Process(target=workloads.factorize_lists,
                                              args=(theirs,), daemon=True)
            process.start()
            theirs.close()
            stack.callback(_stop_bare, process, mine)
            self.connections.append(mine)

    def map(self, nums: list, job_s: list) -> list:
        """Factors of ``nums``, in order; ``job_s[i]`` is how long ``nums[i]`` took serially."""
        shares = _balanced_shares(job_s, len(self.connections))
        for share, conn in zip(shares, self.connections):
            conn.send([nums[i] for i in share])
        factors = [None] * len(nums)
        for share, conn in zip(shares, self.connections):
            for i, found in zip(share, conn.recv()):
                factors[i] = found
        return factors


def _balanced_shares(job_s: list, count: int) -> list:
    """Indices of ``job_s`` in ``count`` shares of about equal total time: the longest
    job first, each to the share with the least time so far."""
    shares = [[] for _ in range(count)]
    loads = [0.0] * count
    for i in sorted(range(len(job_s)), key=job_s.__getitem__, reverse=True):
        least = loads.index(min(loads))
        shares[least].append(i)
        loads[least] += job_s[i]
    return shares


def _stop_bare(process, conn) -> None:
    with contextlib.suppress(OSError):
        conn.send(None)
    process.join(5.0)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()


class Minimalcluster:
    """minicw's ancestor, in a child process (``workloads.py minimalcluster``)."""

    def __init__(self, child: Child, version):
        self.child = child
        self.version = version

    @classmethod
    def start(cls, stack: contextlib.ExitStack):
        """The peer, or None when minimalcluster is not installed."""
        if importlib.util.find_spec("minimalcluster") is None:
            return None
        child = stack.enter_context(Child([sys.executable, WORKLOADS_PY, "minimalcluster"],
                                          own_group=True))
        hello = json.loads(child.readline(60.0))
        if "error" in hello:
            raise BenchmarkError("minimalcluster: %s" % hello["error"])
        peer = cls(child, hello.get("version"))
        peer.execute(workloads.INC_SOURCE, "inc", (0, 1000), 50)  # warm-up
        return peer

    def execute(self, source, function, args_range, chunksize, want_sum=False,
                timeout_s=600.0) -> dict:
        """Run ``execute()`` over ``range(*args_range)``; its seconds, count and sum."""
        self.child.send(json.dumps({"op": "run", "source": source, "function": function,
                                    "range": list(args_range), "chunksize": chunksize,
                                    "sum": want_sum}))
        reply = json.loads(self.child.readline(timeout_s))
        if "error" in reply:
            raise BenchmarkError("minimalcluster: %s" % reply["error"])
        return reply


def minimalcluster_rows(workload, case, value, unit, mc_runs, name, target) -> list:
    if name not in mc_runs:
        return [make_row(workload, case, value, unit, "minimalcluster", None, target,
                         note="minimalcluster not installed: no comparison")]
    return [make_row(workload, case, value, unit, "minimalcluster execute()",
                     median(mc_runs, name, "tasks_per_s"), target)]


# --- workload: batched -------------------------------------------------------------------

def bench_batched(run: Run) -> list:
    n = run.sizes["batched"]
    total = n * (n + 1) // 2    # sum(inc(i) for i in range(n))

    def check_sum(result):
        expect("sum of results", sum(result), total)

    def check_dict(result):
        expect("results", len(result), n)
        expect("sum of results", sum(result.values()), total)

    with contextlib.ExitStack() as stack:
        ppe, pool = start_pools(stack)
        cluster, executor = start_cluster(stack)
        cluster.load_envir(workloads.INC_SOURCE, from_file=False)
        cluster.register_target_function("inc")
        cluster.load_args(range(10_000))
        with run.guard("batched warm-up"):
            cluster.execute()
            expect("warm-up", sum(executor.map(inc, range(10_000), chunksize=1000)),
                   50_005_000)
        cluster.load_args(range(n))
        minimal = Minimalcluster.start(stack)

        def execute(chunksize):
            cluster.chunksize = chunksize
            return throughput(n, cluster.execute, check_dict)

        default_chunksize = cluster.chunksize
        with run.guard("batched warm-up, 1 us jobs"):
            expect("warm-up", sum(executor.map(spin_1us, range(10_000))), 50_005_000)
            expect("warm-up", sum(pool.map(spin_1us, range(10_000))), 50_005_000)
        n_1us = run.sizes["batched_1us"]
        total_1us = n_1us * (n_1us + 1) // 2
        contenders = {
            "minicw map default": lambda: throughput(
                n, lambda: sum(executor.map(inc, range(n))), lambda s: expect("sum", s, total)),
            "minicw map 1000": lambda: throughput(
                n, lambda: sum(executor.map(inc, range(n), chunksize=1000)),
                lambda s: expect("sum", s, total)),
            "minicw execute 1000": lambda: execute(1000),
            "minicw execute default": lambda: execute(default_chunksize),
            "PPE map": lambda: throughput(
                n, lambda: sum(ppe.map(inc, range(n), chunksize=1000)),
                lambda s: expect("sum", s, total)),
            "Pool map": lambda: throughput(n, lambda: pool.map(inc, range(n)), check_sum),
            "minicw map default, 1 us": lambda: throughput(
                n_1us, lambda: sum(executor.map(spin_1us, range(n_1us))),
                lambda s: expect("sum", s, total_1us)),
            "Pool map, 1 us": lambda: throughput(
                n_1us, lambda: sum(pool.map(spin_1us, range(n_1us))),
                lambda s: expect("sum", s, total_1us)),
        }
        if minimal is not None:
            contenders["minimalcluster execute"] = lambda: _minimal_batched(minimal, n, total)
        runs = run.interleave("batched", contenders, min_repeat=TARGET_MIN_REPEAT)

    ppe_rate = median(runs, "PPE map", "tasks_per_s")
    default = median(runs, "minicw execute default", "tasks_per_s")
    rows = [
        make_row("batched", "executor.map(), default chunks", median(
                 runs, "minicw map default", "tasks_per_s"), "tasks/s",
                 "Pool.map (default chunks)", median(runs, "Pool map", "tasks_per_s"),
                 Target("ratio", ">=", 1.0)),
        make_row("batched", "executor.map(), default chunks, %s jobs of 1 us"
                 % format(n_1us, ","), median(runs, "minicw map default, 1 us", "tasks_per_s"),
                 "tasks/s", "Pool.map (default chunks)",
                 median(runs, "Pool map, 1 us", "tasks_per_s"), Target("ratio", ">=", 1.0)),
        make_row("batched", "executor.map(chunksize=1000)", median(runs, "minicw map 1000",
                 "tasks_per_s"), "tasks/s", "PPE.map(chunksize=1000)", ppe_rate,
                 Target("ratio", ">=", 1.0)),
        make_row("batched", "execute(), chunksize=1000", median(runs, "minicw execute 1000",
                 "tasks_per_s"), "tasks/s", "PPE.map(chunksize=1000)", ppe_rate,
                 Target("ratio", ">=", 1.0)),
    ]
    rows += minimalcluster_rows("batched", "execute(), %s" % chunk_label(default_chunksize),
                                default, "tasks/s", runs, "minimalcluster execute",
                                Target("ratio", ">=", 20.0))
    rows += [
        make_row("batched", "execute(), %s" % chunk_label(default_chunksize), default, "tasks/s",
                 "PPE.map(chunksize=1000)", ppe_rate),
    ]
    return rows


def _minimal_batched(minimal: Minimalcluster, n: int, total: int) -> dict:
    reply = minimal.execute(workloads.INC_SOURCE, "inc", (0, n), 50, want_sum=True)
    expect("minimalcluster results", reply["count"], n)
    expect("minimalcluster sum", reply["sum"], total)
    return {"seconds": reply["seconds"], "tasks_per_s": n / reply["seconds"]}


# --- workload: checkpoint -----------------------------------------------------------------

def bench_checkpoint(run: Run) -> list:
    """The same map with and without ``checkpoint=`` (a new file each run), interleaved."""
    n = run.sizes["checkpoint"]
    total = n * (n + 1) // 2
    with contextlib.ExitStack() as stack:
        _, executor = start_cluster(stack)
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="minicw-bench-"))
        files = itertools.count()

        def mapped(fn, checkpointed: bool):
            def call():
                options = {}
                if checkpointed:
                    options["checkpoint"] = os.path.join(folder, "run%d.sqlite" % next(files))
                return sum(executor.map(fn, range(n), **options))
            return lambda: throughput(n, call, lambda s: expect("sum", s, total))

        with run.guard("checkpoint warm-up"):
            expect("warm-up", sum(executor.map(spin, range(2000))), 2001000)
        runs = run.interleave("checkpoint", {
            "map 100us": mapped(spin, False),
            "map 100us checkpoint": mapped(spin, True),
            "map no-op": mapped(inc, False),
            "map no-op checkpoint": mapped(inc, True),
        })
    rate = lambda name: median(runs, name, "tasks_per_s")  # noqa: E731
    return [
        make_row("checkpoint", "map(checkpoint=), %d jobs of 100 us" % n,
                 rate("map 100us checkpoint"), "tasks/s", "the same map without",
                 rate("map 100us"), Target("ratio", ">=", 0.95)),
        make_row("checkpoint", "map(checkpoint=), %d no-op jobs" % n,
                 rate("map no-op checkpoint"), "tasks/s", "the same map without",
                 rate("map no-op"), note="journaling's own cost: about %.1f us per result"
                 % _per_job_us(rate("map no-op checkpoint"), rate("map no-op"))),
    ]


# --- workload: tls ------------------------------------------------------------------------

def bench_tls(run: Run) -> list:
    """The batched map and the round trip on a cluster over TLS and on a plain one."""
    import shutil
    from minicw import tls
    n = run.sizes["tls"]
    count = run.sizes["roundtrip"]
    if shutil.which("openssl") is None:
        return [make_row("tls", "map(chunksize=1000) over TLS", None, "tasks/s",
                         "the same map without", None, Target("ratio", ">=", 0.75),
                         note="the openssl command is missing: no certificate to test with")]
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="minicw-bench-tls-"))
        cert, key, _ = tls.make_selfsigned(os.path.join(folder, "tls"), "localhost", days=1)
        executors = {}
        for name, options in (("plain", {}), ("tls", {"tls_cert": cert, "tls_key": key})):
            cluster = stack.enter_context(LocalCluster(n_workers=WORKERS, **options))
            executors[name] = stack.enter_context(cluster.executor())
            stack.push(on_error(cluster.shutdown))

        def mapped(executor):
            def call():
                return sum(executor.map(inc, range(n), chunksize=1000))
            return lambda: throughput(n, call, lambda s: expect("sum", s, n * (n + 1) // 2))

        def latencies(executor):
            def measure():
                samples = []
                for i in range(count):
                    started = time.perf_counter()
                    result = executor.submit(inc, i).result()
                    samples.append((time.perf_counter() - started) * 1e6)
                    if result != i + 1:
                        raise BenchmarkError("round trip %d: got %r" % (i, result))
                return {"median_us": statistics.median(samples)}
            return measure

        contenders = {"map plain": mapped(executors["plain"]),
                      "map tls": mapped(executors["tls"]),
                      "roundtrip plain": latencies(executors["plain"]),
                      "roundtrip tls": latencies(executors["tls"])}
        with run.guard("tls warm-up"):
            for executor in executors.values():
                expect("warm-up", sum(executor.map(inc, range(10_000), chunksize=1000)),
                       50_005_000)
        runs = run.interleave("tls", contenders, min_repeat=TARGET_MIN_REPEAT)
    rate = lambda name: median(runs, name, "tasks_per_s")  # noqa: E731
    return [
        make_row("tls", "map(chunksize=1000) over TLS, %d jobs" % n, rate("map tls"),
                 "tasks/s", "the same map without", rate("map plain"),
                 Target("ratio", ">=", 0.75)),
        make_row("tls", "executor.submit().result() over TLS, median",
                 median(runs, "roundtrip tls", "median_us"), "us", "the same without",
                 median(runs, "roundtrip plain", "median_us"), Target("ratio", "<=", 1.25)),
    ]


# --- workload: pool -----------------------------------------------------------------------

def bench_pool(run: Run) -> list:
    """minicw.Pool against multiprocessing.Pool, the same script on each: both of 2
    processes, minicw's on the LocalCluster it starts when no master is named."""
    import minicw
    n = run.sizes["pool"]
    n_imap = run.sizes["pool_imap"]
    count = run.sizes["roundtrip"]
    with contextlib.ExitStack() as stack:
        _, stdlib_pool = start_pools(stack)
        stack.enter_context(_no_master_named())
        minicw_pool = stack.enter_context(minicw.Pool(WORKERS))
        pools = {"minicw": minicw_pool, "stdlib": stdlib_pool}

        def mapped(pool):
            return lambda: throughput(n, lambda: sum(pool.map(inc, range(n))),
                                      lambda s: expect("sum", s, n * (n + 1) // 2))

        def imapped(pool):
            return lambda: throughput(n_imap, lambda: sum(pool.imap(inc, range(n_imap))),
                                      lambda s: expect("sum", s, n_imap * (n_imap + 1) // 2))

        def applied(pool):
            def measure():
                samples = []
                for i in range(count):
                    started = time.perf_counter()
                    result = pool.apply_async(inc, (i,)).get()
                    samples.append((time.perf_counter() - started) * 1e6)
                    if result != i + 1:
                        raise BenchmarkError("apply %d: got %r" % (i, result))
                return {"median_us": statistics.median(samples)}
            return measure

        contenders = {}
        for name, pool in pools.items():
            contenders["map " + name] = mapped(pool)
            contenders["imap " + name] = imapped(pool)
            contenders["apply " + name] = applied(pool)
        with run.guard("pool warm-up"):
            for pool in pools.values():
                expect("warm-up", sum(pool.map(inc, range(10_000))), 50_005_000)
                expect("warm-up", sum(pool.imap(inc, range(1_000))), 500_500)
        runs = run.interleave("pool", contenders)
    rate = lambda name: median(runs, name, "tasks_per_s")  # noqa: E731
    return [
        make_row("pool", "Pool.map(), %d jobs, default chunks" % n, rate("map minicw"),
                 "tasks/s", "multiprocessing.Pool.map()", rate("map stdlib")),
        make_row("pool", "Pool.imap(), %d jobs, chunksize 1" % n_imap, rate("imap minicw"),
                 "tasks/s", "multiprocessing.Pool.imap()", rate("imap stdlib")),
        make_row("pool", "Pool.apply_async().get(), median",
                 median(runs, "apply minicw", "median_us"), "us",
                 "multiprocessing.Pool.apply_async().get()",
                 median(runs, "apply stdlib", "median_us")),
    ]


@contextlib.contextmanager
def _no_master_named():
    """No $MINICW_MASTER and an empty run directory, while a block runs: a
    minicw.Pool started there starts its own LocalCluster, as on a laptop."""
    saved = {name: os.environ.get(name) for name in ("MINICW_MASTER", "MINICW_RUN_DIR")}
    with tempfile.TemporaryDirectory(prefix="minicw-bench-run-") as run_dir:
        os.environ.pop("MINICW_MASTER", None)
        os.environ["MINICW_RUN_DIR"] = run_dir
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


# --- workload: progress -------------------------------------------------------------------

class _NullTerminal:
    """stderr while a map draws its progress line: a terminal by its word
    (isatty), os.devnull by its writes, which it counts."""

    def __init__(self, devnull):
        self._devnull = devnull
        self.writes = 0

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.writes += 1
        return self._devnull.write(text)

    def flush(self) -> None:
        self._devnull.flush()


def bench_progress(run: Run) -> list:
    """The batched map with its progress line drawn and without, interleaved."""
    n = run.sizes["progress"]
    total = n * (n + 1) // 2
    with contextlib.ExitStack() as stack:
        _, executor = start_cluster(stack)
        terminal = _NullTerminal(stack.enter_context(open(os.devnull, "w")))
        draws = []

        def mapped(drawing: bool):
            def call():
                return sum(executor.map(inc, range(n), chunksize=1000, progress=drawing))
            return lambda: throughput(n, call, lambda s: expect("sum", s, total))

        def drawn():
            # Drawn from the first result on, not after PROGRESS_DELAY_S: the
            # whole run pays for the line, as the part of a long run after 2 s does.
            saved = minicw_config.PROGRESS_DELAY_S, sys.stderr
            minicw_config.PROGRESS_DELAY_S, sys.stderr = 0.0, terminal
            writes = terminal.writes
            try:
                return mapped(True)()
            finally:
                minicw_config.PROGRESS_DELAY_S, sys.stderr = saved
                draws.append(terminal.writes - writes)

        with run.guard("progress warm-up"):
            expect("warm-up", sum(executor.map(inc, range(10_000), chunksize=1000)), 50_005_000)
        runs = run.interleave("progress", {"map": mapped(False), "map progress": drawn},
                              min_repeat=PROGRESS_MIN_REPEAT)
    rate = lambda name: median(runs, name, "tasks_per_s")  # noqa: E731
    return [
        make_row("progress", "executor.map(chunksize=1000), progress drawn, %d no-op jobs" % n,
                 rate("map progress"), "tasks/s", "the same map, progress=False", rate("map"),
                 Target("ratio", ">=", 0.98),
                 note="%d to %d writes to the line per run; about %.2f us per result"
                 % (min(draws), max(draws), _per_job_us(rate("map progress"), rate("map")))),
    ]


# --- workload: output -------------------------------------------------------------------

def bench_output(run: Run) -> list:
    """Jobs that print nothing, with output forwarding on (the default) and off:
    the batched map and the round trip, each side by side in one run."""
    n = run.sizes["progress"]
    total = n * (n + 1) // 2
    samples = run.sizes["roundtrip"]
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(LocalCluster(n_workers=WORKERS))
        stack.push(on_error(cluster.shutdown))
        forwarding = stack.enter_context(cluster.executor(forward_output=True))
        silent = stack.enter_context(cluster.executor(forward_output=False))

        def mapped(executor):
            return lambda: throughput(n, lambda: sum(executor.map(inc, range(n), chunksize=1000)),
                                      lambda s: expect("sum", s, total))

        def round_trips(executor):
            def measure():
                times = []
                for i in range(samples):
                    started = time.perf_counter()
                    expect("result", executor.submit(inc, i).result(), i + 1)
                    times.append(time.perf_counter() - started)
                return {"median_us": statistics.median(times) * 1e6}
            return measure

        with run.guard("output warm-up"):
            for executor in (forwarding, silent):
                expect("warm-up", sum(executor.map(inc, range(10_000), chunksize=1000)),
                       50_005_000)
                round_trips(executor)()
        # A B B A in every round: whichever side goes second after a switch of
        # executor pays for it (seen as 3-8% either way), so both sides do.
        runs = run.interleave("output", {
            "map forwarding": mapped(forwarding), "map off": mapped(silent),
            "map off ": mapped(silent), "map forwarding ": mapped(forwarding),
            "roundtrip forwarding": round_trips(forwarding), "roundtrip off": round_trips(silent),
            "roundtrip off ": round_trips(silent),
            "roundtrip forwarding ": round_trips(forwarding),
        }, min_repeat=PROGRESS_MIN_REPEAT)
        for name in [name for name in runs if name.endswith(" ")]:
            runs[name.strip()] += runs.pop(name)
    return [
        make_row("output", "executor.map(chunksize=1000), output forwarded, %d no-op jobs" % n,
                 median(runs, "map forwarding", "tasks_per_s"), "tasks/s",
                 "the same map, forward_output=False", median(runs, "map off", "tasks_per_s"),
                 Target("ratio", ">=", 0.98)),
        make_row("output", "executor.submit().result(), output forwarded, median",
                 median(runs, "roundtrip forwarding", "median_us"), "us",
                 "the same, forward_output=False", median(runs, "roundtrip off", "median_us"),
                 Target("ratio", "<=", 1.02)),
    ]


def _per_job_us(slower: float | None, faster: float | None) -> float:
    if not slower or not faster:
        return float("nan")
    return (1 / slower - 1 / faster) * 1e6


# --- workload: submit --------------------------------------------------------------------

def bench_submit(run: Run) -> list:
    n = run.sizes["submit"]
    total = n * (n + 1) // 2

    def futures_loop(executor):
        def call():
            futures = [executor.submit(inc, i) for i in range(n)]
            concurrent.futures.wait(futures)
            return futures
        return lambda: throughput(n, call, lambda futures: expect(
            "sum", sum(f.result() for f in futures), total))

    def pool_loop(pool):
        def call():
            results = [pool.apply_async(inc, (i,)) for i in range(n)]
            for result in results:
                result.wait()
            return results
        return lambda: throughput(n, call, lambda results: expect(
            "sum", sum(r.get() for r in results), total))

    with contextlib.ExitStack() as stack:
        ppe, pool = start_pools(stack)
        cluster, executor = start_cluster(stack)
        thread, sums = _client_thread(stack, cluster)
        with run.guard("submit warm-up"):   # workers, function, its timing
            futures_loop(executor)()
            _thread_loop(thread, sums, n, total)()

        contenders = {
            "minicw executor": futures_loop(executor),
            "minicw ClientThread": _thread_loop(thread, sums, n, total),
            "PPE": futures_loop(ppe),
            "Pool": pool_loop(pool),
        }
        runs = run.interleave("submit", contenders)

    ppe_rate = median(runs, "PPE", "tasks_per_s")
    rows = []
    for name, case in (("minicw executor", "ClusterExecutor.submit loop"),
                       ("minicw ClientThread", "ClientThread.submit loop")):
        rate = median(runs, name, "tasks_per_s")
        rows.append(make_row("submit", case, rate, "tasks/s",
                             target=Target("value", ">=", 50_000)))
        rows.append(make_row("submit", case, rate, "tasks/s", "PPE.submit loop", ppe_rate,
                             Target("ratio", ">=", 7.0)))
    rows.append(make_row("submit", "ClusterExecutor.submit loop",
                         median(runs, "minicw executor", "tasks_per_s"), "tasks/s",
                         "Pool.apply_async loop", median(runs, "Pool", "tasks_per_s")))
    return rows


def _client_thread(stack, cluster) -> tuple:
    """A started ClientThread whose callback adds results into ``sums[0]``."""
    sums = [0]

    def callback(jobid, result):
        sums[0] += result
    thread = cluster.client_thread(callback)
    thread.start()
    stack.callback(thread.stop)
    return thread, sums


def _thread_loop(thread, sums, n: int, total: int):
    def call():
        sums[0] = 0
        for i in range(n):
            thread.submit(inc, i)
        thread.wait()
        return sums[0]
    return lambda: throughput(n, call, lambda s: expect("sum", s, total))


# --- workload: roundtrip -----------------------------------------------------------------

def bench_roundtrip(run: Run) -> list:
    count = run.sizes["roundtrip"]

    def latencies(call):
        def measure():
            samples = []
            for i in range(count):
                started = time.perf_counter()
                result = call(i)
                samples.append((time.perf_counter() - started) * 1e6)
                if result != i + 1:
                    raise BenchmarkError("round trip %d: got %r" % (i, result))
            ordered = sorted(samples)
            return {"median_us": statistics.median(samples),
                    "p90_us": ordered[int(0.9 * (len(ordered) - 1))], "samples_us": samples}
        return measure

    with contextlib.ExitStack() as stack:
        ppe, pool = start_pools(stack)
        cluster, executor = start_cluster(stack)
        thread_call = _thread_round_trip(stack, cluster)
        contenders = {
            "minicw executor": latencies(lambda i: executor.submit(inc, i).result()),
            "minicw ClientThread": latencies(thread_call),
            "PPE": latencies(lambda i: ppe.submit(inc, i).result()),
            "Pool": latencies(lambda i: pool.apply_async(inc, (i,)).get()),
        }
        for name, measure in contenders.items():
            with run.guard("roundtrip warm-up: %s" % name):
                measure()
        runs = run.interleave("roundtrip", contenders, min_repeat=TARGET_MIN_REPEAT)

    ppe_us = median(runs, "PPE", "median_us")
    return [
        make_row("roundtrip", "executor.submit().result(), median", median(
            runs, "minicw executor", "median_us"), "us", "PPE.submit().result()", ppe_us,
            Target("ratio", "<=", 1.25)),
        make_row("roundtrip", "ClientThread.submit() -> callback, median", median(
            runs, "minicw ClientThread", "median_us"), "us", "PPE.submit().result()", ppe_us),
        make_row("roundtrip", "executor.submit().result(), median", median(
            runs, "minicw executor", "median_us"), "us", "Pool.apply_async().get()",
            median(runs, "Pool", "median_us")),
        make_row("roundtrip", "executor.submit().result(), p90", median(
            runs, "minicw executor", "p90_us"), "us", "PPE.submit().result(), p90",
            median(runs, "PPE", "p90_us"), Target("ratio", "<=", 1.5)),
    ]


def _thread_round_trip(stack, cluster):
    """call(i): submit through a ClientThread and wait for its callback."""
    arrived = threading.Event()
    box = [None]

    def callback(jobid, result):
        box[0] = result
        arrived.set()

    def errback(jobid, error):
        box[0] = error
        arrived.set()
    thread = cluster.client_thread(callback, errback=errback)
    thread.start()
    stack.callback(thread.stop)

    def call(i):
        arrived.clear()
        thread.submit(inc, i)
        arrived.wait()
        if isinstance(box[0], BaseException):
            raise BenchmarkError("ClientThread job %d failed: %r" % (i, box[0]))
        return box[0]
    return call


# --- workload: factorize -----------------------------------------------------------------

def bench_factorize(run: Run) -> list:
    count = _numbers_for(run.sizes["factorize_s"])
    nums = workloads.make_nums(count)
    progress("[factorize] %d numbers from %d" % (count, nums[0]))

    def check(factors):
        expect("numbers factorized", len(factors), count)
        wrong = [n for n, f in zip(nums, factors) if math.prod(f) != n]
        if wrong:
            raise BenchmarkError("wrong factors for %s" % wrong[:3])

    def parallel(call, as_list=lambda result: result):
        def measure():
            ticks = _cpu_ticks()
            seconds, result = timed(call)
            values = {"seconds": seconds}
            if ticks is not None:
                values["steal_share"] = _steal_share(ticks, _cpu_ticks())
            check(as_list(result))
            return values
        return measure

    with contextlib.ExitStack() as stack:
        ppe, pool = start_pools(stack)
        bare = BareProcesses(stack)   # forks too: before any minicw client thread exists
        cluster, executor = start_cluster(stack)
        cluster.load_envir(workloads.FACTORIZE_SOURCE, from_file=False)
        cluster.register_target_function("factorize_naive")
        cluster.load_args(nums[:20])
        with run.guard("factorize warm-up"):
            cluster.execute()
            list(executor.map(factorize_naive, nums[:20]))
            list(ppe.map(factorize_naive, nums[:20]))
            bare.map(nums[:20], [1.0] * 20)
        cluster.load_args(nums)
        minimal = None if run.quick else Minimalcluster.start(stack)
        by_key = lambda result: [result[n] for n in nums]  # noqa: E731
        latest_serial = {}

        def serial():   # and its job times, by which the bare processes share the numbers
            values = _serial_factorize(nums, check)
            latest_serial.update(values)
            return values

        contenders = {
            "minicw execute": parallel(cluster.execute, by_key),
            "PPE map": parallel(lambda: list(ppe.map(factorize_naive, nums))),
            "bare processes": parallel(lambda: bare.map(nums, latest_serial["job_s"])),
        }
        if not run.quick:   # references, left out to keep --quick under a minute
            contenders["minicw map"] = parallel(lambda: list(executor.map(factorize_naive,
                                                                          nums)))
            contenders["Pool map"] = parallel(lambda: pool.map(factorize_naive, nums))
            if minimal is not None:
                contenders["minimalcluster execute"] = lambda: _minimal_factorize(minimal,
                                                                                  nums)
        runs = run.bracket("factorize", "serial", serial, contenders,
                           min_repeat=1 if run.quick else FACTORIZE_MIN_REPEAT)

    _add_efficiency(run, runs)
    job_s = [statistics.median(values["job_s"][i] for values in runs["serial"])
             for i in range(count)]
    chunksize = cluster.chunksize
    pool_chunksize = -(-count // (WORKERS * 4))   # Pool.map's default
    bound = ("granularity bound (in-order chunks of %d on %d processes, no overhead): %.3f"
             % (chunksize or 1, WORKERS, _ideal_efficiency(job_s, chunksize or 1)))
    execute_eff = median(runs, "minicw execute", "efficiency")
    ppe_eff = median(runs, "PPE map", "efficiency")
    serial_s = median(runs, "serial", "seconds")
    rows = [
        make_row("factorize", "execute(), %s, efficiency" % chunk_label(chunksize), execute_eff,
                 "efficiency", "PPE.map()", ppe_eff, Target("ratio", ">=", 0.97),
                 note="%d numbers, serial %.2f s; %s" % (count, serial_s, bound)),
    ]
    bare_eff = median(runs, "bare processes", "efficiency")
    steal = [values["steal_share"] for name, measured in runs.items() if name != "serial"
             for values in measured if "steal_share" in values]
    rows.append(make_row(
        "factorize", "execute(), %s, efficiency" % chunk_label(chunksize), execute_eff,
        "efficiency", "%d bare processes, shares balanced by job time" % WORKERS, bare_eff,
        note="" if not steal else "CPU time the hypervisor took during parallel runs: "
        "median %.1f%%, max %.1f%%" % (100 * statistics.median(steal), 100 * max(steal))))
    if "minicw map" in runs:
        rows += [
            make_row("factorize", "executor.map(), efficiency", median(
                runs, "minicw map", "efficiency"), "efficiency", "PPE.map()", ppe_eff),
            make_row("factorize", "execute(), %s, efficiency" % chunk_label(chunksize),
                     execute_eff, "efficiency", "Pool.map() (chunks of %d)" % pool_chunksize,
                     median(runs, "Pool map", "efficiency")),
        ]
    if "minimalcluster execute" in runs:
        rows.append(make_row("factorize", "execute(), %s, efficiency" % chunk_label(chunksize),
                             execute_eff, "efficiency", "minimalcluster execute()",
                             median(runs, "minimalcluster execute", "efficiency")))
    return rows


def _add_efficiency(run: Run, runs: dict) -> None:
    """Efficiency of each parallel measurement against the serial runs on either
    side of it, added to the results and to the raw measurements."""
    for name, values in runs.items():
        if name != "serial":
            for measured in values:
                measured["efficiency"] = measured["reference_s"] / (
                    WORKERS * measured["seconds"])
    for raw in run.measurements:
        if raw["workload"] == "factorize" and "reference_s" in raw:
            raw["efficiency"] = raw["reference_s"] / (WORKERS * raw["seconds"])


def _cpu_ticks():
    """(steal, total) CPU ticks of this machine since boot; None where /proc/stat is not."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(field) for field in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice, counted in user]
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def _steal_share(before, after) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def _numbers_for(target_s: float) -> int:
    """How many numbers of the sequence this process factorizes in ``target_s``."""
    started = time.perf_counter()
    count = 0
    while time.perf_counter() - started < target_s:
        factorize_naive(workloads.FIRST_NUMBER + 2 * count)
        count += 1
    return max(count, 2 * WORKERS)


def _serial_factorize(nums, check) -> dict:
    job_s = []
    factors = []
    started = time.perf_counter()
    for n in nums:
        job_started = time.perf_counter()
        factors.append(factorize_naive(n))
        job_s.append(time.perf_counter() - job_started)
    seconds = time.perf_counter() - started
    check(factors)
    return {"seconds": seconds, "job_s": job_s}


def _minimal_factorize(minimal: Minimalcluster, nums) -> dict:
    reply = minimal.execute(workloads.FACTORIZE_SOURCE, "factorize_naive",
                            (nums[0], nums[-1] + 1, 2), 50)
    expect("minimalcluster results", reply["count"], len(nums))
    return {"seconds": reply["seconds"]}


def chunk_label(chunksize) -> str:
    """How execute() cut its chunks: a fixed size, or sized by minicw (None)."""
    return "chunksize=auto" if chunksize is None else "chunksize=%d" % chunksize


def _ideal_efficiency(job_s: list, chunksize: int) -> float:
    """Efficiency of in-order chunks on WORKERS processes with zero overhead: each
    chunk goes to the process that frees up first."""
    free_at = [0.0] * WORKERS
    for start in range(0, len(job_s), chunksize):
        first = free_at.index(min(free_at))
        free_at[first] += sum(job_s[start:start + chunksize])
    return sum(job_s) / (WORKERS * max(free_at))


# --- workload: memory --------------------------------------------------------------------

def bench_memory(run: Run) -> list:
    queued = run.interleave("memory", {"queued jobs": lambda: _queued_job_bytes(
        run.sizes["queued"])})
    n = run.sizes["stream"]
    with contextlib.ExitStack() as stack:
        _, pool = start_pools(stack)
        before = children()
        cluster, executor = start_cluster(stack)
        master_pid = new_child(before, "minicw.master")
        with run.guard("streaming warm-up"):
            expect("warm-up", sum(executor.map(inc, range(10_000))), 50_005_000)
        stream = run.interleave("memory", {
            "minicw stream": lambda: _stream(n, lambda items: executor.map(inc, items),
                                             master_pid),
            "Pool stream": lambda: _stream(n, lambda items: pool.imap(inc, items, 1000)),
        })

    note = "%s no-op jobs through executor.map over a generator" % format(n, ",")
    return [
        make_row("memory", "master RSS growth per queued job (submit, no workers)",
                 median(queued, "queued jobs", "bytes_per_job"), "B/job",
                 target=Target("value", "<=", 500),
                 note="%s jobs queued (+1,000 before), in %s chunks; client RSS grew "
                 "%s B/job meanwhile" % (
                     format(run.sizes["queued"], ","),
                     format(median(queued, "queued jobs", "queued_chunks"), ",.0f"),
                     format(median(queued, "queued jobs", "client_bytes_per_job"), ",.0f"))),
        make_row("memory", "master peak RSS, streaming map", median(
            stream, "minicw stream", "master_peak"), "MB", target=Target("value", "<", 100e6),
            note=note),
        make_row("memory", "client RSS growth, streaming map", median(
            stream, "minicw stream", "client_growth"), "MB",
            "Pool.imap(chunksize=1000)", median(stream, "Pool stream", "client_growth")),
        make_row("memory", "streaming map throughput", median(
            stream, "minicw stream", "tasks_per_s"), "tasks/s",
            "Pool.imap(chunksize=1000)", median(stream, "Pool stream", "tasks_per_s")),
    ]


def _queued_job_bytes(n: int) -> dict:
    """A master alone: its RSS growth while ``n`` submitted jobs wait in its queue."""
    authkey = secrets.token_urlsafe(24)
    with contextlib.ExitStack() as stack:
        master, port = start_master(stack, authkey)
        executor = ClusterExecutor("127.0.0.1", port, authkey)
        stack.callback(executor.shutdown, wait=True, cancel_futures=True)
        stack.push(on_error(master.stop))
        warm = 1000
        for i in range(warm):     # the function, the context and the queues exist now
            executor.submit(inc, i)
        _wait_queued(executor, warm)
        time.sleep(QUEUED_SETTLE_S / 5)
        master_before, client_before = workloads.rss_bytes(master.pid), _own_rss()
        started = time.perf_counter()
        for i in range(n):
            executor.submit(inc, i)
        _wait_queued(executor, warm + n)
        submit_s = time.perf_counter() - started
        time.sleep(QUEUED_SETTLE_S)
        master_after, client_after = workloads.rss_bytes(master.pid), _own_rss()
        chunks = executor.status()["queued_chunks"]
    return {"bytes_per_job": (master_after - master_before) / n,
            "client_bytes_per_job": (client_after - client_before) / n,
            "master_rss_before": master_before, "master_rss_after": master_after,
            "submit_s": submit_s, "queued_chunks": chunks}


def _wait_queued(executor, count: int, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        queued = sum(client["queued"] for client in executor.status()["clients"])
        if queued >= count:
            return
        if time.monotonic() > deadline:
            raise BenchmarkError("the master holds %d queued jobs, not %d, after %gs"
                                 % (queued, count, timeout_s))
        time.sleep(0.05)


def _own_rss() -> int:
    return workloads.rss_bytes(os.getpid())


def _stream(n: int, mapper, master_pid=None) -> dict:
    """Sum ``mapper(generator of n items)`` while sampling RSS every SAMPLE_PERIOD_S."""
    pids = {"client": os.getpid()}
    if master_pid is not None:
        pids["master"] = master_pid
    start = {name: workloads.rss_bytes(pid) for name, pid in pids.items()}
    peaks = dict(start)
    done = threading.Event()

    def sample():
        while not done.wait(SAMPLE_PERIOD_S):
            for name, pid in pids.items():
                peaks[name] = max(peaks[name], workloads.rss_bytes(pid))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        seconds, total = timed(lambda: sum(mapper(i for i in range(n))))
    finally:
        done.set()
        sampler.join()
    for name, pid in pids.items():
        peaks[name] = max(peaks[name], workloads.rss_bytes(pid))
    expect("sum", total, n * (n + 1) // 2)
    values = {"seconds": seconds, "tasks_per_s": n / seconds,
              "client_growth": peaks["client"] - start["client"], "client_peak": peaks["client"]}
    if master_pid is not None:
        values.update(master_peak=peaks["master"], master_start=start["master"])
    return values


# --- workload: scale ---------------------------------------------------------------------

def bench_scale(run: Run) -> list:
    nodes, n = run.sizes["scale_nodes"], run.sizes["scale_jobs"]
    total = n * (n + 1) // 2
    authkey = secrets.token_urlsafe(24)

    def check_sum(result):
        expect("sum", result, total)

    with contextlib.ExitStack() as stack:
        cluster, one_node = start_cluster(stack)
        master, port = start_master(stack, authkey)
        started = time.perf_counter()
        sim_pids = _start_sim_nodes(stack, port, authkey, nodes)
        join_s = time.perf_counter() - started
        simulated = stack.enter_context(ClusterExecutor("127.0.0.1", port, authkey))
        stack.push(on_error(master.stop))
        expect("simulated nodes", len(simulated.list_workers()), nodes)
        progress("[scale] %d simulated nodes joined in %.1f s" % (nodes, join_s))

        me = os.getpid()
        # This process is the client; its children are the other roles.
        roles_one = dict(_with_descendants({"master": [cluster._master_process.pid],
                                            "nodes": [cluster._worker_process.pid]}),
                         client=[me])
        roles_sim = dict(_with_descendants({"master": [master.pid], "nodes": sim_pids}),
                         client=[me])

        def measure(executor, chunksize=1, per_node=False, roles=None):
            def call():
                before = _jobs_by_node(executor) if per_node else None
                first_chunk = executor._dispatcher.session.new_chunk_id()
                values = throughput(
                    n, lambda: sum(executor.map(inc, range(n), chunksize=chunksize)),
                    check_sum, roles)
                values["chunks"] = executor._dispatcher.session.new_chunk_id() - first_chunk - 1
                if per_node:
                    after = _jobs_by_node(executor)
                    values["jobs_per_node"] = sorted(after[node] - before.get(node, 0)
                                                     for node in after)
                return values
            return call

        with run.guard("scale warm-up"):   # functions fetched, timings known
            for executor in (one_node, simulated):
                measure(executor)()
                measure(executor, 100)()
        floor_one = _start_floor(stack, [1] * WORKERS)
        floor_sim = _start_floor(stack, _spread(nodes, SIM_PROCESSES))

        def measure_floor(floor, processes, window):
            client, roles = floor
            chunksize = chunking.jobs_per_chunk(0.0, n, processes)  # as minicw cuts them
            roles = dict(_with_descendants(roles), client=[me])

            def call():
                values = throughput(n, lambda: client.run(n, chunksize, window), check_sum,
                                    roles)
                values["chunks"] = math.ceil(n / chunksize)
                return values
            return call

        with run.guard("scale floor warm-up"):   # every worker connection registered
            for floor, processes, window in ((floor_one, WORKERS, 2), (floor_sim, nodes, 1)):
                measure_floor(floor, processes, window)()
        runs = run.interleave("scale", {
            "1 node": measure(one_node, roles=roles_one),
            "simulated": measure(simulated, per_node=True, roles=roles_sim),
            "1 node, chunksize=100": measure(one_node, 100),
            "simulated, chunksize=100": measure(simulated, 100, per_node=True),
            # A chunk leased ahead per process, as minicw's prefetch; one per connection.
            "floor, 1 node": measure_floor(floor_one, WORKERS, 2),
            "floor, simulated": measure_floor(floor_sim, nodes, 1),
        }, min_repeat=SCALE_MIN_REPEAT)
        # What 200 connections cost over 2 with nothing but the messages: at
        # that cost, minicw's 1-node run would reach ``bound`` of itself.
        floor_extra_s = (median(runs, "floor, simulated", "seconds")
                         - median(runs, "floor, 1 node", "seconds"))
        one_node_s = median(runs, "1 node", "seconds")
        minicw_extra_s = median(runs, "simulated", "seconds") - one_node_s
        bound = one_node_s / (one_node_s + max(0.0, floor_extra_s))
        cpu_note = _extra_cpu_note(runs, ("simulated", "1 node"),
                                   ("floor, simulated", "floor, 1 node"), nodes)

    rows = [_master_efficiency_row(runs, nodes)]
    for suffix, case in (("", "map()"), (", chunksize=100", "map(chunksize=100)")):
        sim, one = "simulated" + suffix, "1 node" + suffix
        target = None
        rows.append(make_row(
            "scale", "%s, %d simulated nodes" % (case, nodes), median(runs, sim, "tasks_per_s"),
            "tasks/s", "%s, 1 node x %d processes" % (case, WORKERS),
            median(runs, one, "tasks_per_s"), target,
            note="" if suffix else "%s jobs; %d nodes in %d processes joined in %.1f s; "
            "%d nodes take %.1f ms more than 1; the same messages over bare sockets, no minicw "
            "(workloads.py floorhub), take %.1f ms more: at that cost this ratio would be %.2fx%s"
            % (format(n, ","), nodes, SIM_PROCESSES, join_s, nodes, 1e3 * minicw_extra_s,
               1e3 * floor_extra_s, bound, cpu_note)))
        starved = [sum(1 for jobs in values["jobs_per_node"] if jobs == 0)
                   for values in runs[sim]]
        spread = [values["jobs_per_node"] for values in runs[sim]]
        rows.append(make_row(
            "scale", "%s, nodes with no job (worst repeat)" % case, max(starved), "nodes",
            target=Target("value", "==", 0) if not suffix else None,
            note="jobs per node, min/median/max per repeat: %s" % "; ".join(
                "%d/%d/%d" % (s[0], statistics.median(s), s[-1]) for s in spread)))
    return rows


# --- workload: processes ------------------------------------------------------------------

def bench_processes(run: Run) -> list:
    """Many simulated worker processes (workloads.py simprocs) on one master, jobs
    of NAP_S: throughput against the ideal, jobs per process, the master's RSS."""
    rows = []
    for count in run.sizes["sim_processes"]:
        rows += _sim_process_rows(run, count, targets=count == run.sizes["sim_processes"][0])
    return rows


def _sim_process_rows(run: Run, count: int, targets: bool) -> list:
    ideal = count / workloads.NAP_S
    n = int(ideal * run.sizes["sim_seconds"])
    total = n * (n - 1) // 2
    authkey = secrets.token_urlsafe(24)
    with contextlib.ExitStack() as stack:
        master, port = start_master(stack, authkey)
        started = time.perf_counter()
        children = []
        for nodes in _spread(count // SIM_PER_NODE, SIM_PROCESSES):
            child = stack.enter_context(Child(
                [sys.executable, WORKLOADS_PY, "simprocs", "127.0.0.1", str(port), str(nodes),
                 str(SIM_PER_NODE)], env=minicw_env(authkey)))
            child.wait_for(r"^READY ", timeout_s=300.0)
            children.append(child)
        join_s = time.perf_counter() - started
        executor = stack.enter_context(ClusterExecutor("127.0.0.1", port, authkey))
        stack.push(on_error(master.stop))
        expect("simulated processes", sum(node["nprocs"] for node in executor.list_workers()),
               count)
        progress("[processes] %d simulated processes joined in %.1f s" % (count, join_s))

        def counts():
            found = []
            for child in children:
                child.send("counts")
                found += [int(word) for word in child.wait_for(r"^COUNTS(.*)").group(1).split()]
            return found

        def measure():
            before = counts()
            values = throughput(n, lambda: sum(executor.map(workloads.nap, range(n))),
                                lambda s: expect("sum", s, total),
                                {"master": [master.pid]})
            values["jobs_per_process"] = sorted(a - b for a, b in zip(counts(), before))
            values["master_peak_rss"] = workloads.rss_bytes(master.pid, "VmHWM")
            return values

        with run.guard("processes warm-up"):   # nap timed, every process connected
            expect("warm-up", sum(executor.map(workloads.nap, range(count * 4))),
                   count * 4 * (count * 4 - 1) // 2)
        runs = run.interleave("processes", {str(count): measure})[str(count)]
    rate = statistics.median(values["tasks_per_s"] for values in runs)
    starved = max(sum(1 for jobs in values["jobs_per_process"] if jobs == 0) for values in runs)
    spread = "; ".join("%d/%d/%d" % (v["jobs_per_process"][0],
                                     statistics.median(v["jobs_per_process"]),
                                     v["jobs_per_process"][-1]) for v in runs)
    peak = max(values["master_peak_rss"] for values in runs)
    cpu = statistics.median(values["cpu_ms"].get("master", 0) for values in runs)
    case = "map(nap), %d simulated processes, jobs of %d ms" % (count, workloads.NAP_S * 1e3)
    return [
        make_row("processes", case, rate, "tasks/s", "ideal (%d / %g s)" % (count, workloads.NAP_S),
                 ideal, Target("ratio", ">=", 0.9) if targets else None,
                 note="%s jobs per run; %d nodes of %d in %d processes joined in %.1f s; the "
                 "master used %.0f ms of CPU per run" % (format(n, ","), count // SIM_PER_NODE,
                                                         SIM_PER_NODE, SIM_PROCESSES, join_s, cpu)),
        make_row("processes", "%d simulated processes with no job (worst repeat)" % count,
                 starved, "processes", target=Target("value", "==", 0) if targets else None,
                 note="jobs per process, min/median/max per repeat: " + spread),
        make_row("processes", "master peak RSS, %d simulated processes" % count, peak, "MB",
                 target=Target("value", "<", 200e6) if targets else None),
    ]


def _master_efficiency_row(runs: dict, nodes: int) -> dict:
    """The master's CPU per chunk (a lease and its report) in the simulated runs,
    against the bare-socket hub's per chunk on the same messages."""
    def per_chunk_us(case):
        spent = [1e3 * values["cpu_ms"]["master"] / values["chunks"] for values in runs[case]
                 if values.get("cpu_ms", {}).get("master") is not None and values["chunks"]]
        return statistics.median(spent) if spent else None
    master_us, hub_us = per_chunk_us("simulated"), per_chunk_us("floor, simulated")
    chunks = statistics.median(values["chunks"] for values in runs["simulated"])
    return make_row("scale", "master CPU per chunk (lease and report), %d simulated nodes"
                    % nodes, master_us, "us", "bare-socket hub, the same messages", hub_us,
                    Target("ratio", "<=", 1.5),
                    note="%d chunks per run; CPU read from /proc (schedstat) around each run"
                    % chunks)


def _with_descendants(roles: dict) -> dict:
    """{role: [pid, ...]} with every descendant of each pid added to its role."""
    children = {}
    for pid, parent in parent_pids().items():
        children.setdefault(parent, []).append(pid)
    found = {}
    for role, pids in roles.items():
        todo, found[role] = list(pids), []
        while todo:
            pid = todo.pop()
            found[role].append(pid)
            todo.extend(children.get(pid, ()))
    return found


def _cpu_by_role(roles) -> dict:
    """{role: seconds its processes have run, all threads} from Linux's schedstat
    (nanoseconds, not clock ticks); {} when ``roles`` is None or it is unreadable."""
    spent = {}
    for role, pids in (roles or {}).items():
        total = 0
        try:
            for pid in pids:
                for task in os.listdir("/proc/%d/task" % pid):
                    with open("/proc/%d/task/%s/schedstat" % (pid, task)) as schedstat:
                        total += int(schedstat.read().split()[0])
        except (OSError, ValueError, IndexError):
            return {}
        spent[role] = total / 1e9
    return spent


def _cpu_spent(before: dict, after: dict) -> dict:
    """{role: milliseconds of CPU} between two _cpu_by_role readings."""
    return {role: 1e3 * (after[role] - before[role]) for role in before if role in after}


def _extra_cpu_note(runs: dict, minicw_cases: tuple, floor_cases: tuple, nodes: int) -> str:
    """How much more CPU per run each role spent for ``nodes`` nodes than for 1, for
    minicw and for the bare-socket floor; "" where CPU could not be read."""
    def extra(many, one):
        if not (runs.get(many) and runs.get(one)):
            return {}
        roles = set.intersection(*(set(values["cpu_ms"]) for case in (many, one)
                                   for values in runs[case]))
        return {role: statistics.median(values["cpu_ms"][role] for values in runs[many])
                - statistics.median(values["cpu_ms"][role] for values in runs[one])
                for role in roles}
    minicw_extra, floor_extra = extra(*minicw_cases), extra(*floor_cases)
    if not minicw_extra or not floor_extra:
        return ""
    return ("; CPU per run, %d nodes less 1 node (bare sockets in brackets): master %+.1f ms "
            "(hub %+.1f), node processes %+.1f (%+.1f), client %+.1f (%+.1f)"
            % (nodes, minicw_extra["master"], floor_extra["master"], minicw_extra["nodes"],
               floor_extra["nodes"], minicw_extra["client"], floor_extra["client"]))


def _spread(count: int, parts: int) -> list:
    """``count`` split into ``parts`` nearly equal shares."""
    return [count // parts + (1 if index < count % parts else 0) for index in range(parts)]


def _start_floor(stack, connections: list) -> tuple:
    """A floor hub, a process of worker connections per entry of ``connections``
    and a client connected to the hub: (FloorClient, {role: [pid]} for
    _cpu_by_role, the hub as "master")."""
    hub = stack.enter_context(Child([sys.executable, WORKLOADS_PY, "floorhub"]))
    port = hub.wait_for(r"^READY (\d+)").group(1)
    worker_pids = []
    for count in connections:
        workers = stack.enter_context(Child([sys.executable, WORKLOADS_PY, "floorworkers",
                                             port, str(count)]))
        workers.wait_for(r"^READY")
        worker_pids.append(workers.pid)
    client = workloads.FloorClient(int(port))
    stack.callback(client.close)
    return client, {"master": [hub.pid], "nodes": worker_pids}


def _start_sim_nodes(stack, port: int, authkey: str, nodes: int) -> list:
    """SIM_PROCESSES processes of simulated nodes, started one after another;
    returns their PIDs."""
    pids = []
    for count in _spread(nodes, SIM_PROCESSES):
        if count:
            child = stack.enter_context(Child(
                [sys.executable, WORKLOADS_PY, "simnodes", "127.0.0.1", str(port), str(count)],
                env=minicw_env(authkey)))
            child.wait_for(r"^READY ", timeout_s=120.0)
            pids.append(child.pid)
    return pids


def _jobs_by_node(executor) -> dict:
    return {node["node_id"]: node["jobs_done"] for node in executor.list_workers()}


# --- main --------------------------------------------------------------------------------

WORKLOADS = {
    "batched": bench_batched,
    "processes": bench_processes,
    "submit": bench_submit,
    "roundtrip": bench_roundtrip,
    "factorize": bench_factorize,
    "memory": bench_memory,
    "scale": bench_scale,
    "checkpoint": bench_checkpoint,
    "progress": bench_progress,
    "output": bench_output,
    "tls": bench_tls,
    "pool": bench_pool,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes: the whole run takes about a minute")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measurements per contender, interleaved (default 3, at least 1)")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME]",
                        help="workloads to run, of: %s" % ", ".join(WORKLOADS))
    parser.add_argument("--step-timeout", type=float, default=STEP_LIMIT_S, metavar="SECONDS",
                        help="a measurement or warm-up still running after this long is "
                        "reported as an error (default %(default)g)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="where to write every measurement (default "
                        "benchmarks/results.json, or results-quick.json with --quick)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.names = list(WORKLOADS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [name for name in args.names if name not in WORKLOADS]
    if unknown:
        parser.error("unknown workload %s; choose from %s" % (", ".join(unknown),
                                                              ", ".join(WORKLOADS)))
    if args.json is None:
        args.json = os.path.join(HERE, "results-quick.json" if args.quick else "results.json")
    return args


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine() -> dict:
    def git(*command):
        try:
            return subprocess.run(["git", "-C", ROOT] + list(command), capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    return {"python": sys.version.split()[0], "implementation": platform.python_implementation(),
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "minicw_commit": git("rev-parse", "HEAD"),
            "minicw_tree_modified": bool(git("status", "--porcelain", "--", "minicw")),
            "minimalcluster": importlib.util.find_spec("minimalcluster") is not None}


def main(argv=None) -> int:
    args = parse_args(argv)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, _on_sigint)   # stopped from outside: clean up all the same
    os.environ.setdefault("MINICW_RECONNECT_TIMEOUT_S", RECONNECT_TIMEOUT_S)
    run = Run(args.quick, args.repeat, args.step_timeout)
    rows, errors = [], []
    load_before = load_average()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    started = time.perf_counter()
    interrupted = False
    try:
        for name in args.names:
            check_interrupted()
            progress("== %s" % name)
            workload_started = time.perf_counter()
            try:
                with Watchdog("workload %s" % name, WORKLOAD_LIMIT_S):
                    rows += WORKLOADS[name](run)
            except Exception as exc:  # report it, go on with the next workload
                errors.append("%s: %s: %s" % (name, type(exc).__name__, exc))
                rows.append(make_row(name, "ERROR: %s" % exc, None, ""))
                progress("[%s] failed: %s" % (name, exc))
            progress("== %s took %.1f s" % (name, time.perf_counter() - workload_started))
        check_interrupted()
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: stopping every process started, then the table so far")
    finally:
        kill_leftover_children()
    elapsed = time.perf_counter() - started
    load_after = load_average()
    report = {"machine": machine(), "started_at": started_at, "quick": args.quick,
              "repeat": args.repeat, "workloads": args.names, "seconds": elapsed,
              "load_average": [load_before, load_after], "sizes": run.sizes,
              "rows": rows, "errors": errors, "measurements": run.measurements}
    with open(args.json, "w") as handle:
        json.dump(report, handle, indent=1)
    print(format_table(rows))
    print("\n%s mode, %d repeats, %.0f s; Python %s, %d CPUs, load average %s before, %s "
          "after; ratio = minicw / peer"
          % ("quick" if args.quick else "full", args.repeat, elapsed,
             report["machine"]["python"], os.cpu_count(),
             _load_text(load_before), _load_text(load_after)))
    print("raw measurements: %s" % os.path.abspath(args.json))
    if interrupted:
        return 130
    return 1 if errors else 0


def _load_text(load) -> str:
    return "?" if load is None else "%.2f" % load


if __name__ == "__main__":
    sys.exit(main())
