"""`python -m lora_operator.demo` (`make demo`): a LoRATrainingJob survives a spot reclaim, end to end.

On a fresh machine (the venv installed, nothing downloaded) it builds the tiny Stable Diffusion
model and dataset from configs with fixed seeds, starts the dev cluster in this process (S3, the
Kubernetes API emulator, a pod runner), starts the operator as a subprocess, creates the job's
Secret, uploads model and data, applies examples/tiny-job.yaml, reclaims the training pod after
its first committed checkpoint the way a spot node shutdown does, and waits until attempt 2 has
resumed from that checkpoint and the job has Succeeded. Then it prints the timeline, the final
status, where the weights are, and writes a loss curve marking the preemption.

    result = run_scenario(Path(".demo"))   # plain data (DemoResult); main() does the printing

Everything lands under the workdir (default .demo/): inputs/, outputs/, loss-curve.png and logs/
(operator.log, cluster.log; each pod's container.log under cluster/pods/).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_operator.devcluster.cluster import (
    DEFAULT_S3_PORT,
    KUBE_CHOICES,
    KUBE_WORDS,
    DevClusterError,
    resolve_kube,
)
from lora_operator.devcluster.scenario import DemoError, Scenario, TimelineEvent
from lora_trainer.contract import FINAL_WEIGHTS

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
JOB_MANIFEST = REPO / "examples" / "tiny-job.yaml"
DEFAULT_WORKDIR = Path(".demo")
DEFAULT_TIMEOUT = 900.0  # a safety net: the scenario takes about a minute on 2 idle cores, 5+ at load 10
QUIET_LOGGERS = ("aiohttp.access", "werkzeug", "urllib3", "botocore", "kubernetes", "matplotlib", "PIL")
# No model hub here; and the libraries' import-time advice and progress bars are noise in a demo.
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

__all__ = ["DemoError", "DemoResult", "TimelineEvent", "main", "plot_losses", "run_scenario"]


@dataclass
class DemoResult:
    """What the scenario saw and produced (plain data; no terminal dressing)."""

    workdir: Path
    job_name: str
    timeline: list[TimelineEvent]
    final_status: dict[str, Any]
    spec: dict[str, Any]  # the job's spec as applied
    preempted_step: int  # the step attempt 1 stopped at (its termination message)
    committed_checkpoint_step: int  # checkpoints/latest.json when attempt 1 had ended
    status_checkpoint_step: int | None  # status.latestCheckpoint.step when the operator counted the preemption
    resumed_step: int  # "resumed from step N" in attempt 2's log
    weights_uri: str
    weights_path: Path  # local copy
    weights_sha256: str
    losses: dict[int, float]
    model_dir: Path
    data_dir: Path
    logs: dict[str, Path] = field(default_factory=dict)
    elapsed: float = 0.0


def run_scenario(workdir: Path, *, s3_port: int = DEFAULT_S3_PORT, manifest: Path = JOB_MANIFEST,
                 timeout: float = DEFAULT_TIMEOUT, progress_interval: float = 1.0, kube: str = "auto",
                 on_event: Callable[[TimelineEvent], None] | None = None) -> DemoResult:
    """Run the whole recovery scenario under `workdir`; raises DemoError naming what did not happen.

    Every process it starts (the operator, the pods) is stopped before it returns or raises,
    also on KeyboardInterrupt. `s3_port=0` picks a free port (the job's endpoint is patched).
    `on_event` hears each timeline event as it happens.
    """
    with Scenario(Path(workdir).resolve(), s3_port=s3_port, manifest=manifest, timeout=timeout,
                  progress_interval=progress_interval, kube=kube, on_event=on_event) as sc:
        sc.start_cluster()  # first: a taken port fails the demo at once
        sc.start_operator()  # it gets ready while the inputs are built
        sc.prepare_inputs()
        sc.upload_inputs()
        sc.apply_job()
        sc.wait_attempt_running(1)
        sc.wait_first_checkpoint()
        sc.reclaim_attempt(1)
        preempted_step, committed = sc.wait_preempted(1)
        status_checkpoint = sc.wait_preemption_counted()
        sc.wait_attempt_running(2)
        resumed = sc.wait_resumed(2)
        final = sc.wait_succeeded()
        weights, losses = sc.download_outputs()
        return DemoResult(
            workdir=sc.workdir, job_name=sc.job_name, timeline=list(sc.timeline), final_status=final, spec=sc.spec,
            preempted_step=preempted_step, committed_checkpoint_step=committed,
            status_checkpoint_step=status_checkpoint, resumed_step=resumed,
            weights_uri=sc.output_uri(FINAL_WEIGHTS), weights_path=weights,
            weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(), losses=losses,
            model_dir=sc.model_dir, data_dir=sc.data_dir, logs=dict(sc.log_files), elapsed=sc.elapsed(),
        )


# ---- presentation -------------------------------------------------------------------------------

def plot_losses(result: DemoResult, path: Path) -> Path | None:
    """A loss-per-step PNG, attempt 1 and 2 in two colours, the preemption marked; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not result.losses:
        return None
    cut = result.resumed_step
    steps = sorted(result.losses)
    first = [s for s in steps if s <= cut]
    second = [s for s in steps if s >= cut]  # starts at the checkpoint's step, so the lines join
    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=110)
    ax.plot(first, [result.losses[s] for s in first], marker=".", color="tab:blue",
            label=f"attempt 1 (pod {result.job_name}-a1)")
    ax.plot(second, [result.losses[s] for s in second], marker=".", color="tab:orange",
            label=f"attempt 2 (pod {result.job_name}-a2), resumed from step {cut}")
    lo, hi = min(result.losses.values()), max(result.losses.values())
    span = (hi - lo) or 1.0
    ax.set_ylim(lo - 0.05 * span, hi + 0.35 * span)  # headroom above the curve for the labels
    ax.axvline(result.preempted_step, color="tab:red", linestyle="--", linewidth=1.2)
    ax.annotate(f"spot reclaim at step {result.preempted_step}:\ncheckpoint committed, attempt 2 resumed",
                xy=(result.preempted_step, hi + 0.32 * span), xytext=(6, 0), textcoords="offset points",
                va="top", color="tab:red", fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{result.job_name}: one training run across a spot preemption (logs/metrics.jsonl)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _status_rows(status: dict[str, Any]) -> list[tuple[str, str]]:
    progress = status.get("progress") or {}
    checkpoint = status.get("latestCheckpoint") or {}
    outputs = status.get("outputs") or {}
    step = f"{progress.get('step', '?')}/{progress.get('totalSteps', '?')}" if progress else "-"
    return [
        ("phase", f"{status.get('phase')} ({status.get('reason') or '-'})"),
        ("attempt", str(status.get("attempt"))),
        ("preemptions", str(status.get("preemptions", 0))),
        ("failures", str(status.get("failures", 0))),
        ("step", step),
        ("checkpoint", f"step {checkpoint['step']}  {checkpoint.get('uri', '')}" if checkpoint else "-"),
        ("outputs", outputs.get("weights", "-")),
    ]


def format_event(event: TimelineEvent) -> str:
    """One timeline line."""
    return f"  {event.seconds:6.1f}s  {event.message}"


def report(result: DemoResult, loss_curve: Path | None, with_timeline: bool = True) -> str:
    """The text `make demo` prints after the run (the timeline was printed live when not `with_timeline`)."""
    lines = ["", "timeline (seconds since start)", *map(format_event, result.timeline)] if with_timeline else []
    lines += ["", f"final status (kubectl get ltj {result.job_name} -o yaml)"]
    lines += [f"  {name:<12} {value}" for name, value in _status_rows(result.final_status)]
    lines += ["", f"preempted at step {result.preempted_step}; checkpoint committed at step "
                  f"{result.committed_checkpoint_step}; attempt 2 resumed from step {result.resumed_step}"]
    lines += ["", "weights",
              f"  {result.weights_uri}",
              f"  {result.weights_path}  (sha256 {result.weights_sha256[:16]}…)"]
    if loss_curve:
        lines += [f"loss curve   {loss_curve}"]
    else:
        lines += ["loss curve   not drawn: matplotlib is not installed (pip install -e '.[dev]')"]
    lines += ["logs"] + [f"  {name:<12} {path}" for name, path in result.logs.items()]
    lines += ["", f"done in {result.elapsed:.0f} s"]
    return "\n".join(lines)


def _configure_logging(log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo, print the timeline, status, weights and logs; exit 0, 1 on failure, 130 on Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m lora_operator.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where everything goes (default .demo)")
    parser.add_argument("--s3-port", type=int, default=DEFAULT_S3_PORT, help="S3 port (default 9000; 0 picks one)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds for the whole scenario")
    parser.add_argument("--kube", choices=KUBE_CHOICES, default="auto",
                        help="real control plane (KUBEBUILDER_ASSETS) or the emulator; auto: real when found")
    args = parser.parse_args(argv)
    try:
        kube, _ = resolve_kube(args.kube)
    except DevClusterError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    workdir = args.workdir.resolve()
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    cluster_log = workdir / "logs" / "cluster.log"
    _configure_logging(cluster_log)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` cleans up like Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`&`)
    print(f"lora-operator demo on {KUBE_WORDS[kube]}: a LoRATrainingJob, its pod reclaimed like a spot node, "
          f"resumed (everything under {workdir}/)\n\ntimeline (seconds since start)", flush=True)
    started = time.monotonic()
    try:
        result = run_scenario(workdir, s3_port=args.s3_port, timeout=args.timeout, kube=kube,
                              on_event=lambda e: print(format_event(e), flush=True))
    except DemoError as exc:
        print(f"demo failed after {time.monotonic() - started:.0f} s: {exc} (logs in {workdir}/logs/)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    result.logs["cluster"] = cluster_log
    curve = plot_losses(result, workdir / "loss-curve.png")
    print(report(result, curve, with_timeline=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
