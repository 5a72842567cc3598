"""What jobs print comes back to the client (output.py): per job, prefixed with
the worker and the job, stdout to stdout and stderr to stderr, in the order each
job wrote it; cut beyond the limit; the output of a job that crashed its
process, in its WorkerCrashedError; nothing when turned off; and bytes a job
writes to file descriptor 1 itself, from LocalCluster's own worker node.
Each case runs a client script as a subprocess, as a user runs one.
"""
import os
import re
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import os, sys, time
    from minicw import LocalCluster, WorkerCrashedError

    def chatty(x):
        print("line one of", x)
        print("a warning of", x, file=sys.stderr)
        sys.stdout.write("written ")
        sys.stdout.write("in parts %d\\n" % x)
        return x

    def crash(x):
        print("last words of", x, flush=True)
        os._exit(3)

    def loud(x):
        print("y" * 500)
        return x

    def fd_write(x):
        os.write(1, b"straight to fd 1 from %d\\n" % x)
        return x

    def quiet(x):
        return x

    OPTIONS = eval(sys.argv[1]) if len(sys.argv) > 1 else {}
    with LocalCluster(n_workers=2, **OPTIONS) as cluster:
        with cluster.executor() as executor:
            CASE
""")


def run_case(case: str, options: str = "{}", env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MINICW_FORWARD_OUTPUT", None)
    env.update(env_extra or {})
    script = SCRIPT.replace("CASE", textwrap.indent(textwrap.dedent(case).strip("\n"), " " * 8).lstrip())
    done = subprocess.run([sys.executable, "-c", script, options], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines(), done.stderr.splitlines()


PREFIX = r"^\[[^ \]]+:\d+ (item \d+|job [^\]]+|arg [^\]]+)\] "


def lines_of(lines: list, label: str) -> list:
    """The forwarded lines of one job, without their prefix (checked)."""
    found = []
    for line in lines:
        match = re.match(r"^\[([^ \]]+):(\d+) %s\] (.*)$" % re.escape(label), line)
        if match:
            found.append(match.group(3))
    return found


def test_each_job_output_comes_back_prefixed_in_order_on_its_stream():
    out, err = run_case("""
        print(list(executor.map(chatty, range(3))))
        print(executor.submit(chatty, 10).result())
    """)
    for label, x in [("item 0", 0), ("item 1", 1), ("item 2", 2), ("job 1", 10)]:
        assert lines_of(out, label) == ["line one of %d" % x, "written in parts %d" % x]
        assert lines_of(err, label) == ["a warning of %d" % x]
    assert "[0, 1, 2]" in out and "10" in out
    # a job's lines come before its result reaches the caller
    assert out.index("[0, 1, 2]") > max(out.index(line) for line in out
                                        if re.match(PREFIX + "written in parts 2", line))
    host = re.match(r"^\[([^ \]]+):\d+ ", [line for line in out if "item 0" in line][0]).group(1)
    assert host == os.uname().nodename


def test_execute_and_client_thread_name_their_jobs():
    out, _ = run_case("""
        cluster.load_envir("def shout(x):\\n    print('shout', x)\\n    return x\\n",
                           from_file=False)
        cluster.register_target_function("shout")
        cluster.load_args(["a", "b"])
        print(sorted(cluster.execute().items()))
        with cluster.client_thread(lambda jobid, result: None) as thread:
            thread.submit("mine", chatty, 5)
    """)
    assert lines_of(out, "arg 'a'") == ["shout a"] and lines_of(out, "arg 'b'") == ["shout b"]
    assert lines_of(out, "job mine") == ["line one of 5", "written in parts 5"]


def test_jobs_run_in_one_batch_each_have_their_own_output():
    # a chunk of fast jobs runs in batches (worker_process._run_batched): the
    # output of each job is still labelled with its own item
    out, _ = run_case("""
        def sometimes(x):
            if x % 7 == 3:
                print("seven of", x)
            return x
        for _ in range(3):
            print(sum(executor.map(sometimes, range(100), chunksize=100)))
    """)
    for x in range(100):
        expected = ["seven of %d" % x] * 3 if x % 7 == 3 else []
        assert lines_of(out, "item %d" % x) == expected
    assert out.count("4950") == 3


def test_output_beyond_the_limit_is_cut_with_a_note():
    out, err = run_case("print(executor.submit(loud, 1).result())", "{'forward_output': 100}")
    assert lines_of(out, "job 1") == ["y" * 100]
    assert lines_of(err, "job 1") == [
        "[minicw: 401 more bytes of this job's output cut; the limit is 100 per job]"]


def test_a_crashed_jobs_output_comes_back_in_its_error():
    out, err = run_case("""
        try:
            executor.with_options(max_retries=0).submit(crash, 4).result()
        except WorkerCrashedError as exc:
            print("ERROR", repr(exc.output), str(exc).replace("\\n", "|"))
    """)
    assert lines_of(out, "job 1") == ["last words of 4"]
    [error] = [line for line in out if line.startswith("ERROR ")]
    assert error == ("ERROR 'last words of 4\\n' job crash(4) crashed its worker process "
                     "(exit code 3) on 1 attempt(s); its output before the crash:|"
                     "last words of 4")


def test_no_output_comes_back_with_results_when_turned_off():
    # It stays on the worker node: here LocalCluster's own, whose standard output
    # this process passes on, unattributed to jobs.
    for options, env in [("{'forward_output': False}", None),
                         ("{}", {"MINICW_FORWARD_OUTPUT": "0"})]:
        out, err = run_case("print(list(executor.map(chatty, range(2))))", options, env)
        assert not [line for line in out + err if re.match(PREFIX, line)], out + err
        # (the node's lines are passed on by a thread of ours, so one may land
        # between the two writes of the script's own print: look at the text)
        assert "[0, 1]" in "".join(out)
        assert re.search(r"\[worker \d+\] line one of 0\n", "\n".join(out) + "\n")


def test_what_a_job_writes_to_fd_1_on_a_local_cluster_is_not_lost():
    out, _ = run_case("""
        print(executor.submit(fd_write, 9).result())
        # no pause: the cluster's stop reads the node's last output before its pipes close
    """)
    assert [line for line in out if re.match(r"^\[worker \d+\] straight to fd 1 from 9$", line)]


def test_jobs_that_print_nothing_forward_nothing():
    out, err = run_case("print(sum(executor.map(quiet, range(5000))))")
    assert out == [str(sum(range(5000)))]
    assert not [line for line in err if re.match(PREFIX, line)]
