"""`python -m lora_operator` is `lora-operator`."""

import sys

from lora_operator.cli import main

sys.exit(main())
