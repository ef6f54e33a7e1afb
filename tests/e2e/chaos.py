"""Kill the trainer at chosen moments of what it is doing and check every resume was exact.

A reference run trains uninterrupted and is timed phase by phase (start-up, step pace, checkpoint
upload, final export): it is the yardstick for every deadline here, so a slow or loaded machine
moves the deadlines with it. A chaos run starts `lora-train` as a real process against a real S3
server and follows its log (one line per step: `log_every` is 1). For each attempt it draws a phase
(start-up, a step, a checkpoint save, a checkpoint upload, the final export) and a target step, and
sends SIGKILL or SIGTERM when the log shows the attempt got there (plus a random fraction of the
attempt's own step pace, or of the reference's upload or export time). Then it starts the trainer
again, and repeats until it finishes.

A resume is an attempt whose log says "resumed from step N". It is exact when the checkpoint it
loaded and every checkpoint it committed match the reference's checkpoint of the same step file by
file (sha256 from the MANIFESTs; `trainer_state.json` differs only by the attempt number); an attempt
that resumed at the last step (its predecessor died while exporting) commits nothing, and the final
weights judge it. The run as a whole is exact when the final `pytorch_lora_weights.safetensors` and
the per-step losses equal the reference's.

    python -m tests.e2e.chaos --kills 100      # what `make chaos` runs; prints the tally
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer import contract
from lora_trainer.checkpoint import Manifest
from lora_trainer.config import S3Config
from lora_trainer.storage import Store, open_store
from lora_trainer.train import read_losses

KILL_SIGNALS = (signal.SIGKILL, signal.SIGTERM)
# trainer_state.json carries the attempt number. rng.json holds Python's and NumPy's global RNG
# states, which libraries also draw from (botocore's retry jitter), so they depend on I/O; training
# draws only from seeded generators, which equal weights, optimizer moments and losses prove.
IGNORED_FILES = {"trainer_state.json", "rng.json"}
IGNORED_RANK_RNG = re.compile(r"rng-rank\d+\.json")  # the same for ranks > 0 of a several-process run
PHASES = ("start-up", "step", "save", "upload", "export")
# Deadlines are multiples of the reference run's wall time, measured in the same session.
ATTEMPT_FACTOR = 4.0  # one attempt (killed or not) may take this many reference runs
# The reference itself has nothing to be measured against: it only fails when its log stops moving.
REFERENCE_STALL_SECONDS = 600.0
POLL_SECONDS = 0.02

START_LINE = re.compile(r"attempt (\d+): (?:resumed from step (\d+)|starting at step 0)")
STEP_LINE = re.compile(r"lora_trainer\.progress: step (\d+)/(\d+) ")
COMMIT_LINE = re.compile(r"checkpoint step (\d+) committed by attempt \d+: .* in ([\d.]+)s at ")


def base_env() -> dict[str, str]:
    """What a trainer process inherits: PATH, offline Hugging Face, and PYTHONPATH when set (to run
    the harness against another checkout of the packages than the installed one)."""
    env = {"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def chaos_config(model_uri: str, data_uri: str, output_uri: str, s3: S3Config, cache: Path,
                 inputs: dict | None = None) -> dict:
    """The tiny run every chaos test trains: 40 steps, a checkpoint every 5, every checkpoint kept.

    `log_every` 1 puts a line in the log per step (not a training field: the config hash is the same),
    which is how the harness sees the step an attempt has reached. `inputs` replaces the image
    inputs (base_model, train_data_dir, resolution) for another workload (WORKLOADS)."""
    config = {
        "base_model": model_uri, "train_data_dir": data_uri, "output_dir": output_uri,
        "resolution": 32, "lora_rank": 4, "batch_size": 2, "max_train_steps": 40, "learning_rate": 1e-3,
        "lr_scheduler": "cosine", "lr_warmup_steps": 3, "save_steps": 5, "keep_last": 0, "seed": 11,
        "log_every": 1, "cache_dir": str(cache), "s3": s3.model_dump(mode="json"),
        "preemption_grace_seconds": 20,
    }
    if inputs is not None:
        for key in ("base_model", "train_data_dir", "resolution"):
            config.pop(key)
        config.update(inputs)
    return config


class LogWatch:
    """Follows one attempt's trainer log: the start (and the step it resumed from), steps, commits."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = ""
        self.started_at = time.monotonic()
        self.last_growth = self.started_at
        self.attempt: int | None = None  # the trainer's attempt number, from its start line
        self.start_step: int | None = None  # where training started: None until the start line
        self.start_seen: float | None = None
        self.resumed = False
        self.total: int | None = None
        self.step = 0
        self.step_times: dict[int, float] = {}
        self.commits: dict[int, float] = {}  # step → upload seconds the trainer logged

    def poll(self) -> None:
        """Read what the trainer has written since the last poll."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        now = time.monotonic()
        self.offset += len(data)
        self.last_growth = now
        lines = (self.partial + data.decode(errors="replace")).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if m := START_LINE.search(line):
                self.attempt = int(m.group(1))
                self.start_step = int(m.group(2) or 0)
                self.resumed = m.group(2) is not None
                self.start_seen = now
                self.step = self.start_step
            elif m := STEP_LINE.search(line):
                self.step, self.total = int(m.group(1)), int(m.group(2))
                self.step_times[self.step] = now
            elif m := COMMIT_LINE.search(line):
                self.commits[int(m.group(1))] = float(m.group(2))

    def pace(self) -> float | None:
        """Median seconds per step of this attempt so far (None before two steps)."""
        times = sorted(self.step_times.items())
        gaps = [b[1] - a[1] for a, b in zip(times, times[1:], strict=False) if b[0] == a[0] + 1]
        return statistics.median(gaps) if gaps else None

    def phase(self, total: int, save_steps: int | str) -> str:
        """What the attempt is doing now, as far as its log tells."""
        if self.start_step is None:
            return "start-up"
        if self.step >= total:
            return "export"
        grid = range(save_steps, self.step + 1, save_steps) if isinstance(save_steps, int) else ()  # auto: no grid
        in_flight = [s for s in grid if s > self.start_step and s not in self.commits]
        if in_flight:
            return "save" if in_flight[-1] == self.step else "upload"
        return "step"


@dataclass
class KillPlan:
    """When to kill one attempt: at `phase`, once the log shows `step`, `delay` seconds later."""

    phase: str
    sig: signal.Signals
    step: int | None = None  # drawn when the start line tells where the attempt begins
    delay: float = 0.0
    after_commit: bool = False  # wait for a committed checkpoint first (so that a resume follows)
    share: float = 1.0  # the target is drawn from this first share of the steps left (kills spread out)


@dataclass
class Attempt:
    """One start of the trainer, and how it ended."""

    code: int
    killed: bool
    log: LogWatch
    phase: str | None = None  # what the log showed the attempt doing when the signal went
    sig: str | None = None
    timed_out: bool = False
    seconds: float = 0.0


def _start(config: dict, env: dict[str, str], workdir: Path, attempt: int | None):
    workdir.mkdir(parents=True, exist_ok=True)
    child_env = {**env, contract.ENV_CONFIG: json.dumps(config),
                 contract.ENV_TERMINATION_LOG: str(workdir / "termination.json")}
    if attempt is not None:
        child_env[contract.ENV_ATTEMPT] = str(attempt)
    log = (workdir / "trainer.log").open("ab")
    watch = LogWatch(workdir / "trainer.log")
    proc = subprocess.Popen([sys.executable, "-m", "lora_trainer"], env=child_env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc, watch


def _stop(proc: subprocess.Popen, sig: signal.Signals, wait: float) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def run_attempt(config: dict, env: dict[str, str], workdir: Path, *, timeout: float | None = None,
                stall: float | None = None, plan: KillPlan | None = None, draw=None,
                pace: Reference | None = None, attempt: int | None = None) -> Attempt:
    """Start `lora-train` and follow its log; kill it as `plan` says (`draw(plan, watch)` fills in
    the target once the start line is seen). `timeout` bounds the attempt, `stall` a silent log."""
    proc, watch = _start(config, env, workdir, attempt)
    total, save_steps = config["max_train_steps"], config["save_steps"]
    fire_at: float | None = None
    if plan is not None and plan.phase == "start-up":
        fire_at = watch.started_at + plan.delay
    drawn = plan is None or plan.phase == "start-up"
    exit_wait = config.get("preemption_grace_seconds", 20) + (pace.seconds if pace else 120.0)
    while proc.poll() is None:
        watch.poll()
        now = time.monotonic()
        if plan is not None and not drawn and watch.start_step is not None:
            draw(plan, watch)
            drawn = True
        if plan is not None and drawn and fire_at is None and plan.phase != "start-up":
            reached = watch.step >= plan.step if plan.step is not None else watch.start_step is not None
            if reached and (not plan.after_commit or watch.commits):
                fire_at = now + plan.delay
        if fire_at is not None and now >= fire_at:
            watch.poll()
            phase = watch.phase(total, save_steps)
            code = _stop(proc, plan.sig, exit_wait)
            return Attempt(code, True, watch, phase, plan.sig.name, seconds=now - watch.started_at)
        if timeout is not None and now - watch.started_at > timeout:
            code = _stop(proc, signal.SIGKILL, exit_wait)
            return Attempt(code, False, watch, timed_out=True, seconds=now - watch.started_at)
        if stall is not None and now - watch.last_growth > stall:
            code = _stop(proc, signal.SIGKILL, exit_wait)
            return Attempt(code, False, watch, timed_out=True, seconds=now - watch.started_at)
        time.sleep(POLL_SECONDS)
    watch.poll()
    return Attempt(proc.returncode, False, watch, seconds=time.monotonic() - watch.started_at)


def run_trainer(config: dict, env: dict[str, str], workdir: Path, attempt: int | None = None,
                timeout: float | None = None) -> tuple[int, bool]:
    """Start `lora-train` and let it finish (within `timeout` s). Returns (exit code, timed out)."""
    a = run_attempt(config, env, workdir, timeout=timeout, attempt=attempt)
    return a.code, a.timed_out


def kill_after_first_commit_and_resume(config: dict, env: dict[str, str], workdir: Path, s3: S3Config,
                                       ref: Reference) -> Store:
    """SIGKILL a run once its first checkpoint commit is logged, start it again, and check that it resumed
    from a committed step and ended equal to `ref` (weights sha256, per-step losses); the output's store."""
    plan = KillPlan("step", signal.SIGKILL, step=1, after_commit=True)
    first = run_attempt(config, env, workdir / "a1", plan=plan, draw=lambda plan, watch: None,
                        timeout=ref.deadline(1))
    assert first.killed and first.code == -signal.SIGKILL, (first.code, first.timed_out)
    assert first.log.commits, "killed before a checkpoint was committed"
    store = open_store(config["output_dir"], s3)
    committed = manifests(store)
    assert committed and max(committed) < config["max_train_steps"]  # killed mid-run, not after the end
    second = run_attempt(config, env, workdir / "a2", timeout=ref.deadline(1))
    assert second.code == 0 and not second.timed_out, (second.code, second.timed_out)
    assert second.log.resumed and second.log.start_step in committed, (second.log.resumed, second.log.start_step)
    assert read_result(store) == (ref.weights_sha256, ref.losses)
    return store


