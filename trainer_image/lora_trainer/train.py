"""The training run: set up, resume, loop, checkpoint, export — top to bottom.

Training works in a local scratch folder; everything durable goes to the output store (a local
folder or s3://) through the background uploader, so the loop rarely waits on the network.
On SIGTERM the loop finishes the current optimizer step, commits a checkpoint within the grace
budget and raises `Preempted` (exit 75).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_trainer import checkpoint, contract, determinism, distributed, gpustats, interval, state
from lora_trainer.architectures import read_lm_config
from lora_trainer.cache import EncodeCache, cache_kinds
from lora_trainer.config import (
    TrainConfig,
    bounded_s3,
    config_hash,
    dump_config,
    place_problems,
    resolve_local_paths,
    training_fields,
)
from lora_trainer.contract import Progress
from lora_trainer.data import Position
from lora_trainer.dataset import Dataset, open_dataset
from lora_trainer.errors import ConfigError, DatasetError, InputMissing, Preempted, ResumeRefused, UserError
from lora_trainer.fetch import fetch_file
from lora_trainer.model import pick_device
from lora_trainer.oom import oom_advice
from lora_trainer.paths import shorten
from lora_trainer.progress import ProgressReporter
from lora_trainer.signals import StopFlag
from lora_trainer.single_file import convert_single_file, is_single_file
from lora_trainer.steps import (
    evaluate,
    make_lr_scheduler,
    make_optimizer,
    optimizer_class,
    total_steps,
    train_step,
)
from lora_trainer.storage import Store, fetch_tree, open_store, parse_uri
from lora_trainer.storeproc import StoreProcess, commit_checkpoint, open_upload_store
from lora_trainer.tasks import (
    Family,
    FamilyInfo,
    Parts,
    check_task,
    detect,
    intermediate_files,
    load_family,
    with_family_defaults,
)
from lora_trainer.tblog import RunLogs
from lora_trainer.uploader import BackgroundUploader, Job, retry_storage
from lora_trainer.workdir import prepare_work_dir

log = logging.getLogger(__name__)

PROGRESS_EVERY_SECONDS = 5.0


def file_sha256(path: Path) -> str:
    """sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class RunResult:
    """What a finished run produced."""

    step: int
    total_steps: int
    losses: dict[int, float] = field(default_factory=dict)
    resumed_from: int | None = None
    output: str = ""


def cache_root(config: TrainConfig) -> Path:
    """The local cache: cache_dir, else $LORA_CACHE_DIR (the operator's scratch volume), else ~/.cache."""
    return Path(config.cache_dir or os.environ.get(contract.ENV_CACHE_DIR) or Path.home() / ".cache/lora-trainer")


def scratch_root(config: TrainConfig) -> Path:
    """Local scratch for this output: work_dir, or a folder under the cache."""
    if config.work_dir:
        return Path(config.work_dir)
    return cache_root(config) / "work" / config_hash(config)[:16]


def run_identity() -> tuple[str, int]:
    """(LORA_RUN_ID, LORA_ATTEMPT) when the operator names the run, else ("", 0)."""
    run = os.environ.get(contract.ENV_RUN_ID, "")
    raw = os.environ.get(contract.ENV_ATTEMPT, "")
    return (run, int(raw)) if run and raw.isdigit() else ("", 0)


def resolve_attempt(store: Store) -> int:
    """The fencing attempt: LORA_ATTEMPT continued across runs (LORA_RUN_ID, see
    checkpoint.fence_attempt), else LORA_ATTEMPT, else one more than the newest in the output."""
    raw = os.environ.get(contract.ENV_ATTEMPT)
    if not raw:
        return checkpoint.next_attempt(store)
    try:
        attempt = int(raw)
    except ValueError:
        raise ConfigError(f"{contract.ENV_ATTEMPT}: {raw!r} is not an integer attempt number") from None
    run = os.environ.get(contract.ENV_RUN_ID, "")
    return checkpoint.run_fence(store, run, attempt) if run else attempt


