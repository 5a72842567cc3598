"""The local launcher: scripts/local_start.py, minicw.launcher, minicw.local.allocate,
how clients find what it started (minicw.discover), and the ready-file handshake
(minicw.launch) by which a parent knows that the master or node it started is up.

The launched master and workers run in their own sessions; a script that
started them has exited, so they are not this process's descendants and the
leak check of conftest.py cannot see them.  Every test that launches stops
by the recorded PIDs in a ``finally`` (``stopped`` below) and checks that
those PIDs are gone and the port is free.
"""
import contextlib
import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

import minicw
from minicw import config, discover, launch, launcher, local, rundir
from minicw.errors import MinicwError

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "local_start.py")
SCRIPT_TIMEOUT_S = 90
SQUARE_ENVIR = "def square(x):\n    return x * x\n"


def run_script(*args, env=None, cwd=None):
    done = subprocess.run([sys.executable, SCRIPT] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=env, cwd=cwd,
                          timeout=SCRIPT_TIMEOUT_S)
    return done


def recorded_entries(run_dir):
    record = rundir.read_record(str(run_dir), rundir.LOCAL_RECORD) or {}
    return ([record["master"]] if record.get("master") else []) + record.get("workers", [])


@contextlib.contextmanager
def stopped(run_dir):
    """Whatever happens in the block, end every process recorded in ``run_dir``."""
    seen = []
    try:
        yield seen
    finally:
        seen.extend(recorded_entries(run_dir))
        launcher.local_stop(run_dir=str(run_dir), grace_s=5)
        launcher.end_processes(seen, grace_s=1)  # in case the record was lost


def port_is_free(port):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    return True


def run_squares(address, authkey, n=1000):
    node = minicw.MasterNode(address[0], address[1], authkey).connect()
    try:
        node.load_envir(SQUARE_ENVIR, from_file=False)
        node.register_target_function("square")
        node.load_args(range(n))
        return node.execute()
    finally:
        node.shutdown()


@pytest.fixture
def no_slurm_env(monkeypatch, tmp_path):
    """No SLURM on PATH, no master or key in the environment, a fresh run directory."""
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.delenv("MINICW_MASTER", raising=False)
    monkeypatch.delenv("MINICW_AUTHKEY", raising=False)
    run_dir = tmp_path / "run"
    monkeypatch.setenv(config.ENV_RUN_DIR, str(run_dir))
    return run_dir


def test_script_starts_runs_and_stops(no_slurm_env):
    run_dir = no_slurm_env
    with stopped(run_dir) as seen:
        done = run_script("-n", "2", "start", "--run-dir", str(run_dir))
        assert done.returncode == 0, done.stderr
        assert "master   127.0.0.1:" in done.stdout and "key file" in done.stdout
        record = json.loads((run_dir / "master.json").read_text())
        seen.extend(recorded_entries(run_dir))
        port = record["port"]
        assert [w["nprocs"] for w in record["workers"]] == [2]
        assert stat.S_IMODE(os.stat(run_dir / "authkey").st_mode) == 0o600
        for entry in seen:
            assert int(open(entry["pid_file"]).read()) == entry["pid"]
            assert launcher.process_alive(entry)

        # A client given nothing finds the master and the key in the run directory.
        address, key = discover.master_address(), discover.authkey()
        assert address == ("127.0.0.1", port)
        results = run_squares(address, key)
        assert results == {x: x * x for x in range(1000)}

        done = run_script("stop", "--run-dir", str(run_dir))
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("stopped pid") == 2
    assert not any(launcher.process_alive(entry) for entry in seen)
    assert port_is_free(port)
    assert sorted(os.listdir(run_dir)) == ["master.log", "worker-1.log"]


