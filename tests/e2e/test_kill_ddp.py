"""SIGKILL and resume of `lora-train` running two training processes (gloo, tiny SD).

Behaviour tested: the launcher (the pod's PID 1) killed with SIGKILL once a checkpoint is committed
takes its workers with it, and a second launch resumes from a committed step and ends with final
weights sha256-equal, and per-step losses equal, to an uninterrupted 2-process run's.

The reference is the session's 2-process run (tests/support/ddp.py); deadlines are multiples of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_trainer.checkpoint import Manifest
from tests.e2e.chaos import kill_after_first_commit_and_resume
from tests.e2e.deadlines import FUNC_ONLY, set_deadline
from tests.support.ddp import LOCAL, DdpReference, ddp_config, ddp_env

pytestmark = FUNC_ONLY


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest, ddp_reference: DdpReference) -> float:
    return set_deadline(request, ddp_reference.ref.deadline(2))


@pytest.mark.slow  # `make chaos`: test_ddp's SIGTERM test resumes two processes exactly by default; this one
# adds the launcher's SIGKILL taking its workers with it (and sd-2rank is in the chaos rotation)
def test_sigkill_of_two_processes_resumes_exactly(ddp_reference: DdpReference, tmp_path: Path) -> None:
    config = ddp_config(ddp_reference.model, ddp_reference.data, tmp_path / "out", tmp_path / "cache")
    store = kill_after_first_commit_and_resume(config, ddp_env(), tmp_path, LOCAL, ddp_reference.ref)
    manifest = Manifest.model_validate_json(store.get_bytes("checkpoints/step-000000008/MANIFEST.json"))
    assert manifest.world_size == 2 and "rng-rank1.safetensors" in manifest.files
