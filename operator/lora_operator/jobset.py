"""A group attempt (spec.nodes > 1) as a JobSet (pure): the builder and the group's outcome.

`build_jobset(job, attempt, settings)` turns the attempt's bare pod into one replicated job of
`nodes` pods (Indexed, parallelism = completions = nodes, restartPolicy Never, backoffLimit 0) in
a JobSet `<job>-a<attempt>` owned by the job. The pod template is the bare pod's spec and labels
(so the operator's pod watch sees the group's pods), plus the rendezvous environment: the pod's
index (LORA_NODE_RANK, from the completion-index annotation by the downward API), the group's
size, and the leader's stable DNS name (JobSet's headless service, network.enableDNSHostnames).
JobSet's own restarts are off (failurePolicy.maxRestarts 0): the operator's budgets decide.

The attempt is the group: `group_state` reads the attempt's pods as one. The leader (index 0)
succeeding is success; otherwise a preemption of any pod is ONE preemption of the job, and a
failure of any pod one failure. The operator then deletes the JobSet (its other pods get SIGTERM
and commit a checkpoint) and starts `<job>-a<attempt+1>`, which resumes from the last commit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lora_operator.classify import (
    RUN_ANNOTATION,
    Outcome,
    Reason,
    Result,
    Stuck,
    classify_finished,
    disruption_reason,
    is_live,
    is_terminating,
    parse_time,
    phase,
    stuck,
)
from lora_operator.placement import SPOT
from lora_operator.pods import build_pod, owner_reference, pod_name
from lora_operator.queueing import QUEUE_LABEL, jobset_labels, jobset_queued
from lora_operator.settings import Settings
from lora_operator.spec import JobSpec, SpecError, parse_spec
from lora_trainer.contract import ENV_MASTER_ADDR, ENV_MASTER_PORT, ENV_NNODES, ENV_NODE_RANK

GROUP = "jobset.x-k8s.io"
VERSION = "v1alpha2"
PLURAL = "jobsets"
KIND = "JobSet"
API_VERSION = f"{GROUP}/{VERSION}"
REPLICATED_JOB = "node"  # the one replicated job; pods are <jobset>-node-0-<index>
MASTER_PORT = 29500  # torch.distributed's customary rendezvous port
# What JobSet and the Job controller put on the pods they create.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
NOT_INSTALLED = "JobSetNotInstalled"
NO_PODS = "JobSetNoPods"
JOBSET_FAILED = "JobSetFailed"
MAX_HOSTNAME = 63
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def jobset_name(job_name: str, attempt: int) -> str:
    """Name of the JobSet of a group attempt (the name a bare pod would have)."""
    return pod_name(job_name, attempt)


def pod_hostname(jobset: str, index: int) -> str:
    """The hostname JobSet gives the pod of `index` (its DNS name within the JobSet's subdomain)."""
    return f"{jobset}-{REPLICATED_JOB}-0-{index}"


def leader_address(jobset: str) -> str:
    """The leader's stable DNS name: its hostname under the JobSet's headless service."""
    return f"{pod_hostname(jobset, 0)}.{jobset}"


def not_installed_message() -> str:
    """What the JobSetNotInstalled condition says to do."""
    return (f"spec.nodes > 1 runs the attempt as a JobSet, but the API server does not serve {PLURAL}.{GROUP}/"
            f"{VERSION}: install JobSet (kubernetes-sigs/jobset, v0.5 or later: `kubectl apply --server-side -f "
            "https://github.com/kubernetes-sigs/jobset/releases/download/<version>/manifests.yaml`) and re-create "
            "the job, or set spec.nodes: 1")


def check_group_name(name: str, attempt: int, nodes: int) -> None:
    """Raise SpecError unless the JobSet's service and every pod's hostname are valid DNS labels."""
    js = jobset_name(name, attempt)
    host = pod_hostname(js, nodes - 1)
    if not _DNS1035.match(js) or len(host) > MAX_HOSTNAME:
        raise SpecError("metadata.name", f"{name!r}: with spec.nodes {nodes} the pods' hostnames are "
                        f"<job>-a<attempt>-{REPLICATED_JOB}-0-<index> ({host!r}, {len(host)} characters), which "
                        f"must be a DNS label of at most {MAX_HOSTNAME} lowercase letters, digits and '-' starting "
                        "with a letter; create the job under a shorter name of that form")


def _group_env(jobset: str, nodes: int) -> list[dict[str, Any]]:
    return [
        {"name": ENV_NNODES, "value": str(nodes)},
        {"name": ENV_NODE_RANK, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}},
        {"name": ENV_MASTER_ADDR, "value": leader_address(jobset)},
        {"name": ENV_MASTER_PORT, "value": str(MASTER_PORT)},
    ]


