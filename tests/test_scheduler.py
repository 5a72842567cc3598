"""The master's state machine on its own: leases, reports, crashes, cancels, expiry.

No processes here: a Scheduler is driven directly, as the manager's
connection threads would drive it.
"""

import queue
import threading
import time

import pytest

from minicw import protocol
from minicw.errors import ClusterShutdownError, MinicwError, SessionExpiredError
from minicw.scheduler import Scheduler
from minicw.waiting import Failure, Waiter

NODE_INFO = {"hostname": "h", "pid": 1, "nprocs": 2, "python": "3"}


class Blocking:
    """A Scheduler whose waiting calls (exchange, fetch, poll) block the calling
    thread until they are answered, as a thread of the manager's own server
    would; ``scheduler`` is the Scheduler itself."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def __getattr__(self, name):
        return getattr(self.scheduler, name)

    def exchange(self, *args):
        return self._wait(self.scheduler.exchange, *args)

    def fetch(self, *args):
        return self._wait(self.scheduler.fetch, *args)

    def poll(self, *args):
        return self._wait(self.scheduler.poll, *args)

    def _wait(self, start, *args):
        replies = queue.SimpleQueue()
        reply = start(*args, replies.put)
        if isinstance(reply, Waiter):
            try:
                reply = replies.get(timeout=max(0.0, reply.deadline - time.monotonic()))
            except queue.Empty:
                self.scheduler.end_wait(reply)
                reply = replies.get()
        if isinstance(reply, Failure):
            raise reply.error
        return reply


def make(heartbeat_timeout_s=10.0):
    scheduler = Blocking(Scheduler(heartbeat_timeout_s))
    client = scheduler.open_client({"hostname": "c", "pid": 2})
    scheduler.put_blobs(client, [("fn", b"blob")])
    node = scheduler.register_node(dict(NODE_INFO))
    return scheduler, client, node


def spec(chunk_id, n_jobs, max_retries=2, timeout_s=None):
    return protocol.ChunkSpec(chunk_id, ("fn",), n_jobs, b"payload", timeout_s, max_retries,
                              None)


def fetch(scheduler, client):
    """Deliveries, acknowledging what was fetched before."""
    last, deliveries = scheduler.fetch(client, 0, getattr(scheduler, "_test_ack", 0))
    scheduler._test_ack = last
    return deliveries


def report(lease, start, count, results=b"r", failures=None):
    return protocol.Report(protocol.view(protocol.Lease, lease).token, start, count, results,
                           failures)


def test_lease_report_deliver_exactly_once():
    scheduler, client, node = make()
    scheduler.submit(client, [spec(1, 3)])
    [lease], revoked = scheduler.exchange(node, 0, [], 1, 0)
    assert lease[2] == 1 and list(lease[5]) == [0, 1, 2] and revoked == ()
    scheduler.exchange(node, 0, [report(lease, 0, 2)], 0, 0)
    scheduler.exchange(node, 0, [report(lease, 0, 2)], 0, 0)  # duplicate: dropped
    scheduler.exchange(node, 0, [report(lease, 2, 1)], 0, 0)
    deliveries = fetch(scheduler, client)
    assert [(d[0], list(d[1])) for d in deliveries] == [(1, [0, 1]), (1, [2])]
    status = scheduler.status()["clients"][0]
    assert (status["queued"], status["running"], status["done"]) == (0, 0, 3)
    assert scheduler.status()["leased_chunks"] == 0


def test_round_robin_between_clients():
    scheduler, first, node = make()
    second = scheduler.open_client({"hostname": "c2", "pid": 3})
    scheduler.put_blobs(second, [("fn", b"blob")])
    scheduler.submit(first, [spec(i, 1) for i in range(1, 101)])
    scheduler.submit(second, [spec(i, 1) for i in range(1, 4)])
    order = []
    for _ in range(6):
        [lease], _ = scheduler.exchange(node, 0, [], 1, 0)
        order.append(lease[1])
        scheduler.exchange(node, 0, [report(lease, 0, 1)], 0, 0)
    assert order == [first, second] * 3


def test_lease_share_leaves_work_for_other_processes():
    scheduler, client, node = make()
    scheduler.submit(client, [spec(i, 1) for i in range(1, 5)])
    leases, _ = scheduler.exchange(node, 0, [], 16, 0)
    assert len(leases) == 2  # 4 chunks, 2 processes: a fair share each
    leases, _ = scheduler.exchange(node, 1, [], 16, 0)
    assert len(leases) == 1  # 2 left for 2 processes: one each


def test_crash_retries_the_running_job_first_then_fails_it():
    scheduler, client, node = make()
    scheduler.submit(client, [spec(1, 4, max_retries=1)])
    [lease], _ = scheduler.exchange(node, 0, [], 1, 0)
    scheduler.exchange(node, 0, [report(lease, 0, 1)], 0, 0)  # job 0 done
    scheduler.process_ended(node, 0, lease[0], 2, protocol.END_DIED, "killed by signal SIGKILL")
    [retry], _ = scheduler.exchange(node, 0, [], 1, 0)
    assert tuple(retry[5]) == (2, 1, 3)  # the suspect first, job 0 not again
    scheduler.process_ended(node, 0, retry[0], 0, protocol.END_DIED, "exit code 1")
    [rest], _ = scheduler.exchange(node, 0, [], 1, 0)
    assert tuple(rest[5]) == (1, 3)
    deliveries = fetch(scheduler, client)
    failure = [d for d in deliveries if d[3] is not None]
    assert failure == [(1, (2,), None, (protocol.FAIL_CRASHED, ("exit code 1", 2, None)))]


def test_timeout_and_kill_fail_only_the_running_job():
    scheduler, client, node = make()
    scheduler.submit(client, [spec(1, 2, timeout_s=0.5), spec(2, 2)])
    leases, _ = scheduler.exchange(node, 0, [], 2, 0)
    first = [lease for lease in leases if lease[2] == 1][0]
    scheduler.process_ended(node, 0, first[0], 1, protocol.END_TIMED_OUT, "killed")
    deliveries = fetch(scheduler, client)
    assert deliveries == [(1, (1,), None, (protocol.FAIL_TIMEOUT, 0.5))]
    # Both chunks are queued again, without charge, minus the failed job.
    requeued = []
    while True:
        got, _ = scheduler.exchange(node, 1, [], 16, 0)
        if not got:
            break
        requeued += [(lease[2], tuple(lease[5])) for lease in got]
    assert sorted(requeued) == [(1, (0,)), (2, (0, 1))]


def test_late_report_after_node_expiry_is_dropped(monkeypatch):
    scheduler, client, node = make(heartbeat_timeout_s=5)
    scheduler.submit(client, [spec(1, 1)])
    [lease], _ = scheduler.exchange(node, 0, [], 1, 0)
    clock = [1000.0]
    monkeypatch.setattr("minicw.scheduler.time.monotonic", lambda: clock[0])
    scheduler._nodes[node].last_seen = 990.0   # silent for 10 s
    scheduler._clients[client].last_seen = 999.0  # the client is fine
    scheduler.expire()
    assert scheduler.list_nodes() == []
    # The frozen node wakes up and reports: it is told to stop, nothing is delivered.
    assert scheduler.exchange(node, 0, [report(lease, 0, 1)], 1, 0) is None
    assert fetch(scheduler, client) == []
    assert scheduler.poll(node, 0) == [protocol.Command(protocol.CMD_REREGISTER)]
    other = scheduler.register_node(dict(NODE_INFO))
    [again], _ = scheduler.exchange(other, 0, [], 1, 0)
    assert again[2] == 1 and again[0] != lease[0]


def test_cancel_of_jobs_touches_only_queued_ones():
    scheduler, client, node = make()
    scheduler.submit(client, [spec(1, 3), spec(2, 2)])
    [lease], _ = scheduler.exchange(node, 0, [], 1, 0)
    assert scheduler.cancel(client, [(1, [1])]) == [(1, [])]  # leased: maybe running
    assert scheduler.cancel(client, [(2, [0]), (9, None)]) == [(2, [0]), (9, [])]
    assert scheduler.cancel(client, [(2, None)]) == [(2, [1])]
    assert scheduler.exchange(node, 1, [], 5, 0) == ([], ())
    status = scheduler.status()
    assert status["queued_chunks"] == 0 and status["clients"][0]["queued"] == 0


def test_cancel_of_a_leased_chunk_revokes_it_and_drops_late_results():
    scheduler, client, node = make()
    scheduler.submit(client, [spec(1, 4)])
    [lease], _ = scheduler.exchange(node, 0, [], 1, 0)
    scheduler.exchange(node, 0, [report(lease, 0, 1)], 0, 0)
    assert scheduler.cancel(client, [(1, None)]) == [(1, [1, 2, 3])]
    # The process hears about it with its next exchange; its late report is dropped.
    assert scheduler.exchange(node, 0, [report(lease, 1, 3)], 0, 0) == ([], (lease[0],))
    assert [d[1] for d in fetch(scheduler, client)] == [range(0, 1)]
    assert scheduler.status()["clients"][0]["running"] == 0


def test_kill_queued_job_cancels_it_and_running_job_commands_its_node():
    scheduler, client, node = make()
    scheduler.submit(client, [spec(1, 3), spec(2, 2)])
    [lease], _ = scheduler.exchange(node, 1, [], 1, 0)
    assert lease[2] == 1
    assert scheduler.kill(client, 2, 1) == "cancelled"
    assert scheduler.kill(client, 1, 2) == "killing"
    assert scheduler.poll(node, 0) == [(protocol.CMD_KILL, 1, lease[0], 2)]
    # The node kills the process when it reaches that job and reports it.
    scheduler.exchange(node, 1, [report(lease, 0, 2)], 0, 0)
    scheduler.process_ended(node, 1, lease[0], 2, protocol.END_KILLED, "killed by signal SIGKILL")
    deliveries = fetch(scheduler, client)
    assert deliveries[-1][:2] == (1, (2,))
    assert deliveries[-1][3][0] == protocol.FAIL_CANCELLED
    assert scheduler.kill(client, 1, 0) == "unknown"  # done


def test_dropped_client_revokes_its_leases_and_frees_blobs():
    scheduler, client, node = make()
    scheduler.submit(client, [spec(1, 2), spec(2, 2)])
    [lease], _ = scheduler.exchange(node, 0, [], 1, 0)
    scheduler.close_client(client)
    assert scheduler.exchange(node, 0, [report(lease, 0, 2)], 1, 0) == ([], (lease[0],))
    with pytest.raises(MinicwError, match="holds no blob"):
        scheduler.get_blob("fn")
    with pytest.raises(SessionExpiredError, match="does not know client"):
        fetch(scheduler, client)


def test_close_wakes_waiters_and_refuses_work():
    scheduler, client, node = make()
    scheduler.close()
    assert scheduler.exchange(node, 0, [], 1, 5) is None
    assert scheduler.poll(node, 5) == [protocol.Command(protocol.CMD_SHUTDOWN)]
    with pytest.raises(ClusterShutdownError):
        scheduler.submit(client, [spec(1, 1)])
    assert scheduler.wait_nodes_told(0.1)


def _waiting_exchange(scheduler, node, slot, want, replies):
    """Start a process's blocking exchange in a thread, as a connection thread runs it;
    returns once the scheduler has it queued as a waiter."""
    before = len(scheduler._waiting)
    thread = threading.Thread(target=lambda: replies.__setitem__(
        slot, scheduler.exchange(node, slot, [], want, 10)))
    thread.start()
    deadline = time.monotonic() + 5
    while len(scheduler._waiting) == before:
        assert time.monotonic() < deadline, "the exchange never started waiting"
        time.sleep(0.001)
    return thread


def test_waiting_processes_get_new_work_before_a_returning_one():
    # Two idle processes wait; a third asks (without waiting) right after the
    # submit.  The waiters were first: each gets its share before the newcomer.
    scheduler = Blocking(Scheduler(10.0))
    client = scheduler.open_client({"hostname": "c", "pid": 2})
    scheduler.put_blobs(client, [("fn", b"blob")])
    node = scheduler.register_node(dict(NODE_INFO, nprocs=3))
    replies = {}
    threads = [_waiting_exchange(scheduler, node, slot, 16, replies) for slot in (0, 1)]
    scheduler.submit(client, [spec(i, 1) for i in range(1, 4)])
    late_leases, _ = scheduler.exchange(node, 2, [], 16, 0)
    for thread in threads:
        thread.join(5)
    leased = {slot: [lease[2] for lease in replies[slot][0]] for slot in (0, 1)}
    assert leased == {0: [1], 1: [2]}          # oldest waiter first, a fair share each
    assert [lease[2] for lease in late_leases] == [3]
    assert scheduler._waiting == type(scheduler._waiting)()


def test_a_waiter_whose_node_is_dropped_gets_none_and_its_work_stays_queued():
    scheduler, client, node = make()
    replies = {}
    thread = _waiting_exchange(scheduler, node, 0, 1, replies)
    scheduler.unregister_node(node)
    thread.join(5)
    assert replies[0] is None
    assert len(scheduler._waiting) == 0
    scheduler.submit(client, [spec(1, 2)])
    other = scheduler.register_node(dict(NODE_INFO))
    [lease], _ = scheduler.exchange(other, 0, [], 1, 0)
    assert lease[2] == 1 and list(lease[5]) == [0, 1]


def test_unknown_function_blob_is_refused():
    scheduler, client, node = make()
    with pytest.raises(Exception, match="function blobs the master does not hold: nope"):
        scheduler.submit(client, [protocol.ChunkSpec(1, ("nope",), 1, b"", None, 2, None)])


def test_an_unacknowledged_fetch_is_sent_again():
    scheduler, client, node = make()
    scheduler.submit(client, [spec(1, 1), spec(2, 1)])
    [first], _ = scheduler.exchange(node, 0, [], 1, 0)
    [second], _ = scheduler.exchange(node, 1, [], 1, 0)
    leases = [first, second]
    scheduler.exchange(node, 0, [report(first, 0, 1)], 0, 0)
    last, lost = scheduler.fetch(client, 0, 0)   # the reply never reached the client
    assert [d[0] for d in lost] == [first[2]]
    scheduler.exchange(node, 1, [report(second, 0, 1)], 0, 0)
    again_last, again = scheduler.fetch(client, 0, 0)
    assert [d[0] for d in again] == [leases[0][2], leases[1][2]]
    assert scheduler.fetch(client, 0, again_last) == (again_last, [])


def test_a_cancelled_wait_takes_nothing_from_the_next_call():
    # A node's heartbeat and a client's fetch wait; their callers go away
    # (cancel_wait).  The kill command and the delivery that come next stay
    # for the next poll and fetch, and nobody is answered for the old calls.
    scheduler, client, node = make()
    answered = []
    poll = scheduler.scheduler.poll(node, 10, answered.append)
    fetch = scheduler.scheduler.fetch(client, 10, 0, answered.append)
    scheduler.cancel_wait(poll)
    scheduler.cancel_wait(fetch)
    scheduler.submit(client, [spec(1, 2)])
    [lease], _ = scheduler.exchange(node, 0, [], 1, 0)
    assert scheduler.kill(client, 1, 1) == "killing"
    scheduler.exchange(node, 0, [report(lease, 0, 1)], 0, 0)
    assert answered == []
    assert scheduler.poll(node, 0) == [(protocol.CMD_KILL, 0, lease[0], 1)]
    last, deliveries = scheduler.fetch(client, 0, 0)
    assert [d[0] for d in deliveries] == [1]


def test_chunks_that_no_nodes_python_runs_fail_after_the_grace_period(monkeypatch):
    monkeypatch.setenv("MINICW_PYTHON_GRACE_S", "0")
    scheduler = Blocking(Scheduler(10.0))
    client = scheduler.open_client({"hostname": "c", "pid": 2, "python_tag": "CPython 3.99"})
    scheduler.put_blobs(client, [("fn", b"blob")])
    node = scheduler.register_node(dict(NODE_INFO, python="CPython 3.11.7",
                                        python_tag="CPython 3.11"))
    bytecode = protocol.ChunkSpec(1, ("fn",), 2, b"p", None, 2, None, "CPython 3.99")
    portable = protocol.ChunkSpec(2, ("fn",), 1, b"p", None, 2, None, None)
    scheduler.submit(client, [bytecode, portable])
    [lease], _ = scheduler.exchange(node, 0, [], 16, 0)   # only the portable chunk
    assert lease[2] == 2
    scheduler.expire()                 # starts the grace period
    scheduler.expire()                 # ends it: the bytecode chunk fails
    [failed] = fetch(scheduler, client)
    assert failed[0] == 1 and list(failed[1]) == [0, 1]
    assert failed[3][0] == protocol.FAIL_NO_PYTHON
    assert failed[3][1] == ("CPython 3.99", ["CPython 3.11.7"])
    assert scheduler.status()["clients"][0]["failed"] == 2


def test_status_counts_failures_reported_and_keeps_the_recent_ones():
    scheduler, client, node = make()
    scheduler.submit(client, [spec(1, 4)])
    [lease], _ = scheduler.exchange(node, 0, [], 1, 0)
    failures = (2, [(1, "ValueError", "bad 1", "Traceback ...\nValueError: bad 1\n"),
                    (3, "KeyError", "'x'", "Traceback ...\nKeyError: 'x'\n")])
    scheduler.exchange(node, 0, [report(lease, 0, 4, failures=failures)], 0, 0)
    status = scheduler.status()
    [mine] = status["clients"]
    assert (mine["done"], mine["failed"]) == (2, 2)
    [record] = status["nodes"]
    assert (record.jobs_done, record.jobs_failed) == (2, 2) and record.seen_s_ago < 5
    assert (status["jobs_done"], status["jobs_failed"]) == (2, 2)
    assert status["throughput_1m"] == 4.0   # over the master's first second, not a minute
    newest, older = status["recent_failures"]
    assert (newest["job"], newest["kind"], newest["error"]) == ("1/3", "raised", "KeyError: 'x'")
    assert older["error"] == "ValueError: bad 1" and "ValueError: bad 1" in older["traceback"]
    series = scheduler.throughput_series(60, 10)
    assert len(series) == 6 and series[-1] == (10, 0.4) and sum(r for _, r in series) == 0.4
