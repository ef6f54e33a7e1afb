"""The trainer's configuration: one pydantic model, lora-scripts snake_case or CRD camelCase.

This module imports no torch: the operator uses it to validate job specs and to render the CRD.

Choices where lora-scripts and the issue are silent:
- `epochs` or `max_train_steps` must be set; when both are, `max_train_steps` wins.
- `lora_alpha` defaults to `lora_rank` (scale 1.0), as the diffusers training scripts do.
- `save_steps` unset means no intermediate checkpoints (a SIGTERM still commits one); `auto` takes
  the Young/Daly interval from the measured commit cost and the preemption rate the operator puts
  in LORA_PREEMPTION_RATE_PER_HOUR, held to `min_save_steps`..`max_save_steps` (lora_trainer.interval).
- `keep_last: 0` keeps every checkpoint.
- `caption_extension: txt` (no dot, as the CRD allows) means `.txt`; anything but a dot and
  1-32 letters, digits, `_`, `-` or inner dots is refused.
- s3:// URIs are normalised (`s3://b/a/./b//c` is `s3://b/a/b/c`), a `..` segment is refused;
  `output_dir` may not overlap an input, `work_dir` may not overlap the output or an input
  (compared lexically here, and again with symlinks resolved when the run starts).
- YAML is read with a bounded SafeLoader: at most 1 MiB of text and 100,000 nodes once aliases
  are expanded (an alias bomb is refused before any object is built); error messages echo
  values cut to 200 characters.
- `max_image_pixels` (default 100 MP): a bigger image makes the dataset unusable (exit 65);
  one over a quarter of it is decoded with a warning about memory.
- Relative local paths (`resolve_local_paths`, when a run starts): tried from the current
  directory first (lora-scripts users write them so), then from the config file's folder;
  `metadata_path` from the current directory, then from the dataset folder (for an s3:// dataset
  only the latter). Two that exist and differ are a ConfigError naming both. The chosen paths
  are written back absolute, so config_backup.yaml and the config hash say what was used.
- `base_model` may be one `.safetensors` file (A1111/ComfyUI style); `base_model_config` names a
  diffusers folder with its configs. Pickle checkpoints (`.ckpt`, `.pt`, `.bin`…) are refused:
  loading one runs code from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.interval import AUTO, DEFAULT_MAX_STEPS, DEFAULT_MIN_STEPS
from lora_trainer.paths import (
    SHOWN_CHARS,
    choose_local,
    is_inside,
    metadata_outside,
    normalise_s3_uri,
    overlap_problem,
    s3_uri_problem,
    shorten,
)
from lora_trainer.quantize import QuantizeBase
from lora_trainer.single_file import pickle_problem

DEFAULT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]

LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
MixedPrecision = Literal["no", "fp16", "bf16"]
WeightingScheme = Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"]  # diffusers' SD3/Flux trainers'
Determinism = Literal["exact", "fast"]  # lora_trainer.determinism says what each sets on CUDA
Optimizer = Literal["adamw", "adamw8bit"]  # adamw8bit: bitsandbytes' AdamW8bit, when installed
Task = Literal["text-to-image", "causal-lm"]
ModelFamily = Literal["auto", "sd", "sdxl", "flux", "causal-lm"]  # tasks/ registers one family per name (a test keeps them in step)

# Constrained types shared with the operator's job spec, so the CRD says what the trainer checks.
Rank = Annotated[int, Field(ge=1, le=1024, description="LoRA rank (r): width of the low-rank update.")]
Alpha = Annotated[float, Field(gt=0, le=4096, description="LoRA alpha; the update is scaled by alpha/rank.")]
Resolution = Annotated[
    int,
    Field(ge=8, le=4096, multiple_of=8, description="Training resolution in pixels (square crops)."),
]
BatchSize = Annotated[int, Field(ge=1, le=1024, description="Images per optimizer micro-batch.")]
AccumSteps = Annotated[int, Field(ge=1, le=1024, description="Micro-batches per optimizer step.")]
LearningRate = Annotated[float, Field(gt=0, le=1, description="Peak learning rate for AdamW.")]
Steps = Annotated[int, Field(ge=1, le=10_000_000)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="Seed for every random choice in training.")]
MAX_STEPS = 10_000_000


def _save_steps(value: Any) -> Any:
    """A whole number of steps from 1 to MAX_STEPS (digits in a string too), or "auto"."""
    if value is None or value == AUTO:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_STEPS:
        return value
    raise ValueError(f"must be a whole number of steps from 1 to {MAX_STEPS}, or {AUTO!r} for the interval "
                     "from the preemption rate; e.g. 500 or auto")


# A fixed interval or "auto". In the CRD: int-or-string, an integer >= 1 or the string "auto"
# (minimum/maximum apply to integers only, the pattern to strings only).
SaveSteps = Annotated[
    int | Literal["auto"] | None,
    BeforeValidator(_save_steps),
    WithJsonSchema({
        "x-kubernetes-int-or-string": True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "minimum": 1, "maximum": MAX_STEPS, "pattern": f"^{AUTO}$",
    }),
]

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
MAX_CONFIG_BYTES = 1024 * 1024
MAX_YAML_NODES = 100_000  # counted with aliases expanded
MAX_ERRORS_SHOWN = 10
_CAPTION_EXT = re.compile(r"\.[A-Za-z0-9_-][A-Za-z0-9_.-]{0,31}")


class _Model(BaseModel):
    """Accepts snake_case and camelCase keys; unknown keys are an error that names them."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        loc_by_alias=False,  # errors name fields the way lora-scripts users write them
    )


