"""Shared fixtures: tiny checkpoints in the official layout, built once per test session, and the shipped
face photograph."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FACE_PHOTO = REPO / "runtime" / "assets" / "astronaut.jpg"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny checkpoint: sharded .bin, simple FRGCA, LanguageBind tower directories, seed 0."""
    from facellava.model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    from facellava.model import FaceLlava

    return FaceLlava.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def face_photo() -> Path:
    return FACE_PHOTO
