"""`python -m lora_trainer.demo`: build the tiny model and dataset, train a LoRA locally, show the outputs.

This is the trainer on its own (no Kubernetes); `make demo` runs the full operator demo when the
dev cluster is available (see lora_operator.demo).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lora_trainer import contract
from lora_trainer.config import load_config
from lora_trainer.tiny import build_tiny_dataset, build_tiny_sd
from lora_trainer.train import Trainer

EXAMPLE = Path("examples/train/tiny.yaml")


def main() -> int:
    """Run the tiny example config end to end and print where the outputs are."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(EXAMPLE)
    build_tiny_sd(Path(config.base_model))
    build_tiny_dataset(Path(config.train_data_dir))
    result = Trainer(config).run()
    out = Path(config.output_dir)
    print(f"\ntrained {result.step} steps; outputs in {out}/")
    for name in (contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA, contract.CONFIG_BACKUP, "logs/", "checkpoints/"):
        print(f"  {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