class S3Config(_Model):
    """Where S3-compatible storage lives; credentials come only from the AWS_* environment."""

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://minio.minio:9000; unset for AWS.")
    region: str | None = Field(None, description="Region name, e.g. us-east-1 (R2: auto).")
    path_style: bool = Field(True, description="Path-style addressing (MinIO, moto); false for virtual-hosted.")
    max_attempts: int = Field(8, ge=1, le=50, description="Retries per request before the store counts as down.")
    connect_timeout: float = Field(5.0, gt=0, le=300, description="Seconds to wait for a connection.")
    read_timeout: float = Field(30.0, gt=0, le=3600, description="Seconds to wait for a response.")


def bounded_s3(s3: S3Config, retry_seconds: float) -> S3Config:
    """S3 client settings whose worst case (attempts x timeouts) fits in half of `retry_seconds`.

    The trainer retries a failing call until `storage_retry_seconds` have passed, but checks the
    deadline only between calls; botocore's own retries and read timeouts run inside one call.
    Bounding them keeps a store that accepts connections and never answers from holding the run
    much past the deadline (5 s gives 1.25 s reads, 0.6 s connects, 1 attempt per call)."""
    budget = retry_seconds / 2
    read = min(s3.read_timeout, max(0.5, budget / 2))
    connect = min(s3.connect_timeout, max(0.5, budget / 4))
    attempts = max(1, min(s3.max_attempts, int(budget // (read + connect))))
    return s3.model_copy(update={"read_timeout": read, "connect_timeout": connect, "max_attempts": attempts})


class TrainConfig(_Model):
    """Everything one LoRA training run needs; `lora-train --config` reads it from YAML."""

    task: Task = Field(
        "text-to-image",
        description="What is trained: text-to-image (a diffusers model, images) or causal-lm (a transformers "
        "causal LM, JSONL text).",
    )
    base_model: str = Field(
        ..., min_length=1,
        description="Diffusers model folder, or one .safetensors checkpoint (text-to-image); a transformers "
        "causal-LM folder (causal-lm): local path, file://, or s3://.",
    )
    base_model_config: str | None = Field(
        None, min_length=1,
        description="Diffusers folder (local or s3://) with the configs of a single-file base_model.",
    )
    model_family: ModelFamily = Field(
        "auto",
        description="Model family of base_model: auto reads it from model_index.json (or a single file's keys); "
        "a family name insists on it, and a base model of another family stops the run (exit 78).",
    )
    train_data_dir: str | None = Field(
        None, min_length=1,
        description="Folder of images with captions: local path, file://, or s3:// (text-to-image).",
    )
    train_file: str | None = Field(
        None, min_length=1,
        description="JSONL of prompt/completion, messages or text records: local path, file://, or s3:// (causal-lm).",
    )
    eval_file: str | None = Field(None, min_length=1, description="Held-out JSONL for eval loss (causal-lm).")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="Share of train_file held out for eval loss, drawn with the seed (causal-lm).",
    )
    eval_steps: Steps | None = Field(
        None, description="Eval loss on the held-out split every N steps (and at the last step); unset: last step only.",
    )
    max_seq_length: int = Field(
        1024, ge=8, le=1_048_576, description="Tokens per sequence; longer samples are truncated (causal-lm).",
    )
    packing: bool = Field(
        False, description="Concatenate samples and cut them into max_seq_length blocks (causal-lm).",
    )
    metadata_path: str | None = Field(
        None,
        description="Captions CSV (file_name,text): relative to the current directory, else to train_data_dir; "
        "default metadata.csv if present.",
    )
    caption_extension: str = Field(
        ".txt", description="Sidecar caption extension when there is no metadata CSV; `txt` means `.txt`."
    )
    output_dir: str = Field(..., min_length=1, description="Where outputs go: local path, file://, or s3://.")

    resolution: Resolution | None = Field(
        None,
        description="Training resolution in pixels (square crops); unset: the model family's default "
        "(512 for SD 1.x/2.x, 1024 for SDXL).",
    )
    center_crop: bool = Field(True, description="Centre crop after resizing; false crops at random.")
    random_flip: bool = Field(False, description="Flip images horizontally at random.")
    enable_bucket: bool = Field(
        False, description="Aspect-ratio buckets (kohya): each image cropped to the bucket nearest its aspect "
        "ratio instead of a square; batches drawn within one bucket.",
    )
    min_bucket_reso: int = Field(256, ge=8, le=4096, multiple_of=8, description="Shortest bucket side in pixels.")
    max_bucket_reso: int = Field(1024, ge=8, le=8192, multiple_of=8, description="Longest bucket side in pixels.")
    bucket_reso_steps: int = Field(
        64, ge=8, le=1024, multiple_of=8, description="Bucket sides are multiples of this many pixels."
    )

    lora_rank: Rank = 8
    lora_alpha: Alpha | None = None
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    init_lora: str | None = Field(
        None, min_length=1,
        description="Start from this LoRA instead of a fresh one: a .safetensors file in diffusers or kohya format "
        "(local path, file://, or s3://); it must have the run's rank and target modules (else exit 78). "
        "Its sha256 joins the config hash, so a resume refuses a changed file.",
    )
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Modules that get LoRA adapters; unset: the family's (to_q, to_k, to_v, to_out.0 in the UNet; "
        "the attention projections of a causal LM, e.g. q_proj, k_proj, v_proj, o_proj in Llama).",
    )
    lora_target_mlp: bool = Field(
        False, description="causal-lm with target_modules unset: also the MLP projections (gate/up/down in Llama).",
    )
    merge: bool = Field(False, description="causal-lm: also write the base model with the LoRA merged in (merged/).")
    load_in_4bit: bool = Field(
        False, description="causal-lm: QLoRA, the frozen base in 4-bit NF4 (needs CUDA and bitsandbytes, else exit 78).",
    )
    train_text_encoder: bool = Field(False, description="Also train a LoRA on the CLIP text encoder.")
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEXT_ENCODER_TARGET_MODULES),
        min_length=1,
        description="Text-encoder modules that get LoRA adapters.",
    )

    batch_size: BatchSize = 1
    gradient_accumulation_steps: AccumSteps = 1
    epochs: Steps | None = Field(None, description="Passes over the dataset (used when max_train_steps is unset).")
    max_train_steps: Steps | None = Field(None, description="Optimizer steps to train; wins over epochs.")
    learning_rate: LearningRate = 1e-4
    text_encoder_lr: float | None = Field(None, gt=0, le=1, description="Text-encoder LR; default learning_rate.")
    lr_scheduler: LrScheduler = Field("constant", description="Learning-rate schedule.")
    lr_warmup_steps: int = Field(0, ge=0, le=10_000_000, description="Linear warm-up steps.")
    lr_num_cycles: int = Field(1, ge=1, le=1000, description="Cycles for cosine_with_restarts.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0, le=1)
    adam_epsilon: float = Field(1e-8, gt=0, le=1)
    optimizer: Optimizer = Field(
        "adamw",
        description="adamw (torch) or adamw8bit (bitsandbytes' 8-bit AdamW: less GPU memory; needs the "
        "bitsandbytes package, else the run stops with exit 78).",
    )
    mixed_precision: MixedPrecision = Field(
        "no", description="Autocast precision on CUDA; on CPU training always runs in fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet.")
    quantize_base: QuantizeBase = Field(
        "none", description="Diffusion-transformer families (Flux): the frozen denoiser's weights in int8 or fp8 "
        "(torchao weight-only; needs the torchao package and a CUDA GPU, else exit 78; resume is not guaranteed "
        "bit-exact: quantized CUDA kernels may be nondeterministic). none keeps them in the run's dtype.",
    )
    determinism: Determinism = Field(
        "exact", description="CUDA kernels: exact (deterministic algorithms, cuBLAS workspace, cuDNN without "
        "autotuning, math attention, no TF32: resume is bitwise) or fast (torch's fastest kernels: resume exact only "
        "up to kernel nondeterminism). The CPU is deterministic either way.",
    )
    cache_latents: bool = Field(False, description="Cache VAE posteriors by content (under cache/ in the output).")
    cache_text_embeddings: bool = Field(
        False, description="Cache text-encoder outputs by caption (frozen text encoders only)."
    )
    noise_offset: float = Field(0.0, ge=0, le=1, description="Offset noise strength (0 disables).")
    weighting_scheme: WeightingScheme = Field(
        "none", description="Flow-matching families (Flux): timestep density and loss weights as diffusers' Flux "
        "trainer: none (uniform, unit weights), logit_normal, mode, sigma_sqrt, cosmap. SD and SDXL ignore it.",
    )
    logit_mean: float = Field(0.0, ge=-10, le=10, description="weighting_scheme logit_normal: the mean.")
    logit_std: float = Field(1.0, gt=0, le=10, description="weighting_scheme logit_normal: the standard deviation.")
    mode_scale: float = Field(1.29, ge=0, le=10, description="weighting_scheme mode: the scale.")
    guidance_scale: float = Field(
        3.5, ge=0, le=100, description="Guidance-distilled flow models (FLUX.1-dev): the guidance value trained with.",
    )
    seed: Seed = 42
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS, ge=64, le=2_000_000_000,
        description="Largest image (width x height) the dataset may hold; a bigger one stops the run (exit 65).",
    )

    save_steps: SaveSteps = Field(
        None, description="Commit a resumable checkpoint every N steps, or auto: the Young/Daly interval from the "
        "measured commit cost and the preemption rate (LORA_PREEMPTION_RATE_PER_HOUR).",
    )
    min_save_steps: Steps = Field(DEFAULT_MIN_STEPS, description="save_steps auto: the fewest steps between checkpoints.")
    max_save_steps: Steps = Field(DEFAULT_MAX_STEPS, description="save_steps auto: the most steps between checkpoints.")
    keep_last: int = Field(3, ge=0, le=10_000, description="Committed checkpoints to keep; 0 keeps all.")
    log_every: int = Field(10, ge=1, le=100_000, description="Steps between plain log lines and scalars.")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when present.")
    s3: S3Config = Field(default_factory=S3Config)
    cache_dir: str | None = Field(None, description="Local cache for base model and dataset downloads.")
    work_dir: str | None = Field(None, description="Local scratch folder; default a folder under cache_dir.")
    preemption_grace_seconds: float = Field(
        25.0, gt=0, le=3600, description="Budget to commit a checkpoint after SIGTERM before giving up on it."
    )
    storage_retry_seconds: float = Field(
        300.0, gt=0, le=86_400, description="How long background uploads retry a failing store before the run fails."
    )
    allow_config_change: bool = Field(
        False, description="Resume even if training-defining fields changed since the checkpoint (dangerous)."
    )
    allow_world_size_change: bool = Field(
        False, description="Resume a checkpoint made by a different number of training processes (GPUs x nodes): "
        "correct, but not bitwise equal to an uninterrupted run. Off: such a resume is refused (exit 65).",
    )

    @field_validator("base_model", "base_model_config", "train_data_dir", "train_file", "eval_file", "output_dir")
    @classmethod
    def _clean_uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if problem := s3_uri_problem(value):
            raise ValueError(problem)
        return normalise_s3_uri(value)

    @field_validator("init_lora")
    @classmethod
    def _init_lora_file(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if problem := s3_uri_problem(value):
            raise ValueError(problem)
        if not value.rstrip("/").lower().endswith(".safetensors"):
            raise ValueError("a LoRA is read from one .safetensors file only (no pickle); "
                             "point it at e.g. pytorch_lora_weights_kohya.safetensors")
        return normalise_s3_uri(value)

    @field_validator("base_model")
    @classmethod
    def _no_pickle(cls, value: str) -> str:
        if problem := pickle_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("caption_extension")
    @classmethod
    def _dotted_extension(cls, value: str) -> str:
        ext = value if value.startswith(".") else f".{value}"
        if not _CAPTION_EXT.fullmatch(ext) or ext.endswith("."):
            raise ValueError("write a file extension such as .txt or .caption")
        return ext

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if problem := next(iter(place_problems(self)), None):
            raise ValueError(problem)
        if problem := task_problem(self):
            raise ValueError(problem)
        if problem := save_steps_problem(self.save_steps, self.min_save_steps, self.max_save_steps):
            raise ValueError(": ".join(problem))
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError(f"min_bucket_reso ({self.min_bucket_reso}) is over max_bucket_reso ({self.max_bucket_reso})")
        if self.epochs is None and self.max_train_steps is None:
            raise ValueError("set epochs or max_train_steps (e.g. max_train_steps: 1000)")
        if self.lr_warmup_steps and self.max_train_steps and self.lr_warmup_steps > self.max_train_steps:
            raise ValueError(
                f"lr_warmup_steps ({self.lr_warmup_steps}) exceeds max_train_steps ({self.max_train_steps})"
            )
        return self

    @property
    def alpha(self) -> float:
        """The effective LoRA alpha (defaults to the rank)."""
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)


