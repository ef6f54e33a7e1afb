"""The LoRATrainingJob spec as pydantic models, and its pure mapping to the trainer's TrainConfig.

The CRD schema is generated from these models (`lora_operator.crd`), so the API server rejects
what a schema can say; `parse_spec` and `to_train_config` catch the rest and name the field by its
CRD path (`spec.training.warmupSteps`), never by the trainer's snake_case name.

Two tasks share one spec. `task: causal-lm` reads `dataset.uri` as one JSONL file (the trainer's
`train_file`) and adds the LLM fields (`dataset.evalUri`/`evalFraction`, `training.maxSeqLength`,
`packing`, `evalSteps`, `output.merge`, `baseModel.loadIn4bit`); the image-only fields
(`dataset.captions`, `training.resolution`, `lora.trainTextEncoder`...) belong to text-to-image.
A field of the other task is refused naming it when its value differs from the default: the API
server fills defaults into every stored object, so "set" can only mean "not the default".
`lora.targetModules` has no default in the CRD: unset, the trainer picks the task's (the UNet's
attention for text-to-image, the architecture's attention projections for causal-lm).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from lora_trainer.config import (
    DEFAULT_TARGET_MODULES,
    DEFAULT_TEXT_ENCODER_TARGET_MODULES,
    AccumSteps,
    Alpha,
    BatchSize,
    Determinism,
    LearningRate,
    LrScheduler,
    MixedPrecision,
    ModelFamily,
    Optimizer,
    Rank,
    Resolution,
    S3Config,
    SaveSteps,
    Seed,
    Task,
    TrainConfig,
    WeightingScheme,
    format_validation_error,
    save_steps_problem,
)
from lora_trainer.interval import AUTO, DEFAULT_MAX_STEPS, DEFAULT_MIN_STEPS
from lora_trainer.quantize import QuantizeBase

GROUP = "lora-operator.dev"
VERSION = "v1alpha1"
KIND = "LoRATrainingJob"
PLURAL = "loratrainingjobs"
API_VERSION = f"{GROUP}/{VERSION}"

# Pod names are `<job>-a<attempt>` and the job name is a label value (63 chars at most).
MAX_JOB_NAME = 52
SCRATCH_DIR = "/scratch"
CACHE_DIR = "/scratch/cache"
WORK_DIR = "/scratch/work"
MAX_NODES = 256  # pods of one group attempt (spec.nodes); the JobSet's hostnames stay DNS labels
GRACE_MARGIN_SECONDS = 5  # the trainer must commit its checkpoint this long before SIGKILL

CAUSAL_LM = "causal-lm"

# Bounded sizes keep the CEL cost estimate of the immutability rules under the API server's budget.
Uri = Annotated[str, Field(min_length=1, max_length=1024)]
Name = Annotated[str, Field(max_length=253)]
ModuleName = Annotated[str, Field(min_length=1, max_length=128)]
TrainSteps = Annotated[int, Field(ge=1, le=10_000_000, description="Optimizer steps to train.")]
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
IMMUTABLE_FIELDS = ("task", "baseModel", "dataset", "lora", "training", "output")


class SpecError(ValueError):
    """A job spec that cannot run; `field` is its CRD path, the message says value and fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message if not field or message.startswith(field) else f"{field}: {message}")
        self.field = field
        self.message = message


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ModelSource(_Spec):
    """Where the base model lives."""

    uri: Uri = Field(
        description="Diffusers model folder (s3://bucket/prefix/), or one SD 1.x/2.x .safetensors checkpoint "
        "(s3://bucket/models/v1-5-pruned.safetensors); for causal-lm a transformers causal-LM folder (config.json, "
        "tokenizer, safetensors weights); file:// on a mounted volume. Pickle checkpoints (.ckpt, .pt, .bin) are refused."
    )
    config: Uri | None = Field(
        None,
        description="For a single-file uri: a diffusers folder of the same model holding its configs "
        "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; weights not needed).",
    )
    family: ModelFamily = Field(
        "auto",
        description="Model family: auto reads it from model_index.json (or a single file's keys); a family "
        "name insists on it, and a base model of another family fails the job (exit 78, not retried).",
    )
    load_in_4bit: bool = Field(
        False, alias="loadIn4bit", description="causal-lm: load the base model in 4 bits (QLoRA; needs bitsandbytes in the image and "
        "spec.resources.gpus >= 1).",
    )


class DatasetSpec(_Spec):
    """The captioned images (text-to-image) or the JSONL file (causal-lm) to train on."""

    uri: Uri = Field(
        description="text-to-image: folder of images, s3://bucket/prefix/; causal-lm: one JSONL file, "
        "s3://bucket/data/train.jsonl, each line {prompt, completion}, {messages} or {text} (file:// on a mounted volume)."
    )
    captions: str | None = Field(
        None, max_length=1024, description="Captions CSV (file_name,text) relative to the dataset; default metadata.csv if present."
    )
    caption_extension: str = Field(
        ".txt", max_length=32, description="Sidecar caption file extension, used when there is no captions CSV."
    )
    eval_uri: Uri | None = Field(None, description="causal-lm: a held-out JSONL file for the eval loss.")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="causal-lm: hold out this fraction of the training lines (seeded) for the eval "
        "loss, instead of evalUri.",
    )


