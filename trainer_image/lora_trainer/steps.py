"""One optimizer step of LoRA training, for any family: the math, apart from I/O.

Every random draw in a micro-step (VAE sample, noise, timesteps, dropout) comes from a generator
seeded by (seed, step, micro-step), so step N computes the same thing whether or not the process
was restarted before it.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.optimization import get_scheduler

from lora_trainer.cache import EncodeCache
from lora_trainer.config import TrainConfig
from lora_trainer.data import BatchStream, ImageBatch, derive_seed
from lora_trainer.distributed import SINGLE, World
from lora_trainer.errors import ConfigError
from lora_trainer.tasks import Family, Parts


@dataclass
class StepResult:
    """What one optimizer step measured."""

    loss: float
    grad_norm: float
    lr: float
    tokens: int = 0  # tokens the step trained on (text batches; 0 for images)


def total_steps(config: TrainConfig, n_samples: int, world_size: int = 1) -> int:
    """Optimizer steps for the run: max_train_steps, or epochs over the dataset (a step reads
    batch_size × gradient_accumulation_steps × world_size samples)."""
    if config.max_train_steps is not None:
        return config.max_train_steps
    per_step = config.batch_size * config.gradient_accumulation_steps * world_size
    return max(1, math.ceil((config.epochs or 1) * n_samples / per_step))


def optimizer_class(config: TrainConfig, import_module=importlib.import_module) -> Any:
    """The optimizer class `config.optimizer` names; ConfigError (exit 78) naming the package and
    the fix when adamw8bit is asked for and bitsandbytes does not import."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW
    try:
        return import_module("bitsandbytes.optim").AdamW8bit
    except ImportError:
        raise ConfigError(
            "optimizer: 'adamw8bit' needs the bitsandbytes package, which is not installed; "
            "pip install bitsandbytes in the trainer's environment (CUDA), or set optimizer: adamw"
        ) from None
    except Exception as exc:  # bitsandbytes raises RuntimeError and friends when it finds no usable CUDA
        raise ConfigError(
            f"optimizer: 'adamw8bit' needs bitsandbytes, which does not import here ({type(exc).__name__}: "
            f"{str(exc)[:160]}); fix its installation for this GPU, or set optimizer: adamw"
        ) from None


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' AdamW8bit) over the LoRA parameters, with the config's betas, decay and epsilon."""
    cls = optimizer_class(config)
    # torch's single-tensor path keeps CPU results bit-identical across processes.
    extra = {"foreach": False} if cls is torch.optim.AdamW else {}
    return cls(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        **extra,
    )


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int):
    """The configured LR schedule (diffusers' get_scheduler, stepped once per optimizer step)."""
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=steps,
        num_cycles=config.lr_num_cycles,
    )


def micro_step_loss(family: Family, parts: Parts, config: TrainConfig, batch: ImageBatch, seed: int,
                    cache: EncodeCache | None = None) -> torch.Tensor:
    """The loss of one micro-batch, with all randomness drawn from `seed`: samples -> model inputs -> loss."""
    torch.manual_seed(seed)  # LoRA dropout draws from the global generator
    g = torch.Generator(device=parts.device).manual_seed(seed)
    inputs = family.encode(parts, config, batch, g, cache) if cache is not None else family.encode(parts, config, batch, g)
    return family.loss(parts, config, inputs, g)


def train_step(
    family: Family,
    parts: Parts,
    config: TrainConfig,
    stream: BatchStream,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    scaler: torch.amp.GradScaler | None,
    step: int,
    cache: EncodeCache | None = None,
    world: World = SINGLE,
) -> StepResult:
    """Run one optimizer step (all its micro-batches) and return its loss, grad norm and LR.

    Among several processes (`world`) each draws from (seed, step, micro-step, rank), the gradients
    are averaged over the ranks before clipping, and the loss and tokens reported are the world's."""
    accum = config.gradient_accumulation_steps
    total = 0.0
    tokens = 0
    for micro in range(accum):
        batch = stream.next_samples(config.batch_size)
        tokens += batch.num_tokens
        loss = micro_step_loss(family, parts, config, batch, derive_seed(*world.step_seed(config.seed, step, micro)), cache)
        scaled = loss / accum
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.item()
    world.sync_gradients(params)
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
    lr = optimizer.param_groups[0]["lr"]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss, tokens = world.mean(total / accum, tokens)
    return StepResult(loss=loss, grad_norm=float(grad_norm), lr=float(lr), tokens=tokens)


EVAL_SEED = 0xE7A1


def evaluate(family: Family, parts: Parts, config: TrainConfig, batches: list[Any]) -> float:
    """Mean loss over held-out batches, without gradients; batch i's randomness from (seed, EVAL_SEED, i),
    and the global generator reseeded by the next training micro-step, so training is unaffected."""
    with torch.no_grad():
        losses = [micro_step_loss(family, parts, config, batch, derive_seed(config.seed, EVAL_SEED, i)).item()
                  for i, batch in enumerate(batches)]
    return sum(losses) / len(losses)
