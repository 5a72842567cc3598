"""SLURM launcher: minicw.slurm and scripts/slurm_start.py.

Two kinds of tests:

- unmarked ones need no SLURM: the exact worker command (plain and Docker:
  no image registry is reachable here, so the Docker command is checked as
  composed, never run), the batch scripts, and the errors, with fake
  sbatch/squeue programs on a PATH of their own;
- ``@pytest.mark.slurm`` ones run against real daemons (.ci/run brings up a
  single-node SLURM with ../shared/ci/slurm-up.sh and runs
  ``pytest -m slurm tests/test_slurm.py``).  They are skipped, with the reason,
  when sbatch is not on the PATH or slurmctld does not answer, unless
  $MINICW_REQUIRE_SLURM=1 (set by .ci/run), which turns the skip into a failure.

The real tests submit jobs under a job name of their own (minicwtest<pid>),
so they never touch a user's minicw jobs, and cancel them in a finalizer
that also sweeps any job of that name still queued.
"""
import functools
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

import minicw
from minicw import config, discover, launcher, rundir, slurm

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "slurm_start.py")
SCRIPT_TIMEOUT_S = 150
WORKERS_JOIN_TIMEOUT_S = 60
JOB_NAME = "minicwtest%d" % os.getpid()


# --- without SLURM: commands, scripts, errors ---------------------------------------------

def test_worker_command_plain():
    assert slurm.worker_command("node7", 8888, python="/opt/py/bin/python3") == [
        "/opt/py/bin/python3", "-m", "minicw.worker", "node7", "8888", "-", "-n", "1"]


def test_worker_command_docker_exact_argv():
    # No image registry is reachable from here: the command is checked, not run.
    argv = slurm.worker_command("node7", 8888, docker_image="lab/minicw:3.11",
                                docker_args="-v /shared:/shared --memory '4g'")
    assert argv == ["docker", "run", "-i", "--rm", "--net=host", "-e", "MINICW_AUTHKEY",
                    "-v", "/shared:/shared", "--memory", "4g", "lab/minicw:3.11",
                    "-m", "minicw.worker", "node7", "8888", "-", "-n", "1"]


def test_worker_command_docker_without_args():
    assert slurm.worker_command("h", 1, docker_image="img") == [
        "docker", "run", "-i", "--rm", "--net=host", "-e", "MINICW_AUTHKEY", "img",
        "-m", "minicw.worker", "h", "1", "-", "-n", "1"]


def test_batch_scripts_hold_the_key_file_path_never_the_key(tmp_path):
    run_dir = str(tmp_path / "run dir")
    os.makedirs(run_dir)
    key = "sekrit-" + "x" * 30
    rundir.write_authkey(run_dir, key)
    master = slurm.master_script(run_dir, 0, python="/py")
    workers = slurm.worker_script(run_dir, slurm.worker_command("h", 5, python="/py"))
    for script in (master, workers):
        assert key not in script
        assert script.startswith("#!/bin/sh\n")
        assert "PYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH}" % slurm.package_parent() in script
    assert master.rstrip().endswith(
        "exec /py -m minicw.master --host 0.0.0.0 --port 0 --authkey-file '%s/authkey' "
        "--ready-file '%s/master-address.json'" % (run_dir, run_dir))
    assert "MINICW_AUTHKEY=$(cat '%s/authkey')" % run_dir in workers
    assert workers.rstrip().endswith("exec srun /py -m minicw.worker h 5 - -n 1")


def test_batch_scripts_run_in_a_shell(tmp_path):
    # The worker script, with srun replaced by a stub, exports the key from the file.
    run_dir = str(tmp_path)
    rundir.write_authkey(run_dir, "the-key")
    script = slurm.worker_script(run_dir, [sys.executable, "-c",
                                           "import os; print(os.environ['MINICW_AUTHKEY'])"])
    stub = tmp_path / "srun"
    stub.write_text('#!/bin/sh\nexec "$@"\n')
    stub.chmod(0o755)
    env = dict(os.environ, PATH=os.pathsep.join([str(tmp_path), os.environ.get("PATH", ""),
                                                  os.defpath]))
    if not os.path.exists("/bin/sh"):
        pytest.skip("no /bin/sh on this platform")
    done = subprocess.run(["/bin/sh", "-c", script], stdout=subprocess.PIPE, env=env,
                          universal_newlines=True, timeout=30)
    assert done.stdout.strip() == "the-key"


