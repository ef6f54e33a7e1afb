"""Several training processes: the collectives the loop calls (each a no-op in a world of one).

A worker (started by lora_trainer.launch, or a user's torchrun) joins the process group: gloo on
CPU, NCCL on CUDA (one GPU per local rank). Gradients of the trainable LoRA parameters are averaged
over the ranks after each optimizer step's micro-batches (what DDP's all-reduce does, done here
without its wrapper, so the families keep calling their modules and naming their parameters as
they do alone), so every rank takes the same optimizer step and holds the same weights.

Data: the global batch of a micro-step is `batch_size × world size` samples of the one seeded
order a single process would read; rank r takes the r-th `batch_size` of it (ShardedStream), so
the data position after a step is the same on every rank and is what a checkpoint saves.

The ranks OR their stop flags each step (`any`), so all stop after the same step and checkpoint
it. Rank 0 alone writes and commits checkpoints (MANIFEST last, with the world size), progress,
logs and the final weights; the others hand it their RNG states for the checkpoint and wait on a
barrier at the end. A checkpoint of another world size is refused (exit 65) unless allowed.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_trainer import contract
from lora_trainer.errors import ConfigError, ResumeRefused
from lora_trainer.storage import NotFound, ObjectInfo, Store

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # rank 0 may load a large model while the others wait


@dataclass
class World:
    """This process's place among the training processes; every method is a no-op in a world of one."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: Any = None  # where collective tensors live: CPU for gloo, this rank's GPU for NCCL

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _tensor(self, values: list[float]):
        import torch

        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set (all ranks get the same answer)."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        t = self._tensor([1.0 if flag else 0.0])
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value, on every rank."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = self._tensor([float(value)])
        dist.broadcast(t, 0)
        return int(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def local_first(self) -> Iterator[None]:
        """Local rank 0 runs the block first (it fills shared caches on this node), then the others."""
        if self.size > 1 and self.local_rank != 0:
            self.barrier()
        yield
        if self.size > 1 and self.local_rank == 0:
            self.barrier()

    def step_seed(self, *parts: int) -> tuple[int, ...]:
        """Seed parts for a micro-step's randomness: the rank joins them in a world of several."""
        return parts if self.size == 1 else (*parts, self.rank)

    def sync_gradients(self, params: Sequence[Any]) -> None:
        """Average the gradients of `params` over the ranks, in one flat all-reduce (DDP's bucket)."""
        if self.size == 1:
            return
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(self.size)
        for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)

    def broadcast_params(self, params: Sequence[Any]) -> None:
        """Rank 0's parameter values on every rank (DDP does this when it wraps a module)."""
        if self.size == 1:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, 0)

    def mean(self, value: float, count: int) -> tuple[float, int]:
        """(value averaged over ranks, count summed) — a step's loss and tokens, as the log shows them."""
        if self.size == 1:
            return value, count
        import torch.distributed as dist

        t = self._tensor([value, float(count)])
        dist.all_reduce(t)
        return float(t[0].item()) / self.size, int(t[1].item())

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (plain data: lists, dicts, str); None elsewhere."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.size if self.is_main else None
        dist.gather_object(json.dumps(obj), out, dst=0)
        return [json.loads(o) for o in out] if out is not None else None

    def shard(self, stream: Any) -> Any:
        """This rank's share of the data stream (the stream itself in a world of one)."""
        return stream if self.size == 1 else ShardedStream(stream, self.rank, self.size)

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


SINGLE = World()  # a process training alone


def join(device_type: str) -> World:
    """This process's World from RANK/WORLD_SIZE/LOCAL_RANK, its process group started (gloo on
    CPU, NCCL on CUDA with this rank's GPU made current); a World of one without them."""
    size = int(os.environ.get("WORLD_SIZE") or 1)
    if size == 1 or "RANK" not in os.environ:
        return World()
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK") or 0)
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"{contract.ENV_NPROC_PER_NODE}: local rank {local_rank} has no GPU of its own "
                              f"({torch.cuda.device_count()} visible); ask for one process per GPU")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    log.info("rank %d of %d (local rank %d) joined the process group (%s)", rank, size, local_rank,
             dist.get_backend())
    return World(rank=rank, local_rank=local_rank, size=size, device=device)