def manifests(store: Store) -> dict[int, Manifest]:
    """Every committed checkpoint's MANIFEST, by step."""
    out = {}
    for key in store.list(f"{contract.CHECKPOINTS_DIR}/"):
        if key.endswith(f"/{contract.MANIFEST_FILE}"):
            m = Manifest.model_validate_json(store.get_bytes(key))
            out[m.step] = m
    return out


def digests(m: Manifest) -> dict[str, str]:
    """File digests of a checkpoint that must be identical between runs."""
    return {name: d.sha256 for name, d in m.files.items()
            if name not in IGNORED_FILES and not IGNORED_RANK_RNG.fullmatch(name)}


@dataclass
class Reference:
    """What the uninterrupted run produced, and how long each part of it took on this machine."""

    weights_sha256: str
    losses: dict[int, float]
    checkpoints: dict[int, dict[str, str]]
    seconds: float  # wall time of the whole run, start-up included: the unit of every deadline
    startup: float = 0.0  # Popen → the start line
    step: float = 0.0  # median seconds per step
    upload: float = 0.0  # median seconds a checkpoint commit took (the trainer's own figure)
    export: float = 0.0  # the last step's line → exit

    def deadline(self, references: float) -> float:
        """Seconds for something that takes at most `references` uninterrupted runs, with slack."""
        return references * ATTEMPT_FACTOR * self.seconds


