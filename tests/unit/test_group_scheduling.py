"""spec.nodes > 1 with Kueue and the spot fallback: the JobSet carries the queue, its pods the pool.

Behaviours tested:
- a queued group job's queue label is on its JobSet (Kueue admits the group as one workload) and not
  on the template's pods; an on-demand attempt's template carries the fallback's placement;
- a JobSet Kueue holds (suspended, queue-labelled, no pods) is Pending/Queued however old it is,
  never Stalled; once admitted, the pending deadline counts from the admission, not the creation;
- a group attempt's GPU-seconds are the sum over its pods.
"""

from __future__ import annotations

from typing import Any

from lora_operator.jobset import build_jobset
from lora_operator.placement import ON_DEMAND
from lora_operator.queueing import QUEUE_LABEL
from lora_operator.reconcile import Observed, reconcile
from lora_operator.status import get_condition
from tests.unit.builders import NOW, SETTINGS, ts
from tests.unit.test_jobset import gpod, group_job, running
from tests.unit.test_placement import FALLBACK, SPOT_RESOURCES


def queued_jobset(created_ago: float, suspend: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": "job-a1", "creationTimestamp": ts(created_ago), "labels": {QUEUE_LABEL: "gpus"}},
            "spec": {"suspend": suspend}}


def test_queue_label_on_the_jobset_and_pool_on_its_pods() -> None:
    job = group_job(2, queueName="gpus", resources=SPOT_RESOURCES, spot={"fallback": FALLBACK})
    jobset = build_jobset(job, 1, SETTINGS, pool=ON_DEMAND)
    assert jobset["metadata"]["labels"][QUEUE_LABEL] == "gpus"
    template = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert QUEUE_LABEL not in template["metadata"]["labels"]
    assert QUEUE_LABEL not in jobset["spec"]["replicatedJobs"][0]["template"]["metadata"]["labels"]
    assert template["spec"]["nodeSelector"] == FALLBACK["nodeSelector"]
    assert template["spec"]["tolerations"] == FALLBACK["tolerations"]


def test_held_jobset_is_queued_not_stalled_and_the_deadline_starts_at_admission() -> None:
    old = SETTINGS.pending_deadline * 3
    job = group_job(2, running(phase="Pending"), queueName="gpus")
    d = reconcile(Observed(job=job, pods=[], now=NOW, jobset=queued_jobset(old)), SETTINGS)
    assert (d.status["phase"], d.status["reason"]) == ("Pending", "Queued")
    assert "LocalQueue gpus" in d.status["message"] and d.status["admission"]["queuedAt"]
    assert (get_condition(d.status.get("conditions") or [], "Stalled") or {}).get("status") != "True"
    assert not d.actions, "a queued group is neither deleted nor replaced"
    # Admitted (resumed, its pods not there yet): a JobSet created long ago is not stalled at once.
    admitted = reconcile(Observed(job=group_job(2, d.status, queueName="gpus"), pods=[], now=NOW,
                                  jobset=queued_jobset(old, suspend=False)), SETTINGS)
    assert admitted.status["admission"]["admittedAt"]
    assert (get_condition(admitted.status.get("conditions") or [], "Stalled") or {}).get("status") != "True"
    assert admitted.requeue_after is not None and admitted.requeue_after <= SETTINGS.pending_deadline


def test_group_gpu_seconds_add_up_over_its_pods() -> None:
    job = group_job(2, running(placement={"pool": "spot"}), resources=SPOT_RESOURCES, spot={"fallback": FALLBACK})
    pods = [gpod(0), gpod(1)]  # running 30 s each (tests.unit.builders), 2 GPUs a pod
    d = reconcile(Observed(job=job, pods=pods, now=NOW, jobset={"metadata": {"name": "job-a1",
                                                                           "creationTimestamp": ts(60)}}), SETTINGS)
    assert d.status["usage"]["spotGpuSeconds"] == 2 * 30 * 2
