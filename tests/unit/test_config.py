"""Config model: both spellings, defaults, bad input naming the field, training-field hashing."""

from pathlib import Path

import pytest

from lora_trainer.config import (
    TRAINING_FIELDS,
    TrainConfig,
    changed_fields,
    config_hash,
    dump_config,
    load_config,
    parse_config,
    training_fields,
)
from lora_trainer.errors import EXIT_CONFIG, ConfigError

BASE = {"base_model": "m", "train_data_dir": "d", "output_dir": "o", "max_train_steps": 10}


def test_snake_and_camel_spellings_give_the_same_config() -> None:
    snake = parse_config({**BASE, "lora_rank": 16, "batch_size": 4, "learning_rate": 2e-4, "save_steps": 5})
    camel = parse_config(
        {"baseModel": "m", "trainDataDir": "d", "outputDir": "o", "maxTrainSteps": 10,
         "loraRank": 16, "batchSize": 4, "learningRate": 2e-4, "saveSteps": 5}
    )
    assert snake == camel
    assert snake.lora_rank == 16 and snake.alpha == 16.0


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"lora_rank": 0}, "lora_rank"),
        ({"learningRate": 5}, "learning_rate"),
        ({"resolution": 500}, "resolution"),
        ({"lr_scheduler": "cosin"}, "lr_scheduler"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"lora_rnak": 4}, "lora_rnak"),
        ({"batch_size": "four"}, "batch_size"),
        ({"max_train_steps": None}, "set epochs or max_train_steps"),
        ({"lr_warmup_steps": 50}, "lr_warmup_steps"),
    ],
)
def test_bad_values_name_the_field(patch: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, **patch})
    assert field in str(info.value)
    assert info.value.exit_code == EXIT_CONFIG
    assert "\n" not in str(info.value)


def test_missing_required_field_is_named() -> None:
    with pytest.raises(ConfigError, match="output_dir"):
        parse_config({"base_model": "m", "train_data_dir": "d", "epochs": 1})


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listy)


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = parse_config({**BASE, "target_modules": ["to_q", "to_v"], "s3": {"endpoint_url": "http://x"}})
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_hash_changes_only_with_training_fields() -> None:
    cfg = parse_config(BASE)
    same = cfg.model_copy(update={"save_steps": 7, "keep_last": 1, "output_dir": "elsewhere", "log_every": 3})
    other = cfg.model_copy(update={"seed": 1, "lora_rank": 4})
    assert config_hash(cfg) == config_hash(same)
    assert config_hash(cfg) != config_hash(other)
    assert changed_fields(training_fields(cfg), training_fields(other)) == ["lora_rank", "seed"]


def test_training_fields_exist_on_the_model() -> None:
    assert set(TRAINING_FIELDS) <= set(TrainConfig.model_fields)