def save_steps_problem(save_steps: int | str | None, min_steps: int, max_steps: int,
                       names: tuple[str, str, str] = ("save_steps", "min_save_steps", "max_save_steps"),
                       ) -> tuple[str, str] | None:
    """(field, why) when the auto bounds do not fit (pure): min over max, or a bound changed without auto."""
    every, low, high = names
    if save_steps != AUTO:
        for name, value, default in ((low, min_steps, DEFAULT_MIN_STEPS), (high, max_steps, DEFAULT_MAX_STEPS)):
            if value != default:
                return name, f"only with {every}: auto (it bounds the automatic interval); remove it or set {every}: auto"
        return None
    if min_steps > max_steps:
        return low, f"{min_steps} is over {high} ({max_steps}); lower {low} or raise {high}"
    return None


def task_problem(config: TrainConfig) -> str | None:
    """Why the data and task-only keys do not fit the task (pure), or None."""
    if config.task == "text-to-image":
        if not config.train_data_dir:
            return "train_data_dir: required for task text-to-image; point it at a folder of captioned images"
        extra = [n for n in TEXT_ONLY_FIELDS if getattr(config, n) not in (None, False)]
        if extra:
            return f"{extra[0]}: only for task causal-lm; remove it or set task: causal-lm"
        return None
    if not config.train_file:
        return "train_file: required for task causal-lm; point it at a JSONL file (local or s3://)"
    if config.train_data_dir:
        return "train_data_dir: only for task text-to-image; causal-lm reads train_file (a JSONL)"
    if config.eval_file and config.eval_fraction:
        return "eval_file and eval_fraction: set one of them, not both"
    if config.lora_target_mlp and config.target_modules:
        return "lora_target_mlp: only with target_modules unset; list the MLP modules in target_modules instead"
    if config.merge and config.load_in_4bit:
        return "merge: not with load_in_4bit (the base is quantized); train with load_in_4bit, then merge in 16-bit"
    return None


