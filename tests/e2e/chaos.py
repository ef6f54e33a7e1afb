"""Kill the trainer at random moments and check every resume was exact.

A reference run trains uninterrupted. A chaos run starts `lora-train` as a real process against a real
S3 server, sends SIGKILL or SIGTERM at a random moment (during start-up, a step, a save or an upload),
starts it again, and repeats until it finishes. A resume is exact when every checkpoint the resumed
attempt committed matches the reference's checkpoint of the same step file by file (sha256 from the
MANIFESTs; `trainer_state.json` differs only by the attempt number), and the run as a whole when the
final `pytorch_lora_weights.safetensors` and the per-step losses equal the reference's.

    python -m tests.e2e.chaos --kills 100      # what `make chaos` runs; prints the tally
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
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


def chaos_config(model_uri: str, data_uri: str, output_uri: str, s3: S3Config, cache: Path) -> dict:
    """The tiny run every chaos test trains: 40 steps, a checkpoint every 5, every checkpoint kept."""
    return {
        "base_model": model_uri, "train_data_dir": data_uri, "output_dir": output_uri,
        "resolution": 32, "lora_rank": 4, "batch_size": 2, "max_train_steps": 40, "learning_rate": 1e-3,
        "lr_scheduler": "cosine", "lr_warmup_steps": 3, "save_steps": 5, "keep_last": 0, "seed": 11,
        "log_every": 10, "cache_dir": str(cache), "s3": s3.model_dump(mode="json"),
        "preemption_grace_seconds": 20,
    }


def run_trainer(config: dict, env: dict[str, str], workdir: Path, kill_after: float | None = None,
                sig: signal.Signals = signal.SIGKILL, attempt: int | None = None) -> tuple[int, bool]:
    """Start `lora-train`; kill it with `sig` after `kill_after` s. Returns (exit code, was killed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    child_env = {**env, contract.ENV_CONFIG: json.dumps(config),
                 contract.ENV_TERMINATION_LOG: str(workdir / "termination.json")}
    if attempt is not None:
        child_env[contract.ENV_ATTEMPT] = str(attempt)
    with (workdir / "trainer.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lora_trainer"], env=child_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        killed = False
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            killed = True
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    return code, killed


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
    return {name: d.sha256 for name, d in m.files.items() if name not in IGNORED_FILES}


@dataclass
class Reference:
    """What the uninterrupted run produced."""

    weights_sha256: str
    losses: dict[int, float]
    checkpoints: dict[int, dict[str, str]]
    seconds: float  # wall time of the whole run, start-up included: scales the kill moments


@dataclass
class Tally:
    """How a chaos run went."""

    kills: int = 0
    resumes: int = 0
    exact_resumes: int = 0
    final_exact: bool = False
    losses_exact: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.final_exact and self.losses_exact and self.exact_resumes == self.resumes and not self.problems


def read_result(store: Store) -> tuple[str, dict[int, float]]:
    """sha256 of the final weights and the per-step losses in an output."""
    weights = hashlib.sha256(store.get_bytes(contract.FINAL_WEIGHTS)).hexdigest()
    return weights, read_losses(store.get_bytes("logs/metrics.jsonl").decode())


def reference_run(config: dict, env: dict[str, str], workdir: Path, s3: S3Config) -> Reference:
    """Train uninterrupted and record what an exact run must reproduce."""
    started = time.monotonic()
    code, _ = run_trainer(config, env, workdir)
    seconds = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"reference run exited {code}; see {workdir / 'trainer.log'}")
    store = open_store(config["output_dir"], s3)
    weights, losses = read_result(store)
    return Reference(weights, losses, {s: digests(m) for s, m in manifests(store).items()}, seconds)