def weights_digest(params: Sequence[Any]) -> str:
    """sha256 of the trainable parameters' bytes, in order."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather_rank_states(world: World, step: int, params: Sequence[Any]) -> dict[int, Any] | None:
    """On rank 0, the RNG states of ranks > 0 for its checkpoint of `step` (None elsewhere, or alone).

    Every rank's weights are compared with rank 0's on the way: equal by construction (the same
    averaged gradients and the same optimizer step); should a kernel make them drift, the drift is
    logged and rank 0's weights are given to every rank (what its checkpoint holds)."""
    if world.size == 1:
        return None
    from lora_trainer import state

    got = world.gather({"rng": state.rng_to_data(state.rng_state()), "weights": weights_digest(params)})
    diverged = [rank for rank, g in enumerate(got or []) if g["weights"] != got[0]["weights"]]
    if world.broadcast_int(len(diverged)):
        if world.is_main:
            log.warning("step %d: the LoRA weights of rank(s) %s drifted from rank 0's; giving every rank rank 0's",
                        step, diverged)
        world.broadcast_params(params)
    if got is None:
        return None
    return {rank: state.rng_from_data(g["rng"]) for rank, g in enumerate(got) if rank > 0}


class ShardedStream:
    """Rank r's share of each global micro-batch: the r-th `batch_size` of the `batch_size × world`
    next samples of the wrapped stream's one seeded order; the others are passed over unread."""

    def __init__(self, stream: Any, rank: int, size: int):
        self.stream, self.rank, self.size = stream, rank, size

    @property
    def position(self) -> Any:
        return self.stream.position

    @position.setter
    def position(self, value: Any) -> None:
        self.stream.position = value

    def _skip(self, batches: int, batch_size: int) -> None:
        advance = getattr(self.stream, "advance", None)
        for _ in range(batches):
            advance(batch_size) if advance is not None else self.stream.next_samples(batch_size)

    def next_samples(self, batch_size: int) -> Any:
        """This rank's micro-batch; the position moves past the whole global batch."""
        self._skip(self.rank, batch_size)
        batch = self.stream.next_samples(batch_size)
        self._skip(self.size - 1 - self.rank, batch_size)
        return batch


def scratch_for(scratch: Path, world: World) -> Path:
    """Local rank 0 works in the scratch folder itself, the others in a folder of their own inside it."""
    return scratch if world.local_rank == 0 else scratch / f"rank-{world.local_rank}"


def check_world_size(step: int, saved: int, current: int, allow: bool) -> None:
    """ResumeRefused (exit 65) naming both sizes when the checkpoint's world size is not this run's,
    unless `allow` (allow_world_size_change), which resumes correctly but not bitwise."""
    if saved == current:
        return
    if not allow:
        raise ResumeRefused(
            f"checkpoint step {step} was made by {saved} training process(es), this run has {current}; the "
            f"global batch (batch_size × processes) and the data shards would change: run with {saved} again "
            "(resources.gpus × nodes), or set allow_world_size_change: true (CRD spec.training.allowWorldSizeChange) "
            "to resume anyway, correctly but not bitwise"
        )
    log.warning("resuming checkpoint step %d made by %d process(es) with %d (allow_world_size_change is set): "
                "correct, but not bitwise equal to an uninterrupted run", step, saved, current)


class DiscardStore(Store):
    """The upload store of ranks > 0: rank 0 alone writes the output, so what they would write goes nowhere."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def put_file(self, key: str, path: Path) -> None:
        pass

    def put_bytes(self, key: str, data: bytes) -> str:
        return ""

    def get_bytes(self, key: str) -> bytes:
        raise NotFound(f"{key}: not kept (rank > 0)")

    def get_file(self, key: str, path: Path) -> None:
        raise NotFound(f"{key}: not kept (rank > 0)")

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        return []

    def delete(self, keys: Iterable[str]) -> None:
        pass


def is_main_process() -> bool:
    """Whether this process is rank 0 (or alone), from the environment; no process group needed."""
    return os.environ.get("RANK", "0") == "0"
