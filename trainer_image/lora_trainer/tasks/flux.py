"""Flux: a FluxTransformer2DModel (DiT) trained with flow matching, as diffusers' train_dreambooth_lora_flux.py.

Samples -> model inputs: VAE latents `(z - shift_factor) * scaling_factor` (16 channels), CLIP's
pooled embedding and T5's sequence embeddings (`tokenizer_2.model_max_length` tokens, at most 512),
text ids (zeros) and image ids (row/column of each 2x2 latent patch).
Loss: noise and u from the step's generator, drawn by `weighting_scheme` as the diffusers script
draws them (default "none": u ~ U(0, 1) and unit loss weights; logit_normal with logit_mean and
logit_std, mode with mode_scale; sigma_sqrt and cosmap weight the loss), sigma = the scheduler's
sigma at index u * num_train_timesteps, then, for a scheduler with dynamic shifting (FLUX.1-dev's), the shift for
the resolution the pipeline samples with: mu = calculate_shift(packed image tokens), sigma ->
e^mu / (e^mu + 1/sigma - 1) (`resolution_sigma`); x_t = (1 - sigma) z + sigma noise, packed into
2x2 patches; guidance = `guidance_scale` (the script's default 3.5) when the transformer has
guidance_embeds; the target is noise - z and the loss its weighted mean squared error.
LoRA on the transformer: `target_modules` unset takes the registry's Flux default, both streams'
attention (to_q, to_k, to_v, to_out.0 on the image stream and the single blocks; add_q_proj,
add_k_proj, add_v_proj, to_add_out on the text stream); feed-forward layers (ff.net.0.proj, ff.net.2,
ff_context.net.0.proj, ff_context.net.2, proj_mlp, proj_out) train when listed. With
train_text_encoder, LoRA on the CLIP text encoder too; T5 stays frozen.

Exports: `pytorch_lora_weights.safetensors` (FluxPipeline.load_lora_weights) and
`pytorch_lora_weights_kohya.safetensors` in the OneTrainer/ComfyUI naming
(`lora_transformer_<module path, dots as _>` and `lora_te1_text_model_…`, `.lora_down/.lora_up/.alpha`).
Not kohya sd-scripts' BFL names (`lora_unet_double_blocks_N_img_attn_qkv`, q/k/v fused): diffusers'
reader of those splits the single blocks' fused `linear1` with FLUX.1-dev's fixed sizes (3072 x 3 +
12288), so such a file would not load in diffusers for any other width, and could not be checked
against the diffusers file here; ComfyUI reads both namings. diffusers' reader of this naming maps
attention projections only: a kohya file of a run with feed-forward targets loads in ComfyUI, not
in diffusers (use the diffusers file there).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from diffusers.utils import convert_state_dict_to_diffusers
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from lora_trainer import contract
from lora_trainer.cache import EncodeCache, content_key, module_key
from lora_trainer.config import TrainConfig
from lora_trainer.data import ImageBatch
from lora_trainer.errors import ConfigError, InputMissing
from lora_trainer.export import adapter_metadata, canonicalize_safetensors, peft_state, save_kohya_file
from lora_trainer.initlora import load_init_lora
from lora_trainer.model import (
    add_denoiser_lora,
    add_text_encoder_lora,
    freeze,
    load_failed,
    pick_device,
    trainable_params,
    weight_dtype_for,
)
from lora_trainer.paths import shorten
from lora_trainer.quantize import quantization_config
from lora_trainer.tasks import REGISTRY
from lora_trainer.tasks.sd import autocast_for, cached_latents, vae_latents

SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
T5_MAX_LENGTH = 512  # the longest T5 sequence FluxPipeline takes


@dataclass
class Components:
    """The parts of a Flux pipeline that training touches."""

    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: T5EncoderModel
    tokenizer: CLIPTokenizer
    tokenizer_2: T5Tokenizer
    scheduler: FlowMatchEulerDiscreteScheduler
    device: torch.device
    weight_dtype: torch.dtype

    @property
    def vae_scale(self) -> int:
        """Pixels per latent, as FluxPipeline computes it."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclass
class Inputs:
    """One micro-batch as the Flux transformer takes it (latents still unpacked)."""

    latents: torch.Tensor  # (B, 16, H, W)
    prompt: torch.Tensor  # T5 hidden states (B, L, joint_attention_dim)
    pooled: torch.Tensor  # CLIP pooled (B, pooled_projection_dim)


