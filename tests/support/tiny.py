"""Fixtures that build the tiny Stable Diffusion model and dataset once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_trainer.tiny import build_tiny_dataset, build_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x pipeline folder (32 px), built from configs with fixed seeds."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight captioned synthetic images with metadata.csv."""
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "data", n=8)
