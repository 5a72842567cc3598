"""The progress display (progress.py): the line's text and its throttling under a
fake clock and a fake stream; the notebook path with a stand-in IPython; each
kind of run (map, imap_unordered, execute, ClientThread.wait, a resumed
checkpointed map) counted to its end on a real cluster; and a script on a
real pseudo-terminal, where the line is rewritten in place, against the same
script with stderr piped or progress turned off, where nothing shows.
"""
import io
import os
import re
import subprocess
import sys
import time
import types

import pytest

from minicw import RemoteError, config, progress
from minicw.progress import Progress, start_progress

DELAY_S = config.PROGRESS_DELAY_S
EVERY_S = config.PROGRESS_TERMINAL_EVERY_S
PLAIN_S = config.PROGRESS_PLAIN_EVERY_S


class FakeClock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class FakeStream(io.StringIO):
    """Text written, and whether it says it is a terminal (of ``columns``)."""

    def __init__(self, tty=True, columns=120):
        super().__init__()
        self.tty = tty
        self.columns = columns

    def isatty(self):
        return self.tty

    def fileno(self):
        raise io.UnsupportedOperation("no descriptor")


@pytest.fixture(autouse=True)
def default_setting(monkeypatch):
    """The default (no $MINICW_PROGRESS), and no IPython unless a test brings one."""
    monkeypatch.delenv(config.ENV_PROGRESS, raising=False)
    monkeypatch.delitem(sys.modules, "IPython", raising=False)


def make(total=1000, tty=True, forced=False, label="map"):
    clock, stream = FakeClock(), FakeStream(tty)
    return Progress(total, label, forced=forced, stream=stream, clock=clock), clock, stream


def renders(stream):
    """What each render drew on a terminal: the texts after each carriage return."""
    return [part.rstrip(" \n") for part in stream.getvalue().split("\r")[1:]]


# --- on a terminal: delay, throttling, the line rewritten, its end ----------------------

def test_nothing_shows_before_the_delay_then_one_line_rewritten_in_place():
    shown, clock, stream = make()
    for _ in range(4):
        clock.advance(DELAY_S / 8)
        shown.add(25)
    assert stream.getvalue() == ""
    clock.advance(DELAY_S / 2)
    shown.add(10)
    assert renders(stream) == ["minicw map: 110/1000 done (11%), 55 jobs/s, 0:02 elapsed, "
                               "ETA 0:16"]
    clock.advance(EVERY_S)
    shown.add(90)
    assert len(renders(stream)) == 2 and "\n" not in stream.getvalue()
    assert renders(stream)[1].startswith("minicw map: 200/1000 done (20%)")


def test_rendering_is_throttled_by_time_not_by_results():
    shown, clock, stream = make(total=None)
    clock.advance(DELAY_S)
    for _ in range(1000):           # many segments within one interval: one render
        shown.add(1000)
    assert len(renders(stream)) == 1
    clock.advance(EVERY_S / 2)
    shown.add(1)
    assert len(renders(stream)) == 1
    clock.advance(EVERY_S / 2)
    shown.tick()                     # a waiting caller's tick renders without results
    assert len(renders(stream)) == 2


def test_a_shorter_line_blanks_what_is_left_of_the_longer_one():
    stream = FakeStream()
    line = progress._TerminalLine(stream, 80)
    line.show("minicw map: 5 done, ETA 1:00:00")
    line.show("minicw map: 6 done")
    line.end("minicw map: 7 done, ETA 0:01")
    assert stream.getvalue() == ("\rminicw map: 5 done, ETA 1:00:00"
                                 "\rminicw map: 6 done             "
                                 "\rminicw map: 7 done, ETA 0:01\n")


def test_forwarded_job_output_gets_a_line_of_its_own_then_the_line_comes_back(monkeypatch):
    from minicw import output
    stream = FakeStream()
    monkeypatch.setattr(sys, "stdout", stream)
    line = progress._TerminalLine(stream, 80)
    line.show("minicw map: 5/10 done")
    output.write_job("vm:1", "item 3", [("out", "hello\n")])
    assert stream.getvalue() == ("\rminicw map: 5/10 done" + "\r" + " " * 21 + "\r"
                                 + "[vm:1 item 3] hello\n" + "\rminicw map: 5/10 done")
    line.end("minicw map: 10/10 done")
    output.write_job("vm:1", "item 4", [("out", "after\n")])   # an ended line stays put
    assert stream.getvalue().endswith("minicw map: 10/10 done\n[vm:1 item 4] after\n")