def resolution_sigma(sigmas: torch.Tensor, image_seq_len: int, scheduler_config: Any) -> torch.Tensor:
    """Sigmas shifted for the image's packed token count as FluxPipeline shifts them when sampling
    (scheduler with use_dynamic_shifting); a static-shift scheduler's sigmas are already shifted."""
    cfg = scheduler_config
    if not cfg.get("use_dynamic_shifting", False):
        return sigmas
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    mu = image_seq_len * m + (base_shift - m * base_len)
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def check_resolution(config: TrainConfig, vae_scale: int) -> None:
    """Flux packs 2x2 latent patches: image sides must be multiples of twice the VAE's factor."""
    step = 2 * vae_scale
    if config.resolution is not None and config.resolution % step:
        raise ConfigError(
            f"resolution: {config.resolution} is not a multiple of {step} (Flux packs 2x2 patches of latents "
            f"{vae_scale}x smaller than the image); use {max(step, config.resolution // step * step)} or another "
            f"multiple of {step}"
        )
    if config.enable_bucket and config.bucket_reso_steps % step:
        raise ConfigError(
            f"bucket_reso_steps: {config.bucket_reso_steps} is not a multiple of {step} (Flux packs 2x2 latent "
            f"patches); use {max(step, config.bucket_reso_steps // step * step)}"
        )


def check_precision(weight_dtype: torch.dtype) -> None:
    """Flux runs in bf16 (or fp32): T5-XXL and the transformer overflow in fp16."""
    if weight_dtype == torch.float16:
        raise ConfigError(
            "mixed_precision: 'fp16' overflows Flux (T5-XXL and the transformer's activations exceed fp16's "
            "range); use bf16, or no"
        )


def load_components(model_dir: Path, config: TrainConfig) -> Components:
    """Load the transformer, VAE, CLIP and T5 encoders and tokenizers, and the flow-matching scheduler."""
    missing = [sub for sub in SUBFOLDERS if not (model_dir / sub).is_dir()]
    if missing:
        raise InputMissing(
            f"base_model: {model_dir} is a Flux folder without {', '.join(missing)}/; "
            "save the whole pipeline with FluxPipeline.save_pretrained()"
        )
    device = pick_device(config.device)
    dtype = weight_dtype_for(config.mixed_precision, device)
    check_precision(dtype)  # before gigabytes are read
    # quantize_base: torchao weight-only at load (exit 78 before any read when torchao is absent). Not run
    # here (no torchao, no GPU); peft then wraps torchao's quantized Linear layers with its LoRA layers.
    quantized: dict[str, Any] = {}
    if (qconfig := quantization_config(config.quantize_base)) is not None:
        quantized = {"quantization_config": qconfig, "torch_dtype": dtype}
    try:
        transformer = FluxTransformer2DModel.from_pretrained(
            model_dir, subfolder="transformer", use_safetensors=True, **quantized
        )
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", use_safetensors=True)
        te1 = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", use_safetensors=True)
        te2 = T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder_2", use_safetensors=True)
        tok1 = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        tok2 = T5Tokenizer.from_pretrained(model_dir, subfolder="tokenizer_2")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise load_failed(model_dir, exc) from None
    parts = Components(transformer, vae, te1, te2, tok1, tok2, scheduler, device, dtype)
    check_resolution(config, parts.vae_scale)
    freeze([transformer, vae, te1, te2], device, dtype)
    for module in (vae, te1, te2):
        module.eval()
    return parts


