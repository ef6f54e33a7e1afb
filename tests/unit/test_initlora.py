"""init_lora's pure parts: config checks, the hash it joins, kohya alpha folding, and mismatch messages.

Behaviours tested:
- init_lora takes one .safetensors file (local or s3://, normalised); a pickle or a folder is refused;
  it may not lie inside output_dir; it resolves like the other local paths;
- the file's sha256 joins the training fields and hash, and a changed file is named in the diff;
- kohya alphas fold into the up weights for the run's alpha (a missing .alpha means alpha = rank);
- a mismatch between the file and the run (components, modules, rank) is one line naming both sides
  and the setting to change; a match is None.
"""

from __future__ import annotations

import pytest
import torch

from lora_trainer.config import changed_fields, config_hash, parse_config, training_fields
from lora_trainer.errors import ConfigError
from lora_trainer.initlora import is_kohya, kohya_alpha_to, mismatch

BASE = {"base_model": "/m", "train_data_dir": "/d", "output_dir": "/o", "max_train_steps": 1}


@pytest.mark.parametrize(("value", "ok"), [
    ("/loras/a.safetensors", True),
    ("s3://b/x/./a.safetensors", True),
    ("/loras/a.ckpt", False),
    ("/loras/a.pt", False),
    ("/loras/", False),
    ("s3://b/../a.safetensors", False),
    ("/o/checkpoints/pytorch_lora_weights_step_4.safetensors", False),  # inside output_dir
])
def test_init_lora_value(value: str, ok: bool) -> None:
    if ok:
        assert parse_config({**BASE, "init_lora": value}).init_lora.endswith(".safetensors")
    else:
        with pytest.raises(ConfigError, match="init_lora"):
            parse_config({**BASE, "init_lora": value})


def test_s3_init_lora_is_normalised() -> None:
    assert parse_config({**BASE, "init_lora": "s3://b/x/./a.safetensors"}).init_lora == "s3://b/x/a.safetensors"


def test_init_sha_joins_the_hash_and_is_named_when_changed() -> None:
    c = parse_config({**BASE, "init_lora": "/l/a.safetensors"})
    a, b = training_fields(c, None, "a" * 64), training_fields(c, None, "b" * 64)
    assert a["init_lora"] == "/l/a.safetensors" and a["init_lora_sha256"] == "a" * 64
    assert config_hash(c, None, "a" * 64) != config_hash(c, None, "b" * 64) != config_hash(c)
    assert changed_fields(a, b) == ["init_lora (file content, sha256 aaaaaaaaaaaa... -> bbbbbbbbbbbb...)"]
    # A manifest from before init_lora existed reads as "no init file".
    old = {k: v for k, v in training_fields(parse_config(BASE)).items() if k != "init_lora"}
    assert changed_fields(old, training_fields(parse_config(BASE))) == []


def test_kohya_alpha_folds_into_the_up_weights() -> None:
    up, down = torch.ones(6, 2), torch.ones(2, 5)
    state = {"lora_unet_a.lora_up.weight": up, "lora_unet_a.lora_down.weight": down,
             "lora_unet_a.alpha": torch.tensor(1.0), "lora_unet_b.lora_up.weight": up,
             "lora_unet_b.lora_down.weight": down}
    assert is_kohya(list(state)) and not is_kohya(["unet.x.lora_A.weight"]) and not is_kohya([])
    out = kohya_alpha_to(state, alpha=4.0)
    assert sorted(out) == sorted(k for k in state if not k.endswith(".alpha"))
    assert float(out["lora_unet_a.lora_up.weight"][0, 0]) == 0.25  # alpha 1 -> 4: up / 4
    assert float(out["lora_unet_b.lora_up.weight"][0, 0]) == 0.5  # no alpha: rank 2 -> 4
    assert out["lora_unet_a.lora_down.weight"] is down
    assert kohya_alpha_to(state, alpha=1.0)["lora_unet_a.lora_up.weight"] is up  # equal alphas: untouched


Q, K = "down.attn1.to_q", "down.attn1.to_k"
OUT0 = "down.attn1.to_out.0"
TE_Q = "encoder.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(("file", "run", "rank", "says"), [
    ({"unet": {Q: 4, K: 4}}, {"unet": {Q, K}}, 4, None),
    ({"unet": {Q: 8, K: 8}}, {"unet": {Q, K}}, 4,
     ["has rank 8 (unet down.attn1.to_k)", "lora_rank is 4", "set lora_rank: 8"]),
    ({"unet": {Q: 4, OUT0: 4}}, {"unet": {Q, K}}, 4,
     ["LoRA on 1 unet modules this run has none on (down.attn1.to_out.0)", "none on 1 it has (down.attn1.to_k)",
      "['to_out.0', 'to_q']", "target_modules gives ['to_k', 'to_q']", "set target_modules"]),
    ({"unet": {Q: 4}, "text_encoder": {TE_Q: 4}}, {"unet": {Q}}, 4,
     ["LoRA weights for text_encoder (1 modules)", "set train_text_encoder: true"]),
    ({"unet": {Q: 4}}, {"unet": {Q}, "text_encoder": {TE_Q}}, 4,
     ["no LoRA weights for text_encoder", "set train_text_encoder: false"]),
    ({"unet": {Q: 4}, "text_encoder": {"encoder.layers.1.self_attn.q_proj": 4}},
     {"unet": {Q}, "text_encoder": {TE_Q}}, 4, ["text_encoder_target_modules"]),
])
def test_mismatch(file: dict, run: dict, rank: int, says: list[str] | None) -> None:
    text = mismatch(file, run, rank, "/l/a.safetensors")
    if says is None:
        assert text is None
        return
    assert text is not None and text.startswith("init_lora: /l/a.safetensors ") and "\n" not in text
    for needle in says:
        assert needle in text, text
