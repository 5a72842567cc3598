"""Connections to the master: a hardened ``BaseManager`` transport.

Every minicw peer (client, worker node, worker process) talks to the master
through ``multiprocessing.managers`` proxies, over TCP::

    peer process                                   master process
    ------------                                   --------------
    connect()  --TCP connect (timeout)--------->   _Listener.accept()   (accepter thread)
               <--challenge / answer / challenge->   _Server.handle_request()
               (both sides prove the authkey,        (its own thread, under a receive
                under a receive timeout)              timeout, so a silent or garbage
                                                      peer costs one thread briefly)
    proxy.method(args)  --(ident, name, args)--->   _Server.accept_connection reads the
                                                    first call: for an ``adopter`` object
                                                    the connection goes to the master's
                                                    event loop (reactor.py), otherwise to
                                                    Server.serve_client -> api.method
                        <--('#RETURN', value)----   or ('#ERROR', exc): the exception
                                                    keeps its type on the caller side

What differs from the standard library's defaults, and this module is the
only place that knows:

* TCP_NODELAY on both ends.  Manager messages over about 16 KB go out as a
  header and a body; without it Nagle's algorithm meets the peer's delayed ACK
  and every such call waits ~40 ms.
* The authkey handshake runs under a receive timeout on both ends, so a peer
  that connects and says nothing (or garbage) is dropped with a log line
  instead of holding a thread forever, and a client that reached something
  that is not a minicw master fails fast.
* Connection failures become the errors of ``minicw.errors`` that say which
  host and port and what went wrong: unknown host, nothing listening, wrong
  key, silent peer.
* Served connections can be handed to another server loop after their first
  call (``_Server.adopter``), which is how the master serves every proxy from
  one thread.
* Calls on minicw's private proxies are pickled with plain pickle, without
  a Pickler object per message (none of them carries a multiprocessing
  object).
* TLS (tls.py), when the master has a certificate and its peers a CA or a
  fingerprint: the handshake comes first, in the connection's own thread
  under the same deadline, and the authkey challenge then runs inside it.

The transport registers itself in ``multiprocessing.managers.listener_client``
under the serializer name ``"minicw"``; managers created with that name use
it for their listener and for every proxy connection.
"""
from __future__ import annotations

import logging
import pickle
import socket
import ssl
import struct
import sys
import threading
import time
from multiprocessing import connection, managers
from multiprocessing import AuthenticationError

from minicw import config, protocol, tls
from minicw.protocol import PICKLE_PROTOCOL
from minicw.errors import (
    AuthkeyMismatchError, HandshakeTimeoutError, MasterConnectionError,
    MasterHostUnknownError, MasterNotListeningError,
)

log = logging.getLogger(__name__)

SERIALIZER = "minicw"


def as_authkey(key) -> bytes:
    """The authkey as bytes; ``str`` keys are UTF-8 encoded."""
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray)):
        return bytes(key)
    raise TypeError("authkey must be str or bytes, not %s" % type(key).__name__)


def format_address(address) -> str:
    host, port = address
    return "%s:%s" % (host, port)


# --- socket options ---------------------------------------------------------------

def _with_socket(conn: connection.Connection, apply) -> None:
    """Run ``apply(sock)`` on the socket behind ``conn`` without taking ownership."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        apply(sock)
    finally:
        sock.detach()


def _set_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    # SO_RCVTIMEO / SO_SNDTIMEO make a blocking read / write give up;
    # Connection's plain reads and writes then raise an OSError.  Zero is
    # "wait forever".
    if sys.platform == "win32":  # a DWORD of milliseconds there, a timeval elsewhere
        value = struct.pack("L", int(seconds * 1000))
    else:
        whole = int(seconds)
        value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, option, value)


def _set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    _set_timeout(sock, socket.SO_RCVTIMEO, seconds)


def _set_keepalive(sock: socket.socket, idle_s: float) -> None:
    """TCP keepalive probes after ``idle_s`` of silence, where the platform has them."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", max(1.0, idle_s / 4)),
                        ("TCP_KEEPCNT", 4)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), max(1, int(value)))