class LoraSpec(_Spec):
    """The LoRA adapter's shape."""

    rank: Rank = 8
    alpha: Alpha | None = Field(None, description="LoRA alpha; the update is scaled by alpha/rank. Default: the rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[ModuleName] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Modules that get LoRA adapters; unset: the task's, " + ", ".join(DEFAULT_TARGET_MODULES)
        + " in the UNet for text-to-image, the attention projections for causal-lm (q_proj, k_proj, v_proj, o_proj "
        "in Llama).",
    )
    target_mlp: bool = Field(
        False, description="causal-lm with targetModules unset: also the MLP projections (gate_proj, up_proj, "
        "down_proj in Llama).",
    )
    train_text_encoder: bool = Field(False, description="Also train a LoRA on the CLIP text encoder.")
    text_encoder_target_modules: list[ModuleName] = Field(
        default_factory=lambda: list(DEFAULT_TEXT_ENCODER_TARGET_MODULES),
        min_length=1,
        max_length=64,
        description="Text-encoder modules that get LoRA adapters (with trainTextEncoder).",
        json_schema_extra={"default": list(DEFAULT_TEXT_ENCODER_TARGET_MODULES)},
    )
    init_from: Uri | None = Field(
        None,
        description="Start from an existing LoRA instead of a fresh one (incremental training): one .safetensors "
        "file in diffusers or kohya format, e.g. s3://loras/style-v1/pytorch_lora_weights_kohya.safetensors. "
        "It must have this job's rank and target modules (else the job fails, exit 78); its sha256 joins the "
        "config hash, so a resume refuses a changed file.",
    )


# Bucket bounds are the trainer's own (TrainConfig), so the CRD refuses what the trainer would.
BucketMin = Annotated[int, *TrainConfig.model_fields["min_bucket_reso"].metadata]
BucketMax = Annotated[int, *TrainConfig.model_fields["max_bucket_reso"].metadata]
BucketStep = Annotated[int, *TrainConfig.model_fields["bucket_reso_steps"].metadata]


class BucketSpec(_Spec):
    """Aspect-ratio buckets (kohya's): images keep their shape instead of a square crop."""

    enabled: bool = Field(
        False, description="Crop each image to the bucket (width x height, area at most resolution squared) "
        "nearest its aspect ratio instead of a square; batches are drawn within one bucket.",
    )
    min_resolution: BucketMin = Field(
        TrainConfig.model_fields["min_bucket_reso"].default, description="Shortest bucket side in pixels."
    )
    max_resolution: BucketMax = Field(
        TrainConfig.model_fields["max_bucket_reso"].default, description="Longest bucket side in pixels."
    )
    step: BucketStep = Field(
        TrainConfig.model_fields["bucket_reso_steps"].default,
        description="Bucket sides are multiples of this many pixels (at most the resolution).",
    )


def _trainer(name: str) -> Any:
    """The trainer's type of a field with its bounds, so the CRD refuses what the trainer refuses."""
    return Annotated[TrainConfig.model_fields[name].annotation, *TrainConfig.model_fields[name].metadata]


def _default(name: str) -> Any:
    return TrainConfig.model_fields[name].default


class FlowMatchingSpec(_Spec):
    """Flow-matching families (Flux): timestep sampling, loss weighting and guidance; SD and SDXL ignore it."""

    weighting_scheme: WeightingScheme = Field(
        _default("weighting_scheme"), description="Timestep density and loss weights as diffusers' Flux trainer: "
        "none (uniform timesteps, unit weights), logit_normal, mode, sigma_sqrt, cosmap.",
    )
    logit_mean: _trainer("logit_mean") = Field(_default("logit_mean"), description="weightingScheme logit_normal: the mean.")
    logit_std: _trainer("logit_std") = Field(
        _default("logit_std"), description="weightingScheme logit_normal: the standard deviation."
    )
    mode_scale: _trainer("mode_scale") = Field(_default("mode_scale"), description="weightingScheme mode: the scale.")
    guidance_scale: _trainer("guidance_scale") = Field(
        _default("guidance_scale"), description="Guidance-distilled models (FLUX.1-dev): the guidance value trained with."
    )


