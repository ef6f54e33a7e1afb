"""The job spec and its mapping to the trainer's TrainConfig.

Behaviours tested:
- the design's example spec parses and maps field by field onto TrainConfig;
- defaults fill what is omitted (alpha = rank in the trainer, text-to-image, 50 preemptions);
- errors name the CRD path (`spec.training.learningRate`), the value and the fix;
- semantic checks a schema cannot express (warm-up longer than training) are caught;
- task causal-lm: dataset.uri becomes the trainer's train_file, the LLM knobs map onto their trainer
  keys (unset ones left to the trainer), no image key is sent; a field of the other task with a
  value other than its default is refused naming its CRD path, in both directions.
"""

from __future__ import annotations

import copy

import pytest

from lora_operator.spec import (
    CAUSAL_LM_ONLY_FIELDS,
    IMAGE_ONLY_FIELDS,
    SpecError,
    crd_path,
    parse_spec,
    to_train_config,
    train_config_data,
)
from tests.unit.builders import MINIMAL_SPEC

DESIGN_SPEC = {
    "task": "text-to-image",
    "baseModel": {"uri": "s3://models/sd15/"},
    "dataset": {"uri": "s3://datasets/portraits/", "captions": "metadata.csv"},
    "lora": {"rank": 8, "alpha": 8, "targetModules": ["to_q", "to_k", "to_v", "to_out.0"], "trainTextEncoder": False},
    "training": {"batchSize": 4, "gradientAccumulationSteps": 2, "maxTrainSteps": 1500, "learningRate": 2e-4,
                 "lrScheduler": "cosine", "warmupSteps": 100, "mixedPrecision": "bf16", "resolution": 512, "seed": 42},
    "checkpoint": {"everySteps": 500, "keepLast": 3},
    "output": {"uri": "s3://loras/portrait_style_v2/"},
    "storage": {"endpoint": "http://minio.minio:9000", "region": "us-east-1", "credentialsSecret": "s3-creds"},
    "resources": {"gpus": 1, "memory": "24Gi", "nodeSelector": {}, "tolerations": [], "priorityClassName": ""},
    "spot": {"maxPreemptions": 50},
    "failurePolicy": {"backoffLimit": 3},
    "image": "",
    "suspend": False,
}


def test_design_spec_maps_onto_train_config() -> None:
    config = to_train_config(parse_spec(DESIGN_SPEC))
    expected = {
        "task": "text-to-image", "base_model": "s3://models/sd15/", "train_data_dir": "s3://datasets/portraits/",
        "metadata_path": "metadata.csv", "output_dir": "s3://loras/portrait_style_v2/", "lora_rank": 8,
        "lora_alpha": 8.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "train_text_encoder": False,
        "batch_size": 4, "gradient_accumulation_steps": 2, "max_train_steps": 1500, "learning_rate": 2e-4,
        "lr_scheduler": "cosine", "lr_warmup_steps": 100, "mixed_precision": "bf16", "resolution": 512, "seed": 42,
        "save_steps": 500, "keep_last": 3, "device": "cuda", "cache_dir": "/scratch/cache",
        "preemption_grace_seconds": 25.0,
    }
    got = config.model_dump()
    assert {k: got[k] for k in expected} == expected
    assert config.s3.endpoint_url == "http://minio.minio:9000" and config.s3.region == "us-east-1"


def test_defaults() -> None:
    spec = parse_spec(MINIMAL_SPEC)
    assert (spec.task, spec.lora.rank, spec.spot.max_preemptions, spec.failure_policy.backoff_limit) == (
        "text-to-image", 8, 50, 3)
    assert to_train_config(spec).alpha == 8.0
    assert to_train_config(parse_spec({**MINIMAL_SPEC, "resources": {"gpus": 0}})).device == "cpu"