def tune(conn: connection.Connection, receive_timeout_s: float = 0.0,
         link_timeout_s: float | None = None) -> None:
    """Set TCP_NODELAY and a receive timeout (0 = none) on a connection's socket.

    ``link_timeout_s``: an established link to the master.  A read or a write
    that waits longer fails (every call is answered within a heartbeat
    period, so silence that long is a link gone silent: a Wi-Fi drop, a
    laptop's lid, a NAT that forgot it), and TCP keepalive probes the link
    when it is idle.  The peer then reconnects as after a reset."""
    if isinstance(conn, tls.TlsConnection):
        conn.blocking()   # and timed out by the socket's options below, as a plain one

    def apply(sock):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if link_timeout_s is None:
                _set_receive_timeout(sock, receive_timeout_s)
            else:
                _set_receive_timeout(sock, link_timeout_s)
                _set_timeout(sock, socket.SO_SNDTIMEO, link_timeout_s)
                _set_keepalive(sock, link_timeout_s / 2)
        except OSError:  # pragma: no cover - platforms without these options
            pass
    try:
        _with_socket(conn, apply)
    except OSError:  # pragma: no cover - not a TCP socket (e.g. a pipe)
        pass


# --- client side ------------------------------------------------------------------

def connect(address, authkey: bytes, connect_timeout_s: float = config.CONNECT_TIMEOUT_S,
            handshake_timeout_s: float = config.HANDSHAKE_TIMEOUT_S) -> connection.Connection:
    """Open an authenticated connection to a minicw master at ``address``.

    Raises MasterHostUnknownError, MasterNotListeningError, AuthkeyMismatchError
    or HandshakeTimeoutError, each naming host and port.
    """
    host, port = address
    where = format_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout_s)
    except socket.gaierror as exc:
        raise MasterHostUnknownError(
            "cannot resolve master host %r (port %s): %s; check the host name"
            % (host, port, exc.strerror or exc), address) from None
    except ConnectionRefusedError:
        raise MasterNotListeningError(
            "nothing is listening at %s: connection refused; is the master "
            "running, and on this port?" % where, address) from None
    except socket.timeout:
        raise MasterNotListeningError(
            "no answer from %s within %.3gs; check the host, the port and any "
            "firewall" % (where, connect_timeout_s), address) from None
    except OSError as exc:
        raise MasterNotListeningError(
            "cannot connect to %s: %s" % (where, exc.strerror or exc), address) from None
    chosen = tls_for(address)
    if chosen.dials:
        conn = tls.TlsConnection(tls.wrap_client(sock, tuple(address), chosen,
                                                 handshake_timeout_s))
    else:
        sock.settimeout(None)
        conn = connection.Connection(sock.detach())
    tune(conn, receive_timeout_s=handshake_timeout_s)
    plain_hint = "" if chosen.dials else (
        " (a master that runs with TLS waits for a TLS handshake: %s)" % tls.PEER_HINT)
    try:
        connection.answer_challenge(conn, authkey)
        connection.deliver_challenge(conn, authkey)
    except (AuthenticationError, AssertionError) as exc:
        conn.close()
        if tls.told_tls_required(exc):
            raise tls.TlsError("the master at %s serves TLS, and this peer has no TLS "
                               "settings: %s" % (where, tls.PEER_HINT), address) from None
        if isinstance(exc, AssertionError):   # Python < 3.12's challenge check
            raise MasterConnectionError(
                "the peer at %s answered the minicw handshake with something else; is it "
                "a minicw master?" % where, address) from None
        raise AuthkeyMismatchError(
            "the master at %s rejected our authkey; use the key the master "
            "printed or was started with" % where, address) from None
    except ssl.SSLError as exc:   # TLS 1.3: a refused client certificate comes only now
        conn.close()
        raise tls.TlsError(tls.client_handshake_failure(where, exc), address) from None
    except (EOFError, OSError, ValueError) as exc:
        conn.close()
        if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, EOFError)):
            raise HandshakeTimeoutError(
                "the peer at %s accepted the connection but did not complete "
                "the minicw handshake within %.3gs; is this a minicw master?%s"
                % (where, handshake_timeout_s, plain_hint), address) from None
        raise MasterConnectionError(
            "the peer at %s closed the connection during the handshake (%s); "
            "is this a minicw master of a compatible version?%s"
            % (where, type(exc).__name__, plain_hint), address) from None
    tune(conn, link_timeout_s=link_timeout_for(address))
    return conn


_master_heartbeats = {}   # (host, port) -> the heartbeat timeout its master announced


def master_heartbeat(address, heartbeat_timeout_s: float, api=None) -> None:
    """A master's heartbeat timeout, learnt at hello or register: the links to it
    (``api``'s current one, and those made later) wait at least two of them
    (a node's poll waits a fraction of one)."""
    _master_heartbeats[tuple(address)] = float(heartbeat_timeout_s)
    connection_now = getattr(getattr(api, "_tls", None), "connection", None)
    if connection_now is not None:
        tune(connection_now, link_timeout_s=link_timeout_for(address))