@dataclass
class Tally:
    """How a chaos run went."""

    kills: int = 0
    missed: int = 0  # kills planned in the export that the attempt outran
    resumes: int = 0
    exact_resumes: int = 0
    final_exact: bool = False
    losses_exact: bool = False
    phases: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.final_exact and self.losses_exact and self.exact_resumes == self.resumes and not self.problems


# The final weights a family exports, by the file it names them (image LoRA, PEFT adapter).
FINAL_WEIGHTS = (contract.FINAL_WEIGHTS, "adapter_model.safetensors")


def read_result(store: Store) -> tuple[str, dict[int, float]]:
    """sha256 of the final weights and the per-step losses in an output."""
    name = next((n for n in FINAL_WEIGHTS if store.exists(n)), FINAL_WEIGHTS[0])
    weights = hashlib.sha256(store.get_bytes(name)).hexdigest()
    return weights, read_losses(store.get_bytes("logs/metrics.jsonl").decode())


def reference_run(config: dict, env: dict[str, str], workdir: Path, s3: S3Config) -> Reference:
    """Train uninterrupted, record what an exact run must reproduce and time its phases."""
    a = run_attempt(config, env, workdir, stall=REFERENCE_STALL_SECONDS)
    if a.code != 0 or a.timed_out:
        why = f"its log was silent for {REFERENCE_STALL_SECONDS:.0f}s" if a.timed_out else f"it exited {a.code}"
        raise RuntimeError(f"reference run failed: {why}; see {workdir / 'trainer.log'}")
    store = open_store(config["output_dir"], s3)
    weights, losses = read_result(store)
    w = a.log
    last = w.step_times[max(w.step_times)]
    return Reference(
        weights, losses, {s: digests(m) for s, m in manifests(store).items()}, a.seconds,
        startup=(w.start_seen or w.started_at) - w.started_at, step=w.pace() or 0.0,
        upload=statistics.median(w.commits.values()) if w.commits else 0.0,
        export=w.started_at + a.seconds - last,
    )


