"""A tiny Flux pipeline built from configs with fixed seeds (no downloads, well under 1 MB, seconds to build).

The same shape as FLUX.1-dev: a FluxTransformer2DModel (one double-stream and one single-stream
block, guidance embedding, 3-axis RoPE), a VAE with Flux's 16 latent channels, scaling and shift
factors and no quant convs, CLIP (pooled) and T5 (sequence) text encoders with tokenizers built
locally (a byte-level BPE for CLIP as in tiny.py; a Unigram vocabulary for T5 through the
`tokenizers`-backed T5Tokenizer), and Flux-dev's FlowMatchEulerDiscreteScheduler (dynamic shift).
Saved with ``save_pretrained`` so the trainer reads it like a user's Flux folder.

    python -m lora_trainer.tiny flux PATH
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lora_trainer.tiny import TEXT_MAX_LENGTH, TINY_RESOLUTION, WORDS, _write_clip_tokenizer_files

CLIP_DIM = 16  # CLIP hidden size = the pooled projection the transformer takes
T5_DIM = 32  # T5 d_model = the transformer's joint_attention_dim
T5_MAX_LENGTH = 32  # the T5 tokenizer's model_max_length (512 on FLUX.1-dev): the trained sequence length
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def t5_vocab(words: tuple[str, ...] = WORDS) -> list[tuple[str, float]]:
    """A Unigram vocabulary: T5's specials, then each word as one piece and single letters as fall-backs."""
    letters = sorted({ch for w in words for ch in w})
    pieces = [(s, 0.0) for s in T5_SPECIALS] + [("▁", -2.0)]
    pieces += [(f"▁{w}", -3.0) for w in words]
    pieces += [(ch, -8.0) for ch in letters] + [(f"▁{ch}", -7.0) for ch in letters if ch not in words]
    return pieces


def build_t5_tokenizer(max_length: int = T5_MAX_LENGTH):
    """A T5 tokenizer from a local vocabulary (no sentencepiece model, no download)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=max_length)


def build_tiny_flux(folder: Path, seed: int = 0) -> Path:
    """Build and save a tiny FLUX.1-dev-style diffusers pipeline (FluxPipeline) in `folder`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        _write_clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=TEXT_MAX_LENGTH)
    tokenizer_2 = build_t5_tokenizer()

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * 4,  # 16 latent channels packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=CLIP_DIM,
        guidance_embeds=True,  # guidance-distilled, as FLUX.1-dev
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.3611,  # Flux's values
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_DIM, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=CLIP_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=T5_DIM, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
