"""The master's blob store: functions, environments, contexts and broadcast data.

    client --put_blobs([(key, bytes)])--> BlobStore: key -> bytes, and which
                                          clients put it (a blob lives while
                                          one of them is connected)
    node   --get_blob(key)--------------> bytes (each node fetches a blob once
                                          and caches it: node.py)

Keys are content hashes (protocol.content_key), so a blob put by many
clients is stored once.  The Scheduler owns one store and calls it under
its lock; nothing here locks or touches the network.
"""
from __future__ import annotations

from minicw.errors import MinicwError


BLOB_OVERHEAD = 400          # bytes the master spends on a blob besides its data
TRIM_AFTER_BYTES = 64 << 20  # freeing this much at once hands memory back to the system


def give_back_memory() -> None:
    """Ask the C allocator to return freed memory to the system (glibc only):
    freed blobs otherwise stay in the master's heap, and a master that once held
    a client's 100,000 blobs would keep their size for the rest of its life."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError, ImportError):
        pass   # not glibc: the allocator keeps its own counsel


class _Entry:
    __slots__ = ("data", "owners", "puts", "fetches")

    def __init__(self, data: bytes):
        self.data = data
        self.owners = set()     # client ids that put it
        self.puts = 0           # times a client put it
        self.fetches = 0        # times a node fetched it


class BlobStore:
    """Blobs by key, each kept while a client that put it is connected."""

    def __init__(self):
        self._entries = {}      # key -> _Entry

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def put(self, client_id: int, key: str, data: bytes) -> None:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(data)
        entry.owners.add(client_id)
        entry.puts += 1

    def fetch(self, key: str) -> bytes:
        """A node's copy of the blob; MinicwError when no connected client holds it."""
        entry = self._entries.get(key)
        if entry is None:
            raise MinicwError("the master holds no blob %s; its client has gone away" % key)
        entry.fetches += 1
        return entry.data

    def release(self, client_id: int, keys) -> int:
        """The client left: drop the blobs no other connected client put; how many
        bytes went."""
        freed = 0
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.owners.discard(client_id)
                if not entry.owners:
                    freed += len(entry.data) + BLOB_OVERHEAD
                    del self._entries[key]
        return freed

    def transfers(self, keys) -> dict:
        """{key: (times put, times fetched by nodes)} for blobs held."""
        return {key: (entry.puts, entry.fetches) for key, entry in
                ((key, self._entries.get(key)) for key in keys) if entry is not None}
