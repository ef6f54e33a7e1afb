"""A `task: causal-lm` LoRATrainingJob through a spot reclaim to Succeeded, on each Kubernetes target.

Behaviours (one run of the demo's scenario per target: [emulator], and [real] — etcd, kube-apiserver and
kube-controller-manager — when KUBEBUILDER_ASSETS is set, and then [emulator] is marked slow, so `make
chaos` runs it and `make test` does not; the dev cluster's pod runner plays the kubelet
and runs the real trainer; S3 is moto on a free port):
- examples/llm-tiny-job.yaml, with the tiny Llama folder and one JSONL file uploaded (built from configs
  with fixed seeds, nothing downloaded), ends Succeeded after exactly one preemption and no failure, on
  attempt 2: its pod was reclaimed like a spot node shutdown once the first checkpoint was committed;
  status.outputs names the PEFT adapter (adapter_model.safetensors and its folder), no kohya file;
- attempt 1 stopped with exit 75 at the step of the checkpoint it committed, and attempt 2's trainer
  resumed from that step;
- the PEFT adapter at the output root (adapter_model.safetensors, adapter_config.json) is sha256-equal to
  an uninterrupted `lora-train` run of `to_train_config(parse_spec(spec))` on local copies of the same
  inputs, and the per-step losses (and eval losses) in logs/metrics.jsonl are equal.

The uninterrupted run goes first and is timed: the scenario's timeout and each test's pytest timeout
are multiples of it (tests/e2e/deadlines.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lora_operator.devcluster import seed
from lora_operator.devcluster.scenario import Scenario
from lora_operator.spec import parse_spec, to_train_config
from lora_trainer.tasks.causal_lm import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lora_trainer.tiny_llm import build_tiny_llm, write_tiny_jsonl
from lora_trainer.train import read_metric
from tests.e2e.chaos import REFERENCE_STALL_SECONDS, base_env, run_attempt
from tests.e2e.deadlines import FUNC_ONLY, set_deadline
from tests.support.kube import target_names

pytestmark = FUNC_ONLY
MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "llm-tiny-job.yaml"
SCENARIO_REFERENCES = 30  # cluster, operator and two trainer pods: at most this many uninterrupted runs
TEST_REFERENCES = 2  # a test body only reads what the scenario left
RECORDS, SHAPE, DATA_SEED = 64, "prompt-completion", 0


def build_inputs(model_dir: Path, data_file: Path) -> None:
    """The tiny Llama folder and the JSONL the job trains on (fixed seeds)."""
    build_tiny_llm(model_dir)
    write_tiny_jsonl(data_file, SHAPE, RECORDS, seed=DATA_SEED)


@dataclass
class Outcome:
    """What one run of the job left: its final status and the steps and files that tell the story."""

    status: dict
    preempted_step: int
    committed_step: int
    resumed_step: int
    log2: str
    adapter_sha256: str
    adapter_config: bytes
    metrics: str


class LlmScenario(Scenario):
    """The demo's scenario with causal-lm inputs: a model folder and one JSONL file instead of images."""

    def prepare_inputs(self) -> None:
        for stale in ("inputs", "outputs"):
            shutil.rmtree(self.workdir / stale, ignore_errors=True)
        self.model_dir = self.workdir / "inputs" / "tiny-llm"
        self.data_dir = self.workdir / "inputs" / "data"
        build_inputs(self.model_dir, self.data_dir / "train.jsonl")
        self.event("setup", "built the tiny Llama and a JSONL of prompt/completion records")

    def upload_inputs(self) -> None:
        spec, s3 = self._load_manifest()["spec"], self._s3()
        seed.ensure_buckets(s3, [spec["baseModel"]["uri"], spec["dataset"]["uri"], spec["output"]["uri"]])
        seed.clear_prefix(s3, spec["output"]["uri"])
        seed.upload_folder(s3, self.model_dir, spec["baseModel"]["uri"])
        bucket, key = seed.split_s3_uri(spec["dataset"]["uri"])
        s3.upload_file(str(self.data_dir / "train.jsonl"), bucket, key)
        core, _ = self._kube()
        core.create_namespaced_secret(self.namespace, seed.credentials_secret(self._parsed.storage))
        self.event("setup", f"uploaded the model and {spec['dataset']['uri']}")