TEXT_ONLY_FIELDS = ("train_file", "eval_file", "eval_fraction", "eval_steps", "packing", "lora_target_mlp",
                    "merge", "load_in_4bit")


def place_problems(config: TrainConfig, resolve: bool = False) -> list[str]:
    """Overlaps of output_dir with an input and of work_dir with the output or an input.

    Lexical unless `resolve` (then symlinks count too: the trainer checks again at start)."""
    inputs = [(name, value) for name in ("train_data_dir", "train_file", "eval_file")
              if (value := getattr(config, name))]
    inputs.append(("base_model", config.base_model))
    if config.base_model_config:
        inputs.append(("base_model_config", config.base_model_config))
    if config.init_lora:
        inputs.append(("init_lora", config.init_lora))
    pairs = [("output_dir", config.output_dir, name, value) for name, value in inputs]
    if config.work_dir:
        pairs += [("work_dir", config.work_dir, name, value)
                  for name, value in (("output_dir", config.output_dir), *inputs)]
    return [p for args in pairs if (p := overlap_problem(*args, resolve=resolve))]


# Fields whose change makes a resumed run train something else; output/infra fields are not here.
TRAINING_FIELDS: tuple[str, ...] = (
    "task", "base_model", "base_model_config", "train_data_dir", "metadata_path", "caption_extension", "resolution",
    "center_crop", "random_flip", "lora_rank", "lora_alpha", "lora_dropout", "target_modules",
    "train_text_encoder", "text_encoder_target_modules", "batch_size", "gradient_accumulation_steps",
    "epochs", "max_train_steps", "learning_rate", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps",
    "lr_num_cycles", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "mixed_precision", "noise_offset", "seed", "optimizer", "init_lora", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
    "bucket_reso_steps", "cache_latents", "cache_text_embeddings",
    "train_file", "eval_fraction", "max_seq_length", "packing", "lora_target_mlp", "load_in_4bit",
    "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale", "quantize_base",
)

