"""The master: a manager server that owns the Scheduler.

    clients ----\\                               /---- worker nodes (register, poll,
                 >-- TCP, authkey -- Master ---<       get_blob, process_ended)
    processes --/   (transport.py)    |         \\---- worker processes (exchange)
                                      |
                     typeids:  "client"  -> ClientAPI  --\\
                               "node"    -> NodeAPI    ---> one Scheduler (scheduler.py)
                               "process" -> ProcessAPI --/
                     threads:  accepter; one per new connection for the handshake and
                               the manager's create/incref/decref requests; the event
                               loop (reactor.py) that serves every proxy's calls; the
                               reaper (expires silent nodes and clients)

Each role reaches the master only through its own typeid, so a client cannot
call a node's methods by mistake.  The calls of each typeid are those of
``protocol.ROLES``, and each API class has exactly those methods (checked
when the server starts).  The API classes are thin: each method is one
Scheduler transition.  A call that may wait (a process waiting for work, a
client waiting for results, a node's heartbeat long-poll; ``Call.waits`` in
the contract) takes ``on_reply`` first and returns its reply, or a Waiter
that the state change which settles it answers later through the event
loop; nothing blocks a thread, and nothing sleeps in a loop.

``python -m minicw.master`` runs one (master.py); ``Master`` can also run
inside any process (``start()`` / ``shutdown()``), as the tests do.  Given
a ``dashboard_address``, it also serves the read-only status page of
dashboard.py (threads of its own, reading the Scheduler's public methods).
"""
from __future__ import annotations

import inspect
import logging
import threading

from minicw import config, protocol, transport, validate
from minicw.dashboard import Dashboard
from minicw.errors import ProtocolVersionError
from minicw.reactor import Reactor
from minicw.scheduler import Scheduler

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 1.0  # how long shutdown waits for every node to hear about it


def _check_protocol(info: dict, role: str) -> None:
    if info.get("protocol") != protocol.PROTOCOL_VERSION:
        raise ProtocolVersionError("%s speaks minicw protocol %s, this master speaks %s"
                                   % (role, info.get("protocol"), protocol.PROTOCOL_VERSION))


class _RoleAPI:
    """A role's calls, each one Scheduler transition (see Scheduler for its contract)."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler


class ClientAPI(_RoleAPI):
    """What a client may call (protocol.CLIENT_CALLS); see Scheduler for each contract."""

    def hello(self, info: dict):
        validate.peer_info(info, "client")
        _check_protocol(info, "client")
        client_id = self._scheduler.open_client(info)
        return client_id, {"protocol": protocol.PROTOCOL_VERSION,
                           "heartbeat_timeout_s": self._scheduler.heartbeat_timeout_s}

    def put_blobs(self, client_id, blobs):
        self._scheduler.put_blobs(_client_id(client_id), validate.blobs(blobs))

    def submit(self, client_id, specs):
        self._scheduler.submit(_client_id(client_id), validate.chunk_specs(specs))

    def fetch(self, on_reply, client_id, timeout_s, ack=0):
        return self._scheduler.fetch(_client_id(client_id),
                                     validate.wait_s("fetch's timeout_s", timeout_s),
                                     validate.integer("fetch's ack", ack, 0, 2 ** 63 - 1),
                                     on_reply)

    def cancel(self, client_id, requests):
        return self._scheduler.cancel(_client_id(client_id), validate.cancel_requests(requests))

    def kill(self, client_id, chunk_id, index):
        return self._scheduler.kill(_client_id(client_id),
                                    validate.integer("kill's chunk_id", chunk_id, 0, 2 ** 63 - 1),
                                    validate.integer("kill's index", index, 0,
                                                     config.MAX_JOBS_PER_CHUNK))

    def leased(self, client_id, jobs):
        return self._scheduler.leased(_client_id(client_id), validate.job_refs(jobs))

    def touch(self, client_id):
        self._scheduler.touch(_client_id(client_id))

    def goodbye(self, client_id):
        self._scheduler.close_client(_client_id(client_id))

    def list_nodes(self):
        return self._scheduler.list_nodes()

    def status(self):
        return self._scheduler.status()

    def blob_transfers(self, keys):
        return self._scheduler.blob_transfers(
            [validate.text("a blob key", key) for key in
             validate.sequence("blob_transfers's keys", keys, config.MAX_BLOBS_PER_CALL)])


class NodeAPI(_RoleAPI):
    """What a worker node may call (protocol.NODE_CALLS)."""

    def register(self, info: dict):
        validate.node_info(info)
        _check_protocol(info, "worker node")
        node_id = self._scheduler.register_node(info)
        return node_id, self._scheduler.heartbeat_timeout_s

    def poll(self, on_reply, node_id, timeout_s):
        return self._scheduler.poll(validate.text("node_id", node_id),
                                    validate.wait_s("poll's timeout_s", timeout_s), on_reply)

    def get_blob(self, key):
        return self._scheduler.get_blob(validate.text("a blob key", key))

    def process_ended(self, node_id, slot, token, position, reason, exit_description,
                      output=None):
        self._scheduler.process_ended(
            validate.text("node_id", node_id),
            validate.integer("process_ended's slot", slot, 0, config.MAX_NODE_PROCESSES),
            validate.integer("process_ended's token", token, 0, 2 ** 63 - 1),
            None if position is None else validate.integer(
                "process_ended's position", position, -1, config.MAX_JOBS_PER_CHUNK),
            validate.end_reason(reason),
            validate.text("process_ended's exit_description", exit_description),
            validate.process_output(output))

    def unregister(self, node_id):
        self._scheduler.unregister_node(validate.text("node_id", node_id))


class ProcessAPI(_RoleAPI):
    """What a worker process may call (protocol.PROCESS_CALLS): one report-and-lease call."""

    def exchange(self, on_reply, node_id, slot, reports, want, timeout_s):
        return self._scheduler.exchange(
            validate.text("node_id", node_id),
            validate.integer("exchange's slot", slot, 0, config.MAX_NODE_PROCESSES),
            validate.reports(reports),
            validate.integer("exchange's want", want, 0, config.MAX_CHUNKS_PER_CALL),
            validate.wait_s("exchange's timeout_s", timeout_s), on_reply)


def _client_id(value) -> int:
    return validate.integer("client_id", value, 0, 2 ** 63 - 1)


API_CLASSES = {"client": ClientAPI, "node": NodeAPI, "process": ProcessAPI}


def check_api(role: str, api_class) -> None:
    """Raise TypeError unless ``api_class`` has exactly the role's calls, with
    the contract's arguments (``on_reply`` first for a call that waits)."""
    public = {name for name in vars(api_class) if not name.startswith("_")}
    expected = set(protocol.call_names(role))
    if public != expected:
        raise TypeError("%s differs from protocol.ROLES[%r]: %s" % (
            api_class.__name__, role, sorted(public ^ expected)))
    for call in protocol.ROLES[role]:
        parameters = list(inspect.signature(getattr(api_class, call.name)).parameters)[1:]
        wanted = (["on_reply"] if call.waits else []) + [a.split("=")[0] for a in call.args]
        if parameters != wanted:
            raise TypeError("%s.%s%s does not match the contract's %s" % (
                api_class.__name__, call.name, tuple(parameters), tuple(wanted)))