def encode_prompts(parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 sequence embeddings and CLIP's pooled embedding, tokenized as FluxPipeline does (max-length padded)."""
    clip_ids = parts.tokenizer(
        captions, padding="max_length", max_length=parts.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(parts.device)
    pooled = parts.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    length = min(parts.tokenizer_2.model_max_length, T5_MAX_LENGTH)
    t5_ids = parts.tokenizer_2(
        captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt",
    ).input_ids.to(parts.device)
    prompt = parts.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return prompt, pooled


def flow_matching_loss(parts: Components, config: TrainConfig, inputs: Inputs, g: torch.Generator) -> torch.Tensor:
    """Noise, sigma, the packed noisy latents through the transformer, and the weighted MSE to noise - z."""
    latents = inputs.latents
    bsz, channels, height, width = latents.shape
    device, dtype = latents.device, latents.dtype
    noise = torch.randn(latents.shape, generator=g, device=device, dtype=dtype)
    u = compute_density_for_timestep_sampling(
        config.weighting_scheme, bsz, logit_mean=config.logit_mean, logit_std=config.logit_std,
        mode_scale=config.mode_scale, device=device, generator=g,
    )
    scheduler = parts.scheduler
    n = scheduler.config.num_train_timesteps
    indices = (u * n).long().clamp(0, n - 1).cpu()  # a sigmoid or mode draw can round to 1.0
    seq_len = (height // 2) * (width // 2)
    sigmas = resolution_sigma(scheduler.sigmas[indices].float(), seq_len, scheduler.config).to(device, dtype)
    sigmas = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)
    img_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, device, dtype)
    txt_ids = torch.zeros(inputs.prompt.shape[1], 3, device=device, dtype=dtype)
    guidance = None
    if parts.transformer.config.guidance_embeds:
        guidance = torch.full((bsz,), config.guidance_scale, device=device, dtype=torch.float32)
    with autocast_for(parts.device, parts.weight_dtype):
        pred = parts.transformer(
            hidden_states=packed, timestep=sigmas.flatten(), guidance=guidance, pooled_projections=inputs.pooled,
            encoder_hidden_states=inputs.prompt, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
    vae_scale = parts.vae_scale
    pred = FluxPipeline._unpack_latents(pred, height * vae_scale, width * vae_scale, vae_scale)
    weighting = compute_loss_weighting_for_sd3(config.weighting_scheme, sigmas)
    target = noise - latents
    per_sample = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(1)
    return per_sample.mean()


class Flux:
    """The Flux family (FLUX.1-dev/-schnell style FluxPipeline folders)."""

    info = REGISTRY["flux"]

    def load(self, model_dir: Path, config: TrainConfig) -> Components:
        return load_components(model_dir, config)

    def add_lora(self, parts: Components, config: TrainConfig) -> list[torch.nn.Parameter]:
        """LoRA on the transformer (and the CLIP text encoder with train_text_encoder); fp32 trainable weights."""
        add_denoiser_lora(parts.transformer, config, what="Flux transformer")
        modules: list[torch.nn.Module] = [parts.transformer]
        if config.train_text_encoder:
            add_text_encoder_lora(parts.text_encoder, config)
            modules.append(parts.text_encoder)
        params = trainable_params(modules)
        if config.gradient_checkpointing:
            parts.transformer.enable_gradient_checkpointing()
            if config.train_text_encoder:
                parts.text_encoder.gradient_checkpointing_enable()
        return params

    def trainable(self, parts: Components, config: TrainConfig) -> dict[str, torch.nn.Module]:
        out: dict[str, torch.nn.Module] = {"transformer": parts.transformer}
        if config.train_text_encoder:
            out["text_encoder"] = parts.text_encoder
        return out

    def cacheable(self, config: TrainConfig) -> frozenset[str]:
        """Latents always; text embeddings (T5 sequence + CLIP pooled) while CLIP is frozen."""
        return frozenset({"latents"} if config.train_text_encoder else {"latents", "text"})

    def encode(self, parts: Components, config: TrainConfig, batch: ImageBatch, g: torch.Generator,
               cache: EncodeCache | None = None) -> Inputs:
        vae = parts.vae
        if cache is not None and "latents" in cache.kinds:
            scaled = cached_latents(cache, vae, batch.pixels, g, parts.device, vae.dtype)
        else:
            scaled = vae_latents(vae, batch.pixels, g, parts.device, vae.dtype)
        # (z - shift) * scale, from the shared helpers' z * scale.
        latents = (scaled - vae.config.shift_factor * vae.config.scaling_factor).to(parts.weight_dtype)
        if cache is not None and "text" in cache.kinds:
            prompt, pooled = self._cached_text(parts, batch.captions, cache)
        else:
            with autocast_for(parts.device, parts.weight_dtype):
                if config.train_text_encoder:
                    prompt, pooled = encode_prompts(parts, batch.captions)
                else:
                    with torch.no_grad():
                        prompt, pooled = encode_prompts(parts, batch.captions)
        return Inputs(latents, prompt, pooled)

    def _cached_text(self, parts: Components, captions: list[str], cache: EncodeCache
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 and pooled CLIP embeddings per caption, keyed by the caption and both encoders' weights."""
        encoders = (module_key(parts.text_encoder), module_key(parts.text_encoder_2))

        def compute(caption: str) -> dict[str, torch.Tensor]:
            with torch.no_grad(), autocast_for(parts.device, parts.weight_dtype):
                prompt, pooled = encode_prompts(parts, [caption])
            return {"prompt": prompt, "pooled": pooled}

        rows = [cache.get("text", content_key("text", *encoders, c), lambda c=c: compute(c)) for c in captions]
        return (torch.cat([r["prompt"] for r in rows]).to(parts.device),
                torch.cat([r["pooled"] for r in rows]).to(parts.device))

    def loss(self, parts: Components, config: TrainConfig, inputs: Inputs, g: torch.Generator) -> torch.Tensor:
        return flow_matching_loss(parts, config, inputs, g)

    def _text_encoder(self, parts: Components, config: TrainConfig) -> torch.nn.Module | None:
        return parts.text_encoder if config.train_text_encoder else None

    def save_lora(self, parts: Components, config: TrainConfig, path: Path) -> Path:
        """The diffusers-format file (FluxPipeline.load_lora_weights)."""
        te = self._text_encoder(parts, config)
        FluxPipeline.save_lora_weights(
            save_directory=str(path.parent),
            transformer_lora_layers=convert_state_dict_to_diffusers(peft_state(parts.transformer)),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(peft_state(te)) if te is not None else None,
            weight_name=path.name,
            safe_serialization=True,
            transformer_lora_adapter_metadata=adapter_metadata(parts.transformer),
            text_encoder_lora_adapter_metadata=adapter_metadata(te) if te is not None else None,
        )
        return canonicalize_safetensors(path)

    def load_lora(self, parts: Components, config: TrainConfig, path: Path) -> None:
        """init_lora: a diffusers or OneTrainer/ComfyUI-named (lora_transformer_, lora_te1_) Flux LoRA into
        the run's adapters (FluxPipeline.lora_state_dict reads both, folding a named file's alpha in)."""
        load_init_lora(path, FluxPipeline,
                       {"transformer": parts.transformer, "text_encoder": self._text_encoder(parts, config)},
                       config.lora_rank, config.alpha, shorten(config.init_lora or str(path)),
                       return_alphas=True)  # Flux's lora_state_dict returns a bare dict without it

    def export(self, parts: Components, config: TrainConfig, folder: Path) -> list[tuple[Path, str]]:
        """Final files: diffusers and OneTrainer/ComfyUI (`lora_transformer_`) formats."""
        diffusers_file = self.save_lora(parts, config, folder / contract.FINAL_WEIGHTS)
        state = kohya_state_dict(peft_state(parts.transformer), self._peft_or_none(parts, config), config.alpha)
        kohya = save_kohya_file(folder / contract.FINAL_WEIGHTS_KOHYA, state, config.alpha)
        return [(diffusers_file, contract.FINAL_WEIGHTS), (kohya, contract.FINAL_WEIGHTS_KOHYA)]

    def _peft_or_none(self, parts: Components, config: TrainConfig) -> dict[str, torch.Tensor] | None:
        te = self._text_encoder(parts, config)
        return peft_state(te) if te is not None else None


_LORA_PART = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def kohya_state_dict(
    transformer: dict[str, torch.Tensor], text_encoder: dict[str, torch.Tensor] | None, alpha: float
) -> dict[str, torch.Tensor]:
    """peft LoRA states in the OneTrainer/ComfyUI Flux naming, with the run's alpha on every module (pure).

    `transformer_blocks.0.attn.to_q.lora_A.weight` -> `lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight`;
    CLIP's `encoder.layers.0.self_attn.q_proj` -> `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`."""
    out: dict[str, torch.Tensor] = {}
    for prefix, state in (("lora_transformer_", transformer), ("lora_te1_", text_encoder or {})):
        for key, value in sorted(state.items()):
            match = _LORA_PART.match(key)
            if match is None:
                raise ValueError(f"not a LoRA weight: {key}")
            module = match["module"]
            if prefix == "lora_te1_" and not module.startswith("text_model."):
                module = "text_model." + module  # transformers 5 dropped CLIPTextModel's level; the names keep it
            name = prefix + module.replace(".", "_")
            out[f"{name}.{'lora_down' if match['ab'] == 'A' else 'lora_up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


FAMILY = Flux()
