"""Calibration sets: face crops made by the runtime's own front end and preprocessing, as vision-graph inputs.

A set comes from a folder of photos and videos (faces are detected and cropped, landmarks found by the face mesh,
exactly as `facellava run` does) or from a Face-LLaVA data JSON (the official face crops, `landmarks_2d` .npy files
in crop pixels; the face mesh fills in where a record has none). Files are taken in a random order fixed by the
seed, up to `limit` samples per modality; files that cannot be used (not an image or video, undecodable, no face)
are skipped and counted by reason, and only a source with nothing usable is an error.

The arrays are cached as .npy files (`<modality>_pixel_values.npy`, `<modality>_landmarks.npy`) beside
`sources.json` (which file each row came from, which files were skipped and why, the request that made the set),
and are read back when the same request comes again. The graph reads them through `CalibrationReader`, the shape of
ONNX Runtime's `CalibrationDataReader`: `get_next()` returns one input feed (batch 1) until it returns None.

Torch-free: numpy, OpenCV, Pillow and MediaPipe, as on the device.

    data = build_calibration_set("faces/", limit=64, seed=0, cache="calib-cache/")
    calib, held_out = data.split("image", held_out=0.25, seed=0)
    reader = data.reader("image", with_landmarks=True, indices=calib)   # quantize_static(..., reader)
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from facellava import contract
from facellava.atomic import staged_directory
from facellava.errors import FaceLlavaError
from facellava.runtime import face
from facellava.runtime.medium import prepare_medium

MODALITIES: tuple[contract.Modality, ...] = ("image", "video")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})
SOURCES_NAME = "sources.json"
# bumped when the arrays a request produces change, so that an older cache is rebuilt rather than reused
CACHE_FORMAT = 1


class CalibrationReader:
    """ONNX Runtime's calibration reader interface over a list of input feeds: `get_next()` returns the next feed
    ({"pixel_values": [1, ...], "landmarks": [1, ...]}) or None when all were given; `rewind()` starts over."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.feeds):
            return None
        self._next += 1
        return self.feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds)


@dataclass
class Sample:
    """One preprocessed image or video: what the vision graph takes for it."""

    source: str  # the file, relative to the set's source
    modality: contract.Modality
    pixel_values: np.ndarray  # [1,3,224,224] or [1,3,8,224,224]
    landmarks: np.ndarray  # [1,68,2] or [1,8,68,2], crop pixels / 256


