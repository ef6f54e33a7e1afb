"""A training step that really runs out of memory ends with exit 71 and the advice (lora_trainer.oom).

Behaviours tested: `lora-train` on the tiny SD, in a child process whose address space is capped
(RLIMIT_AS) a little above what the loaded model needs, with a batch whose first VAE activation
alone is over the cap (8 images at 1024 px): the allocator's real failure inside the step exits 71,
the termination message has reason OutOfMemory and names batch_size, resolution, lora_rank and
gradient_accumulation_steps with this run's values, and stderr carries the same single line (no
traceback). The cap keeps the test from using the machine's memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from lora_trainer.errors import EXIT_OOM

# The child imports everything first, then caps its address space at what it has plus HEADROOM
# (enough to load the tiny model and read the data), then runs the CLI.
CHILD = """
import resource, sys
from lora_trainer import cli
import lora_trainer.train  # noqa: F401  (torch, diffusers, peft: imported before the cap)
size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
limit = size + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(cli.main(["--config", sys.argv[1]]))
"""
HEADROOM = 700 * 1024 * 1024  # a 8x32x1024x1024 fp32 activation alone is 1 GiB


def test_a_step_out_of_memory_exits_71_with_the_remedies(tiny_sd: Path, tiny_data: Path, tmp_path: Path) -> None:
    config = {
        "base_model": str(tiny_sd), "train_data_dir": str(tiny_data), "output_dir": str(tmp_path / "out"),
        "resolution": 1024, "batch_size": 8, "gradient_accumulation_steps": 2, "lora_rank": 4,
        "max_train_steps": 2, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "device": "cpu",
        "cache_dir": str(tmp_path / "cache"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    term = tmp_path / "termination.json"
    env = {**os.environ, "LORA_TERMINATION_LOG": str(term), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(HEADROOM)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == EXIT_OOM, proc.stderr[-2000:]
    message = json.loads(term.read_text())
    assert (message["reason"], message["step"]) == ("OutOfMemory", 0)
    for needle in ("out of memory on cpu during step 1", "lower batch_size (now 8, e.g. 4)",
                   "raise gradient_accumulation_steps (now 2, e.g. 4) to keep the effective batch of 16",
                   "lower resolution (now 1024, e.g. 768)", "lower lora_rank (now 4, e.g. 2)",
                   "set gradient_checkpointing: true"):
        assert needle in message["message"], message["message"]
    assert "Traceback" not in proc.stderr
    assert "OutOfMemory: out of memory on cpu during step 1" in proc.stderr