def plan_kill(rng: random.Random, ref: Reference, allow_export: bool, after_commit: bool) -> KillPlan:
    """Draw the phase and signal of the next kill; the step is drawn once the attempt has started.

    An attempt may finish its export before the signal, so the export is drawn only once a checkpoint
    is committed (`allow_export`): never for a run's first kill, and the attempt then resumes. The
    caller allows it for a run's last kill only: after an export kill little is left to kill."""
    phases = PHASES if allow_export else PHASES[:-1]
    if after_commit:  # a start-up kill cannot wait for a commit
        phases = tuple(p for p in phases if p != "start-up")
    phase = rng.choice(phases)
    plan = KillPlan(phase, rng.choice(KILL_SIGNALS), after_commit=after_commit)
    if phase == "start-up":
        plan.delay = rng.uniform(0.1, 0.9) * ref.startup
    return plan


def draw_target(rng: random.Random, ref: Reference, total: int, save_steps: int):
    """`draw(plan, watch)` for run_attempt: the target step and delay, from where the attempt began."""

    def draw(plan: KillPlan, watch: LogWatch) -> None:
        begin = watch.start_step or 0
        if begin >= total:  # resumed at the last step: only the export is left
            plan.phase = "export"
        grid = [s for s in range(save_steps, total + 1, save_steps) if s > begin]
        # Drawn from the first share of what is left, so the attempts after this one have work to kill.
        early = grid[:max(1, round(len(grid) * plan.share))] if grid else grid
        if plan.phase == "step":  # during step s+1, a random fraction of this attempt's pace in
            last = max(begin, total - 2)  # the last step's kill is often outrun
            plan.step = rng.randint(begin, begin + max(0, round((last - begin) * plan.share)))
            plan.delay = rng.uniform(0.0, 0.9) * (watch.pace() or ref.step)
        elif plan.phase == "save":  # the snapshot right after a checkpoint step
            plan.step, plan.delay = rng.choice(early), 0.0
        elif plan.phase == "upload":  # while that checkpoint is uploading
            plan.step, plan.delay = rng.choice(early), rng.uniform(0.0, 0.9) * ref.upload
        else:  # export: after the last step's line (at once when resumed at the last step)
            plan.step = total if begin < total else None
            # The export's length varies with load by more than 2x; the early part is always there.
            plan.delay = rng.uniform(0.0, 0.4) * ref.export

    return draw