class TrainingSpec(_Spec):
    """Optimisation settings; every field here defines what is trained, so it is immutable."""

    batch_size: BatchSize = 1
    gradient_accumulation_steps: AccumSteps = 1
    max_train_steps: TrainSteps | None = Field(None, description="Optimizer steps to train; wins over epochs.")
    epochs: TrainSteps | None = Field(None, description="Passes over the dataset, used when maxTrainSteps is unset.")
    learning_rate: LearningRate = 1e-4
    text_encoder_learning_rate: float | None = Field(
        None, gt=0, le=1, description="Text-encoder learning rate; default learningRate."
    )
    lr_scheduler: LrScheduler = Field("constant", description="Learning-rate schedule.")
    warmup_steps: int = Field(0, ge=0, le=10_000_000, description="Linear learning-rate warm-up steps.")
    lr_num_cycles: int = Field(1, ge=1, le=1000, description="Cycles for the cosine_with_restarts schedule.")
    mixed_precision: MixedPrecision = Field("no", description="Autocast precision on GPUs (CPU runs in fp32).")
    resolution: Resolution | None = Field(
        None, description="Training resolution in pixels (square crops); unset: the model family's default "
        "(512 for SD 1.x/2.x, 1024 for SDXL).",
    )
    center_crop: bool = Field(True, description="Centre crop after resizing; false crops at random.")
    random_flip: bool = Field(False, description="Flip images horizontally at random.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for GPU memory in the UNet.")
    quantize_base: QuantizeBase = Field(
        "none", description="Diffusion-transformer families (Flux): keep the frozen base's weights in int8 or fp8 "
        "(torchao weight-only, less GPU memory; a trainer image without torchao fails the job with exit 78, not "
        "retried; fp8 needs compute capability 8.9+). Not guaranteed bit-exact on resume; none keeps the run's dtype.",
    )
    determinism: Determinism = Field(
        "exact", description="GPU kernels: exact (deterministic kernels; a resumed run is bitwise equal to an "
        "uninterrupted one, at a measured cost in speed) or fast (the fastest kernels; resume is exact only up to "
        "kernel nondeterminism). CPU runs are deterministic either way.",
    )
    optimizer: Optimizer = Field(
        "adamw", description="adamw (torch), or adamw8bit (bitsandbytes' 8-bit AdamW, less GPU memory; a trainer "
        "image without bitsandbytes fails the job with exit 78, not retried).",
    )
    buckets: BucketSpec = Field(
        default_factory=BucketSpec, description="Aspect-ratio buckets; off by default (square crops).",
        json_schema_extra={"default": {}},
    )
    cache_latents: bool = Field(
        False, description="Encode each distinct crop with the VAE once, keyed by its pixels and the VAE; the "
        "cache is kept under cache/ in the output, so a resumed attempt reuses it.",
    )
    cache_text_embeddings: bool = Field(
        False, description="Encode each caption once, keyed by the caption and the text encoders (kept like "
        "cacheLatents); needs lora.trainTextEncoder false.",
    )
    max_grad_norm: float = Field(1.0, ge=0, le=1000, description="Gradient clipping norm; 0 disables clipping.")
    noise_offset: float = Field(0.0, ge=0, le=1, description="Offset-noise strength; 0 disables it.")
    flow_matching: FlowMatchingSpec = Field(
        default_factory=FlowMatchingSpec, description="Flow-matching settings (Flux); the defaults are diffusers' "
        "Flux trainer's.", json_schema_extra={"default": {}},
    )
    seed: Seed = 42
    max_seq_length: int | None = Field(
        None, ge=8, le=1_048_576, description="causal-lm: tokens per sample; longer samples are truncated "
        "(counted in one warning). Unset: the trainer's default.",
    )
    packing: bool = Field(False, description="causal-lm: pack several samples into each maxSeqLength sequence.")
    eval_steps: TrainSteps | None = Field(
        None, description="causal-lm: compute the eval loss every N steps (needs dataset.evalUri or evalFraction)."
    )
    allow_world_size_change: bool = Field(
        False, description="Resume a checkpoint made by a different number of training processes (resources.gpus "
        "x nodes): correct, but not bitwise equal to an uninterrupted run. Off: such a resume fails the job (exit 65).",
    )


class CheckpointSpec(_Spec):
    """How often resumable checkpoints are committed (a SIGTERM always commits one)."""

    every_steps: SaveSteps = Field(
        None, description="Commit a resumable checkpoint every N steps, or auto: the Young/Daly interval "
        "sqrt(2 x commit cost x mean time between preemptions), from the commit cost the trainer measures and the "
        "job's observed preemption rate (the pool's configured rate until it has history), in steps, between "
        "minSteps and maxSteps. Unset: only a SIGTERM commits one.",
    )
    min_steps: TrainSteps = Field(DEFAULT_MIN_STEPS, description="everySteps auto: the fewest steps between checkpoints.")
    max_steps: TrainSteps = Field(DEFAULT_MAX_STEPS, description="everySteps auto: the most steps between checkpoints.")
    keep_last: int = Field(3, ge=0, le=10_000, description="Committed checkpoints to keep; 0 keeps all.")


class OutputSpec(_Spec):
    """Where the LoRA, checkpoints, logs and progress.json go."""

    uri: Uri = Field(pattern=r"^s3://[^/]+(/.*)?$", description="Output folder: s3://bucket/prefix/.")
    merge: bool = Field(False, description="causal-lm: also write the base model with the LoRA merged in (safetensors).")


