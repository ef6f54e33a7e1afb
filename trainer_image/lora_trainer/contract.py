"""The trainer <-> operator contract: env names, output layout names, progress and termination models.

Torch-free, so the operator imports it. Exit codes live in `lora_trainer.errors`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

# Environment the operator sets on the trainer pod.
ENV_CONFIG = "LORA_TRAIN_CONFIG"  # the resolved TrainConfig as JSON (used when --config is absent)
ENV_ATTEMPT = "LORA_ATTEMPT"  # attempt number; fencing compares it with the output's newest
# The run the attempt belongs to (the LoRATrainingJob's uid). With it, LORA_ATTEMPT counts within
# the run and the fence continues from the newest attempt of earlier runs in the output, so a
# deleted and re-applied job resumes instead of being fenced out (lora_trainer.checkpoint.fence_attempt).
ENV_RUN_ID = "LORA_RUN_ID"
ENV_TERMINATION_LOG = "LORA_TERMINATION_LOG"  # default /dev/termination-log
ENV_CACHE_DIR = "LORA_CACHE_DIR"
# Several training processes (issue 15). The operator sets these; `lora-train` reads them and, when
# the world is larger than one process, starts one worker per process through torch.distributed.
ENV_NPROC_PER_NODE = "LORA_NPROC_PER_NODE"  # processes in this pod (resources.gpus when > 1)
ENV_NNODES = "LORA_NNODES"  # pods in the group (spec.nodes)
ENV_NODE_RANK = "LORA_NODE_RANK"  # this pod's index in the group, 0 = leader
ENV_MASTER_ADDR = "LORA_MASTER_ADDR"  # the leader pod's stable DNS name (rendezvous)
ENV_MASTER_PORT = "LORA_MASTER_PORT"
# The preemption rate (per hour) the operator observed for the job, or its pool's configured rate:
# checkpoint.everySteps auto derives the Young/Daly interval from it.
ENV_PREEMPTION_RATE = "LORA_PREEMPTION_RATE_PER_HOUR"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"

# Output layout (same on disk and under an s3:// output URI).
FINAL_WEIGHTS = "pytorch_lora_weights.safetensors"
FINAL_WEIGHTS_KOHYA = "pytorch_lora_weights_kohya.safetensors"
CONFIG_BACKUP = "config_backup.yaml"
PROGRESS_FILE = "progress.json"
LOGS_DIR = "logs"
TRAIN_LOG = "logs/train.log"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "checkpoints/latest.json"
MANIFEST_FILE = "MANIFEST.json"


def intermediate_weights_name(step: int) -> str:
    """Path of the LoRA users can try from step N, relative to the output root."""
    return f"{CHECKPOINTS_DIR}/pytorch_lora_weights_step_{step}.safetensors"


def utcnow() -> str:
    """Now as an RFC 3339 UTC timestamp, the form Kubernetes status uses."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Progress(_Wire):
    """progress.json: the trainer's heartbeat, mirrored by the operator into the job status."""

    step: int = Field(0, ge=0)
    total_steps: int = Field(0, ge=0)
    epoch: int = Field(0, ge=0)
    loss: float | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    tokens_per_second: float | None = None  # text tasks: tokens trained per second this attempt
    attempt: int = Field(0, ge=0)
    state: str = "running"  # running | checkpointing | finished | preempted | failed
    latest_checkpoint_step: int | None = None
    updated: str = Field(default_factory=utcnow)


class TerminationMessage(_Wire):
    """JSON the trainer writes to the termination log before it exits."""

    reason: str
    step: int | None = None
    checkpoint: str | None = None
    message: str = ""


class LatestPointer(_Wire):
    """checkpoints/latest.json: the newest committed checkpoint."""

    step: int
    attempt: int
    path: str  # e.g. checkpoints/step-000000500
    time: str = Field(default_factory=utcnow)
