"""Processes by PID (minicw.processes): alive, started when, on Linux for real;
macOS and BSD through a stand-in ``ps`` (no macOS here); Windows under Wine in
test_windows.py."""
import os
import stat
import subprocess
import sys
import time

import pytest

from minicw import processes


@pytest.mark.skipif(not processes.HAVE_PROC, reason="Linux /proc")
def test_alive_and_start_time_on_linux():
    me = os.getpid()
    started = processes.start_time(me)
    assert processes.alive(me) and processes.alive(me, started)
    assert not processes.alive(me, started + 1)      # same PID, another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while (processes.proc_stat(child.pid) or ["?"])[0] != "Z":   # exited, not reaped
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not processes.alive(child.pid)            # a zombie is not alive
    child.wait()
    assert not processes.alive(child.pid) and processes.start_time(child.pid) is None


FAKE_PS = """#!/bin/sh
# ps -o FIELD= -p PID, as macOS answers it
case "$2" in
    lstart=) echo "Sun Dec  6 09:40:01 2026" ;;
    stat=) if [ "$4" = "{zombie}" ]; then echo "Z+"; else echo "S"; fi ;;
esac
"""


def test_alive_and_start_time_through_ps_as_on_macos(tmp_path, monkeypatch):
    # A stand-in for macOS (it cannot run here): no /proc, and a ps that answers
    # as macOS's does.  The PIDs are this process and its parent (both exist).
    zombie = os.getppid()
    fake = tmp_path / "ps"
    fake.write_text(FAKE_PS.format(zombie=zombie))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", "%s%s%s" % (tmp_path, os.pathsep, os.environ["PATH"]))
    monkeypatch.setattr(processes, "HAVE_PROC", False)
    me = os.getpid()
    assert processes.start_time(me) == "Sun Dec  6 09:40:01 2026"
    assert processes.alive(me, "Sun Dec  6 09:40:01 2026")
    assert not processes.alive(me, "Mon Dec  7 10:00:00 2026")   # the PID was reused
    assert not processes.alive(zombie)
