"""Shared fixtures: real servers on 127.0.0.1 (moto S3, the Kubernetes API emulator)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["tests.support.s3", "tests.support.kube", "tests.support.tiny", "tests.support.ddp"]