def build_jobset(job: Mapping[str, Any], attempt: int, settings: Settings, spec: JobSpec | None = None,
                 pool: str = SPOT) -> dict[str, Any]:
    """The JobSet manifest of group `attempt` of `job` in `pool` (raises SpecError if the spec cannot run)."""
    spec = spec or parse_spec(job.get("spec") or {})
    pod = build_pod(job, attempt, settings, spec, pool)
    meta = job["metadata"]
    name, nodes = meta["name"], spec.nodes
    check_group_name(name, attempt, nodes)
    js = jobset_name(name, attempt)
    pod_spec = pod["spec"]
    for container in pod_spec["containers"]:
        container["env"] = [*container["env"], *_group_env(js, nodes)]
    # Kueue admits the JobSet as one workload (its JobSet integration suspends it until admitted): the
    # queue label goes on the JobSet only, so that its pods are not queued a second time.
    labels = {k: v for k, v in pod["metadata"]["labels"].items() if k != QUEUE_LABEL}
    template = {
        "metadata": {"labels": labels, "annotations": {RUN_ANNOTATION: str(meta.get("uid") or "")}},
        "spec": pod_spec,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": js,
            "namespace": meta.get("namespace", "default"),
            "labels": {**labels, **jobset_labels(spec.queue_name)},
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            # Pods reach the leader by <jobset>-node-0-0.<jobset> before they are Ready (rendezvous first).
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            # No restarts by JobSet: a preemption or failure ends the attempt; the operator counts it.
            "failurePolicy": {"maxRestarts": 0},
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": 1,
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "completionMode": "Indexed",
                        "completions": nodes,
                        "parallelism": nodes,
                        "backoffLimit": 0,  # the Job controller must not replace a failed pod either
                        "template": template,
                    },
                },
            }],
        },
    }


def node_index(pod: Mapping[str, Any]) -> int | None:
    """The pod's index in its group (0 = leader), from the completion index; None if absent."""
    meta = pod.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(COMPLETION_INDEX) or (meta.get("labels") or {}).get(COMPLETION_INDEX)
    return int(value) if str(value or "").isdigit() else None


def group_of(pod: Mapping[str, Any]) -> str:
    """The JobSet a pod belongs to ("" for a bare pod)."""
    return ((pod.get("metadata") or {}).get("labels") or {}).get(JOBSET_NAME_LABEL, "")


@dataclass(frozen=True)
class GroupState:
    """How a group attempt is doing: ended (`outcome`), all pods running, stuck, or still coming up."""

    outcome: Outcome | None = None
    running: bool = False
    node: str = ""  # the leader's node, when running
    leader: str = ""  # the leader pod's name, once it exists
    stuck: Stuck | None = None
    wait: float | None = None  # seconds until the pending deadline passes (then look again)


def _named(pod: Mapping[str, Any], outcome: Outcome) -> Outcome:
    index = node_index(pod)
    who = f"pod {index} ({pod['metadata']['name']})" if index is not None else f"pod {pod['metadata']['name']}"
    return Outcome(outcome.result, outcome.reason, f"{who}: {outcome.message}", outcome.exit_code,
                   outcome.step, outcome.checkpoint)


