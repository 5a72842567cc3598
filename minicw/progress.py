"""Progress of a long run, shown to the person waiting for it.

    execute(), executor.map,          Progress                        the screen
    imap_unordered, ClientThread.wait --------                        ----------
      start_progress(total, progress=) -> Progress, or OFF when not wanted
      add(jobs, failed) per segment ---> done += jobs   --if due-->  one output, picked at
      add_stored(jobs) (a checkpoint)    (one clock read              the first render:
      update(done, failed, total)         per call)                   _TerminalLine  "\\r" + line
      tick() while waiting for results -------------------if due-->   _NotebookLine  display_id
      finish() at the end, also on an --> the last line, ended ---->  _PlainLines    a line now
        error or an interrupt                                                        and then

Who draws: the thread that runs the call (the one iterating a map, waiting
in execute() or ClientThread.wait), never a thread of its own.  That thread
is where the user sees output (a notebook routes it to the running cell),
and a run that ends before anything is due costs no thread, no system call
and no output.  A thread that blocks waiting for results wakes every
PROGRESS_WAKE_S (``wait_s``) and calls ``tick()``, so elapsed time and ETA
move even while nothing arrives.

What a result costs: callers count results a segment at a time (hundreds
or thousands of jobs per call when jobs are fast), and each call reads the
clock once and compares it with when the next render is due; rendering is
throttled by time (PROGRESS_TERMINAL_EVERY_S, ...).

When it shows (``start_progress``): ``progress=True`` / ``False`` on the
call, else $MINICW_PROGRESS (config.progress_setting), else on.  Nothing
appears before the run has taken PROGRESS_DELAY_S.  Then, on stderr:
- a terminal: one line rewritten in place, ended with a newline at the end;
- an IPython kernel (Jupyter) already loaded: a display updated in place
  (IPython's own display machinery; no dependency);
- anything else (a pipe, a file): a plain line at most every
  PROGRESS_PLAIN_EVERY_S, the first after that long too, so a short run
  leaves logs untouched; forced on, the first comes after PROGRESS_DELAY_S.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time

from minicw import config

_NEVER = float("inf")


def start_progress(total: int | None, requested: bool | None = None, label: str = "jobs",
                   stream=None, clock=time.monotonic):
    """The progress of a run of ``total`` jobs (None: not known) starting now:
    a Progress, or OFF when ``requested`` (the call's ``progress=``) or
    $MINICW_PROGRESS turns it off.  ``stream`` defaults to sys.stderr as
    it is at the first render."""
    wanted = config.progress_setting(requested)
    if wanted is False:
        return OFF
    return Progress(total, label, forced=wanted is True, stream=stream, clock=clock)


class Progress:
    """Counts of one run and their display (see the module docstring).

    ``done`` counts finished jobs, failed ones included; ``stored`` those of
    them read from a checkpoint (left out of the rate); ``failed`` those
    that raised, crashed or timed out.
    """

    def __init__(self, total: int | None, label: str = "jobs", forced: bool = False,
                 stream=None, clock=time.monotonic):
        self.total = total
        self.label = label
        self.done = 0
        self.failed = 0
        self.stored = 0
        self.forced = forced
        self._stream = stream
        self._clock = clock
        self._started = clock()
        self._due = self._started + config.PROGRESS_DELAY_S   # when to render next
        self._every_s = None
        self._out = None              # the output, picked at the first render
        self._shown = False           # something is on the screen
        self.finished = False

    # --- counting (the caller's thread) ---

    def add(self, jobs: int, failed: int = 0) -> None:
        """``jobs`` more finished, ``failed`` of which failed."""
        self.done += jobs
        self.failed += failed
        now = self._clock()
        if now >= self._due:
            self._render(now)

    def add_stored(self, jobs: int) -> None:
        """``jobs`` more finished, read from a checkpoint instead of run."""
        self.stored += jobs
        self.add(jobs)

    def update(self, done: int, failed: int, total: int | None) -> None:
        """The counts as they are now (for a caller that keeps its own)."""
        self.done, self.failed, self.total = done, failed, total
        self.tick()

    def tick(self) -> None:
        """Render if due: for a caller that woke up without results."""
        now = self._clock()
        if now >= self._due:
            self._render(now)

    def wait_s(self, timeout_s: float | None) -> float | None:
        """How long a caller waiting for results may block: ``timeout_s``, or less
        so that it can ``tick()`` in time."""
        if self._due == _NEVER:
            return timeout_s
        return config.PROGRESS_WAKE_S if timeout_s is None else min(
            timeout_s, config.PROGRESS_WAKE_S)

    def finish(self) -> None:
        """The run ended (completed, failed or interrupted): its last line, ended.
        Nothing if nothing was shown; later calls do nothing."""
        if self.finished:
            return
        self.finished = True
        self._due = _NEVER
        if self._shown:
            self._write(self._out.end, self.text(self._clock(), final=True))

    # --- drawing ---

    def text(self, now: float, final: bool = False) -> str:
        """The line: counts, rate and times at clock time ``now``."""
        elapsed_s = max(0.0, now - self._started)
        ran = self.done - self.stored
        rate = ran / elapsed_s if elapsed_s > 0 else 0.0
        eta_s = None
        if not final and self.total is not None and rate > 0:
            eta_s = max(0, self.total - self.done) / rate
        return describe(self.label, self.done, self.total, self.failed, rate, elapsed_s, eta_s)

    def _render(self, now: float) -> None:
        if self._out is None and not self._pick_output(now):
            return
        self._due = now + self._every_s
        self._write(self._out.show, self.text(now))

    def _pick_output(self, now: float) -> bool:
        """The first render: where to draw, and how often.  False: not now (a plain
        line waits longer) or never (no stream)."""
        stream = self._stream if self._stream is not None else sys.stderr
        display = _notebook_display()
        if display is not None:
            self._out, self._every_s = _NotebookLine(display), config.PROGRESS_NOTEBOOK_EVERY_S
        elif stream is None:
            self._due = _NEVER   # pythonw, or stderr closed by the program
            return False
        elif _is_terminal(stream):
            self._out = _TerminalLine(stream, _columns(stream))
            self._every_s = config.PROGRESS_TERMINAL_EVERY_S
        else:
            first = self._started + config.PROGRESS_PLAIN_EVERY_S
            if not self.forced and now < first:
                self._due = first   # logs and pipes: only runs that take a while
                return False
            self._out, self._every_s = _PlainLines(stream), config.PROGRESS_PLAIN_EVERY_S
        return True

    def _write(self, draw, text: str) -> None:
        try:
            draw(text)
            self._shown = True
        except Exception:   # a closed or broken stream: the run goes on without display
            self._due = _NEVER
            self._shown = False


class _Off:
    """No progress: what a run gets when it is turned off; every call does nothing."""

    finished = False

    def add(self, jobs: int, failed: int = 0) -> None:
        pass

    def add_stored(self, jobs: int) -> None:
        pass

    def update(self, done: int, failed: int, total: int | None) -> None:
        pass

    def tick(self) -> None:
        pass

    def wait_s(self, timeout_s: float | None) -> float | None:
        return timeout_s

    def finish(self) -> None:
        pass


OFF = _Off()


def describe(label: str, done: int, total: int | None, failed: int, rate_per_s: float,
             elapsed_s: float, eta_s: float | None) -> str:
    """``minicw map: 1200/2000 done (60%), 3 failed, 540 jobs/s, 0:02 elapsed, ETA 0:01``
    (no total: no percentage and no ETA; failed only when some did)."""
    if total is not None:
        percent = 100 * done // total if total else 100
        parts = ["%d/%d done (%d%%)" % (done, total, percent)]
    else:
        parts = ["%d done" % done]
    if failed:
        parts.append("%d failed" % failed)
    parts.append("%s jobs/s" % _rate_text(rate_per_s))
    parts.append("%s elapsed" % _clock_text(elapsed_s))
    if eta_s is not None:
        parts.append("ETA %s" % _clock_text(eta_s))
    return "minicw %s: %s" % (label, ", ".join(parts))


def _rate_text(rate_per_s: float) -> str:
    if rate_per_s >= 100:
        return "%d" % round(rate_per_s)
    return "%.3g" % rate_per_s


def _clock_text(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on (whole seconds gone by)."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return "%d:%02d:%02d" % (hours, minutes, secs)
    return "%d:%02d" % (minutes, secs)


# --- outputs --------------------------------------------------------------------------------

class _TerminalLine:
    """One line rewritten in place: carriage return, the text, blanks over what is
    left of a longer earlier text (no escape sequences: a dumb terminal has
    none), cut to the terminal's width (a wrapped line cannot be rewritten).

    Job output forwarded meanwhile (output.py, from the receiver thread) goes
    through ``room_for_output``: the line is blanked, the output written, the
    line drawn again below it."""

    def __init__(self, stream, columns: int):
        self.stream = stream
        self.width = max(20, columns - 1)
        self.written = 0
        self.text = ""
        self.lock = threading.Lock()

    def show(self, text: str) -> None:
        with self.lock:
            self._draw(text)
            _showing.add(self)

    def _draw(self, text: str) -> None:
        text = text[:self.width]
        self.stream.write("\r" + text + " " * (self.written - len(text)))
        self.stream.flush()
        self.written = len(text)
        self.text = text

    def end(self, text: str) -> None:
        with self.lock:
            self._draw(text)
            self.stream.write("\n")
            self.stream.flush()
            _showing.discard(self)

    def blank(self) -> None:
        """(lock held) The line emptied, the cursor at its start."""
        self.stream.write("\r" + " " * self.written + "\r")
        self.stream.flush()
        self.written = 0


_showing = set()   # the _TerminalLines drawn and not ended


@contextlib.contextmanager
def room_for_output():
    """Write job output inside this: a progress line on the terminal steps aside."""
    lines = list(_showing)
    for line in lines:
        line.lock.acquire()
        try:
            line.blank()
        except (OSError, ValueError):
            pass
    try:
        yield
    finally:
        for line in lines:
            try:
                if line in _showing:
                    line._draw(line.text)
            except (OSError, ValueError):
                pass
            finally:
                line.lock.release()


class _NotebookLine:
    """A display in the running cell, updated in place through its display id."""

    def __init__(self, display):
        self.display = display
        self.handle = None

    def show(self, text: str) -> None:
        bundle = {"text/plain": text}
        if self.handle is None:
            self.handle = self.display(bundle, raw=True, display_id=True)
        else:
            self.handle.update(bundle, raw=True)

    end = show


class _PlainLines:
    """A line of text per render, for logs and pipes."""

    def __init__(self, stream):
        self.stream = stream

    def show(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    end = show


def _notebook_display():
    """IPython's ``display`` when this runs in an IPython kernel (Jupyter) whose
    IPython is already loaded; else None.  Never imports IPython otherwise."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    try:
        shell = ipython.get_ipython()
        if shell is None or not hasattr(shell, "kernel"):   # a terminal IPython: a tty
            return None
        return importlib.import_module("IPython.display").display
    except Exception:
        return None


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except Exception:   # no isatty, or a closed file
        return False


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except Exception:
        return 80
