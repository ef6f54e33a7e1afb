"""Preemption and resume of the real trainer against a real S3 server (moto) on 127.0.0.1.

Behaviours:
- random SIGKILL/SIGTERM kills (seeded) at drawn phases → every resume exact (resumes counted from each
  attempt's "resumed from step N" line), final weights and losses bit-identical;
- SIGTERM → exit 75 and a termination message naming the step and the committed checkpoint URI;
- SIGTERM while the store is down and the grace budget runs out → exit 75, the previous committed
  checkpoint stays intact and the next attempt resumes from it exactly;
- transient S3 errors on PUT and GET while training → the run carries on and ends bit-identical;
- a store that stays down → exit 3 (StorageUnavailable) with a clear message; committed checkpoints survive;
- a stale attempt is refused (exit 73); a changed config is refused naming the fields (exit 65) unless
  allowed; TensorBoard scalars stay on one step axis across resumes.

Deadlines are multiples of the uninterrupted reference run measured first in this module (see
tests/e2e/deadlines.py), so a loaded machine stretches them instead of failing.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from lora_operator.devcluster.s3 import TEST_CREDENTIALS
from lora_trainer import contract
from lora_trainer.checkpoint import claim_attempt
from lora_trainer.config import S3Config, parse_config
from lora_trainer.errors import EXIT_CANTCREAT, EXIT_DATAERR, EXIT_PREEMPTED, EXIT_STORAGE, ResumeRefused
from lora_trainer.storage import open_store
from lora_trainer.train import Trainer
from tests.e2e.chaos import (
    Reference,
    base_env,
    chaos_config,
    chaos_run,
    manifests,
    read_result,
    reference_run,
    run_trainer,
)
from tests.e2e.deadlines import FUNC_ONLY, set_deadline
from tests.support.s3 import S3Env

pytestmark = FUNC_ONLY
REF_ENV = dict(TEST_CREDENTIALS)
# Reference runs each test may take at most (times ATTEMPT_FACTOR); the default is 2.
REFERENCES = {"test_random_kills_resume_exactly": 4}


def child_env(s3: S3Env) -> dict[str, str]:
    return {**base_env(), **s3.env}


@pytest.fixture(scope="module")
def inputs(tiny_sd: Path, tiny_data: Path) -> tuple[str, str]:
    return str(tiny_sd), str(tiny_data)


@pytest.fixture(scope="module")
def reference(s3_server: str, inputs: tuple[str, str], tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted run; outputs depend only on training fields, so every test compares to it."""
    import boto3

    with pytest.MonkeyPatch.context() as mp:
        for name, value in REF_ENV.items():
            mp.setenv(name, value)
        yield _reference(s3_server, inputs, tmp_path_factory, boto3)


def _reference(s3_server: str, inputs: tuple[str, str], tmp_path_factory: pytest.TempPathFactory,
               boto3) -> Reference:

    root = tmp_path_factory.mktemp("ref")
    env = {**REF_ENV, **base_env()}
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                 aws_access_key_id=REF_ENV["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=REF_ENV["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="reference")
    s3 = S3Config(endpoint_url=s3_server, region="us-east-1", path_style=True)
    config = chaos_config(*inputs, "s3://reference/run", s3, root / "cache")
    return reference_run(config, env, root, s3)


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest, reference: Reference) -> float:
    """This test's pytest timeout, in reference runs; what one wait or one attempt may take is
    `reference.deadline(1)`."""
    return set_deadline(request, reference.deadline(REFERENCES.get(request.node.originalname, 2)))


def wait_for(predicate, timeout: float, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout:.0f}s")
        time.sleep(every)