def chaos_run(config: dict, env: dict[str, str], workdir: Path, s3: S3Config, ref: Reference,
              kills: int, rng: random.Random) -> Tally:
    """Kill the trainer `kills` times at random moments, let it finish, and judge every resume.

    Kill moments are drawn from the first 80% of the reference run's wall time, so on a fast or a
    slow machine alike the first attempt is always killed somewhere between start-up and the end;
    a later draw may fall after a resumed (shorter) attempt has finished, and then is no kill.
    """
    tally = Tally()
    max_kill_after = 0.8 * ref.seconds
    store = open_store(config["output_dir"], s3)
    run = 0
    while True:
        run += 1
        if tally.kills < kills:
            sig = rng.choice(KILL_SIGNALS)
            code, killed = run_trainer(config, env, workdir / f"attempt-{run}",
                                       kill_after=rng.uniform(0.2, max_kill_after), sig=sig)
            tally.kills += killed
            if killed and code not in (0, 75, -signal.SIGKILL, -signal.SIGTERM):
                tally.problems.append(f"attempt {run}: {sig.name} gave exit code {code}")
        else:
            code, _ = run_trainer(config, env, workdir / f"attempt-{run}")
        if code == 0:
            break
        if run > kills + 10:
            tally.problems.append("the run never finished")
            return tally
    by_attempt: dict[int, list[int]] = {}
    for step, m in manifests(store).items():
        by_attempt.setdefault(m.attempt, []).append(step)
        # Off-grid steps (committed on SIGTERM) have no reference twin; the later on-grid ones judge them.
        if step in ref.checkpoints and digests(m) != ref.checkpoints[step]:
            tally.problems.append(f"checkpoint step {step} (attempt {m.attempt}) differs from the reference")
    bad_steps = {int(p.split()[2]) for p in tally.problems if p.startswith("checkpoint step")}
    for attempt, steps in by_attempt.items():
        if attempt > 1 and min(steps) > 0:
            tally.resumes += 1
            tally.exact_resumes += not (set(steps) & bad_steps)
    weights, losses = read_result(store)
    tally.final_exact = weights == ref.weights_sha256
    tally.losses_exact = losses == ref.losses
    if not tally.losses_exact:
        diff = sorted(s for s in set(losses) | set(ref.losses) if losses.get(s) != ref.losses.get(s))
        tally.problems.append(f"losses differ at steps {diff[:10]}")
    return tally


def main(argv: list[str] | None = None) -> int:
    """`make chaos`: at least --kills random kills over as many runs as it takes; prints the tally."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--kills-per-run", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    import boto3

    from lora_operator.devcluster.s3 import TEST_CREDENTIALS, start_s3_server
    from lora_trainer.tiny import build_tiny_dataset, build_tiny_sd

    server, endpoint = start_s3_server("127.0.0.1", 0)
    env = {"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1", **TEST_CREDENTIALS,
           "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)
    s3 = S3Config(endpoint_url=endpoint, region="us-east-1", path_style=True)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        root = Path(tmp)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="chaos")
        model, data = build_tiny_sd(root / "sd"), build_tiny_dataset(root / "data")
        ref = reference_run(chaos_config(str(model), str(data), "s3://chaos/ref", s3, root / "cache"),
                            env, root / "ref", s3)
        total = Tally()
        run = 0
        started = time.monotonic()
        while total.kills < args.kills:
            run += 1
            config = chaos_config(str(model), str(data), f"s3://chaos/run-{run}", s3, root / "cache")
            t = chaos_run(config, env, root / f"run-{run}", s3, ref, args.kills_per_run, rng)
            total.kills += t.kills
            total.resumes += t.resumes
            total.exact_resumes += t.exact_resumes
            total.problems += [f"run {run}: {p}" for p in t.problems]
            if not (t.final_exact and t.losses_exact):
                total.problems.append(f"run {run}: final weights or losses differ from the reference")
            print(f"run {run}: {t.kills} kills, {t.exact_resumes}/{t.resumes} exact resumes, "
                  f"final {'exact' if t.final_exact and t.losses_exact else 'DIFFERENT'}", flush=True)
        total.final_exact = total.losses_exact = not total.problems
    server.stop()
    print(f"\nchaos: {total.kills} kills over {run} runs in {time.monotonic() - started:.0f}s; "
          f"{total.exact_resumes}/{total.resumes} resumes exact; "
          f"{'ALL EXACT' if total.ok else 'PROBLEMS: ' + '; '.join(total.problems)}")
    return 0 if total.ok else 1


if __name__ == "__main__":
    sys.exit(main())
