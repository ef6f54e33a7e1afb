"""The trainer's exception tree and the exit codes the operator reads.

    TrainerError                 exit 1   a failure; the operator retries it against backoffLimit
    ├── StorageUnavailable       exit 3   the object store stayed down past the retries (retryable)
    │   └── StorageRejected      exit 77  the store refused us for good: no such bucket, bad
    │                                     credentials (EX_NOPERM; in lora_trainer.storage; never
    │                                     retried by the trainer nor by the operator)
    ├── Preempted                exit 75  stopped on SIGTERM after committing a checkpoint
    └── UserError                         bad input: never retried (64-78 other than 75)
        ├── ConfigError          exit 78  a config field is wrong (EX_CONFIG)
        ├── DatasetError         exit 65  the dataset cannot be trained on (EX_DATAERR)
        ├── InputMissing         exit 66  base model or dataset not found (EX_NOINPUT)
        ├── OutOfMemory          exit 71  a training step ran out of GPU or host memory; the
        │                                 message names the settings to lower (EX_OSERR; oom.py)
        ├── ResumeRefused        exit 65  checkpoints exist but none is usable (verifies and
        │                                 loads), or they were made with a config that changes training
        └── StaleAttempt         exit 73  a newer attempt owns the output (fencing, EX_CANTCREAT)

With several training processes the launcher exits with the most telling of its workers' codes,
in this order: 64-78 but 75, any other failure, 75, a signal (128 + it), 0 (lora_trainer.launch).

Every error carries a `reason` (CamelCase, goes to the termination message and the job status)
and a one-line message that names the field or file, the value, and the fix.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_STORAGE = 3
EXIT_DATAERR = 65
EXIT_NOINPUT = 66
EXIT_OOM = 71
EXIT_CANTCREAT = 73
EXIT_NOPERM = 77
EXIT_PREEMPTED = 75
EXIT_CONFIG = 78


class TrainerError(Exception):
    """Base of every error the trainer reports on purpose."""

    exit_code: int = EXIT_FAILURE
    reason: str = "TrainingFailed"

    def __init__(
        self, message: str, *, reason: str | None = None, step: int | None = None, checkpoint: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.step = step  # for the termination message: where training stood
        self.checkpoint = checkpoint  # URI of the newest committed checkpoint, if known
        if reason is not None:
            self.reason = reason


class StorageUnavailable(TrainerError):
    exit_code = EXIT_STORAGE
    reason = "StorageUnavailable"


class Preempted(TrainerError):
    exit_code = EXIT_PREEMPTED
    reason = "Preempted"


class UserError(TrainerError):
    """A mistake in the input that retrying cannot fix."""


class ConfigError(UserError):
    exit_code = EXIT_CONFIG
    reason = "InvalidConfig"


class DatasetError(UserError):
    exit_code = EXIT_DATAERR
    reason = "InvalidDataset"


class InputMissing(UserError):
    exit_code = EXIT_NOINPUT
    reason = "InputMissing"


class OutOfMemory(UserError):
    """The same settings on the same hardware run out again at the same step: not retried."""

    exit_code = EXIT_OOM
    reason = "OutOfMemory"


class ResumeRefused(UserError):
    exit_code = EXIT_DATAERR
    reason = "ResumeRefused"


class StaleAttempt(UserError):
    exit_code = EXIT_CANTCREAT
    reason = "StaleAttempt"