# Training fields added after checkpoints existed: a manifest without one was made with this value.
ADDED_FIELD_DEFAULTS: dict[str, Any] = {
    "optimizer": "adamw", "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
    "bucket_reso_steps": 64, "cache_latents": False, "cache_text_embeddings": False, "init_lora": None,
    "train_file": None, "eval_fraction": None, "max_seq_length": 1024, "packing": False,
    "lora_target_mlp": False, "load_in_4bit": False,
    "weighting_scheme": "none", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "guidance_scale": 3.5, "quantize_base": "none",
}


BASE_MODEL_SHA256 = "base_model_sha256"  # joins the training fields for a single-file base_model
INIT_LORA_SHA256 = "init_lora_sha256"  # joins them for an init_lora file


def training_fields(
    config: TrainConfig, base_model_sha256: str | None = None, init_lora_sha256: str | None = None
) -> dict[str, Any]:
    """The training-defining subset of a config, as plain JSON data.

    A single-file base model's and an init_lora file's content hashes join them, so a changed file refuses resume."""
    data = config.model_dump(mode="json")
    fields = {name: data[name] for name in TRAINING_FIELDS}
    if base_model_sha256:
        fields[BASE_MODEL_SHA256] = base_model_sha256
    if init_lora_sha256:
        fields[INIT_LORA_SHA256] = init_lora_sha256
    return fields


