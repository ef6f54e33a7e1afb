"""`python -m lora_trainer` is `lora-train`."""

import sys

from lora_trainer.cli import main

sys.exit(main())
