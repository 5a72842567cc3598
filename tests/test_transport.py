"""Connection errors name host, port and cause; hostile peers do not hurt the master."""
import socket
import threading
import time

import pytest

from minicw import WorkerNode, transport
from minicw.errors import (
    AuthkeyMismatchError, HandshakeTimeoutError, MasterHostUnknownError,
    MasterNotListeningError,
)
from minicw.transport import connect_master as connect
from tests.helpers import KEY, start_master, start_worker


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_wrong_key_names_the_master(master):
    host, port = master.address
    with pytest.raises(AuthkeyMismatchError, match="127.0.0.1:%d rejected our authkey" % port):
        connect(master.address, b"wrong")


def test_nothing_listening_names_host_and_port():
    port = _free_port()
    with pytest.raises(MasterNotListeningError, match="nothing is listening at 127.0.0.1:%d" % port):
        connect(("127.0.0.1", port), KEY)


def test_unknown_host_is_named():
    with pytest.raises(MasterHostUnknownError, match="no-such-host.invalid"):
        connect(("no-such-host.invalid", 8888), KEY)


def test_silent_server_times_out_the_handshake():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        address = listener.getsockname()
        started = time.monotonic()
        with pytest.raises(HandshakeTimeoutError, match="did not complete"):
            transport.connect(address, KEY.encode(), handshake_timeout_s=0.5)
        assert time.monotonic() - started < 5


def test_worker_node_connection_errors_are_distinct(master):
    host, port = master.address
    with pytest.raises(AuthkeyMismatchError):
        WorkerNode(host, port, "wrong-key", nprocs=1).join_cluster()
    with pytest.raises(MasterNotListeningError):
        WorkerNode(host, _free_port(), KEY, nprocs=1).join_cluster()
    with pytest.raises(MasterHostUnknownError):
        WorkerNode("no-such-host.invalid", port, KEY, nprocs=1).join_cluster()


def test_worker_cli_wrong_key_exits_with_message():
    proc, port = start_master()
    try:
        worker = start_worker(port, key="not-the-key", wait=False)
        assert worker.wait(30) == 2
        worker.wait_for("rejected our authkey", stream="err")
        worker = start_worker(_free_port(), wait=False, extra_args=["--connect-timeout", "0.5"])
        assert worker.wait(30) == 2
        worker.wait_for("nothing is listening", stream="err")
    finally:
        proc.stop()


def test_garbage_and_silence_do_not_block_other_peers(master, monkeypatch):
    monkeypatch.setattr(transport.config, "HANDSHAKE_TIMEOUT_S", 1.0)
    silent = [socket.create_connection(master.address) for _ in range(5)]
    noisy = socket.create_connection(master.address)
    noisy.sendall(b"\xff" * 64 + b"GET / HTTP/1.0\r\n\r\n")
    huge = socket.create_connection(master.address)
    huge.sendall(b"\x7f\xff\xff\xff")  # claims a 2 GB message
    try:
        # A real client still connects and is served at once.
        started = time.monotonic()
        manager = connect(master.address, KEY)
        assert manager.client().list_nodes() == []
        assert time.monotonic() - started < 2
        # Garbage peers are dropped at once, silent ones after the handshake timeout.
        for sock in [noisy, huge] + silent:
            sock.settimeout(10)
            assert _read_until_closed(sock)
    finally:
        for sock in silent + [noisy, huge]:
            sock.close()


def test_many_connections_after_hostile_ones_still_work(master):
    errors = []

    def client():
        try:
            connect(master.address, KEY).client().status()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=client) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []


def _read_until_closed(sock):
    """True once the peer closed or reset the connection."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True
