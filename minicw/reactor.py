"""The master's event loop: one thread serves every proxy connection.

Under the manager's own model every connection has a thread, and a call
that waits (a worker process waiting for work, a client waiting for
results, a node's heartbeat) parks that thread on a condition.  With 200
nodes that is 400 threads, and every job handed out wakes one of them and
passes the GIL around; the master then spent more time switching threads
than the jobs took.  Here the thread that authenticated a connection
(transport._Server) hands it over after reading its first request, and one
loop serves them all:

    peer (any role)                      master
    ---------------                      ------
    proxy.method(...) --frame-->  selector --> _Channel.inbox --> api.method(...), or for a
                                                               call that waits,
                                                               api.method(on_reply, ...)
                      <--frame--  _Channel.outbox <-- reply <------+          |
                                       ^                                  a Waiter
                                       |                                      |
              the loop itself, or post() from another thread        settled by the state
              (the reaper, a shutdown), answers a Waiter            change that ends it, or
                                                                    by end_wait at its deadline

Frames are the ``multiprocessing.connection`` wire format (a 4-byte
big-endian length, or -1 and an 8-byte length; then a pickle), so the
peers' ordinary manager proxies talk to this loop exactly as they would to
``Server.serve_client``; replies are ``('#RETURN', value)`` or
``('#ERROR', exception)``.  Sockets are non-blocking: a peer that stops
reading (a stopped process, a slow link) holds only its own bytes in
``outbox``, never the loop.  Only the loop thread reads, writes or closes a
channel's socket; other threads reach it through ``_post``.  Calls on one
connection are answered in order (a request that comes while a call waits
waits in ``backlog``).  Answers the loop settles while it handles a request
go out after that request's own reply, so a client's submit is answered
before the leases it handed out.

One selector serves every connection: DefaultSelector is epoll or kqueue on
Linux and macOS; on Windows it is select(), which CPython limits to 512
sockets, so a Windows master serves about 250 worker processes.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque
import pickle

from minicw.protocol import PICKLE_PROTOCOL
from minicw.waiting import Failure, Waiter

log = logging.getLogger(__name__)

READ_SIZE = 1 << 18          # bytes one recv_into() may take (the loop's read buffer)
MAX_SELECT_S = 60.0          # the loop looks at its deadlines at least this often
STALE_DEADLINES = 1024       # answered calls' deadlines kept before the heap is pruned
WINDOWS_MAX_CHANNELS = 500   # select() on Windows takes at most 512 sockets
SMALL_FRAME = 1 << 16        # header and body of a frame this small go in one send()
_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")
_LONG_HEADER_LE = struct.Struct("<Q")   # pickle's BINBYTES8 length


def frame(obj) -> list:
    """``obj`` pickled and framed as ``Connection.send`` would: [header, body...].
    (Plain pickle: a reply holds no object that needs multiprocessing's reducers.)"""
    if type(obj) is tuple and len(obj) == 2 and type(obj[1]) is bytes \
            and len(obj[1]) > SMALL_FRAME and obj[0] == "#RETURN":
        return _bytes_reply_frame(obj[1])
    body = pickle.dumps(obj, PICKLE_PROTOCOL)
    header = _header(len(body))
    if len(body) <= SMALL_FRAME:
        return [header + body]
    return [header, body]


def _header(size: int) -> bytes:
    if size > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _LONG_HEADER.pack(size)
    return _HEADER.pack(size)


# ('#RETURN', <bytes>) spelled in pickle opcodes: PROTO 5, SHORT_BINUNICODE
# '#RETURN', BINBYTES8 <length> ... then TUPLE2 and STOP after the bytes.
_BYTES_REPLY_HEAD = b"\x80\x05\x8c\x07#RETURN\x8e"
_BYTES_REPLY_TAIL = b"\x86."


def _bytes_reply_frame(data: bytes) -> list:
    """The frame of ``('#RETURN', data)`` around ``data`` itself, not a copy: a
    large blob (broadcast data, an environment) costs the loop no pickling."""
    head = _BYTES_REPLY_HEAD + _LONG_HEADER_LE.pack(len(data))
    size = len(head) + len(data) + len(_BYTES_REPLY_TAIL)
    return [_header(size) + head, memoryview(data), _BYTES_REPLY_TAIL]


def take_frames(buffer: bytearray) -> list:
    """Remove and return the complete frames at the start of ``buffer``."""
    frames = []
    offset = 0
    end = len(buffer)
    while end - offset >= 4:
        size = _HEADER.unpack_from(buffer, offset)[0]
        start = offset + 4
        if size == -1:
            if end - offset < 12:
                break
            size = _LONG_HEADER.unpack_from(buffer, start)[0]
            start += 8
        elif size < 0:
            raise ValueError("bad frame length %d" % size)
        if end - start < size:
            break
        with memoryview(buffer) as view:   # one copy of the body, not two
            frames.append(bytes(view[start:start + size]))
        offset = start + size
    if offset:
        del buffer[:offset]
    return frames


def _message(reply) -> tuple:
    if isinstance(reply, Failure):
        return ("#ERROR", reply.error)
    return ("#RETURN", reply)


def _frames(inbox: bytearray, data: memoryview) -> list:
    """The whole frames of what came in: ``inbox`` (kept between reads) then ``data``."""
    if not inbox and len(data) > 4 and _HEADER.unpack_from(data)[0] == len(data) - 4:
        return [data[4:]]   # the common case: exactly one whole frame
    inbox += data
    return take_frames(inbox)


class _Channel:
    """One peer's connection, as the loop sees it."""

    __slots__ = ("sock", "peer", "api", "inbox", "outbox", "writing", "waiter", "on_reply",
                 "backlog", "closed")

    def __init__(self, sock: socket.socket, peer: str, api):
        self.sock = sock
        self.peer = peer
        self.api = api                # the role API object its proxy was made for
        self.inbox = bytearray()      # bytes received, not yet a whole frame
        self.outbox = deque()         # bytes (or memoryviews) still to send
        self.writing = False          # registered for EVENT_WRITE (outbox not empty)
        self.waiter = None            # the Scheduler Waiter of its call that waits
        self.on_reply = None          # what settles that call
        self.backlog = deque()        # requests that came while a call waited, in order
        self.closed = False


class Reactor:
    """Serves the calls of every adopted connection in one thread."""

    def __init__(self, scheduler, calls: dict):
        self._scheduler = scheduler
        self._calls = calls   # {id(api): {name: (bound method, waits)}}: the wire contract
                              # (server.call_table); a call that waits takes on_reply first
        self._selector = selectors.DefaultSelector()
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self._selector.register(self._wake_recv, selectors.EVENT_READ, None)
        self._posted = []                      # (channel or None, reply or (sock, request))
        self._post_lock = threading.Lock()
        self._wake_sent = False
        self._deadlines = []                   # heap of (deadline, seq, channel, waiter)
        self._live_waits = 0                   # channels whose call waits
        self._seq = itertools.count()
        self._channels = set()
        self._settled = []                     # (channel, reply) settled by the loop itself,
                                               # answered after the request that settled them
        self._closing = False
        self._ended = False                    # the loop has returned: nothing is posted
        self._thread = threading.Thread(target=self._run, name="minicw-reactor", daemon=True)
        self._loop_ident = None
        # One buffer for every read, not a new bytes object per recv(): a
        # READ_SIZE allocation is an mmap, a shrink and an munmap each time.
        self._read_view = memoryview(bytearray(READ_SIZE))

    def start(self) -> None:
        self._thread.start()

    def adopt(self, conn, request, api) -> None:
        """Take over ``conn`` (a served manager connection for ``api``) whose
        first request, already received, is ``request``.  Called from the
        connection's thread."""
        sock = socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        conn.close()
        sock.setblocking(False)
        if not self._post(None, (sock, request, api)):
            sock.close()  # the loop has ended (the master shut down): the peer sees EOF

    def flush(self, timeout_s: float) -> bool:
        """Wait until the loop has handled every reply posted before this call
        (written into its socket, or queued for a peer that is not reading);
        False after ``timeout_s``."""
        sent = threading.Event()
        return self._post(None, sent) and sent.wait(timeout_s)

    def close(self) -> None:
        """Stop once the last connection has gone (peers leave on their own
        after the master closes: it answers their next call with the news)."""
        self._closing = True
        self._wake()

    # --- other threads -> the loop ---------------------------------------------------------

    def _post(self, channel, item) -> bool:
        """Hand ``item`` to the loop; False when the loop has ended."""
        with self._post_lock:
            if self._ended:
                return False
            self._posted.append((channel, item))
            if self._wake_sent:
                return True
            self._wake_sent = True
        self._wake()
        return True

    def _wake(self) -> None:
        try:
            self._wake_send.send(b"\0")
        except OSError:  # the loop has gone, or its pipe is full (it is awake then)
            pass

    def _replier(self, channel):
        """The ``on_reply`` of a channel's waiting call."""
        def on_reply(reply):
            if threading.get_ident() == self._loop_ident:
                self._settled.append((channel, reply))
            else:
                self._post(channel, reply)
        return on_reply

    # --- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        self._loop_ident = threading.get_ident()
        try:
            while not (self._closing and not self._channels):
                for key, events in self._selector.select(self._timeout()):
                    channel = key.data
                    if channel is None:
                        self._take_posted()
                        continue
                    try:
                        if events & selectors.EVENT_WRITE:
                            self._flush(channel)
                        if events & selectors.EVENT_READ and not channel.closed:
                            self._receive(channel)
                    except Exception:  # a bug met by one peer must not stop the master
                        log.exception("dropped the connection from %s after an error",
                                      channel.peer)
                        self._drop(channel)
                self._expire_waits()
                self._answer_settled()
        except Exception:  # pragma: no cover - a bug here must not pass silently
            log.exception("the master's event loop failed")
        finally:
            with self._post_lock:
                self._ended = True
                posted, self._posted = self._posted, []
            for channel, item in posted:
                if channel is None and isinstance(item, tuple):
                    item[0].close()   # adopted too late
            for channel in list(self._channels):
                self._drop(channel)
            self._selector.close()
            self._wake_recv.close()
            self._wake_send.close()

    def _timeout(self) -> float:
        if not self._deadlines:
            return MAX_SELECT_S
        return min(MAX_SELECT_S, max(0.0, self._deadlines[0][0] - time.monotonic()))

    def _take_posted(self) -> None:
        try:
            while self._wake_recv.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._post_lock:
            posted, self._posted = self._posted, []
            self._wake_sent = False
        for channel, item in posted:
            if channel is not None:
                self._answer(channel, item)
            elif isinstance(item, threading.Event):
                item.set()   # flush(): everything posted before it is handled
            else:
                self._add(*item)

    def _add(self, sock: socket.socket, request, api) -> None:
        try:
            peer = "%s:%s" % sock.getpeername()[:2]
        except OSError:
            peer = "?"
        if sys.platform == "win32" and len(self._channels) >= WINDOWS_MAX_CHANNELS:
            log.error("refused the connection from %s: a master on Windows serves at most %d "
                      "connections (select() limit); run the master on Linux or macOS for "
                      "more worker processes", peer, WINDOWS_MAX_CHANNELS)
            sock.close()
            return
        channel = _Channel(sock, peer, api)
        channel.on_reply = self._replier(channel)
        self._channels.add(channel)
        self._selector.register(sock, selectors.EVENT_READ, channel)
        self._handle(channel, request)

    def _receive(self, channel: _Channel) -> None:
        try:
            size = channel.sock.recv_into(self._read_view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            size = 0
        if not size:
            self._drop(channel)
            return
        try:
            # The frames may be views of the read buffer: each is unpickled
            # below, before the loop reads again.
            frames = _frames(channel.inbox, self._read_view[:size])
        except ValueError as exc:
            log.warning("dropped the connection from %s: %s", channel.peer, exc)
            self._drop(channel)
            return
        for body in frames:
            if channel.closed:
                return
            try:
                request = pickle.loads(body)
            except Exception as exc:
                log.warning("dropped the connection from %s: unreadable request (%s)",
                            channel.peer, exc)
                self._drop(channel)
                return
            self._handle(channel, request)

    def _handle(self, channel: _Channel, request) -> None:
        if channel.waiter is not None:
            # Calls on one connection are answered in order, as the manager's
            # own server does: a request that comes while a call waits (its
            # caller gave up on that one) waits its turn.
            channel.backlog.append(request)
            return
        try:
            _, method, args, kwds = request
            call, waits = self._method(channel.api, method)
            if waits:
                reply = call(channel.on_reply, *args, **kwds)
            else:
                reply = call(*args, **kwds)
        except Exception as exc:
            self._send(channel, ("#ERROR", exc))
            return
        if isinstance(reply, Waiter):
            channel.waiter = reply
            self._live_waits += 1
            self._add_deadline(channel, reply)
        else:
            self._send(channel, _message(reply))
        # The caller first: a client's submit is answered before the leases it
        # handed out, so the client goes on packing while processes get work.
        self._answer_settled()

    def _answer_settled(self) -> None:
        settled = self._settled
        while settled:
            batch = settled[:]
            settled.clear()
            for channel, reply in batch:
                self._answer(channel, reply)

    def _method(self, api, method) -> tuple:
        """``(bound method, whether the call waits)`` of the contract's call ``method``."""
        try:
            return self._calls[id(api)][method]
        except (KeyError, TypeError):
            raise AttributeError("the master has no method %r for this connection"
                                 % (method,)) from None

    def _answer(self, channel: _Channel, reply) -> None:
        """The settled reply of the channel's waiting call."""
        if channel.waiter is None:
            return  # the channel closed meanwhile
        channel.waiter = None
        self._live_waits -= 1
        self._send(channel, _message(reply))
        while channel.backlog and channel.waiter is None and not channel.closed:
            self._handle(channel, channel.backlog.popleft())

    def _add_deadline(self, channel: _Channel, waiter: Waiter) -> None:
        deadlines = self._deadlines
        if len(deadlines) > 2 * self._live_waits + STALE_DEADLINES:
            # Most entries are of calls answered before their deadline: keep the live ones.
            deadlines[:] = [entry for entry in deadlines if entry[2].waiter is entry[3]]
            heapq.heapify(deadlines)
        heapq.heappush(deadlines, (waiter.deadline, next(self._seq), channel, waiter))

    def _expire_waits(self) -> None:
        deadlines = self._deadlines
        now = time.monotonic()
        while deadlines and deadlines[0][0] <= now:
            _, _, channel, waiter = heapq.heappop(deadlines)
            if channel.waiter is waiter:
                self._scheduler.end_wait(waiter)   # replies through _answer, or did already

    # --- sending ---------------------------------------------------------------------------

    def _send(self, channel: _Channel, message) -> None:
        if channel.closed:
            return
        try:
            parts = frame(message)
        except Exception as exc:
            parts = frame(("#ERROR", TypeError("the master could not pickle its reply: %s"
                                               % exc)))
        was_empty = not channel.outbox
        channel.outbox.extend(parts)
        if was_empty:
            self._flush(channel)

    def _flush(self, channel: _Channel) -> None:
        outbox = channel.outbox
        try:
            while outbox:
                data = outbox[0]
                sent = channel.sock.send(data)
                if sent < len(data):
                    outbox[0] = memoryview(data)[sent:]
                    break
                outbox.popleft()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(channel)
            return
        writing = bool(outbox)
        if writing != channel.writing:
            channel.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self._selector.modify(channel.sock, events, channel)

    def _drop(self, channel: _Channel) -> None:
        if channel.closed:
            return
        channel.closed = True
        self._channels.discard(channel)
        waiter, channel.waiter = channel.waiter, None
        if waiter is not None:
            self._scheduler.cancel_wait(waiter)  # nobody to answer: take nothing for it
            self._live_waits -= 1
        channel.inbox = bytearray()
        channel.outbox.clear()
        channel.backlog.clear()
        try:
            self._selector.unregister(channel.sock)
        except (KeyError, ValueError):
            pass
        channel.sock.close()