def chaos_run(config: dict, env: dict[str, str], workdir: Path, s3: S3Config, ref: Reference,
              kills: int, rng: random.Random) -> Tally:
    """Kill the trainer `kills` times at drawn phases, let it finish, and judge every resume.

    Each attempt gets `ref.deadline(1)` seconds. The first kill always lands (it is never in the
    export), and the run's last planned kill waits for a committed checkpoint when none exists yet,
    so every run is killed and has at least one resume to judge."""
    tally = Tally()
    total, save_steps = config["max_train_steps"], config["save_steps"]
    draw = draw_target(rng, ref, total, save_steps)
    store = open_store(config["output_dir"], s3)
    attempts: list[Attempt] = []
    run = 0
    committed = False
    while True:
        run += 1
        plan = None
        if tally.kills < kills:
            last_kill = tally.kills == kills - 1
            # An export kill leaves the next attempt only the export to do (seconds): the run would
            # end with kills still planned, so it is kept for a run's last kill.
            plan = plan_kill(rng, ref, allow_export=committed and last_kill, after_commit=last_kill and not committed)
            plan.share = 1.0 / (kills - tally.kills)
        a = run_attempt(config, env, workdir / f"attempt-{run}", timeout=ref.deadline(1), plan=plan,
                        draw=draw, pace=ref)
        attempts.append(a)
        committed = committed or bool(a.log.commits) or a.log.resumed
        if a.timed_out:
            tally.problems.append(f"attempt {run}: not done within {ref.deadline(1):.0f}s "
                                  f"({ATTEMPT_FACTOR:g} x the reference's {ref.seconds:.0f}s)")
            return tally
        if a.killed:
            tally.kills += 1
            tally.phases[a.phase] += 1
            if a.code not in (0, 75, -signal.SIGKILL, -signal.SIGTERM):
                tally.problems.append(f"attempt {run}: {a.sig} gave exit code {a.code}")
        elif plan is not None:
            tally.missed += 1
        if a.code == 0:
            break
        if not a.killed:
            tally.problems.append(f"attempt {run}: exited {a.code} unprompted; see {workdir / f'attempt-{run}'}")
            return tally
    found = manifests(store)
    bad_steps: set[int] = set()
    for step, m in found.items():
        # Off-grid steps (committed on SIGTERM) have no reference twin; the later on-grid ones judge them.
        if step in ref.checkpoints and digests(m) != ref.checkpoints[step]:
            bad_steps.add(step)
            tally.problems.append(f"checkpoint step {step} (attempt {m.attempt}) differs from the reference")
    for a in attempts:
        if a.log.resumed:
            tally.resumes += 1
            mine = {s for s, m in found.items() if m.attempt == a.log.attempt}
            tally.exact_resumes += not (({a.log.start_step} | mine) & bad_steps)
    weights, losses = read_result(store)
    tally.final_exact = weights == ref.weights_sha256
    tally.losses_exact = losses == ref.losses
    if not tally.final_exact:
        tally.problems.append("final weights differ from the reference")
    if not tally.losses_exact:
        diff = sorted(s for s in set(losses) | set(ref.losses) if losses.get(s) != ref.losses.get(s))
        tally.problems.append(f"losses differ at steps {diff[:10]}")
    return tally


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _sd_inputs(root: Path) -> dict:
    from lora_trainer.tiny import build_tiny_dataset, build_tiny_sd

    return {"base_model": str(build_tiny_sd(root / "sd")), "train_data_dir": str(build_tiny_dataset(root / "data")),
            "resolution": 32}