def config_hash(
    config: TrainConfig, base_model_sha256: str | None = None, init_lora_sha256: str | None = None
) -> str:
    """sha256 of the training-defining fields: equal hashes mean a resume trains the same thing."""
    canonical = json.dumps(training_fields(config, base_model_sha256, init_lora_sha256), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of training-defining fields whose values differ between two `training_fields` dicts.

    A changed single-file base model reads `base_model (file content, sha256 <old>... -> <new>...)`."""
    out = []
    for name in sorted(set(old) | set(new)):
        if old.get(name, ADDED_FIELD_DEFAULTS.get(name)) == new.get(name, ADDED_FIELD_DEFAULTS.get(name)):
            continue
        if name in (BASE_MODEL_SHA256, INIT_LORA_SHA256):
            was, now = (str(d.get(name) or "none")[:12] for d in (old, new))
            name = f"{name.removesuffix('_sha256')} (file content, sha256 {was}... -> {now}...)"
        out.append(name)
    return sorted(set(out))


# Local paths resolved when a run starts; metadata_path is resolved after train_data_dir.
LOCAL_PATH_FIELDS: tuple[str, ...] = (
    "base_model", "base_model_config", "train_data_dir", "train_file", "eval_file", "output_dir", "cache_dir",
    "work_dir", "init_lora",
)


def resolve_local_paths(
    config: TrainConfig, cwd: Path, config_dir: Path | None = None, exists: Any = None
) -> TrainConfig:
    """The config with every relative local path made absolute (see the module docstring).

    `config_dir` is the folder of the --config file (None when the config came from the
    environment). ConfigError when a relative path exists from two anchors and they differ."""
    anchors = [("the current directory", cwd)]
    if config_dir is not None:
        anchors.append(("the config file's folder", config_dir))
    check = {"exists": exists} if exists else {}
    update: dict[str, str] = {}
    for name in LOCAL_PATH_FIELDS:
        value = getattr(config, name)
        if not value:
            continue
        path, problem = choose_local(name, value, anchors, **check)
        if problem:
            raise ConfigError(problem)
        if path is not None and str(path) != value:
            update[name] = str(path)
    data_dir = update.get("train_data_dir", config.train_data_dir) or ""
    if config.metadata_path and data_dir and not data_dir.startswith("s3://"):
        data_anchor = choose_local("train_data_dir", data_dir, anchors, **check)[0]
        csv_anchors = [anchors[0], ("train_data_dir", data_anchor)] if data_anchor else anchors[:1]
        path, problem = choose_local("metadata_path", config.metadata_path, csv_anchors, **check)
        if problem:
            raise ConfigError(problem)
        if path is not None and not Path(config.metadata_path).is_absolute() and not (exists or os.path.exists)(path):
            tried = " or ".join(f"{shorten(os.path.abspath(a / config.metadata_path))} (from {label})"
                                for label, a in csv_anchors)
            raise DatasetError(f"metadata_path: {shorten(repr(config.metadata_path))} does not exist at {tried}; "
                               "fix the path or remove the setting")
        if path is not None and data_anchor is not None and not is_inside(data_anchor, path):
            raise DatasetError(metadata_outside(config.metadata_path, data_anchor))
        if path is not None:
            update["metadata_path"] = str(path)
    return config.model_copy(update=update) if update else config


_short_repr = reprlib.Repr()
_short_repr.maxlevel, _short_repr.maxdict, _short_repr.maxlist = 3, 4, 6
_short_repr.maxtuple, _short_repr.maxset, _short_repr.maxlong = 6, 6, 60
_short_repr.maxstring = _short_repr.maxother = 40


def short_repr(value: Any) -> str:
    """repr of a value from a config, bounded: a huge or deeply aliased value never expands whole."""
    if isinstance(value, str):
        return shorten(repr(value[: SHOWN_CHARS + 1]))
    return shorten(_short_repr.repr(value))


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem (at most 10): `field: message (got value)`, joined by '; '."""
    parts = []
    errors = exc.errors()
    for err in errors[:MAX_ERRORS_SHOWN]:
        loc = shorten(".".join(str(p) for p in err["loc"]))
        got = err.get("input")
        shown = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {short_repr(got)})"
        msg = shorten(err["msg"].removeprefix("Value error, "), 2 * SHOWN_CHARS)
        parts.append(f"{prefix}{loc}: {msg}{shown}" if loc else f"{prefix}{msg}")
    if len(errors) > MAX_ERRORS_SHOWN:
        parts.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more problems")
    return "; ".join(parts)


