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

A large message is the exception to "only the loop reads": a frame of
LARGE_FRAME bytes or more is read by a thread of its own (_FrameReader),
straight into the objects it carries, and posted back as a request; the
loop meanwhile serves everyone else.  Replies go out as the pickler's parts,
so a large result is sent as the object the Scheduler holds, never copied.

One selector serves every connection: DefaultSelector is epoll or kqueue on
Linux and macOS; on Windows it is select(), which CPython limits to 512
sockets, so a Windows master serves about 250 worker processes.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import logging
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
from collections import deque
import pickle

from minicw import config
from minicw.errors import InvalidCallError
from minicw.protocol import PICKLE_PROTOCOL
from minicw.waiting import Failure, Waiter

log = logging.getLogger(__name__)

READ_SIZE = 1 << 18          # bytes one recv_into() may take (the loop's read buffer)
MAX_SELECT_S = 60.0          # the loop looks at its deadlines at least this often
STALE_DEADLINES = 1024       # answered calls' deadlines kept before the heap is pruned
WINDOWS_MAX_CHANNELS = 500   # select() on Windows takes at most 512 sockets
SMALL_FRAME = 1 << 16        # header and body of a frame this small go in one send()
LARGE_FRAME = 1 << 22        # a frame this big is read by a thread of its own (_FrameReader)
MESSAGE_ENVELOPE_BYTES = 1 << 20   # a frame may hold config.max_message_bytes() plus this
READER_POLL_S = 0.5          # a frame's reader looks this often whether its channel was dropped
# A non-blocking socket that cannot go on now; over TLS, also a record not complete
# yet (want read) or a send that must be retried with the same bytes (want write).
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")


class _Parts:
    """A file for the pickler: what it writes is kept in a list, not joined.
    The C pickler hands a bytes object of 64 KB or more to ``write`` itself
    instead of copying it into its buffer, so a large result or blob goes
    out of the master as the very object the scheduler holds."""

    __slots__ = ("write",)


def frame(obj) -> list:
    """``obj`` pickled and framed as ``Connection.send`` would: [header, body parts...].
    (Plain pickle: a reply holds no object that needs multiprocessing's reducers.)"""
    parts = []
    sink = _Parts()
    sink.write = parts.append
    pickle.Pickler(sink, PICKLE_PROTOCOL).dump(obj)
    if len(parts) == 1:
        body = parts[0]
        if len(body) <= SMALL_FRAME:
            return [_header(len(body)) + body]
        return [_header(len(body)), body]
    return [_header(sum(len(part) for part in parts))] + parts


def _header(size: int) -> bytes:
    if size > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _LONG_HEADER.pack(size)
    return _HEADER.pack(size)


def take_frames(buffer: bytearray) -> list:
    """Remove and return the complete frames at the start of ``buffer``."""
    frames = []
    offset = 0
    end = len(buffer)
    while True:
        announced = _announced(buffer, offset)
        if announced is None:
            break
        size, header_size = announced
        if size < 0:
            raise ValueError("bad frame length %d" % size)
        start = offset + header_size
        if end - start < size:
            break
        with memoryview(buffer) as view:   # one copy of the body, not two
            frames.append(bytes(view[start:start + size]))
        offset = start + size
    if offset:
        del buffer[:offset]
    return frames


def _announced(buffer: bytearray, offset: int = 0):
    """``(body size, header size)`` of the frame starting at ``offset`` in
    ``buffer``, or None while its header is incomplete."""
    if len(buffer) - offset < 4:
        return None
    size = _HEADER.unpack_from(buffer, offset)[0]
    if size != -1:
        return size, 4
    if len(buffer) - offset < 12:
        return None
    return _LONG_HEADER.unpack_from(buffer, offset + 4)[0], 12


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

    __slots__ = ("sock", "peer", "api", "read_into", "write", "pending", "inbox", "outbox",
                 "events", "reading_elsewhere", "waiter", "on_reply", "backlog", "closed")

    def __init__(self, sock: socket.socket, peer: str, api):
        self.sock = sock
        self.peer = peer
        self.api = api                # the role API object its proxy was made for
        tls_object = getattr(sock, "_sslobj", None)
        if tls_object is None:
            self.read_into, self.write, self.pending = sock.recv_into, sock.send, None
        else:
            # Over TLS, the C object's own read and write: SSLSocket's Python
            # layers around them cost more than the cryptography of a small
            # message.  Both raise where SSLSocket's do (want-read or -write,
            # an OSError for a lost link); a peer's close_notify reads 0.
            self.read_into = functools.partial(tls_object.read, READ_SIZE)
            self.write, self.pending = tls_object.write, tls_object.pending
        self.inbox = bytearray()      # bytes received, not yet a whole frame
        self.outbox = deque()         # bytes (or memoryviews) still to send
        self.events = 0               # what the selector watches for (Reactor._watch)
        self.reading_elsewhere = False  # a _FrameReader thread owns its reading side
        self.waiter = None            # the Scheduler Waiter of its call that waits
        self.on_reply = None          # what settles that call
        self.backlog = deque()        # requests that came while a call waited, in order
        self.closed = False