def call_table(apis: dict) -> dict:
    """{id(api): {method name: (bound method, waits)}} for the event loop."""
    return {id(apis[role]): {call.name: (getattr(apis[role], call.name), call.waits)
                             for call in calls}
            for role, calls in protocol.ROLES.items()}


class Master:
    """A minicw master serving on ``(host, port)`` (port 0: any free port), and
    its dashboard on ``dashboard_address`` (host, port) if given; over TLS
    (and the dashboard over HTTPS) when ``tls_settings`` (tls.Settings) has a
    certificate."""

    def __init__(self, host: str = config.DEFAULT_HOST, port: int = config.DEFAULT_PORT,
                 authkey=None, heartbeat_timeout_s: float | None = None,
                 dashboard_address: tuple | None = None, tls_settings=None):
        if authkey is None:
            raise ValueError("the master needs an authkey")
        self.tls = tls_settings if tls_settings is not None and tls_settings.serves else None
        self.scheduler = Scheduler(config.heartbeat_timeout_s(heartbeat_timeout_s))
        self._authkey = transport.as_authkey(authkey)
        self._requested_address = (host, port)
        self._server = None
        self._stopped = threading.Event()
        self._threads = []
        self._dashboard_address = dashboard_address
        self.dashboard = None     # a started dashboard.Dashboard (its .url, .address)

    @property
    def address(self) -> tuple:
        """(host, port) the master listens on; the real port once started."""
        if self._server is None:
            return self._requested_address
        return tuple(self._server.address)

    def start(self) -> tuple:
        """Bind and serve in background threads; returns the address."""
        apis = {}
        for role, api_class in API_CLASSES.items():
            check_api(role, api_class)
            apis[role] = api_class(self.scheduler)

        class ServingManager(transport.Manager):
            pass
        for role, api in apis.items():
            ServingManager.register(role, callable=lambda api=api: api,
                                    exposed=protocol.call_names(role))
        try:
            self._server = ServingManager(self._requested_address,
                                          self._authkey).make_server(self.tls)
        except OSError as exc:
            raise OSError(exc.errno, "cannot listen on %s: %s" % (
                transport.format_address(self._requested_address), exc.strerror)) from None
        self._server.stop_event = self._stopped  # the manager's own shutdown() sets it
        self._reactor = Reactor(self.scheduler, call_table(apis))
        self._server.adopter = (tuple(apis.values()), self._reactor.adopt)
        self._reactor.start()
        self._spawn(self._server.accepter, "minicw-accept")
        self._spawn(self._reap, "minicw-reaper")
        log.info("master listening on %s", transport.format_address(self.address))
        if self._dashboard_address is not None:
            self._start_dashboard()
        return self.address

    def _start_dashboard(self) -> None:
        """Serve the dashboard; OSError (the master shut down) if it cannot listen."""
        dashboard = Dashboard(self.scheduler, self._authkey, self.address, self.tls)
        try:
            dashboard.start(*self._dashboard_address)
        except OSError:
            self.shutdown()
            raise
        self.dashboard = dashboard

    def _spawn(self, target, name):
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _reap(self):
        period_s = self.scheduler.heartbeat_timeout_s / config.HEARTBEATS_PER_TIMEOUT
        while not self._stopped.wait(period_s):
            self.scheduler.expire()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the master has shut down; True if it has."""
        return self._stopped.wait(timeout_s)

    def shutdown(self) -> None:
        """Tell every node and waiting client, then stop listening."""
        if self.dashboard is not None:
            self.dashboard.close()
        if self._server is None or self._server.closing.is_set():
            self._stopped.set()
            return
        self.scheduler.close()
        self.scheduler.wait_nodes_told(SHUTDOWN_GRACE_S)
        self._reactor.flush(SHUTDOWN_GRACE_S)  # the news is in the sockets before we exit
        self._server.close()
        self._reactor.close()
        self._stopped.set()
        log.info("master on %s shut down", transport.format_address(self.address))