_tls_by_address = {}   # (host, port) -> tls.Settings a client API was given for that master


def use_tls(address, chosen: tls.Settings) -> None:
    """Connections to the master at ``address`` use ``chosen`` (from keyword
    arguments) instead of the environment's TLS settings."""
    _tls_by_address[tuple(address)] = chosen


def choose_tls(address, ca=None, fingerprint=None) -> None:
    """A client API's ``tls_ca=`` / ``tls_fingerprint=`` for the master at ``address``
    (the rest of its settings from the environment); nothing when both are None."""
    if ca is not None or fingerprint is not None:
        use_tls(address, tls.settings(ca=ca, fingerprint=fingerprint))


def tls_for(address) -> tls.Settings:
    chosen = _tls_by_address.get(tuple(address))
    return chosen if chosen is not None else tls.settings()


def link_timeout_for(address) -> float:
    return max(config.link_timeout_s(), 2 * _master_heartbeats.get(tuple(address), 0.0))


def _manager_client(address, family=None, authkey=None):
    # The signature multiprocessing.managers expects of a Client factory.
    return connect(tuple(address), authkey)


# --- server side --------------------------------------------------------------------

class _Listener(connection.Listener):
    """A Listener whose accepted sockets use TCP_NODELAY and a handshake timeout."""

    def accept(self):
        conn = super().accept()
        tune(conn, receive_timeout_s=config.handshake_timeout_s())
        return conn


