"""Tiny models and data built from configs with fixed seeds: no downloads, a few MB, seconds to build.

Used by tests, the demo, benchmarks and examples. Everything here is saved with ``save_pretrained``
so the trainer's real loading code reads it from disk exactly like a user's model.

    python -m lora_trainer.tiny sd PATH        # a Stable Diffusion 1.x-style diffusers folder
    python -m lora_trainer.tiny sdxl PATH      # an SDXL-style diffusers folder (tiny_sdxl.py)
    python -m lora_trainer.tiny sd-file PATH.safetensors [--model DIR]   # the same as one original-layout file
    python -m lora_trainer.tiny dataset PATH   # captioned PNGs (metadata.csv or .txt sidecars)
    python -m lora_trainer.tiny blip PATH      # a BLIP captioning model + processor
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

TINY_RESOLUTION = 32
"""Pixel size the tiny pipeline trains and samples at (the VAE downsamples by 2: latents are 16x16)."""

TEXT_MAX_LENGTH = 77  # as in real SD 1.x, so caption handling behaves the same as with a real model

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "stripe")

# Words that become single tokens in both tiny tokenizers; anything else still tokenizes (into
# letters or bytes), it just takes more tokens.
WORDS: tuple[str, ...] = (
    *COLOURS, *SHAPES, *(s + "s" for s in SHAPES),
    "a", "an", "the", "of", "on", "in", "with", "and", "to", "from", "is", "at", "by",
    "background", "gradient", "photo", "picture", "image", "painting", "drawing", "style", "portrait",
    "small", "large", "big", "bright", "dark", "light", "simple", "shape", "shapes", "colour", "color",
    "person", "man", "woman", "cat", "dog", "tree", "house", "sky", "sea", "sun", "flower", "car",
    "standing", "sitting", "top", "left", "right", "center", "close", "up", "view",
)  # fmt: skip

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]")


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table (what the ByteLevel pre-tokenizer emits)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one word the way the CLIP tokenizer does (lowest-ranked pair first)."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def clip_vocab_and_merges(words: Sequence[str] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in which every word of ``words`` is one token.

    All 256 byte symbols (alone and with the ``</w>`` end-of-word mark) are in the vocabulary, so any
    text tokenizes without unknowns. Merges are grown word by word: each new merge joins the first two
    symbols the current merges leave, and, ranked last, never changes how earlier words tokenize.
    """
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            symbols = _bpe(symbols, ranks)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab, merges


def _write_clip_tokenizer_files(folder: Path) -> None:
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def bert_vocab(words: Sequence[str] = WORDS) -> list[str]:
    """A WordPiece vocabulary: BLIP's special tokens, single characters, ``##`` continuations, words."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    return list(dict.fromkeys([*BERT_SPECIALS, *chars, *("##" + c for c in chars), *words]))


# --------------------------------------------------------------------------- Stable Diffusion


def build_tiny_sd(path: Path, seed: int = 0) -> Path:
    """Build and save a tiny SD 1.x-style diffusers pipeline (UNet, VAE, CLIP text encoder, tokenizer, DDPM)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        # The tokenizer is loaded from the vocab/merges files we write, as a user's tokenizer would be.
        _write_clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=TEXT_MAX_LENGTH)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
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
        scaling_factor=0.18215,  # SD 1.x's value, so code that reads it behaves as with a real model
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_MAX_LENGTH,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD 1.x's training noise schedule; DDPM also samples (few steps are enough for a smoke test).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    # Keep the slow-tokenizer files next to tokenizer.json, as real SD 1.x folders have them.
    _write_clip_tokenizer_files(path / "tokenizer")
    return path


# --------------------------------------------------------------------------- single-file checkpoints