class Trainer:
    """One attempt of a training run against one output."""

    def __init__(self, config: TrainConfig, stop: StopFlag | None = None, config_dir: Path | None = None):
        # Relative local paths: from the current directory, else from the config file's folder.
        config = resolve_local_paths(config, Path.cwd(), config_dir)
        self.config = config
        self.stop = stop or StopFlag()
        self.s3 = bounded_s3(config.s3, config.storage_retry_seconds)  # no call outlives the deadline much
        self.store = open_store(config.output_dir, self.s3)
        self.scratch = scratch_root(config)
        self.hash = config_hash(config)
        self.fields = training_fields(config)
        self.cache: EncodeCache | None = None  # set when the run caches model inputs
        self.init_sha: str | None = None  # sha256 of the init_lora file, once fetched
        self.world = distributed.SINGLE  # joined at the start of the run (several processes: distributed.py)

    def _retrying(self, label: str, fn):
        """Start-up storage calls ride out a flaky store like background uploads do."""
        return retry_storage(label, fn, self.config.storage_retry_seconds)

    def _fetch(self, field_name: str, uri: str, cache: Path, refuse: type[UserError]) -> Path:
        try:
            return self._retrying(f"fetching {field_name}", lambda: fetch_tree(uri, cache, self.s3, refuse))
        except (InputMissing, DatasetError) as exc:
            raise type(exc)(f"{field_name}: {exc.message}") from None

    def _check_places(self) -> None:
        """Outputs apart from inputs (symlinks resolved), and output_dir a folder or creatable."""
        if problems := place_problems(self.config, resolve=True):
            raise ConfigError(problems[0])
        out = parse_uri(self.config.output_dir).path
        if out is None:
            return
        existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
        if not existing.is_dir():
            raise ConfigError(
                f"output_dir: {shorten(str(existing))} is a file, not a folder; "
                "point output_dir at a new or existing folder"
            )

    def _fetch_file(self, field_name: str, uri: str, cache: Path) -> Path:
        try:
            return self._retrying(f"fetching {field_name}", lambda: fetch_file(uri, cache, self.s3))
        except InputMissing as exc:
            raise InputMissing(f"{field_name}: {exc.message}") from None

    def _model_dir(self, model: Path, cache: Path) -> tuple[Path, FamilyInfo]:
        """The diffusers folder to load (the base model itself, or its single file converted once)
        and its family, detected through the task registry (model_family insists on one).

        The config takes the family's defaults for what it leaves unset (resolution), and the
        training fields and hash are taken again from it; a single file's sha256 joins them, so
        resume refuses a changed file."""
        c = self.config
        if not model.is_file():
            if c.base_model_config:
                log.warning("base_model_config is only used with a single-file base_model; ignoring it")
            folder, info, sha = model, detect(model, c.model_family, c.task), None
        else:
            config_dir = (self._fetch("base_model_config", c.base_model_config, cache, InputMissing)
                          if c.base_model_config else None)
            folder, sha, info = convert_single_file(model, c.base_model, config_dir, cache_root(c), c.model_family)
            check_task(info, c.task, c.base_model)
        lm = read_lm_config(folder) if info.data == "text" else None
        self.config = c = with_family_defaults(c, info, lm.model_type if lm else None)
        self.fields, self.hash = training_fields(c, sha, self.init_sha), config_hash(c, sha, self.init_sha)
        return folder, info

    def _fetch_data(self, field_name: str, uri: str, single_file: bool) -> Path:
        """A dataset input in the local cache (a folder, or one file); errors name the field."""
        cache = cache_root(self.config) / "inputs"
        if single_file:
            return self._fetch_file(field_name, uri, cache)
        return self._fetch(field_name, uri, cache, DatasetError)

    def _prepare(self) -> tuple[Family, Parts, list, Dataset, int]:
        # Inputs live in the cache, not under work_dir: a pod's root filesystem is read-only and
        # only the cache (an emptyDir) is writable; a second attempt on the node reuses them.
        cache = cache_root(self.config) / "inputs"
        c = self.config
        init = self._fetch_init_lora(cache) if c.init_lora else None  # a missing file fails before the model loads
        if is_single_file(c.base_model):
            model = self._fetch_file("base_model", c.base_model, cache)
        else:
            model = self._fetch("base_model", c.base_model, cache, InputMissing)
        model_dir, info = self._model_dir(model, cache)  # the family fills in what the config left unset
        c = self.config
        data = open_dataset(info.data, c, model_dir, self._fetch_data)  # checked before the model loads
        family = load_family(info)
        parts = family.load(model_dir, c)
        params = family.add_lora(parts, c)
        if init is not None:
            self._load_init_lora(family, parts, init)
        return family, parts, params, data, total_steps(c, data.size, self.world.size)

    def _fetch_init_lora(self, cache: Path) -> Path:
        """The init_lora file in the local cache; its sha256 joins the training fields (set in _model_dir)."""
        path = self._fetch_file("init_lora", self.config.init_lora, cache)
        self.init_sha = file_sha256(path)
        return path

    def _load_init_lora(self, family: Family, parts: Parts, path: Path) -> None:
        """Start from the init_lora file: the family copies it into the adapters add_lora made."""
        load = getattr(family, "load_lora", None)
        if load is None:
            raise ConfigError(f"init_lora: the {family.info.title} family cannot start from a LoRA file yet; remove init_lora")
        load(parts, self.config, path)

    def run(self) -> RunResult:
        """Train to the end (or until stopped) and return what was done."""
        # Background uploads go through their own store (for S3, a child process: see storeproc);
        # started first so its start-up overlaps loading the model.
        self._check_places()  # before anything is created, deleted or started
        uploads = (open_upload_store(self.config.output_dir, self.s3) if distributed.is_main_process()
                   else distributed.DiscardStore(self.config.output_dir))  # rank 0 alone writes the output
        try:
            return self._run(uploads)
        finally:
            if isinstance(uploads, StoreProcess):
                uploads.close()

    def _run(self, uploads: Store) -> RunResult:
        c = self.config
        optimizer_class(c)  # a missing optional optimizer stops the run before the model loads
        rate = interval.read_rate(os.environ) if c.save_steps == interval.AUTO else None  # a bad one too (78)
        device_type = pick_device(c.device).type
        determinism.apply(determinism.settings_for(device_type, c.determinism))  # before CUDA starts
        world = self.world = distributed.join(device_type)  # a world of one unless launched as a worker
        self.scratch = distributed.scratch_for(self.scratch, world)
        with world.local_first():
            # Stale scratch from a killed attempt is never trusted; a folder that is not ours is refused.
            prepare_work_dir(self.scratch, "work_dir" if c.work_dir else "cache_dir")
        log.info("determinism %s on %s: %s", c.determinism, device_type, determinism.guarantee(c.determinism, device_type))
        record = determinism.reproducibility_record(c.determinism, device_type, determinism.library_versions())
        torch.manual_seed(c.seed)
        with world.local_first():  # local rank 0 fills the input caches, then the others read them
            family, parts, params, data, steps = self._prepare()  # bad inputs fail before the output is touched
        world.broadcast_params(params)
        stream = world.shard(data.stream)
        c = self.config  # with the family's defaults: what is hashed, checked and backed up
        kinds = cache_kinds(c.cache_latents, c.cache_text_embeddings, family.cacheable(c))
        attempt = 0
        if world.is_main:  # rank 0 fences and claims for the world
            attempt = self._retrying("resolving the attempt", lambda: resolve_attempt(self.store))
            self._retrying("claiming the output", lambda: checkpoint.claim_attempt(self.store, attempt, *run_identity()))
        attempt = world.broadcast_int(attempt)
        optimizer = make_optimizer(params, c)
        lr_scheduler = make_lr_scheduler(optimizer, c, steps)
        use_scaler = parts.device.type == "cuda" and c.mixed_precision == "fp16"
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        trained = family.trainable(parts, c)  # the modules whose LoRA weights a checkpoint holds

        step, resumed_from = 0, None
        load = lambda folder: state.load_state(folder, trained, optimizer, lr_scheduler, scaler, world.rank)  # noqa: E731
        resumed = None
        if world.is_main:  # rank 0 picks the checkpoint; the others load the same step
            resumed = self._retrying("looking for checkpoints", lambda: self._resume(load, steps))
        chosen = world.broadcast_int(resumed[0].step if resumed else -1)
        if not world.is_main and chosen >= 0:
            resumed = self._retrying("loading the checkpoint", lambda: self._resume(load, steps, only=chosen))
        if resumed is not None:
            resumable, ts = resumed
            step, resumed_from = ts.step, ts.step
            stream.position = Position(ts.epoch, ts.index)
            if changes := determinism.record_changes(ts.reproducibility, record):
                log.warning("attempt %d: checkpoint step %d was made with %s; the resumed run may differ in its last "
                            "bits from an uninterrupted one", attempt, step, ", ".join(changes))
            log.info("attempt %d: resumed from step %d (checkpoint of attempt %d)", attempt, step, resumable.attempt)
        else:
            log.info("attempt %d: starting at step 0 of %d", attempt, steps)

        logs = RunLogs(self.scratch / contract.LOGS_DIR, uploads, resume_step=step)
        uploader = BackgroundUploader(retry_deadline=c.storage_retry_seconds)
        self.cache = EncodeCache(kinds, self.store, self.scratch, lambda key, path: uploader.submit(
            f"cache {key}", lambda: uploads.put_file(key, path))) if kinds else None
        backup = dump_config(c).encode()
        uploader.submit("config backup", lambda: uploads.put_bytes(contract.CONFIG_BACKUP, backup))
        reporter = ProgressReporter(total=steps, start=step, every=c.log_every)
        result = RunResult(step=step, total_steps=steps, resumed_from=resumed_from, output=c.output_dir)
        last_committed = resumed_from
        last_progress = 0.0

        def snapshot(at: int) -> Job | None:
            nonlocal last_committed
            ranks = distributed.gather_rank_states(world, at, params)  # a collective: every rank
            if not world.is_main:
                last_committed = at
                return
            folder = self.scratch / "checkpoints" / checkpoint.step_dir_name(at)
            ts = state.TrainerState(
                step=at, epoch=stream.position.epoch, index=stream.position.index,
                attempt=attempt, config_hash=self.hash, reproducibility=record,
            )
            state.save_state(folder, ts, trained, optimizer, lr_scheduler, scaler, ranks)
            loras = intermediate_files(family, parts, c, self.scratch, at)
            logs.flush()

            def commit() -> None:
                # Logs first: a committed checkpoint must find its steps' losses in the stored logs,
                # since an attempt resuming from it never re-runs (or re-logs) those steps.
                logs.upload()
                for path, name in loras:
                    uploads.put_file(name, path)
                commit_checkpoint(uploads, folder, at, attempt, self.hash, self.fields, c.keep_last, world.size)
                shutil.rmtree(folder, ignore_errors=True)

            job = uploader.submit(f"checkpoint step {at}", commit)
            last_committed = at
            return job

        def progress(state_name: str) -> None:
            p = Progress(
                step=step, total_steps=steps, epoch=stream.position.epoch, loss=reporter.last_loss,
                steps_per_second=reporter.rate, eta_seconds=reporter.eta, attempt=attempt,
                tokens_per_second=reporter.token_rate,
                state=state_name, latest_checkpoint_step=last_committed,
            )
            data = p.model_dump_json().encode()
            uploader.submit("progress", lambda: uploads.put_bytes(contract.PROGRESS_FILE, data), coalesce_key="progress")

        # Where checkpoints fall (fixed, or auto: Young/Daly from the preemption rate); never what is trained.
        cadence = interval.Cadence.start(c.save_steps, c.min_save_steps, c.max_save_steps, step, time.monotonic(),
                                         attempt, rate)
        stopping = False
        try:
            while step < steps:
                if stopping := world.any(self.stop.requested):  # every rank stops after the same step
                    break
                # exit 71 naming the settings to lower; exit 78 naming an op without a deterministic kernel
                with oom_advice(c, step + 1, str(parts.device)), determinism.missing_kernel(step + 1, str(parts.device)):
                    out = train_step(family, parts, c, stream, params, optimizer, lr_scheduler, scaler, step, self.cache,
                                     world)
                step += 1
                result.losses[step] = out.loss
                eval_loss = None
                if data.eval_batches and world.is_main and (step == steps or (c.eval_steps and step % c.eval_steps == 0)):
                    with determinism.missing_kernel(step, str(parts.device)):
                        eval_loss = evaluate(family, parts, c, data.eval_batches)
                gpu = gpustats.sample(parts.device)  # None on the CPU: nothing added
                logs.scalar(step, out.loss, out.lr, out.grad_norm, eval_loss=eval_loss, extra=gpustats.metrics_fields(gpu))
                reporter.update(step, out.loss, tokens=out.tokens, note=gpustats.log_text(gpu))
                # The last step is checkpointed too: a run can be extended (more steps) without
                # losing its tail, and a pod lost while exporting resumes with nothing to redo.
                due = cadence.due(step, steps)
                if cadence.auto:  # timed on each rank: rank 0's decision holds, every rank snapshots together
                    due = bool(world.broadcast_int(int(due)))
                if due:
                    began = time.monotonic()
                    commit = snapshot(step)  # None on ranks > 0: rank 0 alone commits
                    cadence.saved(step, began, time.monotonic(), commit.done if commit is not None else None)
                if time.monotonic() - last_progress > PROGRESS_EVERY_SECONDS:
                    progress("running")
                    last_progress = time.monotonic()
            if stopping and step < steps:
                self._preempt(step, last_committed, snapshot, progress, uploader, reporter)
            self._finish(family, parts, logs, uploader, uploads, progress, reporter)
        finally:
            reporter.close()
            logs.close()
            # A pending upload error must not replace the error already on its way out.
            with contextlib.suppress(Exception):
                uploader.close(timeout=0)
        result.step = step
        world.close()
        return result

    def _resume(
        self, load: Callable[[Path], state.TrainerState], steps: int, only: int | None = None
    ) -> tuple[checkpoint.Resumable, state.TrainerState] | None:
        """Load the newest checkpoint that verifies and loads (step `only`, the one rank 0 chose);
        None if there are none at all.

        A state that fails to load, or names an impossible step, is skipped for the previous one
        (logged); ResumeRefused when checkpoints exist but none is usable."""
        problems: list[str] = []
        for found in checkpoint.resumable_checkpoints(self.store, self.scratch / "resume", problems):
            if only is not None and found.step != only:
                continue
            checkpoint.check_compatible(found.manifest, self.fields, allow=self.config.allow_config_change)
            distributed.check_world_size(found.step, found.manifest.world_size, self.world.size,
                                         self.config.allow_world_size_change)
            try:
                ts = load(found.path)
            except state.StateInvalid as exc:
                why = f"its state does not load ({exc})"
            else:
                if (why := state.state_problem(ts, found.step, steps)) is None:
                    return found, ts
            log.warning("checkpoint step %d is not usable: %s; trying the previous one", found.step, why)
            problems.append(f"step {found.step}: {why}")
        if only is not None:  # never train on from another step than rank 0
            raise ResumeRefused(f"checkpoint step {only}, which rank 0 resumes from, is not usable on rank "
                                f"{self.world.rank} ({'; '.join(problems) or 'not found'})")
        if problems:
            raise ResumeRefused(checkpoint.refusal(self.store, problems))
        return None

    def _preempt(self, step, last_committed, snapshot, progress, uploader, reporter) -> None:
        """Commit a checkpoint at `step` within the grace budget, then raise Preempted."""
        target = last_committed
        if step > 0 and last_committed != step:
            snapshot(step)
            target = step
        progress("preempted")
        budget = self.stop.remaining(self.config.preemption_grace_seconds)
        committed = uploader.wait(timeout=budget)
        self.world.barrier()  # the other ranks leave once rank 0 has committed (or given up)
        reporter.close()
        if committed:
            uri = None
            if target is not None:
                uri = f"{self.config.output_dir.rstrip('/')}/{contract.CHECKPOINTS_DIR}/{checkpoint.step_dir_name(target)}"
            log.info("preempted: checkpoint at step %s committed; exiting 75", target)
            raise Preempted(f"stopped on SIGTERM at step {step}; checkpoint committed", step=step, checkpoint=uri)
        log.error("preempted: checkpoint at step %d not committed within %.1fs; the previous one stands", step, budget)
        raise Preempted(
            f"stopped on SIGTERM at step {step}; checkpoint not committed within the grace budget, "
            "the previous committed checkpoint stands",
            step=step,
        )

    def _finish(self, family, parts, logs, uploader, uploads, progress, reporter) -> None:
        """Export the final LoRA in the family's formats, upload everything and wait until durable
        (rank 0; the other ranks wait for it)."""
        if not self.world.is_main:
            self.world.barrier()
            return
        final_dir = self.scratch / "final"
        final_dir.mkdir(parents=True, exist_ok=True)
        finals = family.export(parts, self.config, final_dir)
        logs.flush()
        uploader.submit_files(uploads, finals, label="final weights")
        uploader.submit("logs", logs.upload, coalesce_key="logs")
        progress("finished")
        uploader.wait(timeout=None)
        self.world.barrier()
        log.info("finished: final LoRA written to %s", self.config.output_dir)


def read_losses(metrics_text: str) -> dict[int, float]:
    """Per-step losses from logs/metrics.jsonl (last value wins for a repeated step)."""
    return read_metric(metrics_text, "loss")


def read_metric(metrics_text: str, name: str) -> dict[int, float]:
    """One metric per step from logs/metrics.jsonl (`loss`, `eval_loss`...); steps without it are left out."""
    out: dict[int, float] = {}
    for line in metrics_text.splitlines():
        if line.strip():
            row = json.loads(line)
            if name in row:
                out[int(row["step"])] = float(row[name])
    return out
