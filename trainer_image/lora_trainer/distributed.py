"""Several training processes: the launcher `lora-train` becomes when asked for more than one, and
the collectives the loop calls (a no-op in a world of one).

    lora-train (the pod's command)  ── LORA_NPROC_PER_NODE × LORA_NNODES > 1 ──►  launch():
        torch.distributed's elastic agent, static rendezvous on LORA_MASTER_ADDR:LORA_MASTER_PORT
        (one pod: 127.0.0.1 and a free port), node rank LORA_NODE_RANK, no elastic restarts
        └── one worker per process: `python -m lora_trainer <same arguments>` with RANK, WORLD_SIZE…
            └── join(): gloo on CPU, NCCL on CUDA (one GPU per local rank)

A worker is a process whose environment has RANK and WORLD_SIZE (the agent's, or a user's own
torchrun): it trains. Gradients of the trainable LoRA parameters are averaged over the ranks after
each optimizer step's micro-batches (what DDP's all-reduce does, done here without its wrapper, so
the families keep calling their modules and naming their parameters as they do alone), so every
rank takes the same optimizer step and holds the same weights.

Data: the global batch of a micro-step is `batch_size × world size` samples of the one seeded
order a single process would read; rank r takes the r-th `batch_size` of it (ShardedStream), so
the data position after a step is the same on every rank and is what a checkpoint saves.

SIGTERM goes to the launcher (the pod's PID 1), whose agent forwards it to every worker; the
ranks OR their stop flags each step (`any`), so all stop after the same step and checkpoint it.
Rank 0 alone writes and commits checkpoints (MANIFEST last), progress, logs and the final
weights; the others hand it their RNG states for the checkpoint and wait on a barrier at the end.

The launcher's exit code is the most telling worker exit (`most_telling_exit`): a documented
input or config error (64-78 but 75) first, then a failure (any other non-zero code), then 75
preempted, then a worker killed by a signal (128 + the signal); 0 only when every worker exited 0.
Peers of a crashed rank fail with a plain collective error (1) or are killed, so the rank that
knew why wins. The chosen worker's termination message becomes the pod's.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_trainer import contract
from lora_trainer.errors import EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED, ConfigError, ResumeRefused, TrainerError
from lora_trainer.storage import NotFound, ObjectInfo, Store

log = logging.getLogger(__name__)

# The launcher tells its workers where to leave their exit code and termination message.
ENV_RANK_REPORTS = "LORA_RANK_REPORTS"
ENV_LAUNCHER_PID = "LORA_LAUNCHER_PID"
DEFAULT_MULTI_NODE_PORT = 29500  # torchrun's default, for a group without LORA_MASTER_PORT
# The agent waits this long past the preemption grace for its workers to commit and exit on SIGTERM.
SHUTDOWN_MARGIN_SECONDS = 15
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # rank 0 may load a large model while the others wait


# ---- the launcher: plan (pure), exit code (pure), launch (I/O) --------------------------------------

@dataclass(frozen=True)
class LaunchPlan:
    """How many workers to start here, and where the group meets."""

    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int  # 0: pick a free port (one pod only)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def _int_env(env: Mapping[str, str], name: str, default: int, low: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < low:
        raise ConfigError(f"{name}: {raw!r} is not an integer of at least {low}; the operator sets it from "
                          "resources.gpus and spec.nodes, unset it to train in one process")
    return int(raw)


def launch_plan(env: Mapping[str, str]) -> LaunchPlan | None:
    """The workers to start, or None when this process trains itself (a world of one, or already a worker)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return None
    nproc = _int_env(env, contract.ENV_NPROC_PER_NODE, 1, 1)
    nnodes = _int_env(env, contract.ENV_NNODES, 1, 1)
    node_rank = _int_env(env, contract.ENV_NODE_RANK, 0, 0)
    if node_rank >= nnodes:
        raise ConfigError(f"{contract.ENV_NODE_RANK}: {node_rank} is not below {contract.ENV_NNODES} {nnodes}; "
                          "node ranks count from 0")
    if nproc * nnodes == 1:
        return None
    addr = env.get(contract.ENV_MASTER_ADDR, "").strip()
    if nnodes > 1 and not addr:
        raise ConfigError(f"{contract.ENV_MASTER_ADDR}: unset, but {contract.ENV_NNODES} is {nnodes}; set it to the "
                          "leader pod's stable DNS name")
    port = _int_env(env, contract.ENV_MASTER_PORT, 0 if nnodes == 1 else DEFAULT_MULTI_NODE_PORT, 1)
    if port > 65535:
        raise ConfigError(f"{contract.ENV_MASTER_PORT}: {port} is not a TCP port (1-65535)")
    return LaunchPlan(nproc, nnodes, node_rank, addr or "127.0.0.1", port)


