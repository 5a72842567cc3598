"""Smoke test of the benchmark suite: one cheap workload end to end.

Runs ``python benchmarks/run.py --quick --only roundtrip`` as a child process
and checks that it prints its table and writes its JSON.  No assertion is
made on any time or ratio: the suite reports targets, the test only checks
that it runs.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")


def run_benchmarks(*args, timeout_s=120, cwd=None):
    """(exit code, stdout, stderr) of run.py; a run past ``timeout_s`` gets SIGTERM,
    on which it stops every process it started, like on Ctrl-C."""
    child = subprocess.Popen([sys.executable, RUN] + list(args), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=cwd)
    try:
        out, err = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.terminate()
        out, err = child.communicate(timeout=60)
        raise AssertionError("run.py took over %ds: %s" % (timeout_s, err[-2000:]))
    return child.returncode, out, err


def test_quick_roundtrip_prints_table_and_writes_json(tmp_path):
    path = tmp_path / "results.json"
    code, out, err = run_benchmarks("--quick", "--only", "roundtrip", "--json", str(path),
                                    "--step-timeout", "30", cwd=str(tmp_path))
    assert code == 0, out + err
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:2] == ["workload", "case"] and header[-2:] == ["target", "result"]
    rows = [line for line in lines if line.startswith("roundtrip ")]
    assert rows and any(line.rstrip().endswith(("PASS", "FAIL")) for line in rows)
    assert "raw measurements: %s" % path in out

    report = json.loads(path.read_text())
    assert report["quick"] is True and report["workloads"] == ["roundtrip"]
    assert report["errors"] == []
    contenders = {m["contender"] for m in report["measurements"]}
    assert {"minicw executor", "PPE"} <= contenders
    for measurement in report["measurements"]:
        assert len(measurement["samples_us"]) == report["sizes"]["roundtrip"]
    targeted = [row for row in report["rows"] if row["target"]]
    assert targeted and all(row["result"] in ("PASS", "FAIL") for row in targeted)


def test_unknown_workload_is_a_usage_error():
    code, out, err = run_benchmarks("--only", "nonesuch", timeout_s=60)
    assert code == 2
    assert "unknown workload nonesuch" in err


def _import_benchmark_module(name: str):
    """benchmarks/<name>.py, imported as run.py itself finds its neighbours."""
    import importlib
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


def _stop(child) -> None:
    """EOF on its stdin ends the child; by PID if it does not within 10 s."""
    child.stdin.close()
    try:
        child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    child.stdout.close()


def _start(*args):
    child = subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", "workloads.py"),
                              *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    assert line.startswith("READY"), "%s said %r" % (args, line)
    return child, line.split()[1:]


def test_scale_floor_runs_every_chunk_through_its_hub():
    # The scale workload's bare-socket floor: a hub, two processes of worker
    # connections and the client, all real processes on 127.0.0.1.
    workloads = _import_benchmark_module("workloads")
    children = []
    try:
        hub, (port,) = _start("floorhub")
        children.append(hub)
        for connections in ("1", "3"):
            children.append(_start("floorworkers", port, connections)[0])
        client = workloads.FloorClient(int(port))
        try:
            for window in (1, 2):
                assert client.run(1000, 7, window) == 1000 * 1001 // 2
        finally:
            client.close()
    finally:
        for child in children:
            _stop(child)
    assert [child.returncode for child in children] == [0, 0, 0]


def test_scale_reads_cpu_of_a_process_and_its_descendants():
    # The scale row's CPU by role: a real child that starts a grandchild which
    # burns CPU; both must be counted, and a process that is gone reads as {}.
    run = _import_benchmark_module("run")
    if not os.path.exists("/proc/self/task/%d/schedstat" % os.getpid()):
        import pytest
        pytest.skip("no /proc schedstat here (not Linux, or the kernel leaves it out)")
    burn = ("import sys, time\n"
            "end = time.process_time() + 0.3\n"
            "while time.process_time() < end: pass\n"
            "print('BURNT', flush=True); sys.stdin.read()\n")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys\n"
         "child = subprocess.Popen([sys.executable, '-c', %r], stdout=sys.stdout)\n"
         "sys.stdin.read(); child.kill(); child.wait()\n" % burn],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline() == "BURNT\n"
        roles = run._with_descendants({"burner": [parent.pid]})
        assert len(roles["burner"]) == 2 and roles["burner"][0] == parent.pid
        spent = run._cpu_by_role(roles)
        assert 0.25 < spent["burner"] < 10
        assert run._cpu_spent({"burner": 1.0}, {"burner": 1.5}) == {"burner": 500.0}
    finally:
        _stop(parent)   # it kills its child before it exits
    assert parent.returncode == 0
    assert run._cpu_by_role(roles) == {}   # both have ended
    assert run._cpu_by_role(None) == {}