def _sdxl_inputs(root: Path) -> dict:
    from lora_trainer.tiny import build_tiny_dataset
    from lora_trainer.tiny_sdxl import build_tiny_sdxl

    return {"base_model": str(build_tiny_sdxl(root / "sdxl")), "resolution": 32, "train_text_encoder": True,
            "train_data_dir": str(build_tiny_dataset(root / "data"))}


def _flux_inputs(root: Path) -> dict:
    from lora_trainer.tiny import build_tiny_dataset
    from lora_trainer.tiny_flux import build_tiny_flux

    return {"base_model": str(build_tiny_flux(root / "flux")), "resolution": 32,
            "train_data_dir": str(build_tiny_dataset(root / "data"))}


def _llm_inputs(root: Path) -> dict:
    from lora_trainer.tiny_llm import build_tiny_llm, write_tiny_jsonl

    return {"task": "causal-lm", "base_model": str(build_tiny_llm(root / "llm")),
            "train_file": str(write_tiny_jsonl(root / "llm-data" / "train.jsonl", "messages", 48)),
            "max_seq_length": 64}


# Every family `make chaos` kills, by name: what builds its tiny inputs (under a folder) as config keys.
# sd-2rank is SD trained by two gloo processes (lora_trainer.launch; its environment in WORKLOAD_ENV).
WORKLOADS = {"sd": _sd_inputs, "sdxl": _sdxl_inputs, "flux": _flux_inputs, "causal-lm": _llm_inputs,
             "sd-2rank": _sd_inputs}
WORKLOAD_ENV = {"sd-2rank": {contract.ENV_NPROC_PER_NODE: "2"}}


def available_workloads() -> list[str]:
    """The workloads whose family this checkout has (a family's tiny builder imports)."""
    import importlib.util

    modules = {"sd": "lora_trainer.tiny", "sdxl": "lora_trainer.tiny_sdxl", "flux": "lora_trainer.tiny_flux",
               "causal-lm": "lora_trainer.tiny_llm", "sd-2rank": "lora_trainer.launch"}
    return [name for name in WORKLOADS if importlib.util.find_spec(modules[name]) is not None]


