"""`lora-train` as the launcher of several training processes, and what a worker does for it.

    lora-train (the pod's command)  ── LORA_NPROC_PER_NODE × LORA_NNODES > 1 ──►  launch():
        torch.distributed's elastic agent, static rendezvous on LORA_MASTER_ADDR:LORA_MASTER_PORT
        (one pod: 127.0.0.1 and a free port), node rank LORA_NODE_RANK, no elastic restarts
        └── one worker per process: `python -m lora_trainer <same arguments>` with RANK, WORLD_SIZE…
            (the training itself: lora_trainer.distributed)

A worker is a process whose environment has RANK and WORLD_SIZE (the agent's, or a user's own
torchrun): it trains. SIGTERM goes to the launcher (the pod's PID 1); its agent forwards it to
every worker and waits the preemption grace (plus a margin) before SIGKILL. A SIGKILLed launcher
takes its workers with it (PR_SET_PDEATHSIG), as a container's death would.

Each worker leaves its exit code and termination message in a folder the launcher reads. The
launcher's exit code is the most telling worker exit (`most_telling_exit`): a documented input
or config error (64-78 but 75) first, then a failure (any other non-zero code), then 75
preempted, then a worker killed by a signal (128 + the signal; 75 when the launcher itself was
told to stop); 0 only when every worker exited 0. Peers of a crashed rank fail with a plain
collective error (1) or are killed, so the rank that knew why wins. The chosen worker's
termination message becomes the pod's.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_trainer import contract
from lora_trainer.errors import EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED, ConfigError

log = logging.getLogger(__name__)

# The launcher tells its workers where to leave their exit code and termination message.
ENV_RANK_REPORTS = "LORA_RANK_REPORTS"
ENV_LAUNCHER_PID = "LORA_LAUNCHER_PID"
DEFAULT_MULTI_NODE_PORT = 29500  # torchrun's default, for a group without LORA_MASTER_PORT
# The agent waits this long past the preemption grace for its workers to commit and exit on SIGTERM.
SHUTDOWN_MARGIN_SECONDS = 15


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
    reports = Path(tempfile.mkdtemp(prefix="lora-ranks-"))  # under $TMPDIR: the pod's scratch volume
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
