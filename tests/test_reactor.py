"""The master's event loop (reactor.py) against real connections on 127.0.0.1:
peers that send garbage once they are being served, a peer that stops
reading a large reply, a peer that leaves while its call waits, and the
framing it shares with ``multiprocessing.connection``.
"""
import pickle
import threading
import time

import pytest

from minicw import protocol, reactor
from minicw.node import python_version
from minicw.transport import connect_master as connect
from tests.helpers import KEY

BIG = 64 << 20   # more than loopback socket buffers hold, so the reply must wait in outbox


def _node_info(nprocs=1):
    return {"protocol": protocol.PROTOCOL_VERSION, "hostname": "test", "pid": 1,
            "nprocs": nprocs, "python": python_version(), "platform": "test",
            "start_method": "test"}


def _served(proxy, method, *args):
    """``proxy``'s own connection, after one real call has made the loop serve it."""
    getattr(proxy, method)(*args)
    return proxy._tls.connection


def _until(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in %gs" % timeout_s
        time.sleep(0.01)


def test_frames_round_trip_the_connection_wire_format():
    buffer = bytearray()
    for message in ("#RETURN", 7), ("#ERROR", ValueError("x")), ("#RETURN", b"y" * 70000):
        for part in reactor.frame(message):
            buffer += part
    buffer += b"\x00\x00"            # the start of a header: not a frame yet
    frames = reactor.take_frames(buffer)
    assert [pickle.loads(body)[0] for body in frames] == ["#RETURN", "#ERROR", "#RETURN"]
    assert pickle.loads(frames[2])[1] == b"y" * 70000
    assert buffer == bytearray(b"\x00\x00")
    with pytest.raises(ValueError, match="bad frame length -2"):
        reactor.take_frames(bytearray(b"\xff\xff\xff\xfe"))


def test_large_bytes_in_a_reply_go_out_as_the_objects_themselves():
    # A blob or a result goes out without being copied by the loop; the peer's
    # ordinary Connection.recv() reads the same reply as from pickle.dumps.
    data = bytes(range(256)) * 4096
    for reply in ("#RETURN", data), ("#RETURN", (7, [(1, 2, data, None)])):
        parts = reactor.frame(reply)
        assert any(part is data for part in parts)
        buffer = bytearray(b"".join(bytes(part) for part in parts))
        [body] = reactor.take_frames(buffer)
        assert pickle.loads(body) == reply


def _large_frame_start(size, sent):
    """The header of a ``size``-byte frame and its first ``sent`` bytes: a pickle
    of one large bytes object (PROTO 5, BINBYTES8 <length>, the bytes ... STOP)."""
    start = b"\x80\x05\x8e" + (size - 12).to_bytes(8, "little")
    return reactor._header(size) + start + b"\0" * (sent - len(start))


def _readers():
    return [thread for thread in threading.enumerate() if thread.name == "minicw-large-message"]


@pytest.mark.parametrize("then, logged", [
    ("stall", "the peer sent nothing for 1s in the middle of a message"),
    ("close", "the connection closed in the middle of a message"),
])
def test_a_large_message_is_read_aside_and_a_broken_one_dropped(master, caplog, then, logged):
    master._reactor._stall_s = 1.0    # the link timeout, shortened for the test
    conn = _served(connect(master.address, KEY).client(), "list_nodes")
    conn._send(_large_frame_start(50 << 20, 1 << 20))   # 1 MB of a 50 MB message
    _until(lambda: len(_readers()) == 1)
    others = connect(master.address, KEY).client()
    assert others.list_nodes() == []     # the loop serves everybody meanwhile
    if then == "close":
        conn.close()
    else:
        assert conn.poll(10)             # dropped after 1 s without a byte
        with pytest.raises(EOFError):
            conn.recv()
    _until(lambda: not _readers())
    _until(lambda: any(logged in record.getMessage() for record in caplog.records))
    assert others.list_nodes() == []
    assert len(master._reactor._channels) == 1   # only the other client's connection


@pytest.mark.parametrize("garbage, logged", [
    (b"\x00\x00\x00\x05hello", "unreadable request"),
    (b"\xff\xff\xff\xfe", "bad frame length"),
])
def test_garbage_on_a_served_connection_drops_only_that_peer(master, caplog, garbage,
                                                             logged):
    manager = connect(master.address, KEY)
    victim = manager.client()
    conn = _served(victim, "list_nodes")
    conn._send(garbage)      # raw bytes on the proxy's socket, past the handshake
    assert conn.poll(10)     # the master closed this connection ...
    with pytest.raises(EOFError):
        conn.recv()
    other = connect(master.address, KEY).client()
    assert other.list_nodes() == []   # ... and serves everybody else
    assert any(logged in record.getMessage() for record in caplog.records)


def test_a_peer_that_stops_reading_a_large_reply_blocks_nobody(master):
    client = connect(master.address, KEY).client()
    client_id, _ = client.hello({"protocol": protocol.PROTOCOL_VERSION, "hostname": "t",
                                 "pid": 1})
    blob = bytes(range(256)) * (BIG // 256)
    client.put_blobs(client_id, [("big", blob)])
    node = connect(master.address, KEY).node()
    conn = _served(node, "register", _node_info())
    # Ask for the blob and read nothing, as a stopped process would.
    conn.send((node._id, "get_blob", ("big",), {}))
    _until(lambda: any(channel.outbox for channel in master._reactor._channels))
    others = connect(master.address, KEY).client()
    answers = []
    served = threading.Thread(target=lambda: answers.extend(
        [others.blob_transfers(["big", "nope"]) for _ in range(20)]), daemon=True)
    served.start()
    served.join(10)          # the loop keeps serving while that reply waits
    assert answers == [{"big": (1, 1)}] * 20
    kind, data = conn.recv()  # the late reader still gets every byte
    assert kind == "#RETURN" and len(data) == BIG and data == blob


def test_a_process_that_leaves_while_its_exchange_waits_is_forgotten(master):
    node_id, _ = connect(master.address, KEY).node().register(_node_info(nprocs=2))
    process = connect(master.address, KEY).process()
    conn = _served(process, "exchange", node_id, 0, [], 0, 0)
    conn.send((process._id, "exchange", (node_id, 0, [], 1, 30.0), {}))
    _until(lambda: len(master.scheduler._waiting) == 1)
    conn.close()             # the process died while it waited for work
    _until(lambda: len(master.scheduler._waiting) == 0)
    # The other slot still waits and is answered as usual.
    other = connect(master.address, KEY).process()
    assert other.exchange(node_id, 1, [], 1, 0.2) == ([], ())


def test_a_waiting_exchange_is_answered_when_work_is_submitted(master):
    node_id, _ = connect(master.address, KEY).node().register(_node_info())
    process = connect(master.address, KEY).process()
    replies = []
    waiting = threading.Thread(
        target=lambda: replies.append(process.exchange(node_id, 0, [], 1, 30.0)))
    waiting.start()
    _until(lambda: len(master.scheduler._waiting) == 1)
    client = connect(master.address, KEY).client()
    client_id, _ = client.hello({"protocol": protocol.PROTOCOL_VERSION, "hostname": "t",
                                 "pid": 1})
    client.put_blobs(client_id, [("fn", b"f")])
    client.submit(client_id, [protocol.ChunkSpec(1, ("fn",), 3, b"payload", None, 2, None)])
    waiting.join(10)
    [(leases, revoked)] = replies
    assert revoked == () and [lease[2] for lease in leases] == [1]
    assert list(leases[0][5]) == [0, 1, 2]


def test_an_unknown_method_is_an_error_for_that_call_only(master):
    client = connect(master.address, KEY).client()
    conn = _served(client, "list_nodes")
    conn.send((client._id, "no_such_method", (), {}))
    kind, error = conn.recv()
    assert kind == "#ERROR" and "no method 'no_such_method'" in str(error)
    assert client.list_nodes() == []


def test_calls_on_one_connection_are_answered_in_order(master):
    # A caller that gave up on a waiting exchange and calls again on the same
    # connection gets the first call's reply first and the second's after it;
    # the work handed to the first call is not lost.
    node_id, _ = connect(master.address, KEY).node().register(_node_info())
    process = connect(master.address, KEY).process()
    conn = _served(process, "exchange", node_id, 0, [], 0, 0)
    conn.send((process._id, "exchange", (node_id, 0, [], 1, 30.0), {}))
    _until(lambda: len(master.scheduler._waiting) == 1)
    conn.send((process._id, "exchange", (node_id, 0, [], 1, 0), {}))
    assert not conn.poll(0.3)            # the second call waits its turn
    client = connect(master.address, KEY).client()
    client_id, _ = client.hello({"protocol": protocol.PROTOCOL_VERSION, "hostname": "t",
                                 "pid": 1})
    client.put_blobs(client_id, [("fn", b"f")])
    client.submit(client_id, [protocol.ChunkSpec(1, ("fn",), 3, b"payload", None, 2, None)])
    assert conn.poll(10)
    kind, (leases, _) = conn.recv()      # the first call's reply: the chunk
    assert kind == "#RETURN" and [lease[2] for lease in leases] == [1]
    assert conn.poll(10)
    assert conn.recv() == ("#RETURN", ([], ()))   # then the second call's
    assert master.scheduler._waiting == type(master.scheduler._waiting)()


def test_an_absurd_timeout_fails_nobody(master):
    # A fetch asking to wait 1e300 s is refused at once, naming the field
    # (validate.py); every other peer, new or old, is still served.
    client = connect(master.address, KEY).client()
    client_id, _ = client.hello({"protocol": protocol.PROTOCOL_VERSION, "hostname": "t",
                                 "pid": 1})
    conn = _served(client, "touch", client_id)
    conn.send((client._id, "fetch", (client_id, 1e300, 0), {}))
    assert conn.poll(10)
    kind, error = conn.recv()
    assert kind == "#ERROR" and "fetch's timeout_s must be a number from 0 to 86400" in str(error)
    assert connect(master.address, KEY).client().list_nodes() == []
    node = connect(master.address, KEY).node()
    assert node.register(_node_info())[0].startswith("test:1#")