def test_finish_draws_the_final_counts_and_ends_the_line_once():
    shown, clock, stream = make(total=310)
    clock.advance(DELAY_S + 1)
    shown.add(100)
    clock.advance(0.1)
    shown.add(210)                  # not due yet: the last render is the final one
    assert len(renders(stream)) == 1
    shown.finish()
    shown.finish()
    value = stream.getvalue()
    assert value.endswith("\n") and value.count("\n") == 1
    assert renders(stream)[-1] == "minicw map: 310/310 done (100%), 100 jobs/s, 0:03 elapsed"
    shown.add(5)                     # after the end: nothing more is drawn
    assert stream.getvalue() == value


def test_a_run_shorter_than_the_delay_draws_nothing_at_all():
    shown, clock, stream = make()
    shown.add(500)
    clock.advance(DELAY_S - 0.1)
    shown.add(500)
    shown.finish()
    assert stream.getvalue() == ""


def test_unknown_total_shows_done_without_percentage_or_eta():
    shown, clock, stream = make(total=None)
    clock.advance(DELAY_S)
    shown.add(1500)
    assert renders(stream) == ["minicw map: 1500 done, 750 jobs/s, 0:02 elapsed"]


def test_failed_jobs_are_shown_when_there_are_some():
    shown, clock, stream = make(total=100, label="wait")
    clock.advance(DELAY_S)
    shown.update(40, 0, 100)
    shown.update(50, 3, 120)         # a ClientThread's counts, more jobs submitted meanwhile
    clock.advance(EVERY_S)
    shown.tick()
    assert "failed" not in renders(stream)[0]
    assert renders(stream)[1].startswith("minicw wait: 50/120 done (41%), 3 failed, ")


def test_results_read_from_a_checkpoint_count_as_done_but_not_in_the_rate():
    shown, clock, stream = make(total=1000)
    shown.add_stored(600)            # read back at once
    clock.advance(DELAY_S * 2)
    shown.add(200)                   # 200 run in 4 s: 50/s, 200 left: 4 s
    assert renders(stream) == ["minicw map: 800/1000 done (80%), 50 jobs/s, 0:04 elapsed, "
                               "ETA 0:04"]


def test_times_and_rates_read_well():
    assert progress.describe("execute", 7, 7, 0, 3.14159, 3725.0, None) == (
        "minicw execute: 7/7 done (100%), 3.14 jobs/s, 1:02:05 elapsed")
    assert progress.describe("map", 0, 0, 0, 0.0, 0.0, None) == (
        "minicw map: 0/0 done (100%), 0 jobs/s, 0:00 elapsed")


def test_the_line_fits_the_terminal_width(monkeypatch):
    shown, clock, stream = make(total=10 ** 6)
    stream.fileno = lambda: 99
    monkeypatch.setattr(os, "get_terminal_size", lambda fd: os.terminal_size((40, 24)))
    clock.advance(DELAY_S)
    shown.add(1)
    assert len(renders(stream)[0]) == 39     # one short of the last column: no wrap


def test_a_broken_stream_never_breaks_the_run():
    shown, clock, stream = make()
    stream.close()
    clock.advance(DELAY_S)
    shown.add(1)                     # ValueError writing to a closed file: swallowed
    clock.advance(EVERY_S)
    shown.add(1)
    shown.finish()
    assert shown.wait_s(None) is None   # and the waiting callers stop waking for it


def test_waiting_callers_wake_to_tick_only_while_progress_may_show():
    shown, clock, _ = make()
    assert shown.wait_s(None) == config.PROGRESS_WAKE_S
    assert shown.wait_s(0.1) == 0.1
    shown.finish()
    assert shown.wait_s(None) is None and shown.wait_s(5) == 5
    assert progress.OFF.wait_s(None) is None


# --- not a terminal: plain lines, seldom --------------------------------------------------

def test_not_a_terminal_a_plain_line_at_most_every_30_s_the_first_after_30_s():
    shown, clock, stream = make(tty=False)
    clock.advance(DELAY_S)
    shown.add(100)
    clock.advance(PLAIN_S - DELAY_S - 1)
    shown.add(100)
    assert stream.getvalue() == ""    # a run under 30 s leaves its log alone
    clock.advance(1)
    shown.add(100)
    clock.advance(PLAIN_S - 1)
    shown.add(100)
    clock.advance(1)
    shown.add(100)
    shown.finish()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(",")[0] for line in lines] == [
        "minicw map: 300/1000 done (30%)", "minicw map: 500/1000 done (50%)",
        "minicw map: 500/1000 done (50%)"]


def test_forced_on_when_not_a_terminal_plain_lines_start_after_the_delay():
    shown, clock, stream = make(tty=False, forced=True)
    clock.advance(DELAY_S)
    shown.add(10)
    clock.advance(1)
    shown.add(10)
    shown.finish()
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == [
        "minicw map: 10/1000 done (1%)", "minicw map: 20/1000 done (2%)"]


