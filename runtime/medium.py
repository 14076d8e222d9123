"""One path from a medium to what the vision graph takes: an image (a file or an RGB array, a camera frame) or a
video (a file or its decoded frames) -> the face crop(s), the 68 landmarks and the preprocessed pixel values.

The runtime (`Pipeline.prepare`) and the calibration set read every medium through `prepare_medium`, so a face
is cropped, landmarked and preprocessed the same way wherever it is used:

    with FaceFrontEnd() as front_end:
        medium = prepare_medium(front_end, image="face.jpg")
        medium.pixel_values, medium.landmarks          # float32 [3, 224, 224], [68, 2] (crop pixels / 256) | None
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facellava import contract
from facellava.errors import FaceLlavaError
from facellava.runtime import face, preprocess
from facellava.runtime.preprocess import expand2square

Image = str | Path | np.ndarray
Video = str | Path | Sequence[np.ndarray]


class LandmarksFileError(FaceLlavaError):
    """A landmarks file `prepare_medium` cannot use (missing, unreadable, of the wrong shape or frame count, not
    finite, already divided), told apart from a medium that cannot be read (the training data counts them
    apart)."""


@dataclass
class PreparedMedium:
    """A medium ready for the vision graph (no batch axis).

    `pixel_values`: float32 [3, 224, 224] (image) or [3, 8, 224, 224] (video). `landmarks`: float32 [68, 2] or
    [8, 68, 2] in crop pixels / 256, or None. `landmarks_source`: "face mesh", "file", "none" (not asked for) or
    "none (face mesh found none)". `crops`: the front end's result per image / frame. `num_frames`: the decoded
    frame count of a video (0 for an image). Milliseconds: detection and crop, face mesh, preprocessing.
    """

    modality: contract.Modality
    pixel_values: np.ndarray
    landmarks: np.ndarray | None
    landmarks_source: str
    crops: list[face.FaceCrop]
    num_frames: int
    detect_ms: float
    landmarks_ms: float
    preprocessing_ms: float


def prepare_medium(front_end: face.FaceFrontEnd | None, image: Image | None = None, video: Video | None = None,
                   landmarks: str | Path | np.ndarray | None = None, no_landmarks: bool = False,
                   no_face_crop: bool = False, face_index: int | None = None,
                   name: str | None = None) -> PreparedMedium:
    """Crop, landmark and preprocess one image or one video.

    `image`: a file or an RGB uint8 [H, W, 3] array. `video`: a file, or the decoded RGB frames (the official
    8 are picked from them, as from a file). `landmarks`: an official-format .npy (crop pixels; one row per decoded
    frame for a video) or an array already divided by 256 ([68, 2], or [8, 68, 2] for the chosen frames);
    `no_landmarks`: none (the official demo's path); otherwise the face mesh's. `no_face_crop`: the whole image
    or frames, the official way (`expand2square`, no resample). `face_index`: which face, left to right (default
    the largest). `name` names the medium in errors.

    `front_end` None: the medium is already the face crop, as in the official training data (crops made by
    `tools/crop_face.py`): no detection and no face mesh, the training's own treatment (`expand2square` for an
    image, a video's frames as they are); landmarks must then be given or refused (ValueError otherwise).

    Raises FaceLlavaError for bad input: not exactly one of an image or a video, landmarks both given and
    refused, an unreadable file, no face found, a landmarks file that cannot be used (`LandmarksFileError`).
    """
    if (image is None) == (video is None):
        raise FaceLlavaError("give exactly one of an image or a video")
    if no_landmarks and landmarks is not None:
        raise FaceLlavaError("give landmarks or ask for none, not both")
    run_mesh = not no_landmarks and landmarks is None
    if front_end is None and run_mesh:
        raise ValueError("a medium without a front end (already cropped) needs landmarks given or refused")
    num_frames = 0
    if image is not None:
        modality: contract.Modality = "image"
        rgb = image if isinstance(image, np.ndarray) else face.load_image(image)
        label = name or "the image"
        if front_end is None:
            crops = [_as_cropped(expand2square(face.check_image(rgb, label)))]
        else:
            crops = [front_end.process_image(face.check_image(rgb, label), face_index=face_index,
                                             no_face_crop=no_face_crop, landmarks=run_mesh, name=label)]
    else:
        modality = "video"
        if isinstance(video, (str, Path)):
            clip = face.read_video(video)
            frames, num_frames = clip.frames, clip.num_frames
        else:
            num_frames = len(video)
            if num_frames == 0:
                raise FaceLlavaError("a video needs at least one frame")
            frames = [video[i] for i in contract.video_frame_indices(num_frames)]
        label = name or "the video"
        if front_end is None:
            crops = [_as_cropped(face.check_image(frame, f"frame {i} of {label}")) for i, frame in enumerate(frames)]
        else:
            crops = front_end.process_video(frames, face_index=face_index, no_face_crop=no_face_crop,
                                            landmarks=run_mesh, name=label)

    if no_landmarks:
        points, source = None, "none"
    elif landmarks is not None:
        if isinstance(landmarks, np.ndarray):
            points = landmarks.astype(np.float32)
        else:
            try:
                points = face.load_landmarks(landmarks, modality, num_frames if modality == "video" else None)
            except FaceLlavaError as error:
                raise LandmarksFileError(str(error)) from None
        source = "file"
    elif any(crop.landmarks is None for crop in crops):
        points, source = None, "none (face mesh found none)"
    else:
        points = np.stack([crop.landmarks for crop in crops]) if modality == "video" else crops[0].landmarks
        source = "face mesh"

    start = time.perf_counter()
    if modality == "image":
        pixels = preprocess.preprocess_image(crops[0].crop)
    else:
        pixels = preprocess.preprocess_video([crop.crop for crop in crops])
    preprocessing_ms = (time.perf_counter() - start) * 1000
    return PreparedMedium(modality, pixels, points, source, crops, num_frames,
                          detect_ms=sum(crop.detect_ms for crop in crops),
                          landmarks_ms=sum(crop.landmarks_ms for crop in crops), preprocessing_ms=preprocessing_ms)


def _as_cropped(crop: np.ndarray) -> face.FaceCrop:
    """A crop the medium already is (no detection, no face mesh)."""
    return face.FaceCrop(crop=crop, landmarks=None, box=None, detect_ms=0.0, landmarks_ms=0.0)