def test_sbatch_options_user_options_come_last():
    assert slurm.sbatch_options("n-workers", "/r/n-%j.log", ["--time=10", "--ntasks=9"],
                                ntasks=4, isolated=True) == [
        "--job-name=n-workers", "--output=/r/n-%j.log", "--ntasks=4",
        "--ntasks-per-node=1", "--time=10", "--ntasks=9"]


def test_job_names():
    assert slurm.job_names() == ("minicw-master", "minicw-workers")
    with pytest.raises(slurm.SlurmError, match="letters, digits"):
        slurm.job_names("bad name")


def test_aliases():
    assert minicw.slurm_master_host is slurm.master_host
    assert slurm.slurm_master_host is slurm.master_host
    assert issubclass(slurm.SlurmError, minicw.MinicwError)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A PATH holding only fake sbatch/squeue/scancel; returns a function to set their output."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name in ("sbatch", "squeue", "scancel"):
        path = bin_dir / name
        path.write_text(
            "#!%s\nimport os, sys\nname = os.path.basename(sys.argv[0]).upper()\n"
            "sys.stdout.write(os.environ.get('FAKE_%%s_OUT' %% name, ''))\n"
            "sys.stderr.write(os.environ.get('FAKE_%%s_ERR' %% name, ''))\n"
            "sys.exit(int(os.environ.get('FAKE_%%s_RC' %% name, '0')))\n" % sys.executable)
        path.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv(config.ENV_RUN_DIR, str(tmp_path / "run"))
    monkeypatch.delenv("MINICW_MASTER", raising=False)
    monkeypatch.delenv("MINICW_AUTHKEY", raising=False)

    def program(name, out="", err="", rc=0):
        monkeypatch.setenv("FAKE_%s_OUT" % name.upper(), out)
        monkeypatch.setenv("FAKE_%s_ERR" % name.upper(), err)
        monkeypatch.setenv("FAKE_%s_RC" % name.upper(), str(rc))
    return program


def squeue_lines(*jobs):
    return "".join("%s|%s|%s|%s|%s\n" % job for job in jobs)


def test_not_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not slurm.available()
    for call in (slurm.master_host, lambda: slurm.start(2), slurm.stop):
        with pytest.raises(slurm.SlurmError, match="SLURM is not installed here: .* is not on "
                                                   "the PATH"):
            call()


def test_no_master_job(fake_slurm):
    fake_slurm("squeue", squeue_lines(("5", "other", "RUNNING", "n1", "None")))
    with pytest.raises(slurm.SlurmMasterNotFoundError,
                       match="no SLURM job named minicw-master of user %s is in the queue"
                       % slurm.current_user()):
        slurm.master_host()


def test_several_masters(fake_slurm):
    fake_slurm("squeue", squeue_lines(("5", "minicw-master", "RUNNING", "n1", "None"),
                                      ("6", "minicw-master", "RUNNING", "n2", "None")))
    with pytest.raises(slurm.SlurmError, match="several SLURM master jobs named minicw-master "
                                               ".*: 5 on n1, 6 on n2; cancel"):
        slurm.master_address()
    with pytest.raises(slurm.SlurmError, match="several"):
        discover.master_address()   # an ambiguity is not silently skipped


def test_pending_master(fake_slurm):
    fake_slurm("squeue", squeue_lines(("5", "minicw-master", "PENDING", "", "Priority")))
    with pytest.raises(slurm.SlurmError, match="master job 5 is PENDING \\(reason: Priority\\)"):
        slurm.master_host()