# --- who decides: the call, the environment, the default -------------------------------------

@pytest.mark.parametrize("requested, env, expected", [
    (None, None, "default"), (None, "1", "forced"), (None, "0", "off"),
    (True, "0", "forced"), (False, "1", "off"), (False, None, "off"), (True, None, "forced"),
    (None, "bogus", "default")])
def test_the_call_wins_over_the_environment_which_wins_over_the_default(
        monkeypatch, requested, env, expected):
    if env is not None:
        monkeypatch.setenv(config.ENV_PROGRESS, env)
    shown = start_progress(10, requested, "map", stream=FakeStream(tty=False))
    if expected == "off":
        assert shown is progress.OFF
    else:
        assert isinstance(shown, Progress) and shown.forced == (expected == "forced")


# --- a notebook --------------------------------------------------------------------------

class FakeHandle:
    def __init__(self, shown):
        self.shown = shown

    def update(self, bundle, raw=False):
        assert raw
        self.shown.append(("update", bundle["text/plain"]))


def fake_ipython(monkeypatch, kernel: bool) -> list:
    shown = []

    def display(bundle, raw=False, display_id=None):
        assert raw and display_id is True
        shown.append(("display", bundle["text/plain"]))
        return FakeHandle(shown)
    shell = types.SimpleNamespace(kernel=object()) if kernel else types.SimpleNamespace()
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: shell
    ipython_display = types.ModuleType("IPython.display")
    ipython_display.display = display
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", ipython_display)
    return shown


def test_in_a_notebook_one_display_is_updated_in_place(monkeypatch):
    shown_in_cell = fake_ipython(monkeypatch, kernel=True)
    shown, clock, stream = make(total=100)
    clock.advance(DELAY_S)
    shown.add(10)
    clock.advance(config.PROGRESS_NOTEBOOK_EVERY_S / 2)
    shown.add(10)                    # throttled
    clock.advance(config.PROGRESS_NOTEBOOK_EVERY_S / 2)
    shown.add(80)
    shown.finish()
    assert stream.getvalue() == ""
    assert [kind for kind, _ in shown_in_cell] == ["display", "update", "update"]
    assert shown_in_cell[-1][1] == "minicw map: 100/100 done (100%), 40 jobs/s, 0:02 elapsed"


def test_a_terminal_ipython_draws_the_terminal_line(monkeypatch):
    shown_in_cell = fake_ipython(monkeypatch, kernel=False)
    shown, clock, stream = make(total=100)
    clock.advance(DELAY_S)
    shown.add(10)
    assert shown_in_cell == [] and renders(stream)


# --- each kind of run, on a real cluster ---------------------------------------------------

@pytest.fixture
def quick_display(monkeypatch):
    """Progress from 0.1 s on, a plain line every 0.1 s: runs of a second show it."""
    monkeypatch.setattr(config, "PROGRESS_DELAY_S", 0.1)
    monkeypatch.setattr(config, "PROGRESS_PLAIN_EVERY_S", 0.1)


def nap(x):
    time.sleep(0.01)
    if x == "fail":
        raise ValueError("no")
    return x


def lines_of(capsys, label):
    return [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("minicw %s:" % label)]


def test_map_imap_unordered_and_a_generator_count_to_their_end(cluster, capsys, quick_display):
    with cluster.executor() as executor:
        assert list(executor.map(nap, range(100), progress=True)) == list(range(100))
        shown = lines_of(capsys, "map")
        assert len(shown) >= 2 and shown[-1].startswith("minicw map: 100/100 done (100%), ")
        assert sorted(executor.imap_unordered(nap, range(100), progress=True)) == list(
            range(100))
        assert lines_of(capsys, "map")[-1].startswith("minicw map: 100/100 done (100%)")
        assert len(list(executor.map(nap, (x for x in range(100)), progress=True))) == 100
        assert lines_of(capsys, "map")[-1].startswith("minicw map: 100 done, ")
        assert len(list(executor.map(nap, range(100), progress=False))) == 100
        assert lines_of(capsys, "map") == []


def test_a_failed_map_ends_its_line_with_the_failure(cluster, capsys, quick_display):
    items = list(range(100)) + ["fail"] + list(range(20))
    with cluster.executor() as executor:
        with pytest.raises(ValueError, match="no"):   # the job's own exception
            list(executor.map(nap, items, progress=True))
    assert re.match(r"minicw map: 101/121 done \(83%\), 1 failed, ", lines_of(capsys, "map")[-1])