class StorageSpec(_Spec):
    """The S3-compatible store and the Secret that holds its credentials (by reference only)."""

    endpoint: str | None = Field(None, max_length=1024, description="S3 endpoint, e.g. http://minio.minio:9000; unset for AWS.")
    region: str | None = Field(None, max_length=64, description="Region name, e.g. us-east-1.")
    path_style: bool = Field(True, description="Path-style addressing (MinIO); false for virtual-hosted buckets.")
    credentials_secret: str | None = Field(
        None, max_length=253, description="Secret in the job's namespace with the access keys; unset to use the pod's identity."
    )
    access_key_id_key: str = Field("AWS_ACCESS_KEY_ID", min_length=1, max_length=253, description="Key of the access key id in the Secret.")
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY", min_length=1, max_length=253, description="Key of the secret access key in the Secret."
    )
    retry_seconds: int = Field(
        300, ge=1, le=86_400,
        description="How long the trainer retries a failing store (uploads, and each request's timeouts and retries) "
                    "before the attempt fails with exit 3.",
    )


class Toleration(_Spec):
    """A pod toleration, as in the Pod API."""

    key: str = Field("", max_length=317, description="Taint key; empty with operator Exists matches every taint.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str = Field("", max_length=63, description="Taint value to match with operator Equal.")
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = Field("", description="Taint effect; empty matches all.")
    toleration_seconds: int | None = Field(None, ge=0, description="How long a NoExecute taint is tolerated.")


class ResourcesSpec(_Spec):
    """What the trainer pod asks the scheduler for."""

    gpus: int = Field(1, ge=0, le=16, description="GPUs per pod (0 trains on CPU).")
    gpu_resource_name: str = Field("nvidia.com/gpu", max_length=253, description="Extended resource name of a GPU.")
    cpu: str | None = Field(None, pattern=QUANTITY, max_length=32, description="CPU request, e.g. 4 or 3500m.")
    memory: str | None = Field(None, pattern=QUANTITY, max_length=32, description="Memory request and limit, e.g. 24Gi.")
    shm_size: str = Field("2Gi", pattern=QUANTITY, max_length=32, description="Size of /dev/shm (a memory emptyDir).")
    scratch_size: str | None = Field(None, pattern=QUANTITY, max_length=32, description="Size limit of the /scratch emptyDir.")
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=64, description="Node labels the pod must run on.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Taints the pod tolerates, e.g. spot nodes.")
    priority_class_name: str = Field("", max_length=253, description="PriorityClass of the pod; empty for the default.")