def exit_class(code: int) -> int:
    """Rank of an exit code in `most_telling_exit` (higher tells more)."""
    if code == EXIT_OK:
        return 0
    if code < 0:  # killed by a signal (Popen's convention)
        return 1
    if code == EXIT_PREEMPTED:
        return 2
    if 64 <= code <= 78:
        return 4  # a documented input or config error: the cause, never a consequence
    return 3


def most_telling_exit(codes: Mapping[int, int | None], signaled: bool = False) -> tuple[int, int]:
    """(rank, exit code) the launcher reports for its workers' exits by rank (None: unknown, as killed).

    Order: a 64-78 code but 75, a failure, 75, a signal (reported as 128 + signal), 0; the lowest
    rank on a tie. A worker killed by a signal exits -signal. When the launcher itself was told to
    stop (`signaled`: SIGTERM, SIGINT), a worker killed before it could commit counts as preempted
    (75), as a lone trainer stopped at start-up does."""
    if not codes:
        return 0, EXIT_PREEMPTED if signaled else EXIT_FAILURE
    known = {rank: (code if code is not None else -signal.SIGKILL) for rank, code in codes.items()}
    if signaled:
        known = {rank: (EXIT_PREEMPTED if code < 0 else code) for rank, code in known.items()}
    rank = max(sorted(known), key=lambda r: exit_class(known[r]))  # max keeps the first (lowest rank) on ties
    code = known[rank]
    return rank, (128 - code if code < 0 else code)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the agent binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _read_reports(folder: Path, world: Iterable[int]) -> dict[int, int | None]:
    codes: dict[int, int | None] = {}
    for rank in world:
        try:
            codes[rank] = int((folder / f"rank-{rank}.exit").read_text().strip())
        except (OSError, ValueError):
            codes[rank] = None
    return codes