class _Server(managers.Server):
    """A manager Server that authenticates in the connection's own thread, with a timeout.

    The standard ``handle_request`` already runs per connection, but with no
    limit on how long a peer may stay silent, and it answers a failed
    handshake with a traceback.  Here a failed or silent handshake is logged
    with the peer's address and the connection closed.
    """

    def __init__(self, registry, address, authkey, serializer, tls_settings=None):
        super().__init__(registry, address, authkey, serializer)
        self.tls = tls_settings if tls_settings is not None and tls_settings.serves else None
        self.closing = threading.Event()
        self.adopter = None   # (objects, adopt(conn, first_request, object)): see
                              # accept_connection
        self.handshakes = _Handshakes()

    def shutdown(self, conn):
        """The manager's own request to stop the server, refused: any peer with the
        key could send it, and the master would end without telling its nodes
        and clients.  The master stops on SIGTERM, Ctrl-C or ``Master.shutdown()``,
        which tell them."""
        raise PermissionError("a minicw master is not stopped by a peer's request; stop it "
                              "with SIGTERM or Ctrl-C where it runs (it tells its worker "
                              "nodes and clients)")

    def accept_connection(self, conn, name):
        """Serve a proxy's connection: in this thread, as the standard Server does,
        unless its first request is for one of ``adopter``'s objects, whose
        connections are handed to ``adopt`` (the master's event loop) with that
        request and the object."""
        threading.current_thread().name = name
        conn.send(("#RETURN", None))
        try:
            request = conn.recv()
        except (EOFError, OSError):
            sys.exit(0)  # how serve_client ends a connection; handle_request closes it
        if self.adopter is not None:
            adopted, adopt = self.adopter
            ident = request[0] if isinstance(request, tuple) and request else None
            with self.mutex:
                try:
                    target = self.id_to_obj.get(ident, (None,))[0]
                except TypeError:  # garbage: serve_client answers it with an error
                    target = None
            if any(target is candidate for candidate in adopted):
                adopt(conn, request, target)
                sys.exit(0)
        self.serve_client(_Replay(conn, request))

    def accepter(self):
        """Accept connections until closed, whatever runs out meanwhile: with no
        file descriptor or thread to spare, the connection is closed, the loop
        pauses (up to ACCEPT_BACKOFF_MAX_S) and says so, rate-limited, and
        the sessions already served go on."""
        pause = 0.0
        self.handshakes.start(self.closing)
        while not self.closing.is_set():
            try:
                conn = self.listener.accept()
            except OSError as exc:
                if self.closing.is_set():
                    return
                pause = self._back_off(pause, "cannot accept connections: %s" % exc)
                continue
            if not self.handshakes.admit(conn):
                conn.close()
                self._refused("more than %d connections are in their handshake"
                              % config.MAX_PENDING_HANDSHAKES)
                continue
            try:
                worker = threading.Thread(target=self.handle_request, args=(conn,),
                                          name="minicw-conn", daemon=True)
                worker.start()
            except RuntimeError as exc:   # no thread to be had now
                self.handshakes.done(conn)
                conn.close()
                pause = self._back_off(pause, "cannot start a thread for a connection: %s" % exc)
                continue
            pause = 0.0

    def _back_off(self, pause: float, why: str) -> float:
        self._refused(why)
        pause = min(config.ACCEPT_BACKOFF_MAX_S, max(0.01, pause * 2))
        self.closing.wait(pause)
        return pause

    _refusals = [0, 0.0]   # refused since the last log line, when it was written

    def _refused(self, why: str) -> None:
        refusals = self._refusals
        refusals[0] += 1
        now = time.monotonic()
        if now - refusals[1] >= config.REFUSALS_LOGGED_EVERY_S:
            log.warning("%s (%d connection(s) refused or dropped)", why, refusals[0])
            refusals[0], refusals[1] = 0, now

    def _authenticate(self, conn) -> bool:
        try:
            connection.deliver_challenge(conn, self.authkey)
            connection.answer_challenge(conn, self.authkey)
        except AuthenticationError:
            log.warning("rejected a connection: wrong authkey")
            return False
        except (EOFError, OSError, ValueError, AssertionError) as exc:
            log.info("dropped a connection during the handshake: %s", type(exc).__name__)
            return False
        finally:
            self.handshakes.done(conn)
        tune(conn, receive_timeout_s=0.0)
        return True

    def handle_request(self, conn):
        try:
            if self.tls is not None:
                conn = self._secure(conn)   # the same peer over TLS, or None
            if conn is not None and self._authenticate(conn):
                self._dispatch_first_request(conn)
        except SystemExit:  # serve_client() ends a served connection this way
            pass
        finally:
            if conn is not None:
                conn.close()

    def _secure(self, conn):
        """The TLS handshake with an accepted peer, under its handshake deadline:
        a TlsConnection to it, or None (logged) when the handshake failed."""
        sock = socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        if tls.plain_peer(sock):
            sock.close()
            self.handshakes.done(conn)
            conn.close()
            log.info("dropped a connection that spoke no TLS (told it: this master serves "
                     "TLS)")
            return None
        secured = tls.server_context(self.tls).wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False)
        tls_conn = tls.TlsConnection(secured)
        admitted = self.handshakes.swap(conn, tls_conn)
        conn.close()
        if not admitted:           # its deadline passed already
            tls_conn.close()
            return None
        try:
            secured.settimeout(config.handshake_timeout_s())
            secured.do_handshake()
        except (OSError, ValueError) as exc:
            self.handshakes.done(tls_conn)
            tls_conn.close()
            log.info("dropped a connection during the TLS handshake: %s",
                     tls.describe_server_failure(exc))
            return None
        return tls_conn

    def _dispatch_first_request(self, conn) -> None:
        try:
            ignored, funcname, args, kwds = conn.recv()
            if funcname not in self.public:
                raise ValueError("%r is not a manager request" % (funcname,))
            func = getattr(self, funcname)
        except (EOFError, OSError):
            return
        except Exception as exc:
            reply = ("#ERROR", exc)
        else:
            try:
                reply = ("#RETURN", func(conn, *args, **kwds))
            except Exception as exc:
                reply = ("#ERROR", exc)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            pass

    def close(self) -> None:
        """Stop accepting; connections being served end when their peers go."""
        self.closing.set()
        try:
            self.listener.close()
        except OSError:
            pass


