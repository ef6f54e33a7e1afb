"""`lora-train`: train a LoRA from a YAML config, or auto-caption a dataset.

    lora-train --config my.yaml [--set key=value ...]     train (config also from $LORA_TRAIN_CONFIG)
    lora-train label --data-dir DIR --model PATH          caption images into metadata.csv

Exit codes are the operator contract (see `lora_trainer.errors`): 0 done, 75 preempted,
64-78 bad input (not retried), anything else a failure. User mistakes print one line, no traceback.
With LORA_NPROC_PER_NODE × LORA_NNODES > 1 this process starts the training processes and exits
with the most telling of their codes (`lora_trainer.launch`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lora_trainer import contract
from lora_trainer.config import TrainConfig, load_config, parse_config, parse_yaml
from lora_trainer.errors import EXIT_FAILURE, EXIT_OK, ConfigError, TrainerError
from lora_trainer.paths import shorten

log = logging.getLogger("lora_trainer")


def _setup_logging() -> None:
    # Library chatter (progress bars, optional-backend warnings) is not for the operator's logs.
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(var, value)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "PIL", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_overrides(pairs: Sequence[str]) -> dict[str, object]:
    """`key=value` pairs with YAML-typed values (`--set max_train_steps=10`)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {shorten(repr(pair))}: expected key=value, e.g. --set max_train_steps=100")
        out[key.strip()] = parse_yaml(value, f"--set {shorten(key.strip())}")
    return out


def resolve_config(path: str | None, overrides: dict[str, object]) -> TrainConfig:
    """The config from --config, else from $LORA_TRAIN_CONFIG (JSON or YAML text)."""
    if path:
        return load_config(path, overrides)
    raw = os.environ.get(contract.ENV_CONFIG)
    if not raw:
        raise ConfigError(f"no config: pass --config FILE or set {contract.ENV_CONFIG}")
    data = parse_yaml(raw, contract.ENV_CONFIG)
    if isinstance(data, dict):
        data.update(overrides)
    return parse_config(data, source=contract.ENV_CONFIG)


def write_termination(reason: str, message: str, step: int | None = None, checkpoint: str | None = None) -> None:
    """Write the termination message JSON where Kubernetes (or $LORA_TERMINATION_LOG) reads it."""
    path = Path(os.environ.get(contract.ENV_TERMINATION_LOG) or contract.DEFAULT_TERMINATION_LOG)
    body = contract.TerminationMessage(reason=reason, step=step, checkpoint=checkpoint, message=message[:3000])
    try:
        path.write_text(body.model_dump_json())
    except OSError:
        pass  # outside a pod /dev/termination-log does not exist; the log line says the same


def cmd_train(args: argparse.Namespace) -> int:
    """Run (or resume) training to the end."""
    from lora_trainer.signals import StopFlag

    stop = StopFlag().install()
    overrides = parse_overrides(args.set or [])
    if args.allow_config_change:
        overrides["allow_config_change"] = True
    config = resolve_config(args.config, overrides)
    from lora_trainer import launch

    if plan := launch.launch_plan(os.environ):  # several processes: this one starts and watches them
        return launch.launch(plan, args.argv, config.preemption_grace_seconds, stop)
    from lora_trainer.train import Trainer  # torch import is slow; config errors come first

    config_dir = Path(args.config).parent if args.config else None
    result = Trainer(config, stop, config_dir=config_dir).run()
    log.info("done: step %d/%d, outputs in %s", result.step, result.total_steps, result.output)
    write_termination("Completed", f"trained {result.step} steps", step=result.step)
    return EXIT_OK


def cmd_label(args: argparse.Namespace) -> int:
    """Caption uncaptioned images with a local BLIP model."""
    from lora_trainer.label import label_dataset

    report = label_dataset(Path(args.data_dir), Path(args.model), overwrite=args.overwrite)
    log.info("labeled %d, kept %d, of %d images", report.labeled, report.kept, report.total)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The CLI: training by default, `label` as a subcommand."""
    parser = argparse.ArgumentParser(prog="lora-train", description="LoRA fine-tuning for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train a LoRA (the default)")
    for p in (parser, train):
        p.add_argument("--config", help="YAML config (snake_case or camelCase keys)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
        p.add_argument(
            "--allow-config-change", action="store_true",
            help="resume even if training-defining fields changed since the checkpoint",
        )
    label = sub.add_parser("label", help="auto-caption images into metadata.csv with a local BLIP model")
    label.add_argument("--data-dir", required=True)
    label.add_argument("--model", required=True, help="folder of a BLIP captioning model")
    label.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lora-train`; returns the process exit code."""
    _setup_logging()
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the workers of a launch run with
    from lora_trainer.launch import worker_exit, worker_setup

    worker_setup()  # a no-op unless this process is one of several (lora_trainer.distributed)
    return worker_exit(_dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return cmd_label(args) if args.command == "label" else cmd_train(args)
    except TrainerError as exc:
        log.error("%s: %s", exc.reason, exc.message)
        write_termination(exc.reason, exc.message, exc.step, exc.checkpoint)
        return exc.exit_code
    except Exception as exc:  # a bug, not a user mistake: keep the traceback for whoever debugs it
        log.exception("unexpected error")
        write_termination("TrainingFailed", f"{type(exc).__name__}: {exc}")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
