"""What jobs print, back where the user is.

    worker process (a lease whose client wants output)           client
    --------------------------------------------------           ------
    Capture.install(): sys.stdout/sys.stderr -> _Stream
    job prints -> Capture.write: (position, stream, text),      decode(delivery, label=...)
                  at most the session's limit per job,            |  forward(origin, output,
                  mirrored to the slot's file (unbuffered)        |          label_of)
    Runner._report -> Capture.take(first, count) ----------->   "[vm:4711 job 17] text"
                      {offset: [(stream, text)]} in the results     each line, to the client's
                                                                    own stdout or stderr
    process crashes -> its node reads the slot's file:
                      crashed_output(path, position) -> process_ended(..., output)
                      -> the job's WorkerCrashedError (and its lines, forwarded)

Only Python-level writes to ``sys.stdout``/``sys.stderr`` are captured (what
``print`` and most libraries write); bytes written to file descriptor 1 or 2
directly (a C extension, a subprocess) go to the worker node's own output.
Jobs that print nothing cost nothing per job: the streams are swapped once per
lease, and the clock or the state is read only when something is written.
The limit (``forward_output`` on the client, ``MINICW_FORWARD_OUTPUT``; 0 is
off) travels with the client's context blob (context.py).
"""
from __future__ import annotations

import io
import os
import sys
import threading

from minicw import progress

STDOUT, STDERR = "out", "err"
CUT_NOTE = "[minicw: %d more bytes of this job's output cut; the limit is %d per job]\n"


# --- the worker process's side -------------------------------------------------------------

class _Stream(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` of a worker process while it runs a lease."""

    def __init__(self, capture: "Capture", name: str, original):
        self._capture = capture
        self._name = name
        self._original = original

    @property
    def encoding(self):
        return getattr(self._original, "encoding", None) or "utf-8"

    @property
    def errors(self):
        return getattr(self._original, "errors", None) or "strict"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text) -> int:
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        if text:
            self._capture.write(self._name, text)
        return len(text)

    def flush(self) -> None:
        pass


class Capture:
    """Job output of one worker process: what each job of the running lease wrote."""

    def __init__(self, state, position_field: int, mirror_path: str | None = None):
        self._state = state                # the slot state: which job runs now
        self._position_field = position_field
        self._mirror_path = mirror_path
        self._mirror = None                # fd of the slot's file, opened at first write
        self._mirrored = False             # something was written there since the last clear
        self._lock = threading.Lock()      # a job's own threads may print too
        self.limit = 0
        self._entries = {}                 # position -> [(stream, text)]
        self._sizes = {}                   # position -> characters kept (and cut)
        self._saved = None
        # (first position, results list) while the worker process runs a batch of
        # jobs: the running job's position is the first plus the results so far
        self.batch = None

    # --- a lease ---
    def install(self, limit: int) -> None:
        """Capture from now on, ``limit`` characters per job at most."""
        self.limit = limit
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Stream(self, STDOUT, sys.stdout)
        sys.stderr = _Stream(self, STDERR, sys.stderr)

    def uninstall(self) -> None:
        if self._saved is not None:
            sys.stdout, sys.stderr = self._saved
            self._saved = None
        if self._mirrored:
            self._clear_mirror()

    @property
    def installed(self) -> bool:
        return self._saved is not None

    # --- writes ---
    def write(self, stream: str, text: str) -> None:
        batch = self.batch
        if batch is None:
            position = self._state[self._position_field]
        else:
            position = batch[0] + len(batch[1])
        with self._lock:
            size = self._sizes.get(position, 0)
            room = self.limit - size
            self._sizes[position] = size + len(text)
            if room <= 0:
                return
            kept = text[:room]
            self._entries.setdefault(position, []).append((stream, kept))
            self._mirror_write(position, stream, kept)

    def take(self, first: int, count: int) -> dict | None:
        """{offset from ``first``: [(stream, text)]} of the jobs at positions
        ``first``..``first+count`` (forgotten here), or None when they printed nothing."""
        if not self._entries:
            return None
        taken = {}
        with self._lock:
            for position in [p for p in self._entries if first <= p < first + count]:
                entries = self._entries.pop(position)
                size = self._sizes.pop(position, 0)
                if size > self.limit:
                    entries.append((STDERR, CUT_NOTE % (size - self.limit, self.limit)))
                taken[position - first] = entries
        return taken or None

    # --- the slot's file: what a crashed job wrote, for its node ---
    def _mirror_write(self, position: int, stream: str, text: str) -> None:
        if self._mirror_path is None:
            return
        try:
            if self._mirror is None:
                self._mirror = os.open(self._mirror_path,
                                       os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            data = text.encode("utf-8", "replace")
            os.write(self._mirror, b"%d %s %d\n" % (position, stream.encode(), len(data)) + data)
            self._mirrored = True
        except OSError:
            self._mirror_path = None   # no file (a full disk): crashed jobs' output is lost

    def _clear_mirror(self) -> None:
        try:
            os.ftruncate(self._mirror, 0)
            os.lseek(self._mirror, 0, os.SEEK_SET)
        except OSError:
            pass
        self._mirrored = False


def crashed_output(path: str, position: int) -> list:
    """[(stream, text)] that the job at ``position`` wrote before its process died,
    read from the slot's file (and the file removed)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        os.remove(path)
    except OSError:
        return []
    found = []
    at = 0
    while at < len(data):
        end = data.find(b"\n", at)
        if end < 0:
            break
        try:
            written_at, stream, size = data[at:end].split()
            size = int(size)
        except ValueError:
            break
        text = data[end + 1:end + 1 + size]
        at = end + 1 + size
        if int(written_at) == position:
            found.append((stream.decode(), text.decode("utf-8", "replace")))
    return found


# --- the client's side --------------------------------------------------------------------

_write_lock = threading.Lock()   # lines of one job stay together


def forward(origin: str, output: dict, label_of) -> None:
    """Write each job's output to this process's stdout or stderr, every line
    prefixed ``[origin label]``; ``label_of(offset)`` names the job (None: no prefix)."""
    for offset in sorted(output):
        write_job(origin, label_of(offset), output[offset])


def write_job(origin: str, label: str | None, entries: list) -> None:
    """A job's lines, each prefixed ``[origin label]`` (label None: as the job
    wrote them, as multiprocessing's children do; minicw.Pool)."""
    prefix = "" if label is None else "[%s %s] " % (origin, label)
    with _write_lock, progress.room_for_output():
        for stream, text in _lines(entries):
            target = sys.stderr if stream == STDERR else sys.stdout
            try:
                target.write(prefix + text)
                target.flush()
            except (OSError, ValueError, AttributeError):
                pass   # a closed or missing stream: nowhere to show it


def _lines(entries: list):
    """(stream, line ending in a newline) from a job's writes: writes of a stream
    joined up to each newline, in the order the job wrote them (a line left
    open on one stream ends when the job writes to the other)."""
    pending = {}
    for stream, text in entries:
        for other in [name for name in pending if name != stream]:
            yield other, pending.pop(other) + "\n"
        text = pending.pop(stream, "") + text
        lines = text.split("\n")
        for line in lines[:-1]:
            yield stream, line + "\n"
        if lines[-1]:
            pending[stream] = lines[-1]
    for stream, rest in pending.items():
        yield stream, rest + "\n"


def text_of(entries: list) -> str:
    """A job's output as one text (stdout and stderr as they were written)."""
    return "".join(text for _, text in entries)