def test_master_from_squeue_and_recorded_port(fake_slurm, tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    rundir.write_record(run_dir, slurm.SLURM_RECORD, {"job_name": "minicw", "port": 7777})
    fake_slurm("squeue", squeue_lines(("5", "minicw-master", "RUNNING", "node3", "None")))
    assert slurm.master_address() == ("node3", 7777)
    # The address the job wrote wins while its job is queued ...
    rundir.write_record(run_dir, slurm.ADDRESS_FILE, {"host": "node3.lan", "port": 41000,
                                                        "job_id": "5"})
    assert slurm.master_address() == ("node3.lan", 41000)
    assert slurm.master_host() == "node3.lan"
    assert discover.master_address() == ("node3.lan", 41000)
    # ... and is ignored once that job left the queue.
    fake_slurm("squeue", squeue_lines(("8", "minicw-master", "RUNNING", "node4", "None")))
    assert slurm.master_address() == ("node4", 7777)


def test_discover_falls_through_without_a_slurm_master(fake_slurm):
    fake_slurm("squeue", "")
    assert discover.master_address() == (config.DEFAULT_HOST, config.DEFAULT_PORT)
    fake_slurm("squeue", err="slurm_load_jobs error: Unable to contact slurm controller", rc=1)
    assert discover.master_address() == (config.DEFAULT_HOST, config.DEFAULT_PORT)


def test_sbatch_failure_quotes_its_stderr(fake_slurm):
    fake_slurm("squeue", "")
    fake_slurm("sbatch", err="sbatch: error: invalid partition specified: nope\n", rc=1)
    with pytest.raises(slurm.SlurmCommandError, match="`sbatch --parsable --job-name=minicw-master"
                                                      ".*` failed with exit code 1: sbatch: error: "
                                                      "invalid partition specified: nope"):
        slurm.start(2, port=0)


def test_squeue_failure_is_named(fake_slurm):
    fake_slurm("squeue", err="slurm_load_jobs error: Unable to contact slurm controller", rc=1)
    with pytest.raises(slurm.SlurmCommandError, match="`squeue .*` failed with exit code 1: "
                                                      "slurm_load_jobs error: Unable to contact"):
        slurm.master_host()


def test_start_needs_a_worker_count(fake_slurm):
    with pytest.raises(slurm.SlurmError, match="give the number of worker tasks"):
        slurm.start(None)


def test_stop_without_record_falls_back_to_job_names(fake_slurm, tmp_path):
    log_path = tmp_path / "scancel.args"
    # squeue lists our two jobs and a stranger's; scancel records its arguments.
    scancel = tmp_path / "fake-bin" / "scancel"
    scancel.write_text("#!%s\nimport sys\nopen(%r, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                       % (sys.executable, str(log_path)))
    jobs = squeue_lines(("5", "minicw-master", "RUNNING", "n1", "None"),
                        ("6", "minicw-workers", "RUNNING", "n2", "None"),
                        ("7", "somebody-else", "RUNNING", "n2", "None"))
    fake_slurm("squeue", jobs)
    with pytest.raises(slurm.SlurmError, match="jobs still in the queue 0.5s after scancel: "
                                               "5 \\(RUNNING\\), 6 \\(RUNNING\\)"):
        slurm.stop(timeout_s=0.5)   # the fake queue never empties
    assert log_path.read_text() == "6 5\n"


# --- SLURM installed, its controller unreachable -------------------------------------------

UNREACHABLE = {   # what the real programs print when no slurmctld answers
    "sbatch": "sbatch: error: Batch job submission failed: Unable to contact slurm "
              "controller (connect failure)",
    "squeue": "slurm_load_jobs error: Unable to contact slurm controller (connect failure)",
    "scancel": "scancel: error: Kill job error on job id 5: Unable to contact slurm "
               "controller (connect failure)",
}


@pytest.fixture
def unreachable_slurm(tmp_path, monkeypatch):
    """A PATH whose sbatch, squeue and scancel fail as they do when slurmctld is down.

    A stand-in: a real unreachable controller needs SLURM installed and no
    slurmctld running, which CI (it starts one) and most machines cannot offer.
    The real programs retry for seconds first; these wait briefly, say what
    the real ones say and exit 1.  Returns a function: how often NAME ran.
    """
    bin_dir = tmp_path / "unreachable-bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    calls.write_text("")
    for name, message in UNREACHABLE.items():
        path = bin_dir / name
        path.write_text("#!%s\nimport sys, time\nopen(%r, 'a').write(%r)\ntime.sleep(0.2)\n"
                        "sys.exit(%r)\n" % (sys.executable, str(calls), name + "\n", message))
        path.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv(config.ENV_RUN_DIR, str(tmp_path / "run"))
    monkeypatch.delenv("MINICW_MASTER", raising=False)
    monkeypatch.delenv("MINICW_AUTHKEY", raising=False)
    return lambda name: calls.read_text().split().count(name)


def test_start_with_slurm_unreachable_says_how_to_run_locally(unreachable_slurm, tmp_path):
    run_dir = str(tmp_path / "run")
    with pytest.raises(slurm.SlurmCommandError) as caught:
        with minicw.allocate(2, port=0):
            pytest.fail("allocate ran its block without a master")
    message = str(caught.value)
    assert "`sbatch --parsable --job-name=minicw-master" in message
    assert UNREACHABLE["sbatch"] in message
    assert 'backend="local"' in message and "scripts/local_start.py" in message
    assert os.listdir(run_dir) == []   # no key file, no record
    with pytest.raises(slurm.SlurmCommandError) as caught:
        minicw.start(2, backend="slurm", port=0)   # asked for SLURM: no advice
    assert 'backend="local"' not in str(caught.value)

    # As the message says; and minicw.stop() stops it locally though sbatch is on the PATH.
    address = minicw.start(1, backend="local")
    try:
        assert discover.master_address() == address   # the local record, before squeue
    finally:
        ended = minicw.stop()
        launcher.end_processes(ended, grace_s=1)   # in case stop() took the wrong road
    assert len(ended) == 2 and not any(launcher.process_alive(entry) for entry in ended)
    assert unreachable_slurm("squeue") == 0 and unreachable_slurm("scancel") == 0


def test_a_failing_squeue_is_asked_and_reported_once(unreachable_slurm, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="minicw.discover")
    default = (config.DEFAULT_HOST, config.DEFAULT_PORT)
    for _ in range(3):   # three clients constructed without a host, say
        assert discover.master_address() == default
    assert unreachable_slurm("squeue") == 1
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "minicw.discover"]
    assert [level for level, _ in said] == [logging.WARNING]
    assert "`squeue --noheader" in said[0][1] and UNREACHABLE["squeue"] in said[0][1]
    assert "set MINICW_MASTER=host:port" in said[0][1]

    monkeypatch.setattr(config, "SLURM_RETRY_S", 0.0)   # the retry time has passed
    assert discover.master_address() == default
    assert unreachable_slurm("squeue") == 2
    said = [r.levelno for r in caplog.records if r.name == "minicw.discover"]
    assert said == [logging.WARNING, logging.DEBUG]   # said once per process


def test_a_live_local_master_is_found_without_squeue(unreachable_slurm, tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    # The record's master is this process: alive and on this host, all that discovery asks.
    me = {"pid": os.getpid(), "start_time": launcher.process_start_time(os.getpid())}
    rundir.write_record(run_dir, rundir.LOCAL_RECORD, {
        "kind": "local", "hostname": socket.gethostname(), "host": "127.0.0.1",
        "port": 45678, "master": me, "workers": []})
    assert discover.master_address() == ("127.0.0.1", 45678)
    assert discover.master_address(port=1234) == ("127.0.0.1", 1234)
    assert unreachable_slurm("squeue") == 0


def test_slurm_script_runs_from_a_clean_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = str(tmp_path)   # no SLURM here
    done = subprocess.run([sys.executable, SCRIPT, "-n", "2", "start", "--run-dir",
                           str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, cwd=str(tmp_path), timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("slurm_start.py: error: SLURM is not installed here: sbatch")
    assert "Traceback" not in done.stderr


# --- real SLURM ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def slurm_skip_reason():
    if shutil.which("sbatch") is None:
        return ("SLURM is not installed (no sbatch on PATH); .ci/run brings up a "
                "single-node SLURM with ../shared/ci/slurm-up.sh and runs these")
    try:
        ping = subprocess.run(["scontrol", "ping"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "sbatch is on PATH but `scontrol ping` failed: %s" % exc
    if "UP" not in ping.stdout:
        first_line = (ping.stdout.strip().splitlines() or ["no output"])[0]
        return "sbatch is on PATH but slurmctld does not answer (scontrol ping: %s)" % first_line
    return None


def require_slurm():
    reason = slurm_skip_reason()
    if reason is None:
        return
    if os.environ.get("MINICW_REQUIRE_SLURM") == "1":
        pytest.fail("MINICW_REQUIRE_SLURM=1 but " + reason)
    pytest.skip(reason)


def slurm_start(*args, timeout_s=SCRIPT_TIMEOUT_S):
    done = subprocess.run([sys.executable, SCRIPT] + list(args) + ["--job-name", JOB_NAME],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout_s)
    return done


def our_jobs():
    return [job for job in slurm.user_jobs() if job.name.startswith(JOB_NAME + "-")]


def cancel_everything_of_ours(run_dir):
    try:
        slurm.stop(run_dir=run_dir, timeout_s=60)
    finally:
        left = [job.job_id for job in our_jobs()]
        if left:
            slurm.scancel(left)
            slurm.wait_jobs_gone(left, 60)


def wait_for_worker_nodes(address, key, count):
    node = minicw.MasterNode(address[0], address[1], key).connect()
    try:
        deadline = time.monotonic() + WORKERS_JOIN_TIMEOUT_S
        while len(node.list_workers()) < count:
            assert time.monotonic() < deadline, "the worker job did not join: %s" % our_jobs()
            time.sleep(0.2)
    finally:
        node.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A master job and a 2-task worker job, started with scripts/slurm_start.py."""
    require_slurm()
    run_dir = str(tmp_path_factory.mktemp("slurm-run"))
    saved = {name: os.environ.pop(name, None) for name in ("MINICW_MASTER", "MINICW_AUTHKEY")}
    os.environ[config.ENV_RUN_DIR] = run_dir
    try:
        # --overcommit: the 2 worker tasks share one CPU, so master and workers run
        # at once even on a 2-core machine whose SLURM advertises its real CPUs.
        done = slurm_start("-n", "2", "start", "--run-dir", run_dir, "--port", "0",
                           "--timeout", "60", "--Xworkers=--overcommit")
        assert done.returncode == 0, done.stderr
        print(done.stdout)
        yield run_dir, done.stdout
    finally:
        os.environ.pop(config.ENV_RUN_DIR, None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        cancel_everything_of_ours(run_dir)


@pytest.mark.slurm
def test_master_host_finds_the_master_job(cluster):
    run_dir, output = cluster
    record = rundir.read_record(run_dir, slurm.SLURM_RECORD)
    host, port = slurm.master_address()
    assert host == slurm.master_host() == socket.gethostname()
    assert "master   %s:%d  job %s" % (host, port, record["master_job"]) in output
    jobs = {job.name: job for job in our_jobs()}
    assert jobs[JOB_NAME + "-master"].job_id == record["master_job"]
    assert jobs[JOB_NAME + "-master"].state == "RUNNING"
    assert jobs[JOB_NAME + "-workers"].job_id == record["workers_job"]
    # A client given nothing finds the SLURM master and the key file by itself.
    assert discover.master_address() == (host, port)
    assert discover.authkey() == rundir.read_authkey(run_dir)


@pytest.mark.slurm
def test_masternode_flow_runs_1000_jobs(cluster):
    address, key = slurm.master_address(), rundir.read_authkey(cluster[0])
    wait_for_worker_nodes(address, key, 2)
    node = minicw.MasterNode(address[0], address[1], key).connect()
    try:
        node.load_envir("def cube(x):\n    return x ** 3\n", from_file=False)
        node.register_target_function("cube")
        node.load_args(range(1000))
        assert node.execute() == {x: x ** 3 for x in range(1000)}
        assert len(node.list_workers()) == 2
    finally:
        node.shutdown()


@pytest.mark.slurm
def test_cluster_executor_runs_1000_jobs(cluster):
    pytest.importorskip("minicw.executor", reason="minicw.ClusterExecutor is not written yet")
    host = slurm.master_host()
    port = slurm.master_address()[1]
    key = rundir.read_authkey(cluster[0])
    with minicw.ClusterExecutor(host, port, key) as executor:
        assert list(executor.map(lambda x: x * x, range(1000))) == [x * x for x in range(1000)]
        assert executor.submit(pow, 3, 4).result(timeout=60) == 81
    # Given nothing, it finds the SLURM master and reads the key file by itself.
    with minicw.ClusterExecutor() as executor:
        assert executor.address == (host, port)
        assert sum(executor.map(abs, range(-500, 500))) == 250000


def _cube_plus(x, extra=0):
    return x ** 3 + extra


@pytest.mark.slurm
def test_a_pool_given_nothing_finds_the_slurm_master(cluster):
    """multiprocessing code moved by its import: Pool() uses the SLURM cluster
    (its two worker processes), not a LocalCluster of its own."""
    address, key = slurm.master_address(), rundir.read_authkey(cluster[0])
    wait_for_worker_nodes(address, key, 2)
    with minicw.Pool() as pool:
        assert pool._cluster is None and pool.address == address
        assert pool._processes == 2
        assert pool.map(_cube_plus, range(1000)) == [x ** 3 for x in range(1000)]
        assert pool.starmap(_cube_plus, [(2, 1), (3, 1)]) == [9, 28]
        assert sorted(pool.imap_unordered(abs, range(-50, 50), 7)) == sorted(
            abs(x) for x in range(-50, 50))


@pytest.mark.slurm
def test_workers_restart_alone(cluster):
    run_dir = cluster[0]
    record = rundir.read_record(run_dir, slurm.SLURM_RECORD)
    done = slurm_start("-M", "stop", "--run-dir", run_dir)
    assert done.returncode == 0, done.stderr
    assert "cancelled jobs %s" % record["workers_job"] in done.stdout
    assert [job.name for job in our_jobs()] == [JOB_NAME + "-master"]
    done = slurm_start("-M", "-n", "2", "start", "--run-dir", run_dir, "--Xworkers=--overcommit")
    assert done.returncode == 0, done.stderr
    assert rundir.read_record(run_dir, slurm.SLURM_RECORD)["master_job"] == record["master_job"]
    wait_for_worker_nodes(slurm.master_address(), rundir.read_authkey(run_dir), 2)


@pytest.mark.slurm
def test_stop_cancels_and_empties_the_queue(cluster):
    run_dir = cluster[0]
    record = rundir.read_record(run_dir, slurm.SLURM_RECORD)
    address = slurm.master_address()
    done = slurm_start("stop", "--run-dir", run_dir)
    assert done.returncode == 0, done.stderr
    assert "cancelled jobs %s, %s; none left in the queue" % (
        record["workers_job"], record["master_job"]) in done.stdout
    assert our_jobs() == []
    for name in (slurm.SLURM_RECORD, slurm.ADDRESS_FILE, "authkey"):
        assert not os.path.exists(os.path.join(run_dir, name))
    with pytest.raises(slurm.SlurmMasterNotFoundError):
        slurm.master_address()
    with socket.socket() as probe:
        assert probe.connect_ex(address) != 0


@pytest.mark.slurm
def test_minicw_allocate_uses_slurm_when_sbatch_is_there(tmp_path):
    require_slurm()
    run_dir = str(tmp_path)
    assert launcher.choose_backend() == "slurm"
    try:
        with minicw.allocate(2, run_dir=run_dir, port=0, job_name=JOB_NAME,
                             worker_options=["--overcommit"], timeout_s=60) as address:
            assert address == slurm.master_address(run_dir)
            assert {job.name for job in our_jobs()} == {JOB_NAME + "-master",
                                                        JOB_NAME + "-workers"}
            key = rundir.read_authkey(run_dir)
            wait_for_worker_nodes(address, key, 2)
            node = minicw.MasterNode(address[0], address[1], key).connect()
            try:
                node.load_envir("def neg(x):\n    return -x\n", from_file=False)
                node.register_target_function("neg")
                node.load_args(range(100))
                assert node.execute() == {x: -x for x in range(100)}
            finally:
                node.shutdown()
        assert our_jobs() == []
    finally:
        cancel_everything_of_ours(run_dir)


@pytest.mark.slurm
def test_sbatch_rejecting_a_job_is_reported(tmp_path):
    require_slurm()
    done = slurm_start("-n", "1", "start", "--run-dir", str(tmp_path), "--port", "0",
                       "--Xmaster=--partition=no-such-partition")
    assert done.returncode == 1
    assert done.stderr.startswith("slurm_start.py: error: `sbatch --parsable")
    assert "no-such-partition" in done.stderr and "invalid partition" in done.stderr.lower()
    assert "Traceback" not in done.stderr
    assert our_jobs() == []


@pytest.mark.slurm
def test_a_rejected_worker_job_takes_its_new_master_down(tmp_path):
    require_slurm()
    run_dir = str(tmp_path)
    try:
        done = slurm_start("-n", "1", "start", "--run-dir", run_dir, "--port", "0",
                           "--Xworkers=--partition=no-such-partition")
        assert done.returncode == 1
        assert "--job-name=%s-workers" % JOB_NAME in done.stderr
        assert "invalid partition" in done.stderr.lower()
        assert our_jobs() == []
        assert sorted(name for name in os.listdir(run_dir) if not name.endswith(".log")) == []
    finally:
        cancel_everything_of_ours(run_dir)


@pytest.mark.slurm
def test_a_master_that_never_runs_is_cancelled(tmp_path):
    require_slurm()
    run_dir = str(tmp_path)
    try:
        done = slurm_start("-n", "1", "start", "--run-dir", run_dir, "--port", "0",
                           "--timeout", "3", "--Xmaster=--begin=now+1hour")
        assert done.returncode == 1
        assert "did not write its address to %s within 3s (it is PENDING" % os.path.join(
            run_dir, slurm.ADDRESS_FILE) in done.stderr
        assert "it was cancelled" in done.stderr
        assert our_jobs() == []
        assert not os.path.exists(os.path.join(run_dir, slurm.SLURM_RECORD))
    finally:
        cancel_everything_of_ours(run_dir)


@pytest.mark.slurm
def test_a_slurm_cluster_over_tls_pins_its_certificate(tmp_path):
    require_slurm()
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificate")
    from minicw import TlsError, tls, transport
    cert, key, fingerprint = tls.make_selfsigned(str(tmp_path / "tls"), socket.gethostname(),
                                                 days=2)
    run_dir = str(tmp_path / "run")
    try:
        with minicw.allocate(2, run_dir=run_dir, port=0, job_name=JOB_NAME,
                             worker_options=["--overcommit"], timeout_s=60,
                             tls_cert=cert, tls_key=key) as address:
            record = rundir.read_record(run_dir, slurm.SLURM_RECORD)
            assert record["tls_fingerprint"] == fingerprint
            authkey = rundir.read_authkey(run_dir)
            with pytest.raises(TlsError, match="serves TLS, and this peer has no TLS settings"):
                minicw.ClusterExecutor(address[0], address[1], authkey)
            transport.choose_tls(address, fingerprint=fingerprint)
            wait_for_worker_nodes(address, authkey, 2)   # the workers pinned it too
            with minicw.ClusterExecutor(address[0], address[1], authkey,
                                        tls_fingerprint=fingerprint) as executor:
                assert sum(executor.map(abs, range(-500, 500))) == 250000
    finally:
        transport._tls_by_address.clear()
        cancel_everything_of_ours(run_dir)


def test_batch_scripts_name_tls_files_never_their_content(tmp_path):
    from minicw import tls
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("CERT"), key.write_text("SECRET-KEY-MATERIAL")
    script = slurm.master_script(str(tmp_path), 8888, tls_settings=tls.Settings(
        cert=str(cert), key=str(key)))
    assert "--tls-cert %s --tls-key %s" % (cert, key) in script
    assert "SECRET-KEY-MATERIAL" not in script
    assert slurm.worker_command("h", 1, tls_fingerprint="ab" * 32)[-2:] == [
        "--tls-fingerprint", "ab" * 32]