class _Received:
    """What a _FrameReader thread posts to the loop: the request it read, or
    why the connection must be dropped."""

    __slots__ = ("request", "error")

    def __init__(self, request, error: BaseException | None = None):
        self.request = request
        self.error = error


class _Refused:
    """A request read and thrown away (it was over the size limit): its reply is ``error``."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class _FrameReader:
    """The body of one large frame, read from its peer's socket by a thread of
    its own while the loop serves everybody else.

    The unpickler reads each large bytes object with ``readinto`` straight
    into the object it builds: a 600 MB result costs the master its 600 MB
    once, and the loop none of the copying.  The socket stays non-blocking
    (the loop may be writing a reply on it); this thread waits on a selector
    of its own, and gives up after ``stall_s`` without a byte, or when the
    loop has dropped the channel.
    """

    def __init__(self, channel: "_Channel", size: int, prefix: bytes, stall_s: float):
        self._channel = channel
        self._left = size                    # bytes of the frame not handed out yet
        self._prefix = memoryview(prefix)    # what the loop had read of it already
        self._stall_s = stall_s
        self._selector = None

    def readinto(self, buffer) -> int:
        with memoryview(buffer) as view, view.cast("B") as out:
            wanted = min(len(out), self._left)
            got = min(wanted, len(self._prefix))
            if got:
                out[:got] = self._prefix[:got]
                self._prefix = self._prefix[got:]
            sock = self._channel.sock
            while got < wanted:
                try:
                    count = sock.recv_into(out[got:wanted])
                except _WOULD_BLOCK:
                    self._wait()
                    continue
                if not count:
                    raise EOFError("the connection closed in the middle of a message")
                got += count
        self._left -= got
        return got

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self._left:
            size = self._left
        buffer = bytearray(size)
        self.readinto(buffer)
        return bytes(buffer)

    def readline(self) -> bytes:   # only text-mode pickle opcodes read lines
        line = bytearray()
        while self._left and not line.endswith(b"\n"):
            line += self.read(1)
        return bytes(line)

    def finish(self) -> None:
        if self._left:
            raise ValueError("%d bytes of a message were left after its pickle" % self._left)

    def discard(self) -> None:
        """Read the rest of the frame and keep none of it."""
        scratch = memoryview(bytearray(min(self._left, READ_SIZE) or 1))
        while self._left:
            self.readinto(scratch[:min(len(scratch), self._left)])

    def close(self) -> None:
        if self._selector is not None:
            self._selector.close()

    def _wait(self) -> None:
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._channel.sock, selectors.EVENT_READ)
        deadline = time.monotonic() + self._stall_s
        while not self._selector.select(READER_POLL_S):
            if self._channel.closed:
                raise ConnectionError("the connection was dropped")
            if time.monotonic() > deadline:
                raise TimeoutError("the peer sent nothing for %gs in the middle of a message"
                                   % self._stall_s)


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
        self._max_frame = config.max_message_bytes() + MESSAGE_ENVELOPE_BYTES
        # A peer that stops sending in the middle of a large message is given
        # as long as a silent link (config.link_timeout_s), from the master's side.
        self._stall_s = max(config.MIN_LINK_TIMEOUT_S, 2 * scheduler.heartbeat_timeout_s)
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
        take_socket = getattr(conn, "take_socket", None)
        if take_socket is not None:   # over TLS: the SSLSocket itself (tls.TlsConnection)
            sock, already_read = take_socket()
        else:
            sock = socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM)
            already_read = b""
            conn.close()
        sock.setblocking(False)
        if not self._post(None, (sock, request, api, already_read)):
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
                elif isinstance(item, _Received):
                    channel.reading_elsewhere = False
                    if channel.closed:
                        channel.sock.close()
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
                if type(item) is _Received:
                    self._received(channel, item)
                else:
                    self._answer(channel, item)
            elif isinstance(item, threading.Event):
                item.set()   # flush(): everything posted before it is handled
            else:
                self._add(*item)

    def _add(self, sock: socket.socket, request, api, already_read: bytes) -> None:
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
        self._watch(channel)
        self._handle(channel, request)
        if already_read:   # what a TLS connection had read past its first request
            self._receive_bytes(channel, memoryview(already_read))

    def _receive(self, channel: _Channel) -> None:
        self._receive_once(channel)
        pending = channel.pending
        # Over TLS, bytes already decrypted raise no event: take them now.
        while pending is not None and not channel.closed and not channel.reading_elsewhere \
                and pending():
            self._receive_once(channel)

    def _receive_once(self, channel: _Channel) -> None:
        try:
            size = channel.read_into(self._read_view)
        except _WOULD_BLOCK:
            return
        except OSError:
            size = 0
        if not size:
            self._drop(channel)
            return
        self._receive_bytes(channel, self._read_view[:size])

    def _receive_bytes(self, channel: _Channel, data: memoryview) -> None:
        try:
            # The frames may be views of the read buffer: each is unpickled
            # below, before the loop reads again.
            frames = _frames(channel.inbox, data)
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
        if channel.inbox and not channel.closed:
            self._large_frame(channel)

    def _large_frame(self, channel: _Channel) -> None:
        """A frame still arriving: a large one goes to a thread of its own, which
        reads it straight into the objects it holds; one over the size limit is
        read and thrown away, and its call refused."""
        announced = _announced(channel.inbox)
        if announced is None or announced[0] < LARGE_FRAME:
            return
        size, header_size = announced
        reader = _FrameReader(channel, size, bytes(channel.inbox[header_size:]), self._stall_s)
        channel.inbox = bytearray()
        channel.reading_elsewhere = True
        self._watch(channel)
        try:
            threading.Thread(target=self._read_frame, args=(channel, reader, size),
                             name="minicw-large-message", daemon=True).start()
        except RuntimeError as exc:   # no thread to be had: the peer will call again
            log.error("dropped the connection from %s: no thread to read its message of %d "
                      "bytes (%s)", channel.peer, size, exc)
            channel.reading_elsewhere = False
            self._drop(channel)

    def _read_frame(self, channel: _Channel, reader: _FrameReader, size: int) -> None:
        """A _FrameReader's thread: read one frame, then hand it to the loop."""
        try:
            if size <= self._max_frame:
                received = _Received(pickle.Unpickler(reader).load())
                reader.finish()
            else:
                reader.discard()
                received = _Received(_Refused(InvalidCallError(
                    "a message of %d bytes is over the master's limit of %d bytes for one "
                    "payload, result or blob (%s), plus %d for the call itself"
                    % (size, self._max_frame - MESSAGE_ENVELOPE_BYTES,
                       config.ENV_MAX_MESSAGE_BYTES, MESSAGE_ENVELOPE_BYTES))))
        except Exception as exc:
            received = _Received(None, exc)
        finally:
            reader.close()
        if not self._post(channel, received):
            channel.sock.close()   # the loop has ended and left this socket to its reader

    def _received(self, channel: _Channel, received: _Received) -> None:
        """A _FrameReader's frame, back in the loop."""
        channel.reading_elsewhere = False
        if channel.closed:
            channel.sock.close()   # _drop left the close to the reader
            return
        if received.error is not None:
            log.warning("dropped the connection from %s: %s", channel.peer, received.error)
            self._drop(channel)
            return
        self._watch(channel)
        if channel.outbox:
            self._flush(channel)
        self._handle(channel, received.request)

    def _handle(self, channel: _Channel, request) -> None:
        if channel.waiter is not None:
            # Calls on one connection are answered in order, as the manager's
            # own server does: a request that comes while a call waits (its
            # caller gave up on that one) waits its turn.
            channel.backlog.append(request)
            return
        if type(request) is _Refused:
            self._send(channel, ("#ERROR", request.error))
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
        if was_empty and not channel.reading_elsewhere:
            self._flush(channel)

    def _flush(self, channel: _Channel) -> None:
        outbox = channel.outbox
        try:
            while outbox:
                data = outbox[0]
                sent = channel.write(data)
                if sent < len(data):
                    outbox[0] = memoryview(data)[sent:]
                    break
                outbox.popleft()
        except _WOULD_BLOCK:
            pass
        except OSError:
            self._drop(channel)
            return
        if bool(outbox) != bool(channel.events & selectors.EVENT_WRITE):
            self._watch(channel)

    def _watch(self, channel: _Channel) -> None:
        """Have the selector watch ``channel`` for reading and for writing (while
        its outbox holds bytes), unless a _FrameReader thread reads it: then for
        neither, since a TLS connection must not be read and written at once."""
        if channel.reading_elsewhere:
            events = 0
        else:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if channel.outbox else 0)
        if events == channel.events:
            return
        if not channel.events:
            self._selector.register(channel.sock, events, channel)
        elif not events:
            self._selector.unregister(channel.sock)
        else:
            self._selector.modify(channel.sock, events, channel)
        channel.events = events

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
        if channel.events:
            self._selector.unregister(channel.sock)
            channel.events = 0
        if channel.reading_elsewhere:
            # Its reader thread is inside recv(): wake it, and leave the close
            # to _received, so that no other socket can take this descriptor
            # while that thread still reads it.
            try:
                channel.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        else:
            channel.sock.close()