@dataclass
class CalibrationSet:
    """Preprocessed calibration inputs per modality.

    `pixel_values[m]`: float32 [N, 3, 224, 224] (image) or [N, 3, 8, 224, 224] (video); `landmarks[m]`: float32
    [N, 68, 2] or [N, 8, 68, 2] in crop pixels / 256; `sources[m]`: the file of each row; `skipped`: [{"file",
    "reason"}] for every file that could not be used; `request`: what was asked (source, modalities, limit, seed).
    """

    pixel_values: dict[str, np.ndarray]
    landmarks: dict[str, np.ndarray]
    sources: dict[str, list[str]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    request: dict[str, Any] = field(default_factory=dict)

    def count(self, modality: str) -> int:
        """How many samples of this modality the set holds."""
        return len(self.sources.get(modality, []))

    def skipped_summary(self) -> str:
        """'skipped 2 files: 1 not an image or video file, 1 no face found' (or 'no file skipped')."""
        if not self.skipped:
            return "no file skipped"
        reasons = Counter(_reason_kind(entry["reason"]) for entry in self.skipped)
        return f"skipped {len(self.skipped)} files: " + ", ".join(f"{n} {r}" for r, n in reasons.most_common())

    def split(self, modality: str, held_out: float = 0.25, seed: int = 0) -> tuple[list[int], list[int]]:
        """Row indices (calibration, held out): a seeded random `held_out` fraction (at least one row, and at least
        one left for calibration) is kept apart to check the quantized graph on crops it was not calibrated on.
        Raises FaceLlavaError when the modality has fewer than 2 samples."""
        n = self.count(modality)
        if n < 2:
            raise FaceLlavaError(f"the calibration set has {n} {modality} sample(s); at least 2 are needed (one to "
                                 "calibrate, one held out to check): add files or raise --limit")
        order = np.random.default_rng(seed).permutation(n).tolist()
        held = min(n - 1, max(1, round(n * held_out)))
        return sorted(order[held:]), sorted(order[:held])

    def feeds(self, modality: str, with_landmarks: bool, indices: Sequence[int] | None = None
              ) -> list[dict[str, np.ndarray]]:
        """One graph input feed (batch 1) per row."""
        rows = range(self.count(modality)) if indices is None else indices
        feeds = []
        for row in rows:
            feed = {"pixel_values": self.pixel_values[modality][row : row + 1]}
            if with_landmarks:
                feed["landmarks"] = self.landmarks[modality][row : row + 1]
            feeds.append(feed)
        return feeds

    def samples(self) -> list[Sample]:
        """Every row as its own sample (batch 1), images first, in the set's order."""
        return [Sample(name, modality, self.pixel_values[modality][row:row + 1],
                       self.landmarks[modality][row:row + 1])
                for modality in MODALITIES if modality in self.sources
                for row, name in enumerate(self.sources[modality])]

    def reader(self, modality: str, with_landmarks: bool, indices: Sequence[int] | None = None) -> CalibrationReader:
        """A `CalibrationReader` over the rows (all by default) for a graph with or without landmark input."""
        return CalibrationReader(self.feeds(modality, with_landmarks, indices))

    def save(self, directory: str | Path) -> Path:
        """Write the arrays and `sources.json` into `directory`, replacing it as a whole (atomically: a crash
        leaves the old cache or none)."""
        directory = Path(directory)
        with staged_directory(directory) as temp:
            for modality in self.sources:
                np.save(temp / f"{modality}_pixel_values.npy", self.pixel_values[modality])
                np.save(temp / f"{modality}_landmarks.npy", self.landmarks[modality])
            listing = {"format": CACHE_FORMAT, "request": self.request, "sources": self.sources,
                       "skipped": self.skipped}
            (temp / SOURCES_NAME).write_text(json.dumps(listing, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CalibrationSet:
        """Read a set written by `save`. Raises FaceLlavaError when the directory does not hold one."""
        directory = Path(directory)
        try:
            listing = json.loads((directory / SOURCES_NAME).read_text())
            sources = {m: list(files) for m, files in listing["sources"].items()}
            pixels = {m: np.load(directory / f"{m}_pixel_values.npy", allow_pickle=False) for m in sources}
            landmarks = {m: np.load(directory / f"{m}_landmarks.npy", allow_pickle=False) for m in sources}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise FaceLlavaError(f"{directory} does not hold a calibration set ({error}); delete it to rebuild it"
                                 ) from None
        for m in sources:
            if len(pixels[m]) != len(sources[m]) or len(landmarks[m]) != len(sources[m]):
                raise FaceLlavaError(f"{directory}: the {m} arrays and the source list differ in length; delete it "
                                     "to rebuild it")
        return cls(pixels, landmarks, sources, listing.get("skipped", []), listing.get("request", {}))


# --- building -----------------------------------------------------------------------------------------------


class _Unusable(Exception):
    """One file or record that cannot be used; the message is the reason recorded in the source list."""


@dataclass
class _Candidate:
    """One medium to read: its path, modality, and (from a data JSON) its landmarks file and whether it is
    already a face crop."""

    path: Path
    modality: str | None
    landmarks: Path | None = None
    is_crop: bool = False
    problem: str | None = None  # a reason known before reading (unknown suffix, bad record)


def build_calibration_set(source: str | Path, *, modalities: Sequence[str] = MODALITIES, limit: int | None = None,
                          seed: int = 0, cache: str | Path | None = None, front_end: face.FaceFrontEnd | None = None,
                          progress: bool = True) -> CalibrationSet:
    """Make (or read from `cache`) a calibration set from a folder of images and videos or a data JSON.

    `modalities`: which media to keep; `limit`: most samples per modality (None: all); `seed`: the random order in
    which files are tried (so a limit picks a random, reproducible subset); `cache`: a directory where the set is
    saved, and read back when it already holds the same request over the same files (by name, size and mtime);
    `front_end`: a FaceFrontEnd to reuse (one is made when needed). Returns the set. Raises FaceLlavaError for a
    missing source, an empty folder, an unreadable data JSON, a bad limit, or when no file is usable (the message
    counts the reasons).
    """
    source = Path(source)
    modalities = tuple(m for m in MODALITIES if m in modalities)
    if not modalities:
        raise FaceLlavaError("no modality asked for; choose image, video or both")
    if limit is not None and limit < 1:
        raise FaceLlavaError(f"--limit must be at least 1, got {limit}")
    candidates = _candidates(source)
    request = {"source": str(source.resolve()), "modalities": list(modalities), "limit": limit, "seed": seed,
               "files": _fingerprint(candidates)}
    if cache is not None and (Path(cache) / SOURCES_NAME).is_file():
        with contextlib.suppress(FaceLlavaError):
            cached = CalibrationSet.load(cache)
            if cached.request == request:
                return cached

    order = np.random.default_rng(seed).permutation(len(candidates))
    rows: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m: [] for m in modalities}
    sources: dict[str, list[str]] = {m: [] for m in modalities}
    skipped: list[dict[str, str]] = []
    owned = front_end is None
    try:
        for index in tqdm(order, desc="calibration set", unit="file", disable=not progress):
            candidate = candidates[index]
            name = _display(candidate.path, source)
            if candidate.problem is not None:
                skipped.append({"file": name, "reason": candidate.problem})
                continue
            modality = candidate.modality
            if modality not in modalities or (limit is not None and len(rows[modality]) >= limit):
                continue  # not asked for, or enough of this modality already
            if front_end is None:
                front_end = face.FaceFrontEnd()
            try:
                rows[modality].append(_read(candidate, front_end))
                sources[modality].append(name)
            except _Unusable as reason:
                skipped.append({"file": name, "reason": str(reason)})
            except FaceLlavaError as error:
                skipped.append({"file": name, "reason": str(error)})
            if limit is not None and all(len(rows[m]) >= limit for m in modalities):
                break
    finally:
        if owned and front_end is not None:
            front_end.close()

    kept = [m for m in modalities if rows[m]]
    result = CalibrationSet(
        pixel_values={m: np.stack([p for p, _ in rows[m]]).astype(np.float32) for m in kept},
        landmarks={m: np.stack([lm for _, lm in rows[m]]).astype(np.float32) for m in kept},
        sources={m: sources[m] for m in kept}, skipped=skipped, request=request)
    if not kept:
        wanted = " or ".join(modalities)
        raise FaceLlavaError(f"no usable {wanted} calibration sample in {source}: {result.skipped_summary()}; give "
                             "face photos or videos in which a face can be found")
    if cache is not None:
        result.save(cache)
    return result


def _candidates(source: Path) -> list[_Candidate]:
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(source).parts))
        if not files:
            raise FaceLlavaError(f"calibration folder {source} has no files; put face photos or videos in it, or "
                                 "give a Face-LLaVA data JSON")
        return [_Candidate(p, modality_of(p), problem=None if modality_of(p) else "not an image or video file")
                for p in files]
    if source.is_file() and source.suffix.lower() == ".json":
        return _json_candidates(source)
    if source.is_file() and modality_of(source):
        return [_Candidate(source, modality_of(source), problem=None)]
    if source.is_file():
        raise FaceLlavaError(f"{source} is neither a folder, a data JSON nor an image or video; give a folder of "
                             "face photos and videos, or a Face-LLaVA data .json file")
    raise FaceLlavaError(f"calibration data {source} does not exist")


