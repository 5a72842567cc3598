"""Large shared data sent once: ``broadcast(obj)`` returns a ``Handle``.

    client                       master              worker node          worker process
    ------                       ------              -----------          --------------
    broadcast(obj): store()
      serialize once --put_blob--> blob store --get_blob (once per node)--> node cache
      Handle(key)                                                             |
    submit(fn, handle) --payload carries only the key-------------------> unpickling the
                                                                          payload calls
                                                                          resolve(key): the
                                                                          object, loaded once
                                                                          per process

A Handle pickles as a call to ``resolve(key)``, so wherever it sits in a
job's arguments (top level, inside a list, a keyword) the job receives the
object itself.  The worker process installs its blob fetcher with
``set_fetcher``; in any other process ``resolve`` gives the Handle back.
"""
from __future__ import annotations

import pickle
from collections import OrderedDict

from minicw import protocol, serialize
from minicw.errors import SerializationError

OBJECTS_PER_PROCESS = 8   # broadcast objects a worker process keeps loaded

_fetch_blob = None        # key -> blob bytes; set in worker processes
_loaded = OrderedDict()   # key -> object, most recently used last


class Handle:
    """Stands for an object broadcast to the cluster; pass it as a job argument."""

    __slots__ = ("key", "nbytes", "type_name")

    def __init__(self, key: str, nbytes: int, type_name: str):
        self.key = key
        self.nbytes = nbytes
        self.type_name = type_name

    def __reduce__(self):
        return resolve, (self.key, self.nbytes, self.type_name)

    def __eq__(self, other):
        return isinstance(other, Handle) and other.key == self.key

    def __hash__(self):
        return hash(self.key)

    def __repr__(self):
        return "<minicw.Handle %s of %s, %d bytes>" % (self.key[:12], self.type_name,
                                                       self.nbytes)


def make_blob(obj, namespace: str | None = None) -> tuple[str, bytes, Handle]:
    """Serialize ``obj`` once: (key, blob bytes, handle)."""
    data = serialize.dumps(obj, protocol.PICKLE_PROTOCOL, namespace)
    key, blob = protocol.pack_blob(protocol.BLOB_DATA, data)
    return key, blob, Handle(key, len(data), type(obj).__name__)


def store(session, obj, namespace: str | None = None) -> Handle:
    """Serialize ``obj`` once and store it in the master through a client
    ``session``; the Handle stands for it in job arguments."""
    try:
        key, blob, handle = make_blob(obj, namespace)
    except Exception as exc:
        raise SerializationError("cannot broadcast %s: %s" % (type(obj).__name__, exc)) \
            from exc
    session.put_blob(key, blob)
    return handle


def set_fetcher(fetch_blob) -> None:
    global _fetch_blob
    _fetch_blob = fetch_blob


def resolve(key: str, nbytes: int = 0, type_name: str = "object"):
    """The broadcast object (in a worker process), else the Handle itself."""
    if _fetch_blob is None:
        return Handle(key, nbytes, type_name)
    obj = _loaded.get(key, _loaded)
    if obj is not _loaded:
        _loaded.move_to_end(key)
        return obj
    kind, data = pickle.loads(_fetch_blob(key))
    obj = serialize.loads(data)
    _loaded[key] = obj
    while len(_loaded) > OBJECTS_PER_PROCESS:
        _loaded.popitem(last=False)
    return obj
