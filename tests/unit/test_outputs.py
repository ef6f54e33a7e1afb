"""Two live jobs never share an output: the holder check (pure) and reconcile's OutputInUse.

Behaviours tested:
- output_holder: same folder, a folder inside or around another on the same store conflicts;
  other buckets, sibling folders and other endpoints do not; a started job holds before an
  unstarted one, then the older one, then namespace/name; finished or deleting jobs hold nothing;
- reconcile: a new job whose output a live job holds gets no pod, phase Pending, Stalled with
  reason OutputInUse naming the holder and the field, one Warning event; once the holder is gone
  it starts attempt 1; the holder itself is not held back by the newcomer;
- OutputIndex (the operator's cache of live outputs) finds exactly the outputs a comparison with
  every live job finds, for folders at every depth, across stores and buckets, after updates and
  removals.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from lora_operator.outputs import OutputIndex, OutputUse, output_holder, output_use
from lora_operator.reconcile import CreatePod, Observed, reconcile
from lora_operator.spec import overlap
from lora_operator.status import get_condition
from tests.unit.builders import NOW, SETTINGS, make_job, ts


def use(name: str, uri: str = "s3://loras/job/", store: str = "http://minio:9000", started: bool = False,
        created: str = "2026-01-01T00:00:00Z", namespace: str = "ml") -> OutputUse:
    return OutputUse(namespace, name, store, uri, started, created)


ME = use("me", created="2026-01-02T00:00:00Z")


@pytest.mark.parametrize(("other", "holds"), [
    (use("a"), True),                                                   # same folder, older
    (use("a", "s3://loras/job"), True),                                 # no trailing slash
    (use("a", "s3://loras/job/sub/"), True),                            # inside mine
    (use("a", "s3://loras/"), True),                                    # around mine
    (use("a", "s3://loras/job2/"), False),                              # a sibling
    (use("a", "s3://other/job/"), False),                               # another bucket
    (use("a", store="http://other:9000"), False),                       # another store
    (use("a", created="2026-01-03T00:00:00Z"), False),                  # younger, unstarted: I rank first
    (use("a", created="2026-01-03T00:00:00Z", started=True), True),     # younger but started
    (use("me", created="2026-01-01T00:00:00Z"), False),                 # myself
    (use("me", created="2026-01-01T00:00:00Z", namespace="other"), True),  # same name, other namespace
])
def test_output_holder(other: OutputUse, holds: bool) -> None:
    assert (output_holder(ME, [other]) == other) is holds


def test_started_me_is_held_only_by_an_older_started_job() -> None:
    me = use("me", started=True, created="2026-01-02T00:00:00Z")
    assert output_holder(me, [use("a", created="2026-01-01T00:00:00Z")]) is None
    older = use("b", started=True, created="2026-01-01T00:00:00Z")
    assert output_holder(me, [older]) == older


def job(name: str, created: str, status: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    body = make_job(name, status=status)
    body["metadata"].update(creationTimestamp=created, uid=f"uid-{name}", **meta)
    return body


@pytest.mark.parametrize(("body", "live"), [
    (job("a", ts(10)), True),
    (job("a", ts(10), {"phase": "Suspended", "attempt": 2}), True),
    (job("a", ts(10), {"phase": "Succeeded", "attempt": 2}), False),
    (job("a", ts(10), {"phase": "Failed"}), False),
    (job("a", ts(10), deletionTimestamp=ts(1)), False),
])
def test_output_use_of_live_jobs_only(body: dict[str, Any], live: bool) -> None:
    assert (output_use(body) is not None) is live


def test_second_live_job_is_refused_until_the_first_is_gone() -> None:
    first = job("first", ts(100), {"phase": "Running", "attempt": 1, "preemptions": 0, "failures": 0})
    second = job("second", ts(10))
    users = [u for b in (first, second) if (u := output_use(b))]
    d = reconcile(Observed(job=second, pods=[], now=NOW, output_users=users), SETTINGS)
    assert d.actions == [] and d.status["attempt"] == 0 and d.status["phase"] == "Pending"
    stalled = get_condition(d.status["conditions"], "Stalled")
    assert stalled is not None and (stalled["status"], stalled["reason"]) == ("True", "OutputInUse")
    assert "ml/first" in stalled["message"] and "spec.output.uri" in stalled["message"]
    assert [e.reason for e in d.events if e.type == "Warning"] == ["OutputInUse"]
    assert d.requeue_after == SETTINGS.progress_interval
    again = reconcile(Observed(job=job("second", ts(10), d.status), pods=[], now=NOW, output_users=users), SETTINGS)
    assert [e.reason for e in again.events if e.type == "Warning"] == []  # said once
    # The holder is unaffected by the newcomer.
    held = reconcile(Observed(job=first, pods=[], now=NOW, output_users=users), SETTINGS)
    assert get_condition(held.status["conditions"], "Stalled")["reason"] != "OutputInUse"
    # Once the holder is deleted, the second starts its first attempt.
    free = reconcile(Observed(job=job("second", ts(10), d.status), pods=[], now=NOW,
                              output_users=[output_use(second)]), SETTINGS)
    assert [a.pod["metadata"]["name"] for a in free.actions if isinstance(a, CreatePod)] == ["second-a1"]
    assert get_condition(free.status["conditions"], "Stalled")["status"] == "False"


def test_output_index_finds_what_comparing_with_every_job_finds() -> None:
    rng = random.Random(5)
    folders = ["", "a", "a/b", "a/b/c", "a/bc", "b", "b/a", "a/./b/../b"]
    stores, buckets = ["http://minio:9000", ""], ["loras", "other"]
    index, live = OutputIndex(), {}
    for step in range(400):
        key = ("ml", f"job{rng.randrange(40)}")
        if rng.random() < 0.2:
            index.put(key, None)
            live.pop(key, None)
        else:
            u = use(key[1], f"s3://{rng.choice(buckets)}/{rng.choice(folders)}", rng.choice(stores))
            index.put(key, u)
            live[key] = u
        me = use("me", f"s3://{rng.choice(buckets)}/{rng.choice(folders)}", rng.choice(stores))
        expected = {o for o in live.values() if o.store == me.store and overlap(me.uri, o.uri) is not None}
        assert set(index.near(me)) == expected, (step, me)
    assert len(index) == len(live) and set(index.values()) == set(live.values())