def modality_of(path: str | Path) -> contract.Modality | None:
    """'image' or 'video' from a file's suffix; None for anything else."""
    suffix = Path(path).suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def _json_candidates(path: Path) -> list[_Candidate]:
    """The media of a Face-LLaVA data JSON (a list of records with `image` or `video` and optional `landmarks_2d`,
    paths relative to the JSON's folder). Records without a medium are listed as problems, not read."""
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FaceLlavaError(f"data file {path} cannot be read as JSON ({error})") from None
    if not isinstance(records, list) or not records:
        raise FaceLlavaError(f"data file {path} must hold a non-empty JSON list of records")
    folder, candidates = path.parent, []
    for index, record in enumerate(records):
        label = path / f"record {index}"
        kinds = [k for k in MODALITIES if isinstance(record, dict) and k in record]
        if len(kinds) != 1:
            problem = "neither an image nor a video" if not kinds else "both an image and a video"
            candidates.append(_Candidate(label, None, problem=problem))
            continue
        kind = kinds[0]
        media, landmarks = record[kind], record.get("landmarks_2d")
        media = media[0] if isinstance(media, list) and len(media) == 1 else media
        landmarks = landmarks[0] if isinstance(landmarks, list) and len(landmarks) == 1 else landmarks
        if not isinstance(media, str) or not (landmarks is None or isinstance(landmarks, str)):
            candidates.append(_Candidate(label, None, problem=f"'{kind}' or 'landmarks_2d' is not one path"))
            continue
        candidates.append(_Candidate(folder / media, kind, folder / landmarks if landmarks else None, is_crop=True))
    return candidates


def _fingerprint(candidates: Sequence[_Candidate]) -> list[list[Any]]:
    """Name, size and mtime of every file a set reads: a cache is reused only while these are unchanged."""
    rows = []
    for candidate in candidates:
        for path in (candidate.path, candidate.landmarks):
            if path is not None and path.is_file():
                stat = path.stat()
                rows.append([str(path), stat.st_size, stat.st_mtime_ns])
    return rows


def _display(path: Path, source: Path) -> str:
    root = source if source.is_dir() else source.parent
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _read(candidate: _Candidate, front_end: face.FaceFrontEnd) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values, landmarks) of one medium, as the runtime computes them (`prepare_medium`): a data JSON's face
    crops are used whole, as --no-face-crop does, with their landmarks file when they have one. Raises _Unusable or
    FaceLlavaError."""
    medium = {candidate.modality: candidate.path}
    prepared = prepare_medium(front_end, medium.get("image"), medium.get("video"),
                              landmarks=candidate.landmarks if candidate.is_crop else None,
                              no_face_crop=candidate.is_crop, name=str(candidate.path))
    if prepared.landmarks is None:
        raise _Unusable("the face mesh found no landmarks")
    return prepared.pixel_values, prepared.landmarks


def _reason_kind(reason: str) -> str:
    """A short kind of a skip reason for the summary (the full reason stays in the source list)."""
    for pattern, kind in (("not an image or video", "not an image or video file"), ("no face found", "no face found"),
                          ("not an image Pillow", "not an image"), ("could not be decoded", "corrupt image"),
                          ("not a video", "not a video"), ("no frames", "corrupt video"),
                          ("landmarks", "landmark problem"), ("not found", "missing file")):
        if pattern in reason:
            return kind
    return reason