@pytest.mark.slow  # a kill campaign: `make chaos` (the other tests here resume exactly after one kill each)
def test_random_kills_resume_exactly(s3_env: S3Env, inputs, reference: Reference, tmp_path: Path) -> None:
    config = chaos_config(*inputs, s3_env.uri("chaos"), s3_env.s3, tmp_path / "cache")
    tally = chaos_run(config, child_env(s3_env), tmp_path, s3_env.s3, reference, kills=3, rng=random.Random(7))
    # The first kill never targets the export, so it lands. A later one in the export can be outrun, or
    # be a SIGTERM the trainer answers by finishing (exit 0): either ends the run early. The export is
    # drawn only once a checkpoint is committed, and the last planned kill waits for one, so some
    # attempt resumes (counted from its "resumed from step N" line, also when it resumed at the end).
    assert 1 <= tally.kills <= 3 and tally.kills + tally.missed <= 3
    assert tally.resumes >= 1
    assert tally.problems == []
    assert tally.final_exact and tally.losses_exact
    assert tally.exact_resumes == tally.resumes


def test_sigterm_commits_and_reports(s3_env: S3Env, inputs, reference: Reference, tmp_path: Path) -> None:
    config = chaos_config(*inputs, s3_env.uri("term"), s3_env.s3, tmp_path / "cache")
    store = open_store(config["output_dir"], s3_env.s3)
    env = child_env(s3_env)
    proc = _start(config, env, tmp_path / "a1")
    wait_for(lambda: store.exists(contract.LATEST_FILE), reference.deadline(1))  # training is under way
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=reference.deadline(1)) == EXIT_PREEMPTED
    message = contract.TerminationMessage.model_validate_json((tmp_path / "a1/termination.json").read_text())
    assert message.reason == "Preempted" and message.step and message.step > 0
    assert message.checkpoint == f"{config['output_dir']}/checkpoints/step-{message.step:09d}"
    assert message.step in manifests(store)  # the checkpoint named is committed
    assert run_trainer(config, env, tmp_path / "a2", timeout=reference.deadline(1))[0] == 0
    assert read_result(store) == (reference.weights_sha256, reference.losses)


def _start(config: dict, env: dict[str, str], workdir: Path):
    import json
    import subprocess
    import sys

    workdir.mkdir(parents=True, exist_ok=True)
    env = {**env, contract.ENV_CONFIG: json.dumps(config),
           contract.ENV_TERMINATION_LOG: str(workdir / "termination.json")}
    log = (workdir / "trainer.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "lora_trainer"], env=env, stdout=log, stderr=subprocess.STDOUT)


def test_grace_budget_exceeded_keeps_last_checkpoint(s3_faults: S3Env, inputs, reference: Reference,
                                                     tmp_path: Path) -> None:
    s3 = s3_faults.s3
    config = chaos_config(*inputs, s3_faults.uri("grace"), s3, tmp_path / "cache")
    config["preemption_grace_seconds"] = 2
    store = open_store(config["output_dir"], s3)
    proc = _start(config, child_env(s3_faults), tmp_path / "a1")
    wait_for(lambda: store.exists(contract.LATEST_FILE), reference.deadline(1))
    s3_faults.proxy.down()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=reference.deadline(1))
    s3_faults.proxy.up()
    assert code == EXIT_PREEMPTED
    message = contract.TerminationMessage.model_validate_json((tmp_path / "a1/termination.json").read_text())
    assert "not committed within the grace budget" in message.message
    committed = manifests(store)
    assert committed and message.step not in committed
    # The next attempt resumes from the newest committed checkpoint and ends like an uninterrupted run.
    assert run_trainer(config, child_env(s3_faults), tmp_path / "a2", timeout=reference.deadline(1))[0] == 0
    log = (tmp_path / "a2/trainer.log").read_text()
    assert f"resumed from step {max(committed)}" in log


