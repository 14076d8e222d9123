"""How an exported vision graph is checked: the inputs it is fed, its limits, and running it in ONNX Runtime
(the figures and the judging are `export.fidelity`'s).

Torch-free (numpy, onnxruntime, and the runtime's image loading, crop and preprocessing for the photograph),
because both the ONNX export (against PyTorch) and the engine build on a device (against ONNX Runtime, where torch
is absent) use it. Every check runs on two input sets: fresh random tensors and the shipped face photograph as the
runtime's front end crops and landmarks it (its record shipped beside it, so no MediaPipe is needed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facellava import contract
from facellava.atomic import atomic_file
from facellava.errors import FaceLlavaError
from facellava.export import fidelity
from facellava.runtime.assets import face_photo, face_photo_record
from facellava.runtime.preprocess import preprocess_image, preprocess_video

MODALITIES: tuple[contract.Modality, ...] = ("image", "video")
PRECISIONS = ("fp32", "fp16")  # what `export vision` writes
# what `build-engine` builds: also the INT8 Q/DQ graphs of `calibrate vision`, held to their own target cosine
ENGINE_PRECISIONS = (*PRECISIONS, "int8")
OUTPUT_NAME = "visual_tokens"
# DESIGN.md section 4: FP32 must reproduce the reference; FP16 must point the same way (`fidelity.judge` limits).
LIMITS: dict[str, dict[str, float]] = {
    "fp32": {"rel_err_max": 1e-4},
    "fp16": {"cosine_min": 0.999},
}
RANDOM_BATCH = 2  # not 1, so that every check also exercises the dynamic batch axis
# When the photograph stands in for a video: eight frames whose window drifts this many pixels per frame (a
# hand-held camera), each frame the photograph less a margin of 4 steps on every side.
VIDEO_DRIFT_PX = 3
# The real front end's boxes and landmarks of the shipped photograph (`assets.face_photo_record`), shipped so that
# an export needs no MediaPipe; `write_face_photo_asset` makes it again.
FACE_PHOTO_ASSET = "astronaut_face.npz"


def drifting_frames(rgb: np.ndarray) -> list[np.ndarray]:
    """A photograph as the 8 frames of a video: windows of it drifting `VIDEO_DRIFT_PX` pixels right and down per
    frame, every window the same size."""
    margin = (contract.NUM_FRAMES // 2) * VIDEO_DRIFT_PX
    height, width = rgb.shape[:2]
    frames = []
    for frame in range(contract.NUM_FRAMES):
        shift = margin + (frame - contract.NUM_FRAMES // 2) * VIDEO_DRIFT_PX
        frames.append(np.ascontiguousarray(rgb[shift:shift + height - 2 * margin, shift:shift + width - 2 * margin]))
    return frames


def front_end_record(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """What the real face front end (MediaPipe's graphs, `FaceFrontEnd()`) makes of a photograph, as arrays: the
    face box (x, y, width, height) and 68 landmarks (crop pixels / 256) of the image ("image_box",
    "image_landmarks"), and of its `drifting_frames` as a video ("video_boxes" [8, 4], "video_landmarks"
    [8, 68, 2]). Needs MediaPipe. Raises FaceLlavaError when no face or no landmarks are found."""
    from facellava.runtime.face import FaceFrontEnd

    with FaceFrontEnd() as front_end:
        image = front_end.process_image(rgb, name="the face photograph")
        video = front_end.process_video(drifting_frames(rgb), name="the face photograph as a video")
    if image.landmarks is None or any(crop.landmarks is None for crop in video):
        raise FaceLlavaError("the face mesh finds no face in the face photograph; give another photograph")
    box = lambda b: [b.x, b.y, b.width, b.height]  # noqa: E731
    return {"image_box": np.int32(box(image.box)), "image_landmarks": image.landmarks.astype(np.float32),
            "video_boxes": np.int32([box(crop.box) for crop in video]),
            "video_landmarks": np.stack([crop.landmarks for crop in video]).astype(np.float32)}


def write_face_photo_asset(path: str | Path | None = None) -> Path:
    """Make the shipped photograph's front-end record again (`front_end_record` of runtime/assets/astronaut.jpg,
    with the photograph's sha256) and write it as an .npz, by default over the shipped asset; returns its path.
    Run `python -c "from facellava.export.parity import write_face_photo_asset; write_face_photo_asset()"` after
    a change to the front end (tests/test_parity_asset.py says when)."""
    from facellava.runtime.face import load_image

    target = Path(path) if path is not None else face_photo().parent / FACE_PHOTO_ASSET
    record = front_end_record(load_image(face_photo()))
    with atomic_file(target) as temp, open(temp, "wb") as handle:  # never a half-written asset
        np.savez(handle, photo_sha256=np.str_(contract.file_sha256(face_photo())), **record)
    return target


def face_photo_inputs(modality: contract.Modality, with_landmarks: bool, photo: str | Path | None = None
                      ) -> dict[str, np.ndarray]:
    """A real photograph as one graph input (batch 1), made as the runtime makes it: the front end's official
    face crop, preprocessed by `runtime.preprocess`, with the front end's 68 landmarks. For video, the
    photograph's `drifting_frames`. The shipped photograph's boxes and landmarks come from its shipped record
    (no MediaPipe needed); another photograph runs the front end (MediaPipe). Raises FaceLlavaError when the
    photograph cannot be read or holds no face."""
    from facellava.runtime.face import FaceBox, load_image, official_crop

    path = Path(photo) if photo is not None else face_photo()
    rgb = load_image(path)
    shipped = face_photo_record()
    if contract.file_sha256(path) == str(shipped["photo_sha256"]):
        record = shipped
    else:
        record = front_end_record(rgb)
    if modality == "image":
        crop = official_crop(rgb, FaceBox(*(int(v) for v in record["image_box"]), score=1.0))
        inputs = {"pixel_values": preprocess_image(crop)[None], "landmarks": record["image_landmarks"][None]}
    else:  # [B, C, T, H, W] as the official video processor lays it out
        crops = [official_crop(frame, FaceBox(*(int(v) for v in box), score=1.0))
                 for frame, box in zip(drifting_frames(rgb), record["video_boxes"], strict=True)]
        inputs = {"pixel_values": preprocess_video(crops)[None], "landmarks": record["video_landmarks"][None]}
    if not with_landmarks:
        del inputs["landmarks"]
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in inputs.items()}


def random_inputs(modality: contract.Modality, with_landmarks: bool, batch: int, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
    """Fresh random graph inputs: normal pixel values (the range CLIP normalization gives) and uniform
    landmarks in [0, 1)."""
    size = contract.IMAGE_SIZE
    frames = () if modality == "image" else (contract.NUM_FRAMES,)
    inputs = {"pixel_values": rng.standard_normal((batch, 3, *frames, size, size), dtype=np.float32)}
    if with_landmarks:
        inputs["landmarks"] = rng.random((batch, *frames, contract.NUM_LANDMARKS, 2), dtype=np.float32)
    return inputs


def parity_inputs(modality: contract.Modality, with_landmarks: bool, seed: int, photo: str | Path | None = None,
                  random_batch: int = RANDOM_BATCH) -> dict[str, dict[str, np.ndarray]]:
    """The two input sets every check uses: {"random": `random_batch` from `seed`, "face_photo": batch 1}."""
    rng = np.random.default_rng(seed)
    return {"random": random_inputs(modality, with_landmarks, random_batch, rng),
            "face_photo": face_photo_inputs(modality, with_landmarks, photo)}


def parity_record(per_input: Mapping[str, dict[str, float]], limits: Mapping[str, float]) -> dict[str, Any]:
    """One parity record from the `fidelity.compare` figures of each input set: the worst of each figure, the
    figures of each set under "inputs", judged against `limits` ("limits" and "passed" set)."""
    record = {**fidelity.worst(list(per_input.values())), "inputs": dict(per_input)}
    fidelity.judge(record, limits)
    return record


def describe_miss(name: str, record: Mapping[str, Any]) -> str:
    """One line naming a vision parity miss with its numbers, for the FaceLlavaError that fails the export."""
    return (f"{name} misses its parity threshold ({fidelity.describe_limits(record['limits'])}): "
            f"cosine {record['cosine']:.6f}, "
            f"rel_err {record['rel_err']:.3g}, max_abs {record['max_abs']:.3g}; "
            "rerun with --allow-drift to keep it anyway")


def parse_choices(text: str | Iterable[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """`"image,video"` (or a list) -> a tuple in `allowed`'s order. Raises FaceLlavaError naming an unknown one."""
    items = [s.strip().lower() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    unknown = [s for s in items if s not in allowed]
    if unknown or not items:
        raise FaceLlavaError(f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                             f"choose from {','.join(allowed)}")
    return tuple(a for a in allowed if a in items)


def run_onnx(path: str | Path, inputs: Mapping[str, dict[str, np.ndarray]],
             providers: Sequence[Any] = ("CPUExecutionProvider",)) -> dict[str, np.ndarray]:
    """Run an ONNX vision graph in ONNX Runtime on each named input set; returns {set name: visual_tokens}."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=list(providers))
    return {name: session.run([OUTPUT_NAME], dict(feed))[0] for name, feed in inputs.items()}