def launch(plan: LaunchPlan, argv: Sequence[str], grace_seconds: float, stop: Any = None) -> int:
    """Start this node's workers through torch.distributed's elastic agent, wait for them, and return
    the most telling exit code; the chosen worker's termination message becomes this process's."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = plan.master_port or free_port(plan.master_addr)
    reports = Path(tempfile.mkdtemp(prefix="lora-ranks-", dir=os.environ.get(contract.ENV_CACHE_DIR) or None))
    os.environ[ENV_RANK_REPORTS] = str(reports)
    os.environ[ENV_LAUNCHER_PID] = str(os.getpid())
    config = LaunchConfig(
        min_nodes=plan.nnodes, max_nodes=plan.nnodes, nproc_per_node=plan.nproc_per_node,
        run_id=os.environ.get(contract.ENV_RUN_ID) or "lora-train", rdzv_backend="static",
        rdzv_endpoint=f"{plan.master_addr}:{port}", rdzv_configs={"rank": plan.node_rank, "timeout": 900},
        max_restarts=0,  # the operator counts preemptions and failures; the agent never restarts
        monitor_interval=0.1, start_method="spawn", signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT",
        shutdown_timeout=int(grace_seconds) + SHUTDOWN_MARGIN_SECONDS,
    )
    first = plan.node_rank * plan.nproc_per_node
    ranks = range(first, first + plan.nproc_per_node)
    log.info("starting %d training processes (node %d of %d, world size %d, rendezvous %s:%d)",
             plan.nproc_per_node, plan.node_rank, plan.nnodes, plan.world_size, plan.master_addr, port)
    how, signaled = "finished", False
    if stop is not None and stop.requested:  # told to stop before any worker started: nothing to save
        _write_termination(contract.TerminationMessage(reason="Preempted", message="stopped before training started"))
        return EXIT_PREEMPTED
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "lora_trainer", *argv)
    except ChildFailedError:
        how = "a worker failed"
    except SignalException as exc:
        how, signaled = f"{signal.Signals(exc.sigval).name} forwarded to the workers", True
    codes = _read_reports(reports, ranks)
    rank, code = most_telling_exit(codes, signaled)
    _adopt_termination(reports, rank, code)
    shutil.rmtree(reports, ignore_errors=True)
    log.info("workers done (%s): exits by rank %s; exiting %d (rank %d's)", how,
             {r: ("killed" if c is None else c) for r, c in codes.items()}, code, rank)
    return code


def _adopt_termination(reports: Path, rank: int, code: int) -> None:
    """Copy the chosen worker's termination message to this process's termination log."""
    try:
        body = contract.TerminationMessage.model_validate_json((reports / f"rank-{rank}.json").read_bytes())
    except (OSError, ValueError):
        reason = "Preempted" if code == EXIT_PREEMPTED else "TrainingFailed"
        body = contract.TerminationMessage(
            reason=reason, message=f"training process rank {rank} ended without a report (exit {code})")
    _write_termination(body)


def _write_termination(body: contract.TerminationMessage) -> None:
    target = Path(os.environ.get(contract.ENV_TERMINATION_LOG) or contract.DEFAULT_TERMINATION_LOG)
    with contextlib.suppress(OSError):
        target.write_text(body.model_dump_json())


# ---- a worker ---------------------------------------------------------------------------------------

def _die_with_launcher() -> None:
    # A SIGKILLed launcher (the pod's process group, or a node lost) must take its workers with it,
    # as a container's death does: they run in sessions of their own (the agent's choice).
    launcher = os.environ.get(ENV_LAUNCHER_PID)
    if not launcher or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):  # the launcher died before prctl took effect
        os._exit(128 + signal.SIGKILL)


def worker_setup() -> None:
    """In a worker the launcher started: die with it, report to it, and log quietly on ranks > 0."""
    rank = os.environ.get("RANK")
    if rank is None or "WORLD_SIZE" not in os.environ:
        return
    _die_with_launcher()
    if reports := os.environ.get(ENV_RANK_REPORTS):
        os.environ[contract.ENV_TERMINATION_LOG] = str(Path(reports) / f"rank-{rank}.json")
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s"))
    if rank != "0":  # one voice in the log: the others say only what goes wrong
        root.setLevel(logging.WARNING)


def worker_exit(code: int) -> int:
    """Leave this worker's exit code for the launcher; returns it."""
    rank, reports = os.environ.get("RANK"), os.environ.get(ENV_RANK_REPORTS)
    if rank is not None and reports:
        with contextlib.suppress(OSError):
            (Path(reports) / f"rank-{rank}.exit").write_text(str(code))
    return code


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
    """On rank 0, the RNG states of ranks > 0 for its checkpoint of `step` (None elsewhere, or alone),
    once every rank is seen to hold rank 0's weights; a TrainerError if one does not (a bug)."""
    if world.size == 1:
        return None
    from lora_trainer import state

    got = world.gather({"rng": state.rng_to_data(state.rng_state()), "weights": weights_digest(params)})
    if got is None:
        return None
    if diverged := [rank for rank, g in enumerate(got) if g["weights"] != got[0]["weights"]]:
        raise TrainerError(f"step {step}: the LoRA weights of rank(s) {diverged} differ from rank 0's; the training "
                           "processes diverged (a bug: please report it), so no checkpoint is written")
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
