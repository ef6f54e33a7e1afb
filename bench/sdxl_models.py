"""SDXL-shaped pipelines built from configs with fixed seeds, for the SDXL benchmarks (no downloads).

Two sizes of the same architecture (a `text_time` UNet with cross-attention on two concatenated
CLIP text encoders, the second one projected and pooled; an SDXL-scaled VAE):

    small  about ten million parameters, proportioned like SDXL (three UNet levels, the deepest with
           the most transformer layers, a four-level VAE, two text encoders the second the wider),
           so the VAE and the text encoders cost a share of a step as they do in the real model;
    full   SDXL base 1.0's published configs (2.6 B UNet parameters, CLIP ViT-L and bigG text
           encoders, the 4-channel VAE); random weights, for speed and memory on a GPU only.

Tokenizers are the tiny test vocabulary (lora_trainer.tiny), 77 tokens as in SDXL. Not a test
fixture: tests use lora_trainer.tiny_sdxl.

    python bench/sdxl_models.py small PATH
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "unet": {
            "block_out_channels": (32, 64, 128), "layers_per_block": 2, "transformer_layers_per_block": (0, 1, 2),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (2, 4, 8), "addition_time_embed_dim": 32, "norm_num_groups": 16,
        },
        "vae": {"block_out_channels": (16, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16},
        "te1": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 2},
        "te2": {"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4},
    },
    "full": {
        "unet": {
            "block_out_channels": (320, 640, 1280), "layers_per_block": 2, "transformer_layers_per_block": (1, 2, 10),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (5, 10, 20), "addition_time_embed_dim": 256, "norm_num_groups": 32,
        },
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
        "te1": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        "te2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20},
    },
}


def build_sdxl(path: Path, size: str = "small", seed: int = 0) -> Path:
    """Build and save an SDXL pipeline of `size` (see SIZES) with seeded random weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_trainer.tiny import TEXT_MAX_LENGTH, _write_clip_tokenizer_files

    cfg = SIZES[size]
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        _write_clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=TEXT_MAX_LENGTH)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, model_max_length=TEXT_MAX_LENGTH)

    def text_config(te: dict[str, Any]) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=te["hidden_size"],
            hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **te,
        )

    u = cfg["unet"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, use_linear_projection=True,
        addition_embed_type="text_time", cross_attention_dim=cfg["te1"]["hidden_size"] + cfg["te2"]["hidden_size"],
        projection_class_embeddings_input_dim=6 * u["addition_time_embed_dim"] + cfg["te2"]["hidden_size"], **u,
    )
    torch.manual_seed(seed + 1)
    v = cfg["vae"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, scaling_factor=0.13025,
        down_block_types=("DownEncoderBlock2D",) * len(v["block_out_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(v["block_out_channels"]), **v,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config(cfg["te1"]))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(cfg["te2"]))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, prediction_type="epsilon", timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", choices=sorted(SIZES))
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_sdxl(args.path, args.size, args.seed))


if __name__ == "__main__":
    main()