def test_snake_case_is_accepted_too() -> None:
    spec = copy.deepcopy(MINIMAL_SPEC)
    spec["base_model"] = spec.pop("baseModel")
    assert parse_spec(spec).base_model.uri == "s3://models/sd15/"


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"training": {"maxTrainSteps": 100, "learningRate": 5}}, "spec.training.learningRate", "5"),
        ({"training": {"maxTrainSteps": 100, "learningRate": -1}}, "spec.training.learningRate", "greater than 0"),
        ({"training": {"maxTrainSteps": 100, "resolution": 500}}, "spec.training.resolution", "multiple of 8"),
        ({"lora": {"rank": 0}}, "spec.lora.rank", "greater than or equal to 1"),
        ({"training": {}}, "spec.training.maxTrainSteps", "set maxTrainSteps"),
        ({"training": {"maxTrainSteps": 10, "warmupSteps": 50}}, "spec.training.warmupSteps", "lower warmupSteps"),
        ({"checkpoint": {"everySteps": 500}}, "spec.checkpoint.everySteps", "exceeds maxTrainSteps"),
        ({"output": {"uri": "file:///tmp/x"}}, "spec.output.uri", "s3://"),
        ({"training": {"maxTrainSteps": 100, "lrScheduler": "exotic"}}, "spec.training.lrScheduler", "cosine"),
        ({"lora": {"rnak": 4}}, "spec.lora.rnak", "Extra inputs"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory", "pattern"),
        ({"output": {"uri": "s3://datasets/portraits/"}}, "spec.output.uri", "equals spec.dataset.uri"),
        ({"output": {"uri": "s3://datasets/portraits"}}, "spec.output.uri", "equals spec.dataset.uri"),
        ({"output": {"uri": "s3://datasets/portraits/out/"}}, "spec.output.uri", "is inside spec.dataset.uri"),
        ({"output": {"uri": "s3://datasets//portraits/./out"}}, "spec.output.uri", "is inside spec.dataset.uri"),
        ({"output": {"uri": "s3://models/"}}, "spec.output.uri", "contains spec.baseModel.uri"),
        ({"output": {"uri": "s3://models/x/../sd15"}}, "spec.output.uri", "equals spec.baseModel.uri"),
        ({"storage": {"retrySeconds": 0}}, "spec.storage.retrySeconds", "greater than or equal to 1"),
    ],
)
def test_errors_name_the_crd_field(change: dict, field: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({**MINIMAL_SPEC, **change})
    assert info.value.field == field
    assert field in str(info.value) and words in str(info.value)


def test_missing_required_block() -> None:
    spec = dict(MINIMAL_SPEC)
    del spec["output"]
    with pytest.raises(SpecError, match=r"spec\.output: Field required"):
        parse_spec(spec)


def test_not_a_mapping() -> None:
    with pytest.raises(SpecError, match="expected an object"):
        parse_spec(["nope"])


def test_every_local_path_of_a_pod_lies_in_its_scratch_volume() -> None:
    """The pod's root filesystem is read-only: inputs, cache and work must sit under /scratch."""
    from pathlib import PurePosixPath

    from lora_operator.spec import SCRATCH_DIR
    from lora_trainer.train import cache_root, scratch_root

    config = to_train_config(parse_spec(DESIGN_SPEC))
    for path in (cache_root(config) / "inputs", scratch_root(config)):
        assert PurePosixPath(path).is_relative_to(SCRATCH_DIR), path


@pytest.mark.parametrize("uri", ["s3://loras/job/", "s3://datasets/portraits-out/", "s3://models2/sd15/",
                                 "s3://other/datasets/portraits/"])
def test_output_apart_from_inputs_is_fine(uri: str) -> None:
    assert parse_spec({**MINIMAL_SPEC, "output": {"uri": uri}}).output.uri == uri


def test_storage_retry_seconds_reaches_the_trainer() -> None:
    assert to_train_config(parse_spec(MINIMAL_SPEC)).storage_retry_seconds == 300
    spec = {**MINIMAL_SPEC, "storage": {**MINIMAL_SPEC["storage"], "retrySeconds": 20}}
    assert to_train_config(parse_spec(spec)).storage_retry_seconds == 20


def test_single_file_base_model_and_its_config_pass_through() -> None:
    spec = parse_spec({**MINIMAL_SPEC, "baseModel": {"uri": "s3://models/sd15/v1-5-pruned.safetensors",
                                                     "config": "s3://models/sd15-configs/"}})
    config = to_train_config(spec)
    assert config.base_model == "s3://models/sd15/v1-5-pruned.safetensors"
    assert config.base_model_config == "s3://models/sd15-configs/"
    assert to_train_config(parse_spec(MINIMAL_SPEC)).base_model_config is None


def test_pickle_base_model_is_refused_naming_the_crd_field() -> None:
    with pytest.raises(SpecError) as info:
        to_train_config(parse_spec({**MINIMAL_SPEC, "baseModel": {"uri": "s3://models/sd15/v1-5-pruned.ckpt"}}))
    assert str(info.value).startswith("spec.baseModel.uri: ") and "pickle checkpoint" in str(info.value)


def test_output_inside_the_base_model_config_is_refused() -> None:
    data = {**MINIMAL_SPEC, "baseModel": {"uri": "s3://m/x.safetensors", "config": "s3://m/cfg/"},
            "output": {"uri": "s3://m/cfg/out/"}}
    with pytest.raises(SpecError, match=r"spec.output.uri: .* is inside spec.baseModel.config"):
        parse_spec(data)


def _training(**fields: object) -> dict:
    return {**MINIMAL_SPEC, "training": {"maxTrainSteps": 100, **fields}}


@pytest.mark.parametrize(
    ("training", "lora", "expected"),
    [
        ({}, {}, {"optimizer": "adamw", "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
                  "bucket_reso_steps": 64, "cache_latents": False, "cache_text_embeddings": False}),
        ({"optimizer": "adamw8bit"}, {}, {"optimizer": "adamw8bit"}),
        ({"buckets": {"enabled": True, "minResolution": 512, "maxResolution": 2048, "step": 32}}, {},
         {"enable_bucket": True, "min_bucket_reso": 512, "max_bucket_reso": 2048, "bucket_reso_steps": 32}),
        ({"cacheLatents": True, "cacheTextEmbeddings": True}, {}, {"cache_latents": True, "cache_text_embeddings": True}),
        ({"cacheLatents": True}, {"trainTextEncoder": True}, {"cache_latents": True, "train_text_encoder": True}),
        ({"resolution": 64, "buckets": {"enabled": True, "step": 64}}, {}, {"bucket_reso_steps": 64, "resolution": 64}),
        ({"flowMatching": {"weightingScheme": "logit_normal", "logitMean": 0.5, "logitStd": 0.5, "modeScale": 1.0,
                           "guidanceScale": 1.0}}, {},
         {"weighting_scheme": "logit_normal", "logit_mean": 0.5, "logit_std": 0.5, "mode_scale": 1.0, "guidance_scale": 1.0}),
        ({}, {}, {"weighting_scheme": "none", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "guidance_scale": 3.5}),
    ],
)
def test_sdxl_options_reach_the_trainer(training: dict, lora: dict, expected: dict) -> None:
    """Optimizer, buckets and caches map onto the trainer's keys (lora-train reads the same names from YAML)."""
    got = to_train_config(parse_spec({**_training(**training), "lora": lora})).model_dump()
    assert {k: got[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("training", "lora", "field", "words"),
    [
        ({"cacheTextEmbeddings": True}, {"trainTextEncoder": True}, "spec.training.cacheTextEmbeddings",
         "set cacheTextEmbeddings: false or trainTextEncoder: false"),
        ({"buckets": {"minResolution": 1024, "maxResolution": 512}}, {}, "spec.training.buckets.minResolution",
         "1024 is over maxResolution (512)"),
        ({"resolution": 32, "buckets": {"enabled": True}}, {}, "spec.training.buckets.step", "64 is over resolution (32)"),
        ({"buckets": {"step": 12}}, {}, "spec.training.buckets.step", "multiple of 8"),
        ({"buckets": {"minResolution": 0}}, {}, "spec.training.buckets.minResolution", "greater than or equal to 8"),
        ({"buckets": {"enabled": True, "maxResolution": 9000}}, {}, "spec.training.buckets.maxResolution", "8192"),
        ({"buckets": {"enable": True}}, {}, "spec.training.buckets.enable", "Extra inputs"),
        ({"optimizer": "lion"}, {}, "spec.training.optimizer", "adamw8bit"),
        ({"flowMatching": {"weightingScheme": "uniform"}}, {}, "spec.training.flowMatching.weightingScheme", "logit_normal"),
        ({"flowMatching": {"logitStd": 0}}, {}, "spec.training.flowMatching.logitStd", "greater than 0"),
    ],
)
def test_sdxl_options_refused_naming_the_field(training: dict, lora: dict, field: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({**_training(**training), "lora": lora})
    assert info.value.field == field
    assert field in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("name", ["min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"])
def test_bucket_bounds_are_the_trainers(name: str) -> None:
    """The CRD refuses exactly what TrainConfig refuses (one source for the bounds)."""
    from lora_operator.spec import BucketSpec
    from lora_trainer.config import TrainConfig

    crd = {"min_bucket_reso": "min_resolution", "max_bucket_reso": "max_resolution", "bucket_reso_steps": "step"}[name]
    ours, theirs = BucketSpec.model_fields[crd], TrainConfig.model_fields[name]
    assert (ours.default, ours.metadata) == (theirs.default, theirs.metadata)


# ---- task: causal-lm -------------------------------------------------------------------------------

LLM_SPEC = {
    "task": "causal-lm",
    "baseModel": {"uri": "s3://models/llama/"},
    "dataset": {"uri": "s3://datasets/legal/train.jsonl"},
    "training": {"maxTrainSteps": 100},
    "output": {"uri": "s3://loras/legal/"},
    "storage": {"endpoint": "http://minio:9000", "credentialsSecret": "s3-creds"},
}
IMAGE_KEYS = {"train_data_dir", "metadata_path", "caption_extension", "base_model_config", "resolution", "center_crop",
              "random_flip", "train_text_encoder", "text_encoder_target_modules", "text_encoder_lr", "noise_offset",
              "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "cache_latents",
              "cache_text_embeddings"}
LLM_KEYS = {"train_file", "eval_file", "eval_fraction", "max_seq_length", "packing", "eval_steps", "merge",
            "load_in_4bit", "lora_target_mlp"}


def with_fields(spec: dict, **blocks: dict) -> dict:
    """`spec` with keys merged into its blocks (`training={"packing": True}`)."""
    out = copy.deepcopy(spec)
    for block, fields in blocks.items():
        out[block] = {**out.get(block, {}), **fields}
    return out


@pytest.mark.parametrize(
    ("blocks", "expected"),
    [
        ({}, {"task": "causal-lm", "train_file": "s3://datasets/legal/train.jsonl", "packing": False, "merge": False,
              "load_in_4bit": False, "lora_target_mlp": False}),
        ({"lora": {"targetMlp": True}}, {"lora_target_mlp": True}),
        ({"dataset": {"evalUri": "s3://datasets/legal/eval.jsonl"}}, {"eval_file": "s3://datasets/legal/eval.jsonl"}),
        ({"dataset": {"evalFraction": 0.1}, "training": {"evalSteps": 20}}, {"eval_fraction": 0.1, "eval_steps": 20}),
        ({"training": {"maxSeqLength": 512, "packing": True}}, {"max_seq_length": 512, "packing": True}),
        ({"output": {"merge": True}}, {"merge": True}),
        ({"baseModel": {"loadIn4bit": True}, "resources": {"gpus": 1}}, {"load_in_4bit": True, "device": "cuda"}),
        ({"lora": {"targetModules": ["q_proj", "v_proj"]}}, {"target_modules": ["q_proj", "v_proj"]}),
        ({"training": {"maxTrainSteps": 7, "batchSize": 2, "seed": 3}},
         {"max_train_steps": 7, "batch_size": 2, "seed": 3}),
    ],
)
def test_causal_lm_maps_onto_trainer_keys(blocks: dict, expected: dict) -> None:
    data = train_config_data(parse_spec(with_fields(LLM_SPEC, **blocks)))
    assert {k: data[k] for k in expected} == expected
    assert not IMAGE_KEYS & data.keys()  # the image family's keys (and their defaults) stay out


def test_causal_lm_leaves_unset_knobs_to_the_trainer() -> None:
    data = train_config_data(parse_spec(LLM_SPEC))
    for key in ("eval_file", "eval_fraction", "max_seq_length", "eval_steps", "target_modules"):
        assert key not in data, key


def test_text_to_image_sends_no_llm_keys() -> None:
    data = train_config_data(parse_spec(MINIMAL_SPEC))
    assert data["train_data_dir"] == "s3://datasets/portraits/" and not LLM_KEYS & data.keys()
    assert "target_modules" not in data  # unset: the trainer's default (the UNet's attention)
    assert to_train_config(parse_spec(MINIMAL_SPEC)).target_modules is None  # resolved per family at run time


# A value other than the default for every field one task reads only.
IMAGE_ONLY_VALUES = {
    ("base_model", "config"): "s3://models/configs/", ("dataset", "captions"): "metadata.csv",
    ("dataset", "caption_extension"): ".caption", ("lora", "train_text_encoder"): True,
    ("lora", "text_encoder_target_modules"): ["q_proj"], ("training", "text_encoder_learning_rate"): 1e-5,
    ("training", "resolution"): 512, ("training", "center_crop"): False, ("training", "random_flip"): True,
    ("training", "noise_offset"): 0.1, ("training", "buckets"): {"enabled": True},
    ("training", "cache_latents"): True, ("training", "cache_text_embeddings"): True,
    ("lora", "init_from"): "s3://loras/v1/a.safetensors",
    ("training", "flow_matching"): {"weightingScheme": "cosmap"},
}
LLM_ONLY_VALUES = {
    ("base_model", "load_in_4bit"): True, ("dataset", "eval_uri"): "s3://datasets/eval.jsonl",
    ("dataset", "eval_fraction"): 0.1, ("training", "max_seq_length"): 256, ("training", "packing"): True,
    ("training", "eval_steps"): 10, ("output", "merge"): True, ("lora", "target_mlp"): True,
}


def test_every_task_only_field_has_a_row() -> None:
    assert set(IMAGE_ONLY_VALUES) == set(IMAGE_ONLY_FIELDS)
    assert set(LLM_ONLY_VALUES) == set(CAUSAL_LM_ONLY_FIELDS)


@pytest.mark.parametrize(("base", "task", "other", "values"), [
    (LLM_SPEC, "causal-lm", "text-to-image", IMAGE_ONLY_VALUES),
    ({**MINIMAL_SPEC, "resources": {"gpus": 1}}, "text-to-image", "causal-lm", LLM_ONLY_VALUES),
], ids=["image-field-in-llm-job", "llm-field-in-image-job"])
def test_a_field_of_the_other_task_is_refused_by_name(base: dict, task: str, other: str, values: dict) -> None:
    for (block, name), value in values.items():
        path = crd_path(block, name)
        leaf = path.rsplit(".", 1)[1]
        with pytest.raises(SpecError) as info:
            parse_spec(with_fields(base, **{path.split(".")[1]: {leaf: value}}))
        assert info.value.field == path, path
        assert f"applies to task {other} only" in str(info.value) and f"spec.task is {task}" in str(info.value)


def test_a_causal_lm_family_needs_the_causal_lm_task() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(with_fields(MINIMAL_SPEC, baseModel={"family": "causal-lm"}))
    assert info.value.field == "spec.baseModel.family" and "an image family" in str(info.value)


def test_default_values_of_the_other_task_are_fine() -> None:
    """The API server writes every default into stored objects: those must not count as set."""
    image_defaults = {"dataset": {"captionExtension": ".txt"}, "lora": {"trainTextEncoder": False},
                      "training": {"centerCrop": True, "randomFlip": False, "noiseOffset": 0.0, "cacheLatents": False,
                                   "buckets": {"enabled": False, "minResolution": 256, "maxResolution": 1024,
                                               "step": 64}}}
    assert parse_spec(with_fields(LLM_SPEC, **image_defaults)).task == "causal-lm"
    llm_defaults = {"training": {"packing": False}, "output": {"merge": False}, "baseModel": {"loadIn4bit": False},
                    "lora": {"targetMlp": False}}
    assert parse_spec(with_fields(MINIMAL_SPEC, **llm_defaults)).task == "text-to-image"


@pytest.mark.parametrize(("blocks", "field", "words"), [
    ({"dataset": {"evalUri": "s3://d/eval.jsonl", "evalFraction": 0.1}}, "spec.dataset.evalFraction", "not both"),
    ({"baseModel": {"loadIn4bit": True}, "resources": {"gpus": 0}}, "spec.baseModel.loadIn4bit", "resources.gpus"),
    ({"dataset": {"evalFraction": 1.0}}, "spec.dataset.evalFraction", "less than 1"),
    ({"training": {"maxSeqLength": 4}}, "spec.training.maxSeqLength", "greater than or equal to 8"),
    ({"output": {"uri": "s3://datasets/legal/train.jsonl"}}, "spec.output.uri", "equals spec.dataset.uri"),
    ({"dataset": {"evalUri": "s3://loras/legal/eval.jsonl"}}, "spec.output.uri", "contains spec.dataset.evalUri"),
    ({"task": None}, "spec.task", "causal-lm"),
    ({"output": {"merge": True}, "baseModel": {"loadIn4bit": True}, "resources": {"gpus": 1}}, "spec.output.merge",
     "merge in 16 bits"),
    ({"lora": {"targetMlp": True, "targetModules": ["q_proj"]}}, "spec.lora.targetMlp", "gate_proj"),
    ({"baseModel": {"family": "sdxl"}}, "spec.baseModel.family", "use family auto, or causal-lm"),
])
def test_causal_lm_errors_name_the_field(blocks: dict, field: str, words: str) -> None:
    spec = with_fields(LLM_SPEC, **{k: v for k, v in blocks.items() if k != "task"})
    if "task" in blocks:
        spec["task"] = "text-generation"
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert info.value.field == field and words in str(info.value), str(info.value)


def test_causal_lm_spec_becomes_a_trainer_config() -> None:
    spec = with_fields(LLM_SPEC, dataset={"evalFraction": 0.1}, training={"maxSeqLength": 256, "packing": True,
                                                                           "evalSteps": 10}, lora={"targetMlp": True})
    config = to_train_config(parse_spec(spec))
    assert (config.task, config.train_file, config.train_data_dir) == ("causal-lm", "s3://datasets/legal/train.jsonl",
                                                                       None)
    assert (config.eval_fraction, config.max_seq_length, config.packing, config.eval_steps, config.lora_target_mlp) == (
        0.1, 256, True, 10, True)
    assert config.target_modules is None  # the architecture's projections, resolved when the model is loaded
    assert to_train_config(parse_spec(LLM_SPEC)).max_seq_length == 1024  # unset: the trainer's default