@dataclass
class Reference:
    seconds: float
    adapter_sha256: str
    adapter_config: bytes
    metrics: str


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """`lora-train` uninterrupted, as a process, on the job's spec with local inputs."""
    root = tmp_path_factory.mktemp("llm-reference")
    build_inputs(root / "model", root / "train.jsonl")
    spec = yaml.safe_load(MANIFEST.read_text())["spec"]
    config = to_train_config(parse_spec(spec)).model_copy(update={
        "base_model": str(root / "model"), "train_file": str(root / "train.jsonl"), "output_dir": str(root / "out"),
        "cache_dir": str(root / "cache"), "work_dir": str(root / "work"),
    })
    run = run_attempt(config.model_dump(mode="json"), base_env(), root / "run", stall=REFERENCE_STALL_SECONDS)
    assert run.code == 0 and not run.timed_out, (root / "run" / "trainer.log").read_text()[-3000:]
    out = root / "out"
    return Reference(run.seconds, hashlib.sha256((out / ADAPTER_WEIGHTS).read_bytes()).hexdigest(),
                     (out / ADAPTER_CONFIG).read_bytes(), (out / "logs" / "metrics.jsonl").read_text())


def _targets() -> list[object]:
    """Each target; with the real control plane there, the emulator's run is left to `make chaos`
    (pytest -m slow): the operator's side is the SD demo's, run on both targets by test_operator."""
    names = [t for t in target_names() if t != "cluster"]
    return [pytest.param(t, marks=pytest.mark.slow) if t == "emulator" and "real" in names else t for t in names]


@pytest.fixture(scope="module", params=_targets())
def outcome(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            reference: Reference) -> Outcome:
    """The job run once on this target: applied, reclaimed after its first checkpoint, recovered."""
    workdir = tmp_path_factory.mktemp(f"llm-job-{request.param}")
    with LlmScenario(workdir.resolve(), s3_port=0, manifest=MANIFEST, timeout=SCENARIO_REFERENCES * reference.seconds,
                     progress_interval=1.0, kube=request.param) as sc:
        sc.start_cluster()
        sc.start_operator()
        sc.prepare_inputs()
        sc.upload_inputs()
        sc.apply_job()
        sc.wait_attempt_running(1)
        sc.wait_first_checkpoint()
        sc.reclaim_attempt(1)
        preempted, committed = sc.wait_preempted(1)
        sc.wait_preemption_counted()
        sc.wait_attempt_running(2)
        resumed = sc.wait_resumed(2)
        status = sc.wait_succeeded()
        local = workdir / "output"
        seed.download_prefix(sc._s3(), sc.spec["output"]["uri"], local, skip=("checkpoints/",))
        return Outcome(status, preempted, committed, resumed, sc.log_files["attempt 2"].read_text(),
                       hashlib.sha256((local / ADAPTER_WEIGHTS).read_bytes()).hexdigest(),
                       (local / ADAPTER_CONFIG).read_bytes(), (local / "logs" / "metrics.jsonl").read_text())


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest, reference: Reference) -> float:
    return set_deadline(request, TEST_REFERENCES * reference.seconds)


def test_causal_lm_job_succeeds_after_one_preemption(outcome: Outcome) -> None:
    status = outcome.status
    assert status["phase"] == "Succeeded", status
    assert (status["preemptions"], status["failures"], status["attempt"]) == (1, 0, 2)
    spec = yaml.safe_load(MANIFEST.read_text())["spec"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == spec["training"]["maxTrainSteps"]
    output = spec["output"]["uri"]
    assert status["outputs"]["weights"] == output + "adapter_model.safetensors"  # the PEFT adapter, not a diffusers file
    assert status["outputs"]["adapter"] == output and "kohyaWeights" not in status["outputs"]


def test_attempt_2_resumed_from_the_committed_checkpoint(outcome: Outcome) -> None:
    assert outcome.preempted_step == outcome.committed_step >= 1
    assert outcome.resumed_step == outcome.committed_step
    assert f"attempt 2: resumed from step {outcome.committed_step}" in outcome.log2


def test_adapter_and_losses_equal_an_uninterrupted_run(outcome: Outcome, reference: Reference) -> None:
    assert outcome.adapter_sha256 == reference.adapter_sha256
    for metric in ("loss", "eval_loss"):
        assert read_metric(outcome.metrics, metric) == read_metric(reference.metrics, metric), metric
    assert read_metric(reference.metrics, "eval_loss")  # the job's evalSteps did evaluate
    job, ref = json.loads(outcome.adapter_config), json.loads(reference.adapter_config)
    spec = yaml.safe_load(MANIFEST.read_text())["spec"]
    assert job.pop("base_model_name_or_path") == spec["baseModel"]["uri"]  # the base as the job names it
    ref.pop("base_model_name_or_path")
    assert job == ref