class YamlTooBig(yaml.YAMLError):
    """A YAML document over the size or expanded-node limits."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose documents are checked for expanded size before any object is built."""


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in `node` once every alias is expanded; a cycle counts as too many."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_YAML_NODES + 1  # seen again before finished: a recursive structure
    total = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            total += _expanded_nodes(child, memo)
            if total > MAX_YAML_NODES:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            total += _expanded_nodes(k, memo) + _expanded_nodes(v, memo)
            if total > MAX_YAML_NODES:
                break
    memo[key] = total
    return total


def load_yaml(text: str) -> Any:
    """Parse one YAML document safely, refusing (YamlTooBig) more than 1 MiB or 100,000 nodes."""
    if len(text) > MAX_CONFIG_BYTES:
        raise YamlTooBig(f"{len(text)} characters, over the {MAX_CONFIG_BYTES} limit")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}) > MAX_YAML_NODES:
            raise YamlTooBig(
                f"over {MAX_YAML_NODES} values once aliases (*name) are expanded, or a recursive alias"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise YamlTooBig("nested too deeply") from None
    finally:
        loader.dispose()


def parse_yaml(text: str, source: str) -> Any:
    """`load_yaml` with every failure as a one-line ConfigError naming `source`."""
    try:
        return load_yaml(text)
    except YamlTooBig as exc:
        raise ConfigError(f"{source}: YAML refused, {exc}; a config needs a few dozen plain settings") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{source}: not valid YAML{where}; fix the syntax") from None


def parse_config(data: Any, source: str = "config") -> TrainConfig:
    """Validate plain data into a TrainConfig, or raise ConfigError naming the fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config file (snake_case or camelCase keys) and apply CLI overrides."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file ({exc.strerror}); check the --config path") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text; save the config as UTF-8") from None
    data = parse_yaml(text, str(p))
    data = dict(data) if isinstance(data, dict) else data
    if overrides and isinstance(data, dict):
        data.update(overrides)
    return parse_config(data, source=str(p))


def dump_config(config: TrainConfig) -> str:
    """The resolved config as YAML (snake_case), for config_backup.yaml and pod handoff."""
    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