def test_script_runs_from_a_clean_checkout(no_slurm_env, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = run_script("stop", "--run-dir", str(no_slurm_env), env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "nothing recorded in %s" % no_slurm_env in done.stdout


def test_master_only_then_workers_then_workers_stop_alone(no_slurm_env):
    run_dir = str(no_slurm_env)
    with stopped(run_dir) as seen:
        address = launcher.local_start(run_dir=run_dir, workers=False)
        assert rundir.read_record(run_dir, rundir.LOCAL_RECORD)["workers"] == []
        assert launcher.local_start(1, run_dir=run_dir, master=False) == address
        assert launcher.local_start(1, run_dir=run_dir, master=False) == address
        seen.extend(recorded_entries(run_dir))
        master, workers = seen[0], seen[1:]
        assert len(run_squares(address, rundir.read_authkey(run_dir), 200)) == 200

        ended = launcher.local_stop(run_dir=run_dir, master=False)
        assert [e["pid"] for e in ended] == [w["pid"] for w in workers]
        assert not any(launcher.process_alive(w) for w in workers)
        assert launcher.process_alive(master)
        assert launcher.recorded_master(run_dir) == address
        launcher.local_stop(run_dir=run_dir)
    assert not launcher.process_alive(master)
    assert launcher.recorded_master(run_dir) is None
    assert port_is_free(address[1])


def test_workers_need_a_recorded_master(no_slurm_env):
    with pytest.raises(MinicwError, match="no running local master is recorded in"):
        launcher.local_start(1, run_dir=str(no_slurm_env), master=False)


def test_a_second_master_in_the_same_run_dir_is_refused(no_slurm_env):
    run_dir = str(no_slurm_env)
    with stopped(run_dir):
        address = launcher.local_start(run_dir=run_dir, workers=False)
        with pytest.raises(MinicwError, match="a local master already runs from .*%d"
                           % address[1]):
            launcher.local_start(1, run_dir=run_dir)
        assert launcher.recorded_master(run_dir) == address


def test_a_master_that_cannot_listen_is_reported_with_its_log(no_slurm_env):
    run_dir = str(no_slurm_env)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with stopped(run_dir):
            with pytest.raises(MinicwError) as caught:
                launcher.local_start(1, run_dir=run_dir, port=port, timeout_s=30)
    message = str(caught.value)
    assert "master" in message and "exited before it was ready" in message
    assert os.path.join(run_dir, "master.log") in message and "cannot listen" in message
    assert rundir.read_record(run_dir, rundir.LOCAL_RECORD) is None
    assert not os.path.exists(rundir.authkey_path(run_dir))


@contextlib.contextmanager
def port_held(port):
    """Keep ``port`` taken, so that a master started meanwhile must get another one."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        yield


def script_start_reports(run_dir):
    """Start with the script; the port it printed, after checking the record agrees."""
    done = run_script("-n", "2", "start", "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr
    printed = int(done.stdout.split("master   127.0.0.1:")[1].split()[0])
    assert rundir.read_record(str(run_dir), rundir.LOCAL_RECORD)["port"] == printed
    return printed


def test_script_start_stop_start_reports_the_new_master(no_slurm_env):
    # The logs are appended to: the second start must not take the first master's
    # "listening on" line for its own (it reads the new master's ready file).
    run_dir = no_slurm_env
    with stopped(run_dir) as seen:
        first_port = script_start_reports(run_dir)
        seen.extend(recorded_entries(run_dir))
        assert len(run_squares(("127.0.0.1", first_port), discover.authkey(), 100)) == 100
        assert run_script("stop", "--run-dir", str(run_dir)).returncode == 0
        with port_held(first_port):
            second_port = script_start_reports(run_dir)
        seen.extend(recorded_entries(run_dir))
        assert second_port != first_port
        assert discover.master_address() == ("127.0.0.1", second_port)
        assert len(run_squares(("127.0.0.1", second_port), discover.authkey(), 100)) == 100
        assert open(run_dir / "master.log").read().count("minicw master listening on") == 2
    assert not any(launcher.process_alive(entry) for entry in seen)


def test_two_allocate_blocks_in_a_row(no_slurm_env):
    with stopped(no_slurm_env) as seen:
        with minicw.allocate(2, backend="local") as first:
            seen.extend(recorded_entries(no_slurm_env))
            assert len(run_squares(first, discover.authkey(), 100)) == 100
        with port_held(first[1]), minicw.allocate(2, backend="local") as second:
            seen.extend(recorded_entries(no_slurm_env))
            assert second != first and discover.master_address() == second
            assert len(run_squares(second, discover.authkey(), 100)) == 100
    assert len(seen) == 4 and not any(launcher.process_alive(e) for e in seen)


def test_ready_file_of_a_master_run_from_the_command_line(tmp_path):
    ready_file = str(tmp_path / "master.ready")
    rundir.write_json(ready_file, {"pid": 1, "host": "127.0.0.1", "port": 1})  # stale
    child = subprocess.Popen([sys.executable, "-m", "minicw.master", "--host", "127.0.0.1",
                              "--port", "0", "--ready-file", ready_file],
                             env=launch.child_env("k" * 20), stdout=subprocess.DEVNULL)
    try:
        record = launch.wait_ready_file(ready_file, child.pid, lambda: child.poll() is None,
                                        "master", 30, lambda: "(output not kept)")
        assert record["pid"] == child.pid and record["hostname"] == socket.gethostname()
        assert record["host"] == "127.0.0.1" and not port_is_free(record["port"])
        assert "job_id" not in record
    finally:
        child.terminate()
        child.wait(30)
    assert not os.path.exists(ready_file)   # removed by the master at shutdown


def test_a_child_that_exits_first_is_reported():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        with pytest.raises(MinicwError, match=r"the worker node \(pid %d\) exited before it "
                                              r"was ready; the end: nothing" % child.pid):
            launch.wait_ready_file(os.devnull + ".absent", child.pid,
                                   lambda: child.poll() is None, "worker node", 30,
                                   lambda: "the end: nothing")
    finally:
        child.wait(30)


def test_a_child_master_that_cannot_listen_says_why():
    # The child's reason is on its stderr; the error the user sees must quote it.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(MinicwError) as caught:
            launch.start_master("127.0.0.1", port, "k" * 20)
    message = str(caught.value)
    assert "exited before it was ready; exit code %d" % launch.EXIT_USAGE in message
    assert "cannot listen on 127.0.0.1:%d" % port in message
    assert "address already in use" in message.lower()


def test_child_env_carries_the_key_and_this_minicw():
    env = launch.child_env(b"sekrit")
    assert env["MINICW_AUTHKEY"] == "sekrit"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == launch.package_parent() == ROOT


def test_allocate_from_python(no_slurm_env):
    run_dir = str(no_slurm_env)
    with stopped(run_dir) as seen:
        with local.allocate(2, run_dir=run_dir) as address:
            seen.extend(recorded_entries(run_dir))
            assert launcher.recorded_master(run_dir) == address
            assert len(run_squares(address, discover.authkey(), 300)) == 300
        assert rundir.read_record(run_dir, rundir.LOCAL_RECORD) is None
    assert len(seen) == 2 and not any(launcher.process_alive(e) for e in seen)
    assert port_is_free(address[1])


def test_minicw_allocate_is_local_without_sbatch(no_slurm_env):
    assert launcher.choose_backend() == "local"
    with stopped(no_slurm_env) as seen:
        with minicw.allocate(1) as address:   # run directory from $MINICW_RUN_DIR
            seen.extend(recorded_entries(no_slurm_env))
            assert discover.master_address() == address
            if importlib.util.find_spec("minicw.executor"):   # written at the same time
                with minicw.ClusterExecutor() as executor:   # finds the recorded master
                    assert executor.address == address
                    assert list(executor.map(abs, [-1, -2, 3])) == [1, 2, 3]
    assert not any(launcher.process_alive(e) for e in seen)


def test_sbatch_on_path_chooses_slurm(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    assert launcher.choose_backend() == "slurm"
    assert launcher.choose_backend("local") == "local"
    with pytest.raises(ValueError):
        launcher.choose_backend("pbs")


def test_stop_leaves_a_reused_pid_alone(no_slurm_env):
    run_dir = str(no_slurm_env)
    os.makedirs(run_dir)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start_time = launcher.process_start_time(bystander.pid)
        if start_time is None:
            pytest.skip("no /proc start times on this platform")
        entry = {"pid": bystander.pid, "start_time": start_time - 1, "log": "x",
                 "session": True, "pid_file": os.path.join(run_dir, "master.pid"), "argv": []}
        rundir.write_record(run_dir, rundir.LOCAL_RECORD, {
            "hostname": socket.gethostname(), "host": "127.0.0.1", "port": 1,
            "master": entry, "workers": []})
        assert launcher.recorded_master(run_dir) is None   # not the process we started
        launcher.local_stop(run_dir=run_dir, grace_s=1)
        assert bystander.poll() is None
        assert rundir.read_record(run_dir, rundir.LOCAL_RECORD) is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_stale_record_is_replaced(no_slurm_env):
    run_dir = str(no_slurm_env)
    os.makedirs(run_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rundir.write_record(run_dir, rundir.LOCAL_RECORD, {
        "hostname": socket.gethostname(), "host": "127.0.0.1", "port": 1, "workers": [],
        "master": {"pid": dead.pid, "start_time": None, "pid_file": "/nonexistent"}})
    assert launcher.recorded_master(run_dir) is None
    with stopped(run_dir):
        address = launcher.local_start(run_dir=run_dir, workers=False)
        assert launcher.recorded_master(run_dir) == address


def test_another_hosts_record_is_left_alone(no_slurm_env):
    run_dir = str(no_slurm_env)
    os.makedirs(run_dir)
    rundir.write_record(run_dir, rundir.LOCAL_RECORD, {
        "hostname": "some-other-host", "host": "127.0.0.1", "port": 1, "workers": [],
        "master": {"pid": os.getpid(), "start_time": None, "pid_file": "/nonexistent"}})
    assert launcher.recorded_master(run_dir) is None
    for call in (lambda: launcher.local_stop(run_dir=run_dir),
                 lambda: launcher.local_start(1, run_dir=run_dir)):
        with pytest.raises(MinicwError, match="records a local cluster of host some-other-host"):
            call()
    assert rundir.read_record(run_dir, rundir.LOCAL_RECORD)["hostname"] == "some-other-host"


def test_key_file_is_600_and_a_readable_one_is_refused(tmp_path):
    run_dir = str(tmp_path)
    path = rundir.write_authkey(run_dir, "k" * 32)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert rundir.read_authkey(run_dir) == b"k" * 32
    if os.name != "posix":
        return
    os.chmod(path, 0o644)
    with pytest.raises(MinicwError, match=r"readable by group or others \(mode 644\); run "
                                          r"chmod 600"):
        rundir.read_authkey(run_dir)


def test_discover_precedence(no_slurm_env, monkeypatch):
    run_dir = str(no_slurm_env)
    assert discover.master_address() == ("127.0.0.1", 8888)
    with pytest.raises(MinicwError, match="no authkey: .*%s" % rundir.authkey_path(run_dir)):
        discover.authkey()
    os.makedirs(run_dir)
    rundir.write_authkey(run_dir, "from-the-file")
    assert discover.authkey() == b"from-the-file"
    monkeypatch.setenv("MINICW_AUTHKEY", "from-the-env")
    assert discover.authkey() == b"from-the-env"
    assert discover.authkey("explicit") == b"explicit"
    monkeypatch.setenv("MINICW_MASTER", "elsewhere:9999")
    assert discover.master_address() == ("elsewhere", 9999)
    assert discover.master_address(port=1234) == ("elsewhere", 1234)
    assert discover.master_address("given") == ("given", 8888)