class FallbackSpec(_Spec):
    """An on-demand pool to fall back to when spot keeps failing (lora_operator.placement)."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, max_length=64,
        description="Node labels of the on-demand pool; replaces spec.resources.nodeSelector on an on-demand attempt.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64,
        description="Taints the on-demand attempt tolerates; replaces spec.resources.tolerations on it.",
    )
    after_preemptions: int | None = Field(
        3, ge=1, le=100, description="Fall back after this many spot preemptions within windowSeconds (default 3); "
        "null turns this trigger off.",
    )
    window_seconds: int = Field(
        3600, ge=1, le=30 * 86_400, description="The window in which afterPreemptions spot preemptions trigger the fallback.",
    )
    unschedulable_seconds: int | None = Field(
        None, ge=1, le=30 * 86_400, description="Fall back when a spot pod has been unschedulable (PodScheduled False, "
        "Unschedulable) this long; it is replaced without counting a preemption or a failure. Unset: never.",
    )
    return_to_spot: Literal["AfterAttempt", "Never"] = Field(
        "Never", description="AfterAttempt: when an on-demand attempt ends without finishing, the next one goes back "
        "to spot; Never: the job stays on on-demand.",
    )


class SpotSpec(_Spec):
    """Preemption budget: preemptions resume from the latest checkpoint and cost no failure."""

    max_preemptions: int = Field(50, ge=0, le=100_000, description="Preemptions tolerated before the job fails.")
    termination_grace_period_seconds: int = Field(
        30, ge=6, le=3600, description="Pod grace period; the trainer commits a checkpoint within it on SIGTERM."
    )
    fallback: FallbackSpec | None = Field(
        None, description="On-demand fallback: spec.resources.nodeSelector/tolerations name the spot pool, this block "
        "the on-demand one; status.placement, status.usage and status.cost report where the job ran and what it cost.",
    )


class FailurePolicySpec(_Spec):
    """Retries of failed attempts (crashes, OOM, storage outages) with exponential backoff."""

    backoff_limit: int = Field(3, ge=0, le=100, description="Failed attempts retried before the job fails.")


def _obj(model: type[BaseModel], description: str) -> Any:
    # default {} in the schema so the API server fills nested defaults when the block is omitted.
    return Field(default_factory=model, description=description, json_schema_extra={"default": {}})


class JobSpec(_Spec):
    """spec of a LoRATrainingJob."""

    task: Task = Field(
        "text-to-image", description="What is trained: text-to-image (a diffusion LoRA) or causal-lm (an LLM LoRA)."
    )
    base_model: ModelSource = Field(description="The base model to adapt: a diffusers folder or one .safetensors file.")
    dataset: DatasetSpec = Field(description="The captioned images to train on.")
    lora: LoraSpec = _obj(LoraSpec, "The LoRA adapter's shape.")
    training: TrainingSpec = _obj(TrainingSpec, "Optimisation settings.")
    checkpoint: CheckpointSpec = _obj(CheckpointSpec, "Checkpoint cadence and retention.")
    output: OutputSpec = Field(description="Where the results go.")
    storage: StorageSpec = _obj(StorageSpec, "The S3-compatible store.")
    resources: ResourcesSpec = _obj(ResourcesSpec, "Pod resources and placement.")
    nodes: int = Field(
        1, ge=1, le=MAX_NODES,
        description="Pods (nodes) the run spans, each with spec.resources; more than 1 runs the attempt as a "
                    "JobSet (jobset.x-k8s.io, which must be installed) with torch.distributed across the pods.",
    )
    spot: SpotSpec = _obj(SpotSpec, "Preemption budget and grace period.")
    failure_policy: FailurePolicySpec = _obj(FailurePolicySpec, "Retries of failed attempts.")
    image: str = Field("", max_length=1024, description="Trainer image; empty uses the operator's --trainer-image.")
    image_pull_policy: Literal["", "Always", "IfNotPresent", "Never"] = Field(
        "", description="Image pull policy; empty uses the Kubernetes default."
    )
    service_account_name: str = Field("", max_length=253, description="Service account of the trainer pod; empty for default.")
    queue_name: str = Field(
        "", max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
        description="Kueue LocalQueue in the job's namespace: pods are labelled kueue.x-k8s.io/queue-name and wait "
        "(phase Pending, reason Queued) until Kueue admits them. Empty: no queue.",
    )
    suspend: bool = Field(False, description="true stops the running pod (it checkpoints first); false resumes.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, le=2**31 - 1,
        description="Delete the job (and its pods) this many seconds after it succeeded or failed, as "
                    "Kubernetes Jobs do; the outputs in S3 stay. Unset keeps it.",
    )


def _camel_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")


class _Memo:
    """A small LRU of pure results by key. The operator validates the same spec on every pass
    of every job (about 2 ms a pass: most of a pass at 500 jobs); a spec changes only when edited."""

    def __init__(self, size: int = 2048):
        self.size, self.items = size, OrderedDict()

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = compute()
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


_SPECS, _CONFIGS = _Memo(), _Memo()


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except SpecError as exc:
        return exc


def _raise_or_return(outcome: Any) -> Any:
    if isinstance(outcome, SpecError):
        raise SpecError(outcome.field, outcome.message)
    return outcome


def parse_spec(data: Any) -> JobSpec:
    """Validate a job's spec (camelCase mapping) or raise SpecError naming `spec.<field>`.

    Memoised by content: equal specs give the same (frozen) JobSpec object."""
    try:
        key = json.dumps(data, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return _parse_spec(data)
    return _raise_or_return(_SPECS.get(key, lambda: _outcome(lambda: _parse_spec(data))))


def _parse_spec(data: Any) -> JobSpec:
    if not isinstance(data, Mapping):
        raise SpecError("spec", f"expected an object, got {type(data).__name__}")
    try:
        spec = JobSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise SpecError("spec." + _camel_path(exc.errors()[0]["loc"]), format_validation_error(exc, prefix="spec.")) from None
    t = spec.training
    if t.max_train_steps is None and t.epochs is None:
        raise SpecError("spec.training.maxTrainSteps", "set maxTrainSteps (or epochs), e.g. maxTrainSteps: 1500")
    if t.max_train_steps is not None and t.warmup_steps > t.max_train_steps:
        raise SpecError(
            "spec.training.warmupSteps",
            f"{t.warmup_steps} exceeds maxTrainSteps ({t.max_train_steps}); lower warmupSteps",
        )
    _check_output_apart(spec)
    _check_training_options(spec)
    if problem := task_field_problem(spec):
        raise problem
    ce = spec.checkpoint.every_steps
    names = ("spec.checkpoint.everySteps", "spec.checkpoint.minSteps", "spec.checkpoint.maxSteps")
    if problem := save_steps_problem(ce, spec.checkpoint.min_steps, spec.checkpoint.max_steps, names):
        raise SpecError(*problem)
    if isinstance(ce, int) and t.max_train_steps is not None and ce > t.max_train_steps:
        raise SpecError(
            "spec.checkpoint.everySteps",
            f"{ce} exceeds maxTrainSteps ({t.max_train_steps}); no intermediate checkpoint would ever be committed",
        )
    return spec


def _check_training_options(spec: JobSpec) -> None:
    # The trainer refuses these too (exit 78), but only once a pod has started and loaded the model.
    t, b = spec.training, spec.training.buckets
    if t.cache_text_embeddings and spec.lora.train_text_encoder:
        raise SpecError(
            "spec.training.cacheTextEmbeddings",
            "true, but spec.lora.trainTextEncoder is true: trained text encoders change their outputs as training "
            "goes; set cacheTextEmbeddings: false or trainTextEncoder: false",
        )
    if b.min_resolution > b.max_resolution:
        raise SpecError(
            "spec.training.buckets.minResolution",
            f"{b.min_resolution} is over maxResolution ({b.max_resolution}); lower minResolution or raise maxResolution",
        )
    if b.enabled and t.resolution is not None and b.step > t.resolution:
        raise SpecError(
            "spec.training.buckets.step",
            f"{b.step} is over resolution ({t.resolution}); use a step no larger than the resolution, e.g. 64",
        )


@lru_cache(maxsize=8192)  # the OutputInUse check compares every new job's output with every live job's
def uri_parts(uri: str) -> tuple[str, tuple[str, ...]]:
    """(scheme://host, path segments) with empty, `.` and `..` segments resolved."""
    scheme, sep, rest = uri.partition("://")
    host, _, path = rest.partition("/") if sep else ("", "", uri)
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return f"{scheme.lower()}://{host}" if sep else "", tuple(parts)


def overlap(a: str, b: str) -> str | None:
    """How the folders `a` and `b` overlap ("equals", "is inside", "contains"), None if apart."""
    (root_a, pa), (root_b, pb) = uri_parts(a), uri_parts(b)
    if root_a != root_b:
        return None
    if pa == pb:
        return "equals"
    if pa[: len(pb)] == pb:
        return "is inside"
    if pb[: len(pa)] == pa:
        return "contains"
    return None


def _check_output_apart(spec: JobSpec) -> None:
    # Writing into an input would change what a resumed attempt trains on, or delete it.
    inputs = [("spec.baseModel.uri", spec.base_model.uri), ("spec.dataset.uri", spec.dataset.uri)]
    if spec.base_model.config:
        inputs.append(("spec.baseModel.config", spec.base_model.config))
    if spec.dataset.eval_uri:
        inputs.append(("spec.dataset.evalUri", spec.dataset.eval_uri))
    if spec.lora.init_from:
        inputs.append(("spec.lora.initFrom", spec.lora.init_from))
    for field, uri in inputs:
        how = overlap(spec.output.uri, uri)
        if how:
            raise SpecError(
                "spec.output.uri",
                f"{spec.output.uri!r} {how} {field} ({uri!r}); the output must be a folder of its own, "
                f"apart from the inputs, e.g. s3://bucket/loras/<job>/",
            )


# (block, field) of JobSpec read by one task only; the other task refuses them (see the docstring).
IMAGE_ONLY_FIELDS: tuple[tuple[str, str], ...] = (
    ("base_model", "config"), ("dataset", "captions"), ("dataset", "caption_extension"),
    ("lora", "train_text_encoder"), ("lora", "text_encoder_target_modules"), ("lora", "init_from"),
    ("training", "text_encoder_learning_rate"), ("training", "resolution"), ("training", "center_crop"),
    ("training", "random_flip"), ("training", "noise_offset"), ("training", "buckets"), ("training", "cache_latents"),
    ("training", "cache_text_embeddings"), ("training", "flow_matching"),
)
CAUSAL_LM_ONLY_FIELDS: tuple[tuple[str, str], ...] = (
    ("base_model", "load_in_4bit"), ("dataset", "eval_uri"), ("dataset", "eval_fraction"), ("lora", "target_mlp"),
    ("training", "max_seq_length"), ("training", "packing"), ("training", "eval_steps"), ("output", "merge"),
)


def crd_path(block: str, name: str) -> str:
    """`spec.<block>.<field>` in the CRD's camelCase (JobSpec's aliases)."""
    block_field = JobSpec.model_fields[block]
    part = block_field.annotation
    assert isinstance(part, type) and issubclass(part, BaseModel), block
    return f"spec.{block_field.alias}.{part.model_fields[name].alias}"


def task_field_problem(spec: JobSpec) -> SpecError | None:
    """The first field set (not its default) that the job's task does not read, or a task rule broken."""
    own_task, foreign = (CAUSAL_LM, IMAGE_ONLY_FIELDS) if spec.task == CAUSAL_LM else ("text-to-image",
                                                                                     CAUSAL_LM_ONLY_FIELDS)
    other = "text-to-image" if own_task == CAUSAL_LM else CAUSAL_LM
    for block, name in foreign:
        part = getattr(spec, block)
        value = getattr(part, name)
        if value != type(part).model_fields[name].get_default(call_default_factory=True):
            path = crd_path(block, name)
            return SpecError(path, f"{path}: {value!r} applies to task {other} only; remove it (spec.task is {own_task})")
    if spec.dataset.eval_uri and spec.dataset.eval_fraction is not None:
        return SpecError("spec.dataset.evalFraction",
                         "set either spec.dataset.evalUri or spec.dataset.evalFraction, not both")
    if spec.base_model.load_in_4bit and spec.resources.gpus == 0:
        return SpecError("spec.baseModel.loadIn4bit", "4-bit QLoRA runs on CUDA only; set spec.resources.gpus to 1 "
                         "or more, or remove loadIn4bit")
    if spec.output.merge and spec.base_model.load_in_4bit:
        return SpecError("spec.output.merge", "true with spec.baseModel.loadIn4bit: a 4-bit base cannot be merged "
                         "exactly; train with loadIn4bit and merge in 16 bits afterwards, or set merge: false")
    if spec.lora.target_mlp and spec.lora.target_modules:
        return SpecError("spec.lora.targetMlp", "true with spec.lora.targetModules set: list the MLP modules in "
                         "targetModules (e.g. gate_proj, up_proj, down_proj), or remove targetModules")
    family = spec.base_model.family
    if family != "auto" and (family == CAUSAL_LM) != (spec.task == CAUSAL_LM):
        return SpecError("spec.baseModel.family", f"{family} does not train task {spec.task}; use family auto, or "
                         + ("causal-lm" if spec.task == CAUSAL_LM else "an image family such as sd or sdxl"))
    return None


# TrainConfig field -> CRD path, to name fields in the user's words when the trainer's model objects.
CONFIG_PATHS: dict[str, str] = {
    "task": "spec.task",
    "base_model": "spec.baseModel.uri",
    "base_model_config": "spec.baseModel.config",
    "model_family": "spec.baseModel.family",
    "train_data_dir": "spec.dataset.uri",
    "metadata_path": "spec.dataset.captions",
    "caption_extension": "spec.dataset.captionExtension",
    "output_dir": "spec.output.uri",
    "lora_rank": "spec.lora.rank",
    "lora_alpha": "spec.lora.alpha",
    "lora_dropout": "spec.lora.dropout",
    "target_modules": "spec.lora.targetModules",
    "train_text_encoder": "spec.lora.trainTextEncoder",
    "text_encoder_target_modules": "spec.lora.textEncoderTargetModules",
    "init_lora": "spec.lora.initFrom",
    "batch_size": "spec.training.batchSize",
    "gradient_accumulation_steps": "spec.training.gradientAccumulationSteps",
    "max_train_steps": "spec.training.maxTrainSteps",
    "epochs": "spec.training.epochs",
    "learning_rate": "spec.training.learningRate",
    "text_encoder_lr": "spec.training.textEncoderLearningRate",
    "lr_scheduler": "spec.training.lrScheduler",
    "lr_warmup_steps": "spec.training.warmupSteps",
    "lr_num_cycles": "spec.training.lrNumCycles",
    "mixed_precision": "spec.training.mixedPrecision",
    "resolution": "spec.training.resolution",
    "center_crop": "spec.training.centerCrop",
    "random_flip": "spec.training.randomFlip",
    "gradient_checkpointing": "spec.training.gradientCheckpointing",
    "quantize_base": "spec.training.quantizeBase",
    "determinism": "spec.training.determinism",
    "allow_world_size_change": "spec.training.allowWorldSizeChange",
    "optimizer": "spec.training.optimizer",
    "enable_bucket": "spec.training.buckets.enabled",
    "min_bucket_reso": "spec.training.buckets.minResolution",
    "max_bucket_reso": "spec.training.buckets.maxResolution",
    "bucket_reso_steps": "spec.training.buckets.step",
    "cache_latents": "spec.training.cacheLatents",
    "cache_text_embeddings": "spec.training.cacheTextEmbeddings",
    "max_grad_norm": "spec.training.maxGradNorm",
    "noise_offset": "spec.training.noiseOffset",
    "weighting_scheme": "spec.training.flowMatching.weightingScheme",
    "logit_mean": "spec.training.flowMatching.logitMean",
    "logit_std": "spec.training.flowMatching.logitStd",
    "mode_scale": "spec.training.flowMatching.modeScale",
    "guidance_scale": "spec.training.flowMatching.guidanceScale",
    "seed": "spec.training.seed",
    "save_steps": "spec.checkpoint.everySteps",
    "keep_last": "spec.checkpoint.keepLast",
    "min_save_steps": "spec.checkpoint.minSteps",
    "max_save_steps": "spec.checkpoint.maxSteps",
    "train_file": "spec.dataset.uri",
    "eval_file": "spec.dataset.evalUri",
    "eval_fraction": "spec.dataset.evalFraction",
    "max_seq_length": "spec.training.maxSeqLength",
    "packing": "spec.training.packing",
    "eval_steps": "spec.training.evalSteps",
    "merge": "spec.output.merge",
    "load_in_4bit": "spec.baseModel.loadIn4bit",
    "lora_target_mlp": "spec.lora.targetMlp",
    "s3": "spec.storage",
    "preemption_grace_seconds": "spec.spot.terminationGracePeriodSeconds",
    "storage_retry_seconds": "spec.storage.retrySeconds",
}


def task_config_data(spec: JobSpec) -> dict[str, Any]:
    """The trainer keys only this job's task reads (pure); unset optional ones are left to the trainer."""
    t, lora, ds = spec.training, spec.lora, spec.dataset
    if spec.task == CAUSAL_LM:
        optional = {"eval_file": ds.eval_uri, "eval_fraction": ds.eval_fraction, "max_seq_length": t.max_seq_length,
                    "eval_steps": t.eval_steps}
        return {"train_file": ds.uri, "packing": t.packing, "merge": spec.output.merge,
                "load_in_4bit": spec.base_model.load_in_4bit, "lora_target_mlp": lora.target_mlp,
                **{k: v for k, v in optional.items() if v is not None}}
    return {
        "base_model_config": spec.base_model.config,
        "train_data_dir": ds.uri,
        "metadata_path": ds.captions,
        "caption_extension": ds.caption_extension,
        "resolution": t.resolution,
        "center_crop": t.center_crop,
        "random_flip": t.random_flip,
        "train_text_encoder": lora.train_text_encoder,
        "text_encoder_target_modules": list(lora.text_encoder_target_modules),
        "init_lora": lora.init_from,
        "text_encoder_lr": t.text_encoder_learning_rate,
        "noise_offset": t.noise_offset,
        "enable_bucket": t.buckets.enabled,
        "min_bucket_reso": t.buckets.min_resolution,
        "max_bucket_reso": t.buckets.max_resolution,
        "bucket_reso_steps": t.buckets.step,
        "cache_latents": t.cache_latents,
        "cache_text_embeddings": t.cache_text_embeddings,
        "weighting_scheme": t.flow_matching.weighting_scheme,
        "logit_mean": t.flow_matching.logit_mean,
        "logit_std": t.flow_matching.logit_std,
        "mode_scale": t.flow_matching.mode_scale,
        "guidance_scale": t.flow_matching.guidance_scale,
    }


def train_config_data(spec: JobSpec) -> dict[str, Any]:
    """The trainer config of this job as plain data (pure), before the trainer's model checks it."""
    t, lora = spec.training, spec.lora
    data: dict[str, Any] = {
        "task": spec.task,
        "base_model": spec.base_model.uri,
        "model_family": spec.base_model.family,
        "output_dir": spec.output.uri,
        "lora_rank": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        **task_config_data(spec),
        "batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "epochs": t.epochs,
        "max_train_steps": t.max_train_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler": t.lr_scheduler,
        "lr_warmup_steps": t.warmup_steps,
        "lr_num_cycles": t.lr_num_cycles,
        "max_grad_norm": t.max_grad_norm,
        "mixed_precision": t.mixed_precision,
        "gradient_checkpointing": t.gradient_checkpointing,
        "quantize_base": t.quantize_base,
        "determinism": t.determinism,
        "optimizer": t.optimizer,
        "seed": t.seed,
        "allow_world_size_change": t.allow_world_size_change,
        "save_steps": spec.checkpoint.every_steps,
        "keep_last": spec.checkpoint.keep_last,
        # The bounds only with auto: the trainer refuses a changed bound beside a fixed interval.
        **({"min_save_steps": spec.checkpoint.min_steps, "max_save_steps": spec.checkpoint.max_steps}
           if spec.checkpoint.every_steps == AUTO else {}),
        "device": "cuda" if spec.resources.gpus > 0 else "cpu",
        "s3": S3Config(endpoint_url=spec.storage.endpoint, region=spec.storage.region, path_style=spec.storage.path_style),
        "cache_dir": CACHE_DIR,
        "work_dir": WORK_DIR,
        "preemption_grace_seconds": float(spec.spot.termination_grace_period_seconds - GRACE_MARGIN_SECONDS),
        "storage_retry_seconds": float(spec.storage.retry_seconds),
    }
    if lora.target_modules is not None:
        data["target_modules"] = list(lora.target_modules)
    return data


def to_train_config(spec: JobSpec) -> TrainConfig:
    """The trainer config a pod of this job runs with (pure); SpecError names the CRD field.

    Memoised per JobSpec object (parse_spec hands out one object per content; the entry keeps it alive)."""
    return _raise_or_return(_CONFIGS.get(id(spec), lambda: (spec, _outcome(lambda: _to_train_config(spec))))[1])


def _to_train_config(spec: JobSpec) -> TrainConfig:
    try:
        return TrainConfig.model_validate(train_config_data(spec))
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        field = CONFIG_PATHS.get(name, "spec")
        got = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
        raise SpecError(field, err["msg"].removeprefix("Value error, ") + got) from None
