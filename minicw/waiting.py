"""Calls that wait in the master, and the lock that answers them.

    a peer's call that may wait            the Scheduler                    the event loop
    (exchange, fetch, poll) --------> answers at once, or returns a  ---> keeps the Waiter with
                                      Waiter kept in its queues           its deadline (reactor.py)
    a state change (submit, report,   takes the Waiter out, queues
    kill, a dropped node, shutdown)   (on_reply, reply) in Transition
                                      .replies; they are passed on once
                                      the lock is released ----------> on_reply(reply): the loop
                                                                       sends it to the peer

A Waiter's reply is passed on exactly once: by the state change that
settles it, by ``Scheduler.end_wait`` at its deadline, or never, when its
caller has gone (``Scheduler.cancel_wait``).  Nothing here touches the network.
"""
from __future__ import annotations


class Waiter:
    """A call that waits in the master: a process's ``exchange`` until work is
    leased to it, a client's ``fetch`` until a delivery, a node's ``poll``
    until a command.

    Its reply goes to ``on_reply`` exactly once, outside the lock: from the
    state change that settles it, or from ``end_wait`` at its deadline.  A
    reply that is an error comes as a ``Failure``.
    """

    __slots__ = ("kind", "owner", "slot", "want", "ack", "deadline", "on_reply")

    def __init__(self, kind, owner, deadline, on_reply, slot=0, want=0, ack=0):
        self.kind = kind            # WAIT_LEASE, WAIT_FETCH or WAIT_POLL
        self.owner = owner          # its NodeState or ClientState
        self.slot = slot            # WAIT_LEASE: the process's slot
        self.want = want            # WAIT_LEASE: chunks asked for
        self.ack = ack              # WAIT_FETCH: the last delivery the client received
        self.deadline = deadline    # time.monotonic() limit of the wait
        self.on_reply = on_reply


WAIT_LEASE, WAIT_FETCH, WAIT_POLL = "lease", "fetch", "poll"


class Failure:
    """The reply of a waiting call that ends in an error."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class Transition:
    """``with scheduler._changing:`` holds the lock for one state change.

    Waiting calls that the change settled are answered on leaving: fetches
    of clients that got deliveries are answered while the lock is still
    held (one reply carries every delivery of the change), then the lock is
    released and the replies are passed on.  A reply may go out on a socket,
    and no thread should wait on the network under the lock.
    """

    __slots__ = ("_lock", "replies", "fed_clients", "_answer_fetches")

    def __init__(self, lock, answer_fetches):
        self._lock = lock
        self.replies = []        # (on_reply, reply)
        self.fed_clients = []    # ClientState with waiting fetches and new deliveries
        self._answer_fetches = answer_fetches

    def __enter__(self):
        self._lock.acquire()

    def __exit__(self, *exc_info):
        if self.fed_clients:
            self._answer_fetches()
        replies = self.replies
        if not replies:
            self._lock.release()
            return
        settled = replies[:]
        replies.clear()
        self._lock.release()
        for on_reply, reply in settled:
            on_reply(reply)
