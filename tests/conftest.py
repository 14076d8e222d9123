"""Shared fixtures: tiny checkpoints in the official layout, built once per test session, and the shipped
face photograph."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FACE_PHOTO = REPO / "runtime" / "assets" / "astronaut.jpg"


@pytest.fixture(autouse=True)
def no_hub_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no Hugging Face cache but the ones they make: a developer's own cache (or one a test left behind)
    must not decide which towers a checkpoint resolves to."""
    empty = tmp_path_factory.getbasetemp() / "no-hub-cache"
    monkeypatch.setenv("HF_HOME", str(empty / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(empty / "xdg-cache"))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)


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


@pytest.fixture(scope="module")
def pipeline(tiny_bundle: Path):
    """The tiny bundle opened for exact comparisons, one per test module: FP32 vision on ONNX Runtime, the F32 GGUF
    with an F32 cache and exact attention in llama.cpp (as the export's parity measures the GGUF)."""
    from facellava.runtime.pipeline import Pipeline

    opened = Pipeline.open(tiny_bundle, vision="onnxruntime", llm="f32", kv_type="f32", flash_attn=False)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def front_end():
    """The face front end (MediaPipe graphs), one per test module."""
    from facellava.runtime.face import FaceFrontEnd

    with FaceFrontEnd() as opened:
        yield opened


@pytest.fixture(scope="module")
def photo(face_photo: Path):
    """The shipped photograph as RGB uint8."""
    from facellava.runtime.face import load_image

    return load_image(face_photo)


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


# --- a sentinel directory outside a bundle, watched by an audit hook -----------------------------------------

_WATCHED: list[tuple[Path, list[str]]] = []


def _audit(event: str, args: tuple) -> None:
    # every Python-level open, listing, rename and removal of a path under a watched directory is recorded
    if not _WATCHED or not event.startswith(("open", "os.", "shutil.")):
        return
    for arg in args:
        if isinstance(arg, str | bytes | os.PathLike):
            name = os.fsdecode(arg)
            # an open follows a symlink; a rename or removal acts on the link itself
            path = os.path.realpath(name) if event == "open" else os.path.join(
                os.path.realpath(os.path.dirname(name) or "."), os.path.basename(name))
            for root, seen in _WATCHED:
                if path.startswith(str(root)):
                    seen.append(f"{event} {path}")


sys.addaudithook(_audit)


class Sentinel:
    """A directory outside the bundle holding valid model files an attacker wants loaded, hashed or deleted."""

    def __init__(self, path: Path, bundle: Path):
        self.path = path
        path.mkdir()
        shutil.copyfile(bundle / "llm-f32.gguf", path / "victim.gguf")
        shutil.copyfile(bundle / "vision_image.onnx", path / "victim.onnx")
        (path / "secret.txt").write_text("SECRET-CONTENT " * 40)
        self.before = self.snapshot()
        self.events: list[str] = []

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(self.path.iterdir())}

    def __enter__(self) -> Sentinel:
        _WATCHED.append((Path(os.path.realpath(self.path)), self.events))
        return self

    def __exit__(self, *exc) -> None:
        _WATCHED.clear()
        assert self.snapshot() == self.before, "a file outside the bundle was changed"
        assert not self.events, self.events



@pytest.fixture(scope="session")
def make_sentinel():
    """`make_sentinel(path, bundle)`: a Sentinel directory; `with sentinel:` asserts nothing in it was touched."""
    return Sentinel
