"""GPU stats for logs (lora_trainer.gpustats): pure formatting from plain data, and nothing on the CPU.

Behaviours tested:
- a sample becomes metrics.jsonl columns in MiB (and percent when NVML answered) and a train.log
  suffix in GiB; without utilisation the percent is left out, not invented;
- on the CPU there is no sample, no column and no log text; RunLogs rows and the progress log line
  are unchanged without GPU stats and carry them when given.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from lora_trainer.config import S3Config
from lora_trainer.gpustats import GIB, MIB, log_text, metrics_fields, sample
from lora_trainer.progress import ProgressReporter
from lora_trainer.storage import open_store
from lora_trainer.tblog import METRICS_FILE, RunLogs

FULL = {"allocated": 10.25 * GIB, "reserved": 12 * GIB, "peak": 11 * GIB, "total": 24 * GIB, "util": 87.0}
NO_NVML = {k: v for k, v in FULL.items() if k != "util"}


@pytest.mark.parametrize(("stats", "fields", "text"), [
    (FULL, {"gpu_mem_allocated_mib": 10496.0, "gpu_mem_reserved_mib": 12288.0, "gpu_mem_peak_mib": 11264.0,
            "gpu_mem_total_mib": 24576.0, "gpu_util_percent": 87.0},
     "gpu 87% mem 10.2/24.0 GiB peak 11.0 GiB"),
    (NO_NVML, {"gpu_mem_allocated_mib": 10496.0, "gpu_mem_reserved_mib": 12288.0, "gpu_mem_peak_mib": 11264.0,
               "gpu_mem_total_mib": 24576.0},
     "gpu mem 10.2/24.0 GiB peak 11.0 GiB"),
    ({"allocated": 3 * MIB, "reserved": 4 * MIB, "peak": 5 * MIB, "total": 80 * GIB},
     {"gpu_mem_allocated_mib": 3.0, "gpu_mem_reserved_mib": 4.0, "gpu_mem_peak_mib": 5.0, "gpu_mem_total_mib": 81920.0},
     "gpu mem 0.0/80.0 GiB peak 0.0 GiB"),
    (None, {}, ""),
])
def test_formatting(stats: dict | None, fields: dict, text: str) -> None:
    assert metrics_fields(stats) == fields
    assert log_text(stats) == text


def test_cpu_has_no_sample() -> None:
    assert sample(torch.device("cpu")) is None


def test_rows_and_log_lines_carry_gpu_stats_only_when_given(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logs = RunLogs(tmp_path / "logs", open_store(str(tmp_path / "out"), S3Config()), resume_step=0)
    logs.scalar(1, 0.5, 1e-4, 1.0, extra=metrics_fields(None))
    logs.scalar(2, 0.4, 1e-4, 1.0, extra=metrics_fields(FULL))
    logs.close()
    rows = [json.loads(line) for line in (tmp_path / "logs" / METRICS_FILE).read_text().splitlines()]
    assert sorted(rows[0]) == ["grad_norm", "loss", "lr", "step", "time"]
    assert rows[1]["gpu_mem_peak_mib"] == 11264.0 and rows[1]["gpu_util_percent"] == 87.0

    reporter = ProgressReporter(total=2, every=1, tty=False)
    with caplog.at_level(logging.INFO, logger="lora_trainer.progress"):
        reporter.update(1, 0.5, note=log_text(None))
        reporter.update(2, 0.4, note=log_text(FULL))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].endswith("s") and "gpu" not in lines[0]
    assert lines[1].endswith(" gpu 87% mem 10.2/24.0 GiB peak 11.0 GiB")
