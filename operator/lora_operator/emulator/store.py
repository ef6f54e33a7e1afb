"""The emulator's etcd: objects, the global resourceVersion counter, and the watch history.

Every write gets the next resourceVersion and is appended to a bounded event log; watches
replay the log from the resourceVersion they ask for (410 Expired when it has been trimmed),
then wait for more. All methods run on the server's event loop thread (no locks needed).
"""

from __future__ import annotations

import asyncio
import collections
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Key", "Store", "WatchEvent"]

# (group, plural, namespace or "", name)
Key = tuple[str, str, str, str]


@dataclass(frozen=True)
class WatchEvent:
    """One write as watchers see it; ``old`` lets selector-filtered watches synthesise ADDED/DELETED."""

    rv: int
    type: str
    key: Key
    obj: dict[str, Any]
    old: dict[str, Any] | None


class Store:
    """In-memory objects with a global, strictly increasing resourceVersion."""

    def __init__(self, history: int = 50_000) -> None:
        self._objects: dict[Key, dict[str, Any]] = {}
        self._rv = 1
        self._log: collections.deque[WatchEvent] = collections.deque(maxlen=history)
        self._changed = asyncio.Event()

    @property
    def resource_version(self) -> int:
        """The latest resourceVersion written."""
        return self._rv

    @property
    def oldest_replayable(self) -> int:
        """The smallest resourceVersion a watch may start from."""
        return self._log[0].rv - 1 if len(self._log) == self._log.maxlen else 0

    def next_rv(self) -> str:
        """Reserve the next resourceVersion (as the string clients see)."""
        self._rv += 1
        return str(self._rv)

    def get(self, key: Key) -> dict[str, Any] | None:
        """A deep copy of the stored object, so callers may modify it freely."""
        obj = self._objects.get(key)
        return copy.deepcopy(obj) if obj is not None else None

    def __contains__(self, key: Key) -> bool:
        return key in self._objects

    def peek(self, key: Key) -> dict[str, Any] | None:
        """The stored object itself, not a copy: read it, never modify it (hot paths like the GC)."""
        return self._objects.get(key)

    def items(self, group: str | None = None, plural: str | None = None,
              namespace: str | None = None) -> Iterator[tuple[Key, dict[str, Any]]]:
        """Stored (key, object) pairs, filtered by any of group/plural/namespace (read-only views)."""
        for key, obj in list(self._objects.items()):
            if group is not None and key[0] != group:
                continue
            if plural is not None and key[1] != plural:
                continue
            if namespace is not None and key[2] != namespace:
                continue
            yield key, obj

    def uids(self) -> set[str]:
        """The uids of every stored object (for the garbage collector)."""
        return {obj["metadata"]["uid"] for obj in self._objects.values()}

    def write(self, key: Key, obj: dict[str, Any], event_type: str) -> dict[str, Any]:
        """Store an object whose resourceVersion was just set, and tell watchers."""
        old = self._objects.get(key)
        self._objects[key] = obj
        self._emit(WatchEvent(int(obj["metadata"]["resourceVersion"]), event_type, key, obj, old))
        return copy.deepcopy(obj)

    def remove(self, key: Key) -> dict[str, Any]:
        """Remove an object; the DELETED event carries a fresh resourceVersion, as on a real server."""
        obj = copy.deepcopy(self._objects.pop(key))
        obj["metadata"]["resourceVersion"] = self.next_rv()
        self._emit(WatchEvent(int(obj["metadata"]["resourceVersion"]), "DELETED", key, obj, obj))
        return copy.deepcopy(obj)

    def _emit(self, event: WatchEvent) -> None:
        self._log.append(event)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def events_after(self, rv: int) -> list[WatchEvent]:
        """Logged events newer than rv, oldest first."""
        newer: list[WatchEvent] = []
        for event in reversed(self._log):  # the log is ordered: walk back only as far as needed
            if event.rv <= rv:
                break
            newer.append(event)
        newer.reverse()
        return newer

    async def wait_for_change(self, timeout: float | None) -> None:
        """Sleep until the next write (or the timeout)."""
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            pass

    def wake_all(self) -> None:
        """Wake every waiting watch (on shutdown)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