def test_execute_counts_its_args(cluster, capsys, quick_display):
    cluster.load_envir("import time\ndef nap(x):\n    time.sleep(0.01)\n    return x\n",
                       from_file=False)
    cluster.register_target_function("nap")
    cluster.load_args(list(range(100)))
    assert len(cluster.execute(progress=True)) == 100
    assert lines_of(capsys, "execute")[-1].startswith("minicw execute: 100/100 done (100%)")


def test_client_thread_wait_counts_done_and_failed_jobs(cluster, capsys, quick_display):
    results = []
    thread = cluster.client_thread(lambda jobid, result: results.append(result))
    with thread:
        for x in list(range(95)) + ["fail"] * 5:
            thread.submit(nap, x)
        with pytest.raises(RemoteError):
            thread.wait(progress=True)
    assert len(results) == 95
    assert lines_of(capsys, "wait")[-1].startswith("minicw wait: 100/100 done (100%), 5 failed")


def test_a_resumed_checkpointed_map_counts_its_stored_results(cluster, capsys, quick_display,
                                                              tmp_path):
    path = str(tmp_path / "run.sqlite")
    with cluster.executor() as executor:
        assert len(list(executor.map(nap, range(60), checkpoint=path, progress=False))) == 60
        assert list(executor.map(nap, range(120), checkpoint=path, resume="force",
                                 progress=True)) == list(range(120))
    assert lines_of(capsys, "map")[-1].startswith("minicw map: 120/120 done (100%)")


# --- a real terminal -----------------------------------------------------------------------

# long_map.py JOBS SLEEP_S MODE...: a map of JOBS sleeps per mode, between markers
SCRIPT = """
import os, sys, time
from minicw import LocalCluster

jobs, sleep_s, modes = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
with LocalCluster(n_workers=2) as cluster:
    with cluster.executor() as executor:
        for mode in modes:
            options = {"forced": {"progress": True}, "off": {"progress": False}}.get(mode, {})
            if mode == "env-off":
                os.environ["MINICW_PROGRESS"] = "0"
            print("BEGIN", mode, file=sys.stderr, flush=True)
            results = list(executor.map(time.sleep, [sleep_s] * jobs, **options))
            os.environ.pop("MINICW_PROGRESS", None)
            print("END", mode, len(results), file=sys.stderr, flush=True)
print("DONE", flush=True)
"""
JOBS = 1200
SLEEP_S = 0.005     # 1200 jobs on 2 processes: 3 s, so a second of it shows progress
RUN_TIMEOUT_S = 120

needs_pty = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "long_map.py"
    path.write_text(SCRIPT)
    return [str(path), str(JOBS), repr(SLEEP_S)]


def on_a_terminal(script, *modes) -> bytes:
    """What the script printed on a pty of its own, to its end."""
    from test_terminal import Terminal
    terminal = Terminal(script + list(modes))
    try:
        terminal.read_until(b"DONE", RUN_TIMEOUT_S)
        assert terminal.wait_exit() == 0, terminal.output
        return terminal.output
    finally:
        terminal.close()


def section(output: bytes, mode: str) -> bytes:
    return output.split(b"BEGIN " + mode.encode(), 1)[1].split(b"END " + mode.encode(), 1)[0]


@needs_pty
def test_on_a_real_terminal_the_line_is_rewritten_in_place_to_its_end(script):
    output = on_a_terminal(script, "default")
    shown = section(output, "default")
    renders = shown.split(b"\rminicw map: ")[1:]
    assert len(renders) >= 3, output
    assert b"\n" not in b"".join(renders[:-1]), output          # one line, rewritten
    assert renders[-1].startswith(b"%d/%d done (100%%)" % (JOBS, JOBS)), output
    assert re.search(rb"elapsed *\r\n$", renders[-1]), output       # then ended
    assert b"ETA" in renders[0]
    assert b"END default %d" % JOBS in output


@needs_pty
def test_on_a_real_terminal_progress_false_or_the_environment_turns_it_off(script):
    output = on_a_terminal(script, "off", "env-off")
    assert b"END off %d" % JOBS in output and b"END env-off %d" % JOBS in output
    assert b"minicw" not in output, output


def test_with_stderr_piped_a_short_run_shows_nothing_unless_forced(script):
    env = dict(os.environ)
    env.pop("MINICW_MASTER", None)
    env.pop(config.ENV_PROGRESS, None)
    done = subprocess.run([sys.executable] + script + ["default", "forced"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=RUN_TIMEOUT_S)
    err = done.stderr
    assert done.returncode == 0 and b"DONE" in done.stdout, err
    assert b"minicw" not in section(err, "default"), err
    forced = section(err, "forced").decode()
    assert "\r" not in forced
    lines = [line for line in forced.splitlines() if line.startswith("minicw map: ")]
    assert lines and lines[-1].startswith("minicw map: %d/%d done (100%%)" % (JOBS, JOBS)), err
