"""How an exported vision graph is checked: the inputs it is fed, its limits, and running it in ONNX Runtime
(the figures and the judging are `export.fidelity`'s).

Torch-free (numpy, onnxruntime, and Pillow for the photograph), because both the ONNX export (against PyTorch)
and the engine build on a device (against ONNX Runtime, where torch is absent) use it. Every check runs on two
input sets: fresh random tensors and the shipped face photograph with plausible landmarks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facellava import contract
from facellava.errors import FaceLlavaError
from facellava.export import fidelity
from facellava.runtime.assets import face_photo

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
# A square around the face in the shipped photograph (x0, y0, x1, y1 in its 512x512 pixels), standing in for the
# MediaPipe crop until the runtime's face front end exists.
PHOTO_FACE_BOX = (150, 40, 300, 190)
VIDEO_JITTER_PX = 3  # frame-to-frame shift of the crop window when the photograph stands in for a video


def mean_face_landmarks() -> np.ndarray:
    """A plausible frontal face in the iBUG-68 layout, [68, 2] float32, in crop pixels / 256 (about [0.1, 0.9]).

    Built from simple curves in the order dlib and FAN emit: jaw, eyebrows, nose bridge, nostrils, eyes, outer and
    inner lips. Not a detector: only inputs of the right layout and range for parity checks.
    """

    def arc(cx: float, cy: float, rx: float, ry: float, start: float, stop: float, n: int) -> list:
        return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in np.linspace(start, stop, n)]

    def ring(cx: float, cy: float, rx: float, ry: float, n: int) -> list:  # from the left corner, over the top
        return [(cx - rx * math.cos(2 * math.pi * i / n), cy - ry * math.sin(2 * math.pi * i / n)) for i in range(n)]

    points = arc(0.5, 0.42, 0.40, 0.50, math.pi, 0.0, 17)  # jaw, left ear over the chin to the right ear
    points += arc(0.32, 0.36, 0.12, 0.05, math.pi, 2 * math.pi, 5)  # eyebrows
    points += arc(0.68, 0.36, 0.12, 0.05, math.pi, 2 * math.pi, 5)
    points += [(0.5, 0.42 + 0.055 * i) for i in range(4)]  # nose bridge
    points += [(0.42 + 0.04 * i, 0.62 + 0.01 * (2 - abs(i - 2))) for i in range(5)]  # nostrils
    points += ring(0.33, 0.44, 0.07, 0.025, 6)  # eyes
    points += ring(0.67, 0.44, 0.07, 0.025, 6)
    points += ring(0.5, 0.76, 0.13, 0.06, 12)  # lips, outer
    points += ring(0.5, 0.76, 0.09, 0.02, 8)  # lips, inner
    landmarks = np.asarray(points, dtype=np.float32)
    assert landmarks.shape == (contract.NUM_LANDMARKS, 2)
    return landmarks


def _clip_normalize(image: Any) -> np.ndarray:
    """A PIL image -> [3, 224, 224] float32: bicubic resize to 224 (the crop is square), CLIP mean and std."""
    from PIL import Image

    size = contract.IMAGE_SIZE
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = (pixels / 255.0 - np.asarray(contract.CLIP_MEAN, np.float32)) / np.asarray(contract.CLIP_STD, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def face_photo_inputs(modality: contract.Modality, with_landmarks: bool, photo: str | Path | None = None
                      ) -> dict[str, np.ndarray]:
    """The real photograph as one graph input (batch 1): the face square cropped, resized to the 256 crop,
    CLIP-normalized at 224; with landmarks, `mean_face_landmarks` on that crop. For video, eight crops whose
    window drifts a few pixels per frame (a hand-held camera), the landmarks moving with the face.
    Raises FaceLlavaError when the photograph cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(photo) if photo is not None else face_photo()
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as error:
        raise FaceLlavaError(f"cannot read the face photograph {path}: {error}") from None
    frames = 1 if modality == "image" else contract.NUM_FRAMES
    x0, y0, x1, y1 = PHOTO_FACE_BOX
    side = x1 - x0
    pixels, landmarks = [], []
    for frame in range(frames):
        dx = dy = 0 if frames == 1 else (frame - frames // 2) * VIDEO_JITTER_PX
        crop = image.crop((x0 + dx, y0 + dy, x1 + dx, y1 + dy)).resize(
            (contract.FACE_CROP_SIZE, contract.FACE_CROP_SIZE), Image.Resampling.BICUBIC)
        pixels.append(_clip_normalize(crop))
        # the face moves by -d in the window; in landmark units (crop pixels / 256) that is -d / side
        landmarks.append(mean_face_landmarks() - np.float32([dx, dy]) / side)
    if modality == "image":
        inputs = {"pixel_values": pixels[0][None], "landmarks": landmarks[0][None]}
    else:  # [B, C, T, H, W] as the official video processor lays it out
        inputs = {"pixel_values": np.stack(pixels, axis=1)[None], "landmarks": np.stack(landmarks)[None]}
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
