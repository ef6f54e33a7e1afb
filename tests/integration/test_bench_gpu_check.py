"""bench/gpu/check.py smoke test on the CPU: the CUDA-options check runs end to end and reports.

Behaviours tested: with `--device cpu` two variants (plain, and gradient checkpointing with both
text encoders) train the tiny SDXL, stop, resume and PASS bit-exactly; the JSON names each variant,
its settings and exact resume; an unavailable adamw8bit is reported SKIP, not failed; an unknown
variant is refused.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "bench" / "gpu" / "check.py"


def test_cpu_smoke_run_passes_and_reports(tmp_path: Path) -> None:
    variants = "fp32,gc" if importlib.util.find_spec("bitsandbytes") else "fp32,gc,adamw8bit"
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(CHECK), "--device", "cpu", "--variants", variants, "--steps", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASS: every variant that ran resumed bit-exactly" in proc.stdout
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["fp32"]["result"] == rows["gc"]["result"] == "PASS"
    assert rows["gc"]["settings"] == {"gradient_checkpointing": True, "train_text_encoder": True}
    assert rows["gc"]["exact_resume"] is True and sorted(rows["gc"]["losses"]) == ["1", "2"]
    assert rows["fp32"]["peak_gpu_mib"] is None  # no GPU columns on the CPU
    if "adamw8bit" in rows:
        assert rows["adamw8bit"]["result"] == "SKIP" and "bitsandbytes" in rows["adamw8bit"]["why"]


def test_unknown_variant_is_refused() -> None:
    proc = subprocess.run([sys.executable, str(CHECK), "--device", "cpu", "--variants", "fp64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown variants ['fp64']" in proc.stderr
