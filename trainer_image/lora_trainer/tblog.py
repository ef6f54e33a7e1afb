"""Run logs: TensorBoard scalars, logs/metrics.jsonl (step, loss, lr, grad_norm, wall time, and eval_loss
on the steps that measured it) and train.log.

Across resumes they stay on one step axis: earlier train.log and metrics rows are carried over
(metrics past the resumed step are dropped, they will be recomputed), and TensorBoard's
`purge_step` hides events an interrupted attempt wrote after the checkpoint it resumes from.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from lora_trainer import contract
from lora_trainer.storage import Store

METRICS_FILE = "metrics.jsonl"
TRAIN_LOG = "train.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunLogs:
    """Writes the run's logs locally and uploads them under `logs/` in the output."""

    def __init__(self, folder: Path, store: Store, resume_step: int):
        self.folder = folder
        self.store = store
        folder.mkdir(parents=True, exist_ok=True)
        # Always carry over: an attempt that starts at step 0 still finds the logs of one that
        # was stopped before its first checkpoint, and must hide their steps too.
        self._carry_over(resume_step)
        self._metrics = (folder / METRICS_FILE).open("a", encoding="utf-8")
        self._handler = logging.FileHandler(folder / TRAIN_LOG, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(self._handler)
        self._tb = SummaryWriter(log_dir=str(folder), purge_step=resume_step + 1)

    def _remote(self, name: str) -> str:
        return f"{contract.LOGS_DIR}/{name}"

    def _carry_over(self, resume_step: int) -> None:
        for name in (TRAIN_LOG, METRICS_FILE):
            if self.store.exists(self._remote(name)):
                text = self.store.get_bytes(self._remote(name)).decode("utf-8", errors="replace")
                if name == METRICS_FILE:
                    rows = [line for line in text.splitlines() if line.strip()]
                    text = "".join(line + "\n" for line in rows if json.loads(line)["step"] <= resume_step)
                (self.folder / name).write_text(text, encoding="utf-8")

    def scalar(self, step: int, loss: float, lr: float, grad_norm: float, eval_loss: float | None = None,
               extra: Mapping[str, float] | None = None) -> None:
        """Record one optimizer step (and the held-out loss when it was measured at this step); `extra`
        columns (GPU memory and utilisation, gpustats.metrics_fields) go to metrics.jsonl and TensorBoard."""
        self._tb.add_scalar("loss/train", loss, step)
        self._tb.add_scalar("learning_rate", lr, step)
        self._tb.add_scalar("grad_norm", grad_norm, step)
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "time": round(time.time(), 4)}
        if eval_loss is not None:
            self._tb.add_scalar("loss/eval", eval_loss, step)
            row["eval_loss"] = eval_loss
        for name, value in (extra or {}).items():
            self._tb.add_scalar(f"gpu/{name.removeprefix('gpu_')}", value, step)
            row[name] = value
        self._metrics.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        """Make everything written so far visible on disk."""
        self._metrics.flush()
        self._handler.flush()
        self._tb.flush()

    def upload(self) -> None:
        """Copy every log file to the output's logs/ (runs on the uploader thread)."""
        self.flush()
        for path in sorted(self.folder.iterdir()):
            if path.is_file():
                self.store.put_file(self._remote(path.name), path)

    def close(self) -> None:
        """Detach the file handler and close the writers."""
        logging.getLogger().removeHandler(self._handler)
        self._handler.close()
        self._metrics.close()
        self._tb.close()
