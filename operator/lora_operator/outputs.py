"""Who holds an output (pure): two live jobs must never train into the same or nested folders.

Each job's trainer fences its output by attempt number (see lora_trainer.checkpoint), which keeps
one job's stale pods from writing; two *jobs* aimed at one output would fence each other out
in turn, each exit 73 (StaleAttempt) undoing the other's work. So the operator refuses early: a job
whose spec.output.uri equals, contains or lies inside the output of another live job (same store)
starts no pod while that job lives; it stays Pending with the condition Stalled, reason
OutputInUse, naming the holder, and starts (resuming from the holder's checkpoints when the
configs match) once the holder is deleted or finished.

Who holds: a job that has started an attempt before one that has not; then the older
(creationTimestamp), then namespace/name. "Live" means not Succeeded/Failed and not being
deleted; a Suspended job still holds its output (it resumes from it). The operator sees the
jobs it watches: with --namespace, a job in an unwatched namespace is not seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lora_operator.spec import overlap, uri_parts

OUTPUT_IN_USE = "OutputInUse"
_TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class OutputUse:
    """One job's output as the holder check sees it."""

    namespace: str
    name: str
    store: str  # the S3 endpoint, normalised ("" for AWS)
    uri: str
    started: bool
    created: str

    @property
    def rank(self) -> tuple[int, str, str, str]:
        return (0 if self.started else 1, self.created, self.namespace, self.name)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def output_use(job: Mapping[str, Any]) -> OutputUse | None:
    """The output a live job uses; None for a finished or deleted job, or one without an output."""
    meta, spec, status = job.get("metadata") or {}, job.get("spec") or {}, job.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") in _TERMINAL:
        return None
    uri = (spec.get("output") or {}).get("uri")
    if not isinstance(uri, str) or not uri:
        return None
    endpoint = (spec.get("storage") or {}).get("endpoint") or ""
    return OutputUse(
        namespace=str(meta.get("namespace") or ""), name=str(meta.get("name") or ""),
        store=str(endpoint).strip().rstrip("/").lower(), uri=uri,
        started=bool(status.get("attempt")), created=str(meta.get("creationTimestamp") or ""),
    )


@lru_cache(maxsize=8192)  # the few candidates OutputIndex.near gives are compared again here
def _overlaps(a: str, b: str) -> bool:
    return overlap(a, b) is not None


_Key = tuple[str, str]  # (namespace, name)
_Folder = tuple[str, str, tuple[str, ...]]  # (store, scheme://host, path segments)


def _folder(use: OutputUse) -> _Folder:
    root, parts = uri_parts(use.uri)
    return use.store, root, parts


class OutputIndex:
    """The live jobs' outputs by folder: the jobs whose outputs overlap one output are found by
    looking up its folder and its parents, not by comparing it with every live job's (with 500 new
    jobs that comparison was quadratic: 250k per burst)."""

    def __init__(self) -> None:
        self._uses: dict[_Key, OutputUse] = {}
        self._at: dict[_Folder, set[_Key]] = {}  # jobs writing exactly into a folder
        self._under: dict[_Folder, set[_Key]] = {}  # jobs writing into a folder or anywhere below it

    def __len__(self) -> int:
        return len(self._uses)

    def values(self) -> list[OutputUse]:
        """Every live job's output."""
        return list(self._uses.values())

    def put(self, key: _Key, use: OutputUse | None) -> None:
        """Record the output of job `key` (None: the job no longer holds one)."""
        old = self._uses.get(key)
        if old == use:
            return
        if old is not None:
            self._file(key, old, remove=True)
        if use is None:
            self._uses.pop(key, None)
        else:
            self._uses[key] = use
            self._file(key, use, remove=False)

    def _file(self, key: _Key, use: OutputUse, remove: bool) -> None:
        store, root, parts = _folder(use)
        for depth in range(len(parts) + 1):
            self._edit(self._under, (store, root, parts[:depth]), key, remove)
        self._edit(self._at, (store, root, parts), key, remove)

    @staticmethod
    def _edit(table: dict[_Folder, set[_Key]], folder: _Folder, key: _Key, remove: bool) -> None:
        if remove:
            keys = table.get(folder)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del table[folder]
        else:
            table.setdefault(folder, set()).add(key)

    def near(self, me: OutputUse) -> list[OutputUse]:
        """The outputs that equal, contain or lie inside `me`'s (on the same store), `me`'s own included."""
        store, root, parts = _folder(me)
        keys = set(self._under.get((store, root, parts), ()))
        for depth in range(len(parts)):
            keys |= self._at.get((store, root, parts[:depth]), set())
        return [self._uses[key] for key in keys]


def output_holder(me: OutputUse, others: Iterable[OutputUse]) -> OutputUse | None:
    """The live job that holds an output overlapping `me`'s and ranks before it; None if free."""
    holders = [o for o in others
               if o.store == me.store and o.rank < me.rank and o.ref != me.ref and _overlaps(me.uri, o.uri)]
    return min(holders, key=lambda o: o.rank, default=None)


def in_use_message(me: OutputUse, holder: OutputUse) -> str:
    """The Stalled/OutputInUse message: which job holds the output, and the fix."""
    how = overlap(me.uri, holder.uri) or "overlaps"
    where = "equals" if how == "equals" else how
    return (f"spec.output.uri {me.uri!r} {where} the output of live job {holder.ref} ({holder.uri!r}); "
            f"this job starts when {holder.ref} finishes or is deleted, or set a different spec.output.uri")
