"""Images and videos for calibration, benchmarking and evaluation, found in a folder or a Face-LLaVA data JSON,
and read through the runtime's own front end (face crop, landmarks) and preprocessing, as the runtime reads them.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facellava import contract
from facellava.errors import FaceLlavaError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def modality_of(path: str | Path) -> contract.Modality | None:
    """'image' or 'video' from the file's suffix; None for anything else."""
    suffix = Path(path).suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def find_media(source: str | Path, limit: int | None = None, seed: int = 0) -> list[Path]:
    """The images and videos of a folder (searched recursively) or of a Face-LLaVA data JSON (its records'
    `image`/`video` paths, relative to the JSON's folder). With `limit`, a seeded random selection of that many.
    Raises FaceLlavaError when the source does not exist or holds no image or video."""
    source = Path(source)
    if source.is_dir():
        found = sorted(p for p in source.rglob("*") if p.is_file() and modality_of(p))
    elif source.is_file() and source.suffix.lower() == ".json":
        try:
            records = json.loads(source.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FaceLlavaError(f"data file {source} is not valid JSON ({error})") from None
        if not isinstance(records, list):
            raise FaceLlavaError(f"data file {source} must hold a JSON list of records")
        found = []
        for record in records:
            for key in ("image", "video"):
                value = record.get(key) if isinstance(record, dict) else None
                value = value[0] if isinstance(value, list) and value else value
                if isinstance(value, str):
                    found.append(source.parent / value)
    elif source.is_file() and modality_of(source):
        found = [source]
    else:
        raise FaceLlavaError(f"{source} is neither a folder, a data JSON nor an image or video file")
    if not found:
        raise FaceLlavaError(f"{source} holds no image ({', '.join(IMAGE_SUFFIXES)}) or video "
                             f"({', '.join(VIDEO_SUFFIXES)})")
    if limit is not None and limit < len(found):
        found = sorted(random.Random(seed).sample(found, limit))
    return found


@dataclass
class PreparedMedium:
    """One image or video as the vision graph takes it."""

    path: Path
    modality: contract.Modality
    pixel_values: np.ndarray  # [1,3,224,224] or [1,3,8,224,224]
    landmarks: np.ndarray | None  # [1,68,2] or [1,8,68,2], crop pixels / 256


def prepare_media(paths: list[Path], front_end: object | None = None
                  ) -> tuple[list[PreparedMedium], Counter[str]]:
    """Face crop, landmarks and preprocessing of each file with the runtime's front end. Files that cannot be
    read (or hold no face) are skipped and counted by reason, not fatal. Returns (prepared, skipped)."""
    from facellava.runtime import face, preprocess

    own = front_end is None
    front_end = face.FaceFrontEnd() if own else front_end
    prepared, skipped = [], Counter()
    try:
        for path in paths:
            modality = modality_of(path)
            try:
                if modality == "image":
                    crops = [front_end.process_image(face.load_image(path))]
                    pixels = preprocess.preprocess_image(crops[0].crop)
                else:
                    crops = front_end.process_video(face.read_video(path).frames)
                    pixels = preprocess.preprocess_video([c.crop for c in crops])
            except FaceLlavaError as error:
                skipped[str(error).split(":")[0][:60]] += 1
                continue
            landmarks = None
            if all(c.landmarks is not None for c in crops):
                landmarks = np.stack([c.landmarks for c in crops]) if modality == "video" else crops[0].landmarks
                landmarks = landmarks[None].astype(np.float32)
            prepared.append(PreparedMedium(path, modality, pixels[None], landmarks))
    finally:
        if own:
            front_end.close()
    return prepared, skipped
