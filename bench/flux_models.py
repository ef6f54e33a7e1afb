"""Flux-shaped pipelines built from configs with fixed seeds, for the Flux benchmarks (no downloads).

    small  a few million parameters, proportioned like FLUX.1-dev (more single- than double-stream
           blocks, 3-axis RoPE, guidance embedding, a four-level 16-channel VAE, T5 wider than CLIP),
           so the VAE and T5 cost a share of a step as they do in the real model;
    full   FLUX.1-dev's published configs (12 B transformer, CLIP-L, T5-XXL's shape, the 16-channel
           VAE); random weights, for speed and memory on a GPU only.

Tokenizers are the tiny test vocabularies (lora_trainer.tiny_flux: CLIP 77 tokens, T5 32). Not a
test fixture: tests use lora_trainer.tiny_flux.

    python bench/flux_models.py small PATH
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "transformer": {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32, "num_attention_heads": 4,
                        "axes_dims_rope": (8, 12, 12)},
        "vae": {"block_out_channels": (16, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16},
        "clip": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 2},
        "t5": {"d_model": 128, "d_kv": 32, "d_ff": 320, "num_layers": 4, "num_heads": 4},
    },
    "full": {
        "transformer": {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
                        "num_attention_heads": 24, "axes_dims_rope": (16, 56, 56)},
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
        "clip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        "t5": {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64},
    },
}


def build_flux(folder: Path, size: str = "small", seed: int = 0, dtype: str = "float32") -> Path:
    """Save a FluxPipeline of the given size in `folder` (random weights from `seed`, stored in `dtype`:
    "full" in bfloat16 is about 34 GB on disk, in float32 twice that)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from lora_trainer.tiny import TEXT_MAX_LENGTH, _write_clip_tokenizer_files
    from lora_trainer.tiny_flux import build_t5_tokenizer

    cfg = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        _write_clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=TEXT_MAX_LENGTH)
    tokenizer_2 = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, joint_attention_dim=cfg["t5"]["d_model"],
                                         pooled_projection_dim=cfg["clip"]["hidden_size"], guidance_embeds=True,
                                         **cfg["transformer"])
    torch.manual_seed(seed + 1)
    levels = len(cfg["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=16, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, **cfg["vae"])
    torch.manual_seed(seed + 2)
    clip = cfg["clip"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=clip["hidden_size"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **clip))
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        **cfg["t5"]))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    if dtype != "float32":  # they are built in float32
        for module in (transformer, vae, text_encoder, text_encoder_2):
            module.to(getattr(torch, dtype))
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                 ).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("size", choices=sorted(SIZES))
    p.add_argument("path", type=Path)
    a = p.parse_args()
    print(build_flux(a.path, a.size))
