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


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported for the runtime: FP32 vision graphs (image and video, with and without
    landmarks) and the F32 GGUF."""
    from facellava.export.llm import export_llm_bundle
    from facellava.export.vision import export_vision

    bundle = tmp_path_factory.mktemp("bundle") / "tiny"
    export_vision(tiny_checkpoint, bundle, precisions=("fp32",), progress=False)
    export_llm_bundle(tiny_checkpoint, bundle, types=("f32",), progress=False)
    return bundle


def write_video(path: Path, frames: int, photo: Path = FACE_PHOTO) -> Path:
    """A small mp4 of the face photograph drifting a few pixels per frame."""
    import cv2
    import numpy as np

    image = cv2.imread(str(photo))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 24, (image.shape[1], image.shape[0]))
    for i in range(frames):
        shift = np.float32([[1, 0, 2 * i], [0, 1, i]])
        writer.write(cv2.warpAffine(image, shift, (image.shape[1], image.shape[0]), borderMode=cv2.BORDER_REFLECT))
    writer.release()
    return path