class _Handshakes:
    """Connections in their handshake: at most MAX_PENDING_HANDSHAKES at once, each
    given config.handshake_timeout_s() for the whole of it.  The receive timeout
    of a socket counts per read, so a peer sending a byte now and then would
    hold its thread for ever; a watcher thread shuts down the socket of a
    handshake past its deadline, which ends its reads."""

    def __init__(self):
        self._deadlines = {}          # conn -> monotonic deadline
        self._lock = threading.Lock()

    def start(self, closing: threading.Event) -> None:
        threading.Thread(target=self._watch, args=(closing,), name="minicw-handshakes",
                         daemon=True).start()

    def admit(self, conn) -> bool:
        with self._lock:
            if len(self._deadlines) >= config.MAX_PENDING_HANDSHAKES:
                return False
            self._deadlines[conn] = time.monotonic() + config.handshake_timeout_s()
            return True

    def done(self, conn) -> None:
        with self._lock:
            self._deadlines.pop(conn, None)

    def swap(self, old, new) -> bool:
        """``new`` (the same peer over TLS) keeps ``old``'s deadline; False when
        the deadline has passed already."""
        with self._lock:
            deadline = self._deadlines.pop(old, None)
            if deadline is None:
                return False
            self._deadlines[new] = deadline
            return True

    def _watch(self, closing: threading.Event) -> None:
        period = min(1.0, config.handshake_timeout_s() / 4)
        while not closing.wait(period):
            now = time.monotonic()
            with self._lock:
                # Under the lock: a connection still listed has not finished its
                # handshake, so it is not closed yet and its descriptor is its own.
                late = [conn for conn, deadline in self._deadlines.items() if deadline < now]
                for conn in late:
                    del self._deadlines[conn]
                    try:
                        _with_socket(conn, lambda sock: sock.shutdown(socket.SHUT_RDWR))
                    except OSError:
                        pass
            if late:
                log.info("dropped %d connection(s) that did not finish the handshake within "
                         "%gs", len(late), config.handshake_timeout_s())


class _Replay:
    """A connection whose first ``recv`` returns a request already received."""

    def __init__(self, conn, request):
        self._conn = conn
        self._first = [request]
        self.send = conn.send
        self.close = conn.close
        self.fileno = conn.fileno

    def recv(self):
        if self._first:
            return self._first.pop()
        return self._conn.recv()


managers.listener_client.setdefault(SERIALIZER, (_Listener, _manager_client))


class Manager(managers.BaseManager):
    """BaseManager speaking the minicw transport; subclasses register typeids."""

    def __init__(self, address, authkey):
        super().__init__(address=tuple(address), authkey=as_authkey(authkey),
                         serializer=SERIALIZER)

    def make_server(self, tls_settings=None) -> _Server:
        """The server for this manager's registry, bound to its address, not yet
        serving; over TLS when ``tls_settings`` has a certificate."""
        return _Server(self._registry, self._address, self._authkey, self._serializer,
                       tls_settings)


def private_proxy_type(name: str, exposed) -> type:
    """A proxy class whose instances keep their own connections, one per thread.

    The standard library's proxies share one connection per thread among
    every proxy of the same address, and a proxy's finalizer closes "the
    finalizing thread's" shared connection when the last proxy goes, even if
    another session in this process still uses it.  minicw opens several
    sessions to one master from one process (an executor, a ClientThread,
    a MasterNode), so each proxy gets connections of its own.
    """
    base = managers.MakeProxyType(name, tuple(exposed))

    class PrivateProxy(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._tls = managers.util.ForkAwareLocal()

        def _callmethod(self, methodname, args=(), kwds={}):
            # BaseProxy's call, less its per-message Pickler object and its
            # '#PROXY' replies (no minicw method returns a proxy).
            self.send_call(methodname, args, kwds)
            return self.receive_reply()

        def send_call(self, methodname, args=(), kwds={}):
            """The first half of a call: send it on this thread's connection.
            ``receive_reply()`` on the same thread is the second half; between
            the two, ``connection()`` becomes readable when the reply is in."""
            self.connection().send_bytes(
                pickle.dumps((self._id, methodname, args, kwds), PICKLE_PROTOCOL))

        def receive_reply(self):
            kind, result = pickle.loads(self._tls.connection.recv_bytes())
            if kind == "#RETURN":
                return result
            raise managers.convert_to_error(kind, result)

        def connection(self) -> connection.Connection:
            """This thread's connection to the master (opened on first use)."""
            try:
                return self._tls.connection
            except AttributeError:
                self._connect()
                return self._tls.connection

    PrivateProxy.__name__ = PrivateProxy.__qualname__ = name
    return PrivateProxy


# --- the master, as its peers reach it ------------------------------------------------------

class MasterManager(Manager):
    """What peers connect with: one typeid per role of protocol.ROLES, no callables."""


def _register_roles() -> None:
    for role in protocol.ROLES:
        names = protocol.call_names(role)
        MasterManager.register(role, exposed=names, proxytype=private_proxy_type(
            "%sProxy" % role.capitalize(), names))


_register_roles()


def connect_master(address, authkey) -> MasterManager:
    """A MasterManager connected to the master at ``address``; ``.client()``,
    ``.node()`` or ``.process()`` then gives a role's proxy.  Raises the
    errors of ``connect``."""
    manager = MasterManager(tuple(address), authkey)
    manager.connect()
    return manager