_UNET_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"),
)
_UNET_FIXED_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_VAE_FIXED_TO_LDM = {"conv_norm_out": "norm_out"}
_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_to_ldm(rest: str) -> str:
    for new, old in _UNET_RESNET_TO_LDM:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """A diffusers SD 1.x/2.x UNet key in the original LDM layout (the inverse of diffusers' converter)."""
    per = layers_per_block + 1
    head, _, tail = key.rpartition(".")  # tail: weight / bias
    for new, old in _UNET_FIXED_TO_LDM.items():
        if head == new:
            return f"{old}.{tail}"
    parts = key.split(".")
    if parts[0] == "down_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.w
            return f"input_blocks.{(b + 1) * per}.0.op.{parts[-1]}"
        j, rest = int(parts[3]), ".".join(parts[4:])
        index = 1 + b * per + j
        return f"input_blocks.{index}.0.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if parts[0] == "mid_block":
        k, rest = int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * k}.{_resnet_to_ldm(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        b, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":  # after the block's last resnet (and its attention, if any)
            slot = 2 if b in up_blocks_with_attention else 1
            return f"output_blocks.{b * per + layers_per_block}.{slot}.conv.{parts[-1]}"
        j, rest = int(parts[3]), ".".join(parts[4:])
        index = b * per + j
        return f"output_blocks.{index}.0.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    raise ValueError(f"no LDM name for UNet key {key!r}")


def vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    """A diffusers AutoencoderKL key in the original LDM layout (without the `first_stage_model.` prefix)."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, what = parts[0], parts[1]  # encoder / decoder
    if what in ("conv_in", "conv_out"):
        return key
    if what in _VAE_FIXED_TO_LDM:
        return f"{side}.{_VAE_FIXED_TO_LDM[what]}.{parts[-1]}"
    if what in ("down_blocks", "up_blocks"):
        i = int(parts[2])
        block = i if side == "encoder" else num_up_blocks - 1 - i
        name = "down" if side == "encoder" else "up"
        if parts[3] == "resnets":
            rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.{name}.{block}.block.{parts[4]}.{rest}"
        sampler = "downsample" if side == "encoder" else "upsample"
        return f"{side}.{name}.{block}.{sampler}.conv.{parts[-1]}"
    if what == "mid_block":
        if parts[2] == "resnets":
            rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.mid.block_{int(parts[3]) + 1}.{rest}"
        module = ".".join(parts[4:-1])
        return f"{side}.mid.attn_1.{_VAE_ATTN_TO_LDM[module]}.{parts[-1]}"
    raise ValueError(f"no LDM name for VAE key {key!r}")


def sd_to_ldm_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """The UNet, VAE and CLIP text encoder of a diffusers SD 1.x folder as one original-layout state dict.

    Keys are those of the CompVis/A1111 `v1-5-pruned.safetensors` files: `model.diffusion_model.*`,
    `first_stage_model.*` (attention projections as 1x1 convolutions) and
    `cond_stage_model.transformer.*`, which diffusers' `from_single_file` converts back."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    with_attention = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        out["model.diffusion_model." + unet_key_to_ldm(key, unet.config.layers_per_block, with_attention)] = value
    for key, value in vae.state_dict().items():
        ldm = vae_key_to_ldm(key, len(vae.config.up_block_types))
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out["first_stage_model." + ldm] = value
    for key, value in text_encoder.state_dict().items():
        # Newer transformers flatten CLIPTextModel; the original layout always has `text_model.`.
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        out["cond_stage_model.transformer." + name] = value
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def build_tiny_sd_single_file(path: Path, model_dir: Path | None = None, seed: int = 0) -> Path:
    """Save the tiny SD model as one original-layout `.safetensors` file (A1111/ComfyUI style).

    `model_dir` is a tiny diffusers folder to convert (built with `seed` when not given); load the
    file back with `from_single_file(path, config=model_dir)`."""
    from safetensors.torch import save_file

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(model_dir) if model_dir else build_tiny_sd(Path(tmp) / "sd", seed=seed)
        state = sd_to_ldm_state_dict(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


# --------------------------------------------------------------------------- dataset


def _draw_sample(rng: np.random.Generator, resolution: int) -> tuple[Image.Image, str]:
    names = list(COLOURS)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    fg, bg = rng.choice(len(names), size=2, replace=False)
    fg_name, bg_name = names[int(fg)], names[int(bg)]
    gradient = bool(rng.integers(2))

    if gradient:  # vertical fade from the background colour to black
        fade = np.linspace(1.0, 0.3, resolution, dtype=np.float32)[:, None, None]
        pixels = (np.array(COLOURS[bg_name], dtype=np.float32) * fade).repeat(resolution, axis=1)
        image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    else:
        image = Image.new("RGB", (resolution, resolution), COLOURS[bg_name])

    draw = ImageDraw.Draw(image)
    size = int(rng.integers(resolution // 3, resolution * 3 // 4))
    x0, y0 = (int(v) for v in rng.integers(0, resolution - size + 1, size=2))
    box = (x0, y0, x0 + size - 1, y0 + size - 1)
    colour = COLOURS[fg_name]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x0 + size // 2, y0), (x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1)], fill=colour)
    else:
        draw.rectangle((0, y0, resolution - 1, y0 + max(2, size // 4)), fill=colour)

    background = f"a {bg_name} gradient background" if gradient else f"a {bg_name} background"
    return image, f"a {fg_name} {shape} on {background}"


def build_tiny_dataset(
    path: Path,
    n: int = 8,
    seed: int = 0,
    resolution: int = TINY_RESOLUTION,
    captions: Literal["csv", "txt"] = "csv",
) -> Path:
    """Write ``n`` PNGs of coloured shapes with captions in ``metadata.csv`` or same-stem ``.txt`` files."""
    if captions not in ("csv", "txt"):
        raise ValueError(f"captions must be 'csv' or 'txt', not {captions!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str]] = []
    for i in range(n):
        image, text = _draw_sample(rng, resolution)
        name = f"img_{i:04d}.png"
        image.save(path / name)
        rows.append((name, text))
        if captions == "txt":
            (path / name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    if captions == "csv":
        with (path / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["file_name", "text"])
            writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- BLIP


def build_tiny_blip(path: Path, seed: int = 0) -> Path:
    """Build and save a tiny BLIP captioner (model + processor) whose ``generate`` always yields words.

    A random decoder would often pick a special token (dropped on decode) or ``[SEP]`` (ends the
    caption) first, giving an empty caption. So the LM-head bias rules out every special token
    (``[SEP]`` included) and favours the whole words of ``WORDS``: greedy decoding yields exactly
    ``max_new_tokens`` image-dependent words.
    """
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
        GenerationConfig,
    )

    path = Path(path)
    vocab = bert_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tokenizer = BertTokenizer.from_pretrained(
            tmp, bos_token="[DEC]", extra_special_tokens=["[ENC]"], model_max_length=64
        )
    ids = {tok: vocab.index(tok) for tok in BERT_SPECIALS}
    image_size = 32
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "bos_token_id": ids["[DEC]"],
            "eos_token_id": ids["[SEP]"],
            "sep_token_id": ids["[SEP]"],
            "pad_token_id": ids["[PAD]"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
            "initializer_range": 0.02,  # BLIP's default 1e-10 would make every image caption the same
        },
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Random logits are ~0.01 apart, so these biases decide what comes out: whole words, never a
        # special token. (A generation config's min_new_tokens cannot do this: BLIP's generate hands
        # over to its text decoder, which never reads the outer model's generation config.)
        bias = model.text_decoder.cls.predictions.bias
        bias.zero_()
        bias[[vocab.index(w) for w in WORDS]] = 1.0
        bias[list(ids.values())] = -1e4
    model.generation_config = GenerationConfig(
        bos_token_id=ids["[DEC]"], eos_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"]
    )
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lora_trainer.tiny {sd,sdxl,flux,sd-file,dataset,blip} PATH``: build one thing and print its path."""
    parser = argparse.ArgumentParser(prog="python -m lora_trainer.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("sd", "sdxl", "flux", "sd-file", "dataset", "blip"))
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=8, help="dataset: number of images")
    parser.add_argument("--resolution", type=int, default=TINY_RESOLUTION, help="dataset: image size")
    parser.add_argument("--captions", choices=("csv", "txt"), default="csv", help="dataset: caption format")
    parser.add_argument("--model", type=Path, help="sd-file: the tiny diffusers folder to convert (else built)")
    args = parser.parse_args(argv)
    if args.what == "sd":
        built = build_tiny_sd(args.path, seed=args.seed)
    elif args.what == "sdxl":
        from lora_trainer.tiny_sdxl import build_tiny_sdxl

        built = build_tiny_sdxl(args.path, seed=args.seed)
    elif args.what == "flux":
        from lora_trainer.tiny_flux import build_tiny_flux

        built = build_tiny_flux(args.path, seed=args.seed)
    elif args.what == "sd-file":
        built = build_tiny_sd_single_file(args.path, model_dir=args.model, seed=args.seed)
    elif args.what == "blip":
        built = build_tiny_blip(args.path, seed=args.seed)
    else:
        built = build_tiny_dataset(
            args.path, n=args.n, seed=args.seed, resolution=args.resolution, captions=args.captions
        )
    print(built)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
