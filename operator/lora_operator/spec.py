"""The LoRATrainingJob spec as pydantic models, and its pure mapping to the trainer's TrainConfig.

The CRD schema is generated from these models (`lora_operator.crd`), so the API server rejects
what a schema can say; `parse_spec` and `to_train_config` catch the rest and name the field by its
CRD path (`spec.training.warmupSteps`), never by the trainer's snake_case name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from lora_trainer.config import (
    DEFAULT_TARGET_MODULES,
    DEFAULT_TEXT_ENCODER_TARGET_MODULES,
    AccumSteps,
    Alpha,
    BatchSize,
    LearningRate,
    LrScheduler,
    MixedPrecision,
    ModelFamily,
    Optimizer,
    Rank,
    Resolution,
    S3Config,
    Seed,
    Task,
    TrainConfig,
    format_validation_error,
)

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
GRACE_MARGIN_SECONDS = 5  # the trainer must commit its checkpoint this long before SIGKILL

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
        "(s3://bucket/models/v1-5-pruned.safetensors); file:// on a mounted volume. Pickle checkpoints "
        "(.ckpt, .pt, .bin) are refused."
    )
    config: Uri | None = Field(
        None,
        description="For a single-file uri: a diffusers folder of the same model holding its configs "
        "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; weights not needed).",
    )
    family: ModelFamily = Field(
        "auto",
        description="Model family: auto reads it from model_index.json (or a single file's keys); sd (1.x/2.x) "
        "or sdxl insists on it, and a base model of another family fails the job (exit 78, not retried).",
    )


class DatasetSpec(_Spec):
    """The captioned images to train on."""

    uri: Uri = Field(description="Folder of images: s3://bucket/prefix/ (or file:// on a mounted volume).")
    captions: str | None = Field(
        None, max_length=1024, description="Captions CSV (file_name,text) relative to the dataset; default metadata.csv if present."
    )
    caption_extension: str = Field(
        ".txt", max_length=32, description="Sidecar caption file extension, used when there is no captions CSV."
    )


class LoraSpec(_Spec):
    """The LoRA adapter's shape."""

    rank: Rank = 8
    alpha: Alpha | None = Field(None, description="LoRA alpha; the update is scaled by alpha/rank. Default: the rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[ModuleName] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        max_length=64,
        description="UNet modules that get LoRA adapters.",
        json_schema_extra={"default": list(DEFAULT_TARGET_MODULES)},
    )
    train_text_encoder: bool = Field(False, description="Also train a LoRA on the CLIP text encoder.")
    text_encoder_target_modules: list[ModuleName] = Field(
        default_factory=lambda: list(DEFAULT_TEXT_ENCODER_TARGET_MODULES),
        min_length=1,
        max_length=64,
        description="Text-encoder modules that get LoRA adapters (with trainTextEncoder).",
        json_schema_extra={"default": list(DEFAULT_TEXT_ENCODER_TARGET_MODULES)},
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
    seed: Seed = 42


class CheckpointSpec(_Spec):
    """How often resumable checkpoints are committed (a SIGTERM always commits one)."""

    every_steps: TrainSteps | None = Field(None, description="Commit a resumable checkpoint every N steps.")
    keep_last: int = Field(3, ge=0, le=10_000, description="Committed checkpoints to keep; 0 keeps all.")


class OutputSpec(_Spec):
    """Where the LoRA, checkpoints, logs and progress.json go."""

    uri: Uri = Field(pattern=r"^s3://[^/]+(/.*)?$", description="Output folder: s3://bucket/prefix/.")


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


class SpotSpec(_Spec):
    """Preemption budget: preemptions resume from the latest checkpoint and cost no failure."""

    max_preemptions: int = Field(50, ge=0, le=100_000, description="Preemptions tolerated before the job fails.")
    termination_grace_period_seconds: int = Field(
        30, ge=6, le=3600, description="Pod grace period; the trainer commits a checkpoint within it on SIGTERM."
    )


class FailurePolicySpec(_Spec):
    """Retries of failed attempts (crashes, OOM, storage outages) with exponential backoff."""

    backoff_limit: int = Field(3, ge=0, le=100, description="Failed attempts retried before the job fails.")


def _obj(model: type[BaseModel], description: str) -> Any:
    # default {} in the schema so the API server fills nested defaults when the block is omitted.
    return Field(default_factory=model, description=description, json_schema_extra={"default": {}})


class JobSpec(_Spec):
    """spec of a LoRATrainingJob."""

    task: Task = Field("text-to-image", description="What is trained; only text-to-image for now.")
    base_model: ModelSource = Field(description="The base model to adapt: a diffusers folder or one .safetensors file.")
    dataset: DatasetSpec = Field(description="The captioned images to train on.")
    lora: LoraSpec = _obj(LoraSpec, "The LoRA adapter's shape.")
    training: TrainingSpec = _obj(TrainingSpec, "Optimisation settings.")
    checkpoint: CheckpointSpec = _obj(CheckpointSpec, "Checkpoint cadence and retention.")
    output: OutputSpec = Field(description="Where the results go.")
    storage: StorageSpec = _obj(StorageSpec, "The S3-compatible store.")
    resources: ResourcesSpec = _obj(ResourcesSpec, "Pod resources and placement.")
    spot: SpotSpec = _obj(SpotSpec, "Preemption budget and grace period.")
    failure_policy: FailurePolicySpec = _obj(FailurePolicySpec, "Retries of failed attempts.")
    image: str = Field("", max_length=1024, description="Trainer image; empty uses the operator's --trainer-image.")
    image_pull_policy: Literal["", "Always", "IfNotPresent", "Never"] = Field(
        "", description="Image pull policy; empty uses the Kubernetes default."
    )
    service_account_name: str = Field("", max_length=253, description="Service account of the trainer pod; empty for default.")
    suspend: bool = Field(False, description="true stops the running pod (it checkpoints first); false resumes.")


def _camel_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[")


def parse_spec(data: Any) -> JobSpec:
    """Validate a job's spec (camelCase mapping) or raise SpecError naming `spec.<field>`."""
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
    ce = spec.checkpoint.every_steps
    if ce is not None and t.max_train_steps is not None and ce > t.max_train_steps:
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


def _uri_parts(uri: str) -> tuple[str, tuple[str, ...]]:
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
    (root_a, pa), (root_b, pb) = _uri_parts(a), _uri_parts(b)
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
    for field, uri in inputs:
        how = overlap(spec.output.uri, uri)
        if how:
            raise SpecError(
                "spec.output.uri",
                f"{spec.output.uri!r} {how} {field} ({uri!r}); the output must be a folder of its own, "
                f"apart from the inputs, e.g. s3://bucket/loras/<job>/",
            )


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
    "optimizer": "spec.training.optimizer",
    "enable_bucket": "spec.training.buckets.enabled",
    "min_bucket_reso": "spec.training.buckets.minResolution",
    "max_bucket_reso": "spec.training.buckets.maxResolution",
    "bucket_reso_steps": "spec.training.buckets.step",
    "cache_latents": "spec.training.cacheLatents",
    "cache_text_embeddings": "spec.training.cacheTextEmbeddings",
    "max_grad_norm": "spec.training.maxGradNorm",
    "noise_offset": "spec.training.noiseOffset",
    "seed": "spec.training.seed",
    "save_steps": "spec.checkpoint.everySteps",
    "keep_last": "spec.checkpoint.keepLast",
    "s3": "spec.storage",
    "preemption_grace_seconds": "spec.spot.terminationGracePeriodSeconds",
    "storage_retry_seconds": "spec.storage.retrySeconds",
}


def to_train_config(spec: JobSpec) -> TrainConfig:
    """The trainer config a pod of this job runs with (pure); SpecError names the CRD field."""
    t, lora = spec.training, spec.lora
    data: dict[str, Any] = {
        "task": spec.task,
        "base_model": spec.base_model.uri,
        "base_model_config": spec.base_model.config,
        "model_family": spec.base_model.family,
        "train_data_dir": spec.dataset.uri,
        "metadata_path": spec.dataset.captions,
        "caption_extension": spec.dataset.caption_extension,
        "output_dir": spec.output.uri,
        "resolution": t.resolution,
        "center_crop": t.center_crop,
        "random_flip": t.random_flip,
        "lora_rank": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.target_modules),
        "train_text_encoder": lora.train_text_encoder,
        "text_encoder_target_modules": list(lora.text_encoder_target_modules),
        "batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "epochs": t.epochs,
        "max_train_steps": t.max_train_steps,
        "learning_rate": t.learning_rate,
        "text_encoder_lr": t.text_encoder_learning_rate,
        "lr_scheduler": t.lr_scheduler,
        "lr_warmup_steps": t.warmup_steps,
        "lr_num_cycles": t.lr_num_cycles,
        "max_grad_norm": t.max_grad_norm,
        "mixed_precision": t.mixed_precision,
        "gradient_checkpointing": t.gradient_checkpointing,
        "optimizer": t.optimizer,
        "enable_bucket": t.buckets.enabled,
        "min_bucket_reso": t.buckets.min_resolution,
        "max_bucket_reso": t.buckets.max_resolution,
        "bucket_reso_steps": t.buckets.step,
        "cache_latents": t.cache_latents,
        "cache_text_embeddings": t.cache_text_embeddings,
        "noise_offset": t.noise_offset,
        "seed": t.seed,
        "save_steps": spec.checkpoint.every_steps,
        "keep_last": spec.checkpoint.keep_last,
        "device": "cuda" if spec.resources.gpus > 0 else "cpu",
        "s3": S3Config(endpoint_url=spec.storage.endpoint, region=spec.storage.region, path_style=spec.storage.path_style),
        "cache_dir": CACHE_DIR,
        "work_dir": WORK_DIR,
        "preemption_grace_seconds": float(spec.spot.termination_grace_period_seconds - GRACE_MARGIN_SECONDS),
        "storage_retry_seconds": float(spec.storage.retry_seconds),
    }
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        field = CONFIG_PATHS.get(name, "spec")
        got = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
        raise SpecError(field, err["msg"].removeprefix("Value error, ") + got) from None
