"""A tiny SDXL pipeline built from configs with fixed seeds (no downloads, about 3 MB, seconds to build).

The same shape as the real one: a UNet with `text_time` added conditioning (time ids and the pooled
embedding), two CLIP text encoders (CLIPTextModel + CLIPTextModelWithProjection) whose hidden
states concatenate, a VAE with SDXL's scaling factor. Saved with ``save_pretrained`` so the
trainer's loading code reads it like a user's SDXL folder.

    python -m lora_trainer.tiny sdxl PATH
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lora_trainer.tiny import TEXT_MAX_LENGTH, TINY_RESOLUTION, _write_clip_tokenizer_files

TIME_EMBED_DIM = 8  # addition_time_embed_dim: six time ids of 8 features each
TEXT_DIM = 16  # hidden size of each text encoder; the UNet cross-attends to both: 2 x 16


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Build and save a tiny SDXL-style diffusers pipeline (StableDiffusionXLPipeline)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        _write_clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=TEXT_MAX_LENGTH)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, model_max_length=TEXT_MAX_LENGTH)

    def text_config() -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=TEXT_DIM,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_DIM,  # time ids + pooled embedding
        cross_attention_dim=2 * TEXT_DIM,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.13025,  # SDXL's value
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config())
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