def test_transient_s3_faults_do_not_change_the_result(s3_faults: S3Env, inputs, reference: Reference,
                                                     tmp_path: Path) -> None:
    s3 = s3_faults.s3
    config = chaos_config(*inputs, s3_faults.uri("faulty"), s3, tmp_path / "c2")
    proxy = s3_faults.proxy
    proxy.fail("PUT", count=3, status=503)
    proxy.fail("GET", count=2, status=500)
    proxy.delay("PUT", count=1, seconds=2.0)
    proxy.drop("PUT", count=1)
    assert run_trainer(config, child_env(s3_faults), tmp_path / "a1", timeout=reference.deadline(1))[0] == 0
    assert (proxy.outcomes("fail-503"), proxy.outcomes("fail-500"), proxy.outcomes("drop")) == (3, 2, 1)
    assert read_result(open_store(config["output_dir"], s3)) == (reference.weights_sha256, reference.losses)


def test_store_that_stays_down(s3_faults: S3Env, inputs, reference: Reference, tmp_path: Path) -> None:
    config = chaos_config(*inputs, s3_faults.uri("down"), s3_faults.s3, tmp_path / "cache")
    config["storage_retry_seconds"] = 3
    store = open_store(config["output_dir"], s3_faults.s3)
    proc = _start(config, child_env(s3_faults), tmp_path / "a1")
    wait_for(lambda: store.exists(contract.LATEST_FILE), reference.deadline(1))
    before = manifests(store)
    s3_faults.proxy.down()
    code = proc.wait(timeout=reference.deadline(1))
    s3_faults.proxy.up()
    assert code == EXIT_STORAGE
    message = contract.TerminationMessage.model_validate_json((tmp_path / "a1/termination.json").read_text())
    assert message.reason == "StorageUnavailable" and "storage still unavailable" in message.message
    after = manifests(store)
    assert set(before) <= set(after)
    assert all(after[s] == before[s] for s in before)


def test_stale_attempt_is_refused(s3_env: S3Env, inputs, reference: Reference, tmp_path: Path) -> None:
    config = chaos_config(*inputs, s3_env.uri("stale"), s3_env.s3, tmp_path / "cache")
    claim_attempt(open_store(config["output_dir"], s3_env.s3), 5)
    code, _ = run_trainer(config, child_env(s3_env), tmp_path / "a1", attempt=3,
                          timeout=reference.deadline(1))
    assert code == EXIT_CANTCREAT
    message = contract.TerminationMessage.model_validate_json((tmp_path / "a1/termination.json").read_text())
    assert message.reason == "StaleAttempt"


def test_changed_config_is_refused_naming_fields(s3_env: S3Env, inputs, tmp_path: Path) -> None:
    base = chaos_config(*inputs, s3_env.uri("changed"), s3_env.s3, tmp_path / "cache")
    base.update(max_train_steps=6, save_steps=3)
    Trainer(parse_config(base)).run()
    changed = parse_config({**base, "seed": 12, "learning_rate": 5e-4, "max_train_steps": 9})
    with pytest.raises(ResumeRefused) as info:
        Trainer(changed).run()
    assert "learning_rate, max_train_steps, seed" in str(info.value)
    assert info.value.exit_code == EXIT_DATAERR
    result = Trainer(changed.model_copy(update={"allow_config_change": True})).run()
    assert result.resumed_from == 6 and result.step == 9


def test_tensorboard_continues_on_one_axis(s3_env: S3Env, inputs, reference: Reference, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = chaos_config(*inputs, s3_env.uri("tb"), s3_env.s3, tmp_path / "cache")
    store = open_store(config["output_dir"], s3_env.s3)
    env = child_env(s3_env)
    proc = _start(config, env, tmp_path / "a1")
    wait_for(lambda: any(m >= 10 for m in manifests(store)), reference.deadline(1))
    proc.kill()
    proc.wait()
    assert run_trainer(config, env, tmp_path / "a2", timeout=reference.deadline(1))[0] == 0
    logs = tmp_path / "logs"
    for key in store.list("logs/"):
        store.get_file(key, logs / Path(key).name)
    acc = EventAccumulator(str(logs))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss/train")]
    assert steps == list(range(1, 41))
    assert len(list(logs.glob("events.out.tfevents.*"))) == 2