def thread_env(parallel: int) -> dict[str, str]:
    """Torch's intra-op threads per trainer: the cores shared out between the runs side by side.

    Without it, N trainers each start one thread per core and thrash; every run of a workload (the
    reference included) gets the same count, so the numbers stay comparable."""
    threads = str(max(1, (os.cpu_count() or 1) // max(1, parallel)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def main(argv: list[str] | None = None) -> int:
    """`make chaos`: --kills kills, --kills-per-run in every run, --parallel runs side by side; prints the tally."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    # 10 a run: each kill costs a restart (seconds), each run a whole training; 100 kills in ~10 runs.
    parser.add_argument("--kills-per-run", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workloads", default=",".join(available_workloads()),
                        help="families to kill, in turn run by run (default: every one this checkout has)")
    # A trainer's start-up (imports, model load) is mostly one thread: two runs side by side on two
    # cores deliver nearly twice the kills per minute.
    parser.add_argument("--parallel", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    if unknown := [n for n in names if n not in WORKLOADS]:
        parser.error(f"--workloads: {', '.join(unknown)} unknown; choose from {', '.join(WORKLOADS)}")

    import boto3

    from lora_operator.devcluster.s3 import TEST_CREDENTIALS, start_s3_server

    started = time.monotonic()
    server, endpoint = start_s3_server("127.0.0.1", 0)
    env = {**base_env(), **TEST_CREDENTIALS, "AWS_EC2_METADATA_DISABLED": "true", **thread_env(args.parallel)}
    os.environ.update({k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    s3 = S3Config(endpoint_url=endpoint, region="us-east-1", path_style=True)
    print(f"chaos: --kills {args.kills} --kills-per-run {args.kills_per_run} --seed {args.seed} "
          f"--workloads {','.join(names)} --parallel {args.parallel}; load average {load_average()} on "
          f"{os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        root = Path(tmp)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="chaos")
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        def config_for(name: str, inputs: dict, output: str) -> dict:
            return chaos_config("", "", f"s3://chaos/{output}", s3, root / "cache" / name, inputs)

        def env_for(name: str) -> dict[str, str]:
            return {**env, **WORKLOAD_ENV.get(name, {})}

        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            # One after another: transformers' and diffusers' lazy imports are not safe across threads.
            inputs = {n: WORKLOADS[n](root / "inputs" / n) for n in names}
            refs = dict(zip(names, pool.map(
                lambda n: reference_run(config_for(n, inputs[n], f"ref-{n}"), env_for(n), root / f"ref-{n}", s3), names),
                strict=True))
            for name, ref in refs.items():
                print(f"reference {name}: {ref.seconds:.1f}s (start-up {ref.startup:.1f}s, {ref.step:.2f}s/step, "
                      f"upload {ref.upload:.2f}s, export {ref.export:.2f}s)", flush=True)
            total, by_workload = Tally(), Counter()
            run, unkilled, planned = 0, 0, 0
            running: dict = {}
            while total.kills < args.kills or running:
                while total.kills + planned < args.kills and len(running) < max(1, args.parallel):
                    run += 1
                    name = names[(run - 1) % len(names)]
                    kills = min(args.kills_per_run, args.kills - total.kills - planned)
                    # One generator per run, from the seed and the run's number: runs side by side stay reproducible.
                    future = pool.submit(chaos_run, config_for(name, inputs[name], f"run-{run}"), env_for(name),
                                         root / f"run-{run}", s3, refs[name], kills, random.Random(f"{args.seed}-{run}"))
                    running[future] = (run, name, kills)
                    planned += kills
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    number, name, kills = running.pop(future)
                    planned -= kills
                    t = future.result()
                    total.kills += t.kills
                    total.missed += t.missed
                    total.resumes += t.resumes
                    total.exact_resumes += t.exact_resumes
                    total.phases += t.phases
                    by_workload[name] += t.kills
                    unkilled += t.kills == 0
                    total.problems += [f"run {number} ({name}): {p}" for p in t.problems]
                    print(f"run {number} ({name}): {t.kills} kills "
                          f"({', '.join(f'{p} {n}' for p, n in sorted(t.phases.items()))}), "
                          f"{t.exact_resumes}/{t.resumes} exact resumes, "
                          f"final {'exact' if t.final_exact and t.losses_exact else 'DIFFERENT'}", flush=True)
                    if t.problems and t.kills == 0:
                        args.kills = total.kills  # a run that cannot even be killed will not get better
        if unkilled:
            total.problems.append(f"{unkilled} runs were never killed")
        total.final_exact = total.losses_exact = not total.problems
    server.stop()
    phases = ", ".join(f"{p} {total.phases[p]}" for p in PHASES)
    workloads = ", ".join(f"{n} {by_workload[n]}" for n in names)
    print(f"\nchaos: {total.kills} kills over {run} runs in {time.monotonic() - started:.0f}s "
          f"(references {', '.join(f'{n} {r.seconds:.1f}s' for n, r in refs.items())}; load average "
          f"{load_average()}); kills by phase: {phases}; by workload: {workloads}; "
          f"{total.missed} planned kills outrun; {total.exact_resumes}/{total.resumes} resumes exact; "
          f"{'ALL EXACT' if total.ok else 'PROBLEMS: ' + '; '.join(total.problems)}")
    return 0 if total.ok else 1


if __name__ == "__main__":
    sys.exit(main())