def group_outcome(pods: Sequence[Mapping[str, Any]]) -> Outcome | None:
    """The outcome of a group attempt from its pods; None while it still runs.

    The leader's success wins (its final weights are committed); then any pod's preemption (a
    disrupted or deleted pod ends the group: its peers' failures follow from it); then a permanent
    error; then a failure. Other pods that finished with exit 0 wait for the leader."""
    ordered = sorted(pods, key=lambda p: (node_index(p) is None, node_index(p) or 0, p["metadata"]["name"]))
    ended: list[tuple[Mapping[str, Any], Outcome]] = []
    for pod in ordered:
        outcome = classify_finished(pod)
        if outcome is None and is_live(pod) and (disruption_reason(pod) or is_terminating(pod)):
            # Still stopping, but the group cannot go on without it: end the attempt now, so every
            # other pod gets its SIGTERM (and the leader commits) within the same grace period.
            reason = disruption_reason(pod) or Reason.POD_DELETED
            outcome = Outcome(Result.PREEMPTED, reason, f"the pod is being stopped ({reason})")
        if outcome is not None:
            if node_index(pod) == 0 and outcome.result is Result.SUCCEEDED:
                return _named(pod, outcome)
            ended.append((pod, outcome))
    for result in (Result.PREEMPTED, Result.PERMANENT, Result.FAILED):
        for pod, outcome in ended:
            if outcome.result is result:
                return _named(pod, outcome)
    return None


def jobset_failed(jobset: Mapping[str, Any] | None) -> str | None:
    """The message of the JobSet's Failed condition, None unless it failed."""
    for cond in ((jobset or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return cond.get("message") or cond.get("reason") or "the JobSet failed"
    return None


def group_queued(pods: Sequence[Mapping[str, Any]], jobset: Mapping[str, Any]) -> bool:
    """Whether Kueue holds the group: its JobSet is queued (suspended) and none of its pods lives."""
    return jobset_queued(jobset) and not any(is_live(p) for p in pods)


def group_state(pods: Sequence[Mapping[str, Any]], nodes: int, jobset: Mapping[str, Any] | None,
                now: datetime, deadline: float, since: datetime | None = None) -> GroupState:
    """Where the attempt's group stands, from its pods, its JobSet (None: absent) and the pending deadline
    (counted from `since`, its admission by Kueue, else from the JobSet's creation)."""
    outcome = group_outcome(pods)
    if outcome is not None:
        return GroupState(outcome=outcome)
    leader = next((p for p in pods if node_index(p) == 0), None)
    leader_name = leader["metadata"]["name"] if leader else ""
    live = [p for p in pods if is_live(p)]
    if not live and jobset is None:
        return GroupState(outcome=Outcome(Result.PREEMPTED, Reason.POD_VANISHED,
                                          "the JobSet and its pods were deleted; resuming from the latest checkpoint"))
    failed = jobset_failed(jobset)
    if not live and failed is not None:  # its pods went before the operator saw how they ended
        return GroupState(outcome=Outcome(Result.FAILED, JOBSET_FAILED, f"JobSet: {failed}"))
    if leader is not None and phase(leader) == "Running" and len(pods) >= nodes and \
            all(phase(p) in ("Running", "Succeeded") for p in pods):
        return GroupState(running=True, node=(leader.get("spec") or {}).get("nodeName") or "?", leader=leader_name)
    for pod in pods:
        found = stuck(pod, now, deadline)
        if found is not None:
            return GroupState(stuck=found, leader=leader_name)
    created = since or parse_time(((jobset or {}).get("metadata") or {}).get("creationTimestamp")) or now
    age = (now - created).total_seconds()
    if len(pods) < nodes and age >= deadline:
        return GroupState(leader=leader_name, stuck=Stuck(NO_PODS, (
            f"{len(pods)} of {nodes} pods exist {age:.0f}s after the JobSet was created; check that the JobSet "
            "controller runs (jobset-system) and the JobSet's events")))
    return GroupState(leader=leader_name, wait=max(1.0, deadline - age))
