"""A group attempt (spec.nodes > 1) as a JobSet: the builder, the group's outcome, the reconcile hooks.

Behaviours tested:
- the JobSet `<job>-a<attempt>` is owned by the job, has one Indexed replicated job of `nodes` pods
  (parallelism = completions = nodes, backoffLimit 0), maxRestarts 0, DNS hostnames on; its pod
  template is the bare pod's spec (hardened securityContext, resources, restartPolicy Never) with
  the job/attempt labels, the run annotation, and the rendezvous env (LORA_NNODES, LORA_NODE_RANK
  from the completion index, LORA_MASTER_ADDR = the leader's DNS name, LORA_MASTER_PORT); the
  template validates against the upstream Pod schema;
- resources.gpus > 1 sets LORA_NPROC_PER_NODE on the bare pod and on the group's pods;
- names that cannot be DNS labels for the JobSet's service or pods' hostnames are refused;
- the group's outcome (table): leader success wins; a preemption of any pod (finished, or still
  stopping with DisruptionTarget / deletionTimestamp) is one preemption; then permanent, then
  failure; a non-leader's exit 0 waits for the leader; nothing ended → None;
- reconcile: nodes 2 creates a JobSet, not a pod; no JobSet API → Failed JobSetNotInstalled; a
  reclaim of any pod → preemptions +1 and the attempt's JobSet deleted (never its pods alone);
  once its pods are gone the next JobSet; leader exit 0 → Succeeded; a vanished JobSet → one
  preemption; a JobSet without pods past the deadline → Stalled JobSetNoPods; a group pod one
  attempt ahead is adopted; a group pod of another run (run annotation) is not ours; suspend and
  stale attempts stop by deleting the JobSet; a pod stuck Terminating on a lost node is forced;
  the next JobSet name still held by a deleted job's JobSet (a re-apply) makes the job wait.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from lora_operator.classify import RUN_ANNOTATION, Result, is_owned_by
from lora_operator.jobset import (
    COMPLETION_INDEX,
    JOBSET_NAME_LABEL,
    MASTER_PORT,
    NO_PODS,
    NOT_INSTALLED,
    build_jobset,
    check_group_name,
    group_outcome,
    jobset_name,
    leader_address,
)
from lora_operator.pods import build_pod
from lora_operator.reconcile import (
    CreateJobSet,
    CreatePod,
    Decision,
    DeleteJobSet,
    DeletePod,
    Observed,
    reconcile,
)
from lora_operator.spec import SpecError
from tests.unit.builders import NOW, SETTINGS, make_job, make_pod, ts


def group_job(nodes: int = 2, status: dict[str, Any] | None = None, name: str = "job", **spec: Any) -> dict[str, Any]:
    return make_job(name, status=status, nodes=nodes, **spec)


def gpod(index: int, attempt: int = 1, job: str = "job", run: str = "uid-1", **kw: Any) -> dict[str, Any]:
    """A pod of a group attempt as JobSet and the Job controller name and label it."""
    pod = make_pod(attempt=attempt, job=job, **kw)
    js = jobset_name(job, attempt)
    meta = pod["metadata"]
    meta["name"] = f"{js}-node-0-{index}-x{index}z"
    meta["labels"].update({JOBSET_NAME_LABEL: js, COMPLETION_INDEX: str(index)})
    meta["annotations"] = {COMPLETION_INDEX: str(index), RUN_ANNOTATION: run}
    meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": f"{js}-node-0", "uid": "j",
                                "controller": True}]
    return pod


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


# --- the builder ------------------------------------------------------------------------------

def test_jobset_shape() -> None:
    jobset = build_jobset(group_job(3), 2, SETTINGS)
    meta, spec = jobset["metadata"], jobset["spec"]
    assert (jobset["apiVersion"], jobset["kind"], meta["name"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet", "job-a2")
    (owner,) = meta["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("LoRATrainingJob", "uid-1", True)
    assert spec["failurePolicy"] == {"maxRestarts": 0}
    assert spec["network"]["enableDNSHostnames"] is True
    (rjob,) = spec["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert rjob["replicas"] == 1
    assert (job["completionMode"], job["completions"], job["parallelism"], job["backoffLimit"]) == ("Indexed", 3, 3, 0)
    template = job["template"]
    assert template["metadata"]["labels"]["lora-operator.dev/job"] == "job"
    assert template["metadata"]["labels"]["lora-operator.dev/attempt"] == "2"
    assert template["metadata"]["annotations"][RUN_ANNOTATION] == "uid-1"
    bare = build_pod(group_job(3), 2, SETTINGS)
    pod_spec = template["spec"]
    assert pod_spec["restartPolicy"] == "Never" and pod_spec["securityContext"] == bare["spec"]["securityContext"]
    (container,) = pod_spec["containers"]
    assert container["securityContext"] == bare["spec"]["containers"][0]["securityContext"]
    assert container["resources"] == bare["spec"]["containers"][0]["resources"]
    env = env_of(container)
    assert env["LORA_ATTEMPT"]["value"] == "2" and env["LORA_NNODES"]["value"] == "3"
    assert env["LORA_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["LORA_MASTER_ADDR"]["value"] == leader_address("job-a2") == "job-a2-node-0-0.job-a2"
    assert env["LORA_MASTER_PORT"]["value"] == str(MASTER_PORT)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "job-a2-node-0-0"},
                                  "spec": pod_spec}, "1.30.0", strict=True)


@pytest.mark.parametrize("gpus, nproc", [(0, None), (1, None), (2, "2"), (8, "8")])
def test_gpus_set_processes_per_pod(gpus: int, nproc: str | None) -> None:
    res = {"gpus": gpus}
    bare = env_of(build_pod(make_job(resources=res), 1, SETTINGS)["spec"]["containers"][0])
    group = build_jobset(group_job(2, resources=res), 1, SETTINGS)
    member = env_of(group["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0])
    for env in (bare, member):
        assert (env.get("LORA_NPROC_PER_NODE") or {}).get("value") == nproc
    assert "LORA_NNODES" not in bare


@pytest.mark.parametrize("name, attempt, nodes, ok", [
    ("job", 1, 2, True),
    ("a" * 47, 999999, 256, False),  # hostname a...-a999999-node-0-255 is over 63
    ("a" * 40, 99, 16, True),
    ("my.job", 1, 2, False),  # a dot cannot be in a Service name
    ("1job", 1, 2, False),  # nor a leading digit
])
def test_group_names(name: str, attempt: int, nodes: int, ok: bool) -> None:
    if ok:
        check_group_name(name, attempt, nodes)
    else:
        with pytest.raises(SpecError, match="metadata.name"):
            check_group_name(name, attempt, nodes)


# --- the group's outcome ----------------------------------------------------------------------

RECLAIM = {"phase": "Failed", "exit_code": 75, "disruption": "PreemptionByScheduler"}


@pytest.mark.parametrize("pods, result, reason, who", [
    ([gpod(0), gpod(1)], None, None, None),
    ([gpod(0, phase="Succeeded", exit_code=0), gpod(1)], Result.SUCCEEDED, "Succeeded", "pod 0"),
    ([gpod(0), gpod(1, phase="Succeeded", exit_code=0)], None, None, None),  # the leader still runs
    ([gpod(0, **RECLAIM), gpod(1)], Result.PREEMPTED, "PreemptionByScheduler", "pod 0"),
    ([gpod(0), gpod(1, **RECLAIM)], Result.PREEMPTED, "PreemptionByScheduler", "pod 1"),
    # The reclaimed pod's peers lose their rendezvous and fail: still one preemption.
    ([gpod(0, phase="Failed", exit_code=1), gpod(1, **RECLAIM)], Result.PREEMPTED, "PreemptionByScheduler", "pod 1"),
    ([gpod(0), gpod(1, disruption="DeletionByTaintManager")], Result.PREEMPTED, "DeletionByTaintManager", "pod 1"),
    ([gpod(0), gpod(1, deleting_ago=1)], Result.PREEMPTED, "PodDeleted", "pod 1"),
    ([gpod(0, phase="Failed", exit_code=1), gpod(1, phase="Failed", exit_code=78)], Result.PERMANENT, "ExitCode78", "pod 1"),
    ([gpod(0), gpod(1, phase="Failed", exit_code=137, terminated_reason="OOMKilled")], Result.FAILED, "OOMKilled", "pod 1"),
])
def test_group_outcome(pods: list[dict], result: Result | None, reason: str | None, who: str | None) -> None:
    outcome = group_outcome(pods)
    if result is None:
        assert outcome is None
        return
    assert outcome is not None and (outcome.result, outcome.reason) == (result, reason)
    assert outcome.message.startswith(who)


def test_group_pods_belong_to_the_run_of_their_annotation() -> None:
    assert is_owned_by(gpod(0), "uid-1") and not is_owned_by(gpod(0, run="uid-old"), "uid-1")


# --- reconcile hooks --------------------------------------------------------------------------

def decide(job: dict, pods: list[dict] | None = None, **kw: Any) -> Decision:
    return reconcile(Observed(job=job, pods=pods or [], now=NOW, **kw), SETTINGS)


def jobsets(d: Decision, kind: type) -> list[str]:
    return [a.jobset["metadata"]["name"] if kind is CreateJobSet else a.name for a in d.actions if isinstance(a, kind)]


def running(attempt: int = 1, **status: Any) -> dict[str, Any]:
    return {"phase": "Running", "attempt": attempt, "preemptions": 0, "failures": 0, "startTime": ts(600), **status}


LIVE_JOBSET = {"metadata": {"name": "job-a1", "creationTimestamp": ts(60)}}


def test_new_group_job_gets_a_jobset_not_a_pod() -> None:
    d = decide(group_job(2))
    assert jobsets(d, CreateJobSet) == ["job-a1"] and not any(isinstance(a, CreatePod) for a in d.actions)
    assert d.status["attempt"] == 1


def test_jobset_not_installed_fails_the_job() -> None:
    d = decide(group_job(2), jobsets_served=False)
    assert d.status["phase"] == "Failed" and d.status["reason"] == NOT_INSTALLED
    assert "install JobSet" in d.status["message"] and not d.actions
    stalled = next(c for c in d.status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", NOT_INSTALLED)


def test_all_pods_running_is_running() -> None:
    d = decide(group_job(2, running(phase="Pending")), [gpod(0), gpod(1)], jobset=LIVE_JOBSET)
    assert d.status["phase"] == "Running" and d.status["podName"] == "job-a1-node-0-0-x0z"


@pytest.mark.parametrize("reclaimed", [0, 1])
def test_reclaim_of_any_pod_is_one_preemption_and_stops_the_group(reclaimed: int) -> None:
    pods = [gpod(i, **(RECLAIM if i == reclaimed else {})) for i in range(2)]
    d = decide(group_job(2, running()), pods, jobset=LIVE_JOBSET)
    assert (d.status["preemptions"], d.status["failures"]) == (1, 0)
    assert jobsets(d, DeleteJobSet) == ["job-a1"] and not jobsets(d, DeletePod)
    assert not jobsets(d, CreateJobSet), "never a new group while a pod of the old one runs"
    # Its pods gone (the garbage collector) and the outcome recorded: the next attempt's JobSet.
    d2 = decide(group_job(2, d.status), [gpod(reclaimed, **RECLAIM)], jobset=None)
    assert jobsets(d2, CreateJobSet) == ["job-a2"] and d2.status["preemptions"] == 1


def test_leader_success_succeeds() -> None:
    d = decide(group_job(2, running()), [gpod(0, phase="Succeeded", exit_code=0), gpod(1)], jobset=LIVE_JOBSET)
    assert d.status["phase"] == "Succeeded" and jobsets(d, DeleteJobSet) == ["job-a1"]


def test_vanished_jobset_is_one_preemption() -> None:
    d = decide(group_job(2, running()), [], jobset=None)
    assert d.status["preemptions"] == 1 and jobsets(d, CreateJobSet) == ["job-a2"]


def test_jobset_without_pods_stalls_after_the_deadline() -> None:
    old = {"metadata": {"name": "job-a1", "creationTimestamp": ts(SETTINGS.pending_deadline + 1)}}
    d = decide(group_job(2, running(phase="Pending")), [], jobset=old)
    stalled = next(c for c in d.status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", NO_PODS)
    young = decide(group_job(2, running(phase="Pending")), [], jobset=LIVE_JOBSET)
    assert young.requeue_after is not None and young.requeue_after <= SETTINGS.pending_deadline


def test_group_one_attempt_ahead_is_adopted_not_deleted() -> None:
    status = running(lastAttempt={"attempt": 1, "result": "Preempted"}, phase="Recovering")
    d = decide(group_job(2, status), [gpod(0, attempt=2, phase="Pending")])
    assert d.status["attempt"] == 2 and not d.actions


def test_pods_of_another_run_are_not_counted() -> None:
    d = decide(group_job(2, running()), [gpod(0, run="uid-old", **RECLAIM)], jobset=LIVE_JOBSET)
    assert d.status["preemptions"] == 0


def test_suspend_deletes_the_jobset_and_counts_nothing() -> None:
    job = group_job(2, running(), suspend=True)
    d = decide(job, [gpod(0), gpod(1)], jobset=LIVE_JOBSET)
    assert jobsets(d, DeleteJobSet) == ["job-a1"] and not jobsets(d, DeletePod)
    assert d.status["phase"] == "Suspended"
    stopping = [gpod(i, deleting_ago=1) for i in range(2)]
    d2 = decide(group_job(2, d.status, suspend=True), stopping, jobset=None)
    assert (d2.status["preemptions"], d2.status["failures"]) == (0, 0) and not jobsets(d2, CreateJobSet)


def test_live_pods_of_an_older_group_attempt_stop_by_their_jobset() -> None:
    d = decide(group_job(2, running(attempt=2)), [gpod(1, attempt=1), gpod(0, attempt=2), gpod(1, attempt=2)],
               jobset={"metadata": {"name": "job-a2", "creationTimestamp": ts(60)}})
    assert jobsets(d, DeleteJobSet) == ["job-a1"]
    assert any(e.reason == "StalePod" for e in d.events)


def test_pod_stuck_terminating_on_a_lost_node_is_forced_too() -> None:
    status = running(lastAttempt={"attempt": 1, "result": "Preempted"}, phase="Recovering")
    stuck_pod = gpod(1, deleting_ago=SETTINGS.terminating_grace + 1)
    d = decide(group_job(2, status), [stuck_pod], nodes_ready={"node-1": False})
    assert jobsets(d, DeleteJobSet) == ["job-a1"] and jobsets(d, DeletePod) == [stuck_pod["metadata"]["name"]]


def test_next_jobset_name_held_by_a_deleted_job_waits() -> None:
    old_run = {"metadata": {"name": "job-a1", "ownerReferences": [
        {"kind": "LoRATrainingJob", "name": "job", "uid": "uid-old", "controller": True}]}}
    d = decide(group_job(2), jobset=old_run)
    assert not d.actions and d.status["attempt"] == 0 and d.requeue_after is not None
    ours = {"metadata": {"name": "job-a1", "ownerReferences": [
        {"kind": "LoRATrainingJob", "name": "job", "uid": "uid-1", "controller": True}]}}
    assert jobsets(decide(group_job(2), jobset=ours), CreateJobSet) == ["job-a1"]  # a lost status write: 409 = done
