"""A small synthetic face instruction data set, for tests and examples of `facellava train`.

The shipped face photograph (runtime/assets/astronaut.jpg) is cut into 256x256 face crops under seeded
augmentations (crop jitter, scale, small rotations, horizontal flips, brightness), each with 68 landmarks and a
templated conversation for one of the five Face-LLaVA tasks (emotion, action units, age, attributes, deepfake).
A few short videos are made from smoothly drifting augmentations of the same photograph. The result is a data
file in the official format (`facellava.model.data`): `data.json`, `images/`, `videos/`, `landmarks/`.

The answers describe the photograph (a smiling adult, brown hair, a real photo); the attribute answer also names
the head tilt that the landmarks show, so the landmark path has something to learn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from facellava import contract
from facellava.atomic import staged_directory
from facellava.errors import FaceLlavaError
from facellava.runtime.assets import face_photo, face_photo_record

CROP = contract.FACE_CROP_SIZE
VIDEO_FRAMES = 12
VIDEO_FPS = 24

# A landmark source: (face crop RGB uint8 [256, 256, 3], the 2x3 affine that took photo pixels to crop pixels)
# -> 68 iBUG points [68, 2] in crop pixels, or None when it finds no face. A detector ignores the affine.
LandmarkSource = Callable[[np.ndarray, np.ndarray], "np.ndarray | None"]

# --- landmark sources ---------------------------------------------------------------------------------------------


def front_end_landmarks() -> LandmarkSource:
    """The default source: the runtime's face front end (MediaPipe face mesh mapped to iBUG-68) on each crop,
    as a user's own data would get them."""
    from facellava.runtime.face import FaceFrontEnd

    front_end = FaceFrontEnd()

    def source(crop: np.ndarray, _affine: np.ndarray) -> np.ndarray | None:
        points = front_end.landmarks(crop)
        return None if points is None else points * contract.LANDMARK_SCALE  # crop pixels, as .npy files hold

    return source


# The alternative source `carried_landmarks`: the front end's landmarks of the photograph itself (shipped with it,
# `assets.face_photo_record`), carried through each augmentation (no MediaPipe needed).

# The crop side of an unaugmented view, in sides of the front end's face box: the box is the detector's, tight
# from brows to chin; 1.6 of it keeps the forehead, the chin and some background in the crop.
VIEW_SIDE = 1.6


def photo_face() -> tuple[tuple[float, float, float, float], np.ndarray]:
    """The shipped photograph's face as the runtime's front end found it: its box (x0, y0, x1, y1) and its 68
    iBUG landmarks [68, 2], both in photo pixels."""
    record = face_photo_record()
    x, y, width, height = (int(v) for v in record["image_box"])
    # the official crop of a box inside the photograph is the square from (x, y), its side truncated to pixels
    side = int(x + (width + height) / 2) - x
    points = record["image_landmarks"].astype(np.float64) * side + [x, y]
    return (float(x), float(y), float(x + side), float(y + side)), points


def carried_landmarks(crop: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A landmark source without a detector: the front end's landmarks of the photograph, moved by the crop's
    affine. A flip (negative determinant) also renumbers the points, as a detector numbers a mirrored face."""
    points = photo_face()[1] @ affine[:, :2].T + affine[:, 2]
    if np.linalg.det(affine[:, :2]) < 0:
        points = points[list(contract.IBUG68_MIRROR)]
    return points.astype(np.float32)


# --- augmentation ----------------------------------------------------------------------------------------------------


def crop_affine(centre: tuple[float, float], side: float, angle_deg: float, flip: bool) -> np.ndarray:
    """The 2x3 affine from photo pixels to a CROP x CROP crop: a square of `side` photo pixels around `centre`,
    turned by `angle_deg` (counter-clockwise on screen), mirrored left-right when `flip`."""
    scale = CROP / side
    theta = math.radians(angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    # y points down, so a counter-clockwise turn on screen is [[cos, sin], [-sin, cos]]
    linear = scale * np.array([[cos, sin], [-sin, cos]])
    if flip:
        linear = np.array([[-1.0, 0.0], [0.0, 1.0]]) @ linear
    offset = np.array([CROP / 2, CROP / 2]) - linear @ np.asarray(centre)
    return np.concatenate([linear, offset[:, None]], axis=1)


def warp(photo: np.ndarray, affine: np.ndarray, brightness: float) -> np.ndarray:
    """The crop that `affine` describes, resampled bicubically, with its brightness scaled."""
    from PIL import Image

    full = np.vstack([affine, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)[:2].ravel()  # PIL maps output pixels back to input pixels
    crop = Image.fromarray(photo).transform((CROP, CROP), Image.AFFINE, tuple(inverse), Image.BICUBIC)
    return np.clip(np.asarray(crop).astype(np.float32) * brightness, 0, 255).astype(np.uint8)


def head_tilt(landmarks: np.ndarray) -> str:
    """'tilted to the left' / 'tilted to the right' / 'upright' (as seen on the image), from the eye centres."""
    left, right = landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0)
    dx, dy = right - left  # eye1 is always the one on the image's left (iBUG numbering), so dx > 0
    angle = math.degrees(math.atan2(dy, abs(dx)))
    if angle > 3:
        return "tilted to the right"  # y points down: the right eye on screen is lower, the head leans right
    if angle < -3:
        return "tilted to the left"
    return "upright"


# --- conversations ---------------------------------------------------------------------------------------------------

QUESTIONS = {
    "emotion": ("What emotion does the person show?", "Which facial expression is visible here?",
                "Describe the emotion on this face."),
    "action_units": ("Which facial action units are active?",
                     "Identify the active facial action units in the provided image."),
    "age": ("How old does this person look?", "Guess the age of the individual shown in the picture."),
    "attributes": ("Describe the facial attributes of this person.",
                   "Analyze the facial characteristics shown in the picture."),
    "deepfake": ("Is this face real or fake?", "Is the face authentic, or is it a fake?"),
}
VIDEO_QUESTIONS = {
    "emotion": ("What emotion is shown in the video?", "Which emotion does the person in the video express?"),
    "deepfake": ("Is the video authentic, or is it a fake?", "Is this video real or manipulated?"),
}
ANSWERS = {
    "emotion": "Happiness. The cheeks are raised and the lip corners are pulled up into a smile.",
    "action_units": "AU6 (cheek raiser), AU12 (lip corner puller) and AU25 (lips part) are active.",
    "age": "The person appears to be about 40 years old.",
    "attributes": "Brown hair, smiling, no eyeglasses, wearing earrings; the head is {tilt}.",
    "deepfake": "Real. The skin texture, the lighting and the edges around the mouth and eyes are consistent.",
}
FOLLOW_UP = ("Is the person smiling?", "Yes, broadly.")
TASKS = tuple(QUESTIONS)


def conversation(task: str, question: str, landmarks: np.ndarray, placeholder: str, follow_up: bool) -> list[dict]:
    """The official conversations list: the question after the placeholder, the templated answer, maybe a
    second round."""
    turns = [{"from": "human", "value": f"{placeholder}\n{question}"},
             {"from": "gpt", "value": ANSWERS[task].format(tilt=head_tilt(landmarks))}]
    if follow_up:
        turns += [{"from": "human", "value": FOLLOW_UP[0]}, {"from": "gpt", "value": FOLLOW_UP[1]}]
    return turns


# --- the data set ----------------------------------------------------------------------------------------------------


def _random_view(rng: np.random.Generator, face_box: tuple[float, float, float, float]) -> dict:
    x0, y0, x1, y1 = face_box
    base_side = VIEW_SIDE * (y1 - y0)
    return {"centre": ((x0 + x1) / 2 + rng.uniform(-0.06, 0.06) * base_side,
                       (y0 + y1) / 2 + rng.uniform(-0.06, 0.06) * base_side),
            "side": base_side * rng.uniform(0.9, 1.1), "angle": rng.uniform(-10, 10), "flip": bool(rng.random() < 0.5),
            "brightness": rng.uniform(0.75, 1.25)}


def _face_box(photo: Path, pixels: np.ndarray) -> tuple[float, float, float, float]:
    """The face box (x0, y0, x1, y1) the views are drawn around: the shipped photograph's from its shipped record,
    another photograph's found by the front end (MediaPipe)."""
    if contract.file_sha256(photo) == str(face_photo_record()["photo_sha256"]):
        return photo_face()[0]
    from facellava.runtime.face import FaceFrontEnd

    with FaceFrontEnd() as front_end:
        box = front_end.process_image(pixels, landmarks=False, name=str(photo)).box
    side = (box.width + box.height) / 2
    return box.x, box.y, box.x + side, box.y + side


def _render(photo: np.ndarray, view: dict, landmark_source: LandmarkSource) -> tuple[np.ndarray, np.ndarray | None]:
    affine = crop_affine(view["centre"], view["side"], view["angle"], view["flip"])
    crop = warp(photo, affine, view["brightness"])
    return crop, landmark_source(crop, affine)


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (CROP, CROP))
    if not writer.isOpened():
        raise FaceLlavaError("OpenCV cannot write mp4 videos here (no mp4v encoder)")
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # RGB -> BGR
    writer.release()


def make_synthetic_data(out_dir: str | Path, n: int = 32, seed: int = 0, videos: int | None = None,
                        landmark_source: LandmarkSource | None = None, photo: str | Path | None = None) -> Path:
    """Write a synthetic training set of `n` records (`videos` of them short videos; default n // 8, at least one
    when n > 1) into `out_dir`, and return the path of its `data.json`.

    Each record is a seeded augmentation of the face photograph (`photo`, by default the shipped one) around the
    face the runtime's front end finds in it, with landmarks from `landmark_source` (default: the runtime's face
    front end on each crop; `carried_landmarks` for the shipped photograph without MediaPipe) and a templated
    conversation; the tasks take turns, and every third
    record has a second round. The directory is written under a temporary name and renamed, so it is whole or
    absent. Raises FaceLlavaError if `out_dir` exists and is not empty, or for n < 1.
    """
    from PIL import Image

    out = Path(out_dir)
    if n < 1:
        raise FaceLlavaError("--n must be at least 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FaceLlavaError(f"{out} already exists and is not an empty directory")
    videos = (max(1, n // 8) if n > 1 else 0) if videos is None else videos
    if not 0 <= videos <= n:
        raise FaceLlavaError(f"--videos must be between 0 and {n}")
    source = landmark_source or front_end_landmarks()
    rng = np.random.default_rng(seed)
    photo = photo or face_photo()
    with Image.open(photo) as image:
        pixels = np.asarray(image.convert("RGB"))
    face_box = _face_box(Path(photo), pixels)

    with staged_directory(out) as staging:
        for folder in ("images", "videos", "landmarks"):
            (staging / folder).mkdir()
        records = []
        for i in range(n):
            is_video = i >= n - videos
            tasks = tuple(VIDEO_QUESTIONS) if is_video else TASKS
            task = tasks[i % len(tasks)]
            question = str(rng.choice((VIDEO_QUESTIONS if is_video else QUESTIONS)[task]))
            name = f"{i:04d}"
            record: dict = {"id": name}
            for _ in range(20):  # a detector may miss a face in a strong augmentation: draw another one
                if is_video:
                    start, end = _random_view(rng, face_box), _random_view(rng, face_box)
                    end["flip"] = start["flip"]
                    rendered = [_render(pixels, _between(start, end, t / (VIDEO_FRAMES - 1)), source)
                                for t in range(VIDEO_FRAMES)]
                    if all(points is not None for _, points in rendered):
                        break
                else:
                    crop, points = _render(pixels, _random_view(rng, face_box), source)
                    if points is not None:
                        break
            else:
                raise FaceLlavaError(f"the landmark source found no face in 20 augmentations of {photo}")
            if is_video:
                landmarks = np.stack([points for _, points in rendered]).astype(np.float32)
                _write_video(staging / "videos" / f"{name}.mp4", [frame for frame, _ in rendered])
                record["video"] = f"videos/{name}.mp4"
                placeholder, tilt_points = "<video>", landmarks[0]
            else:
                landmarks = np.asarray(points, dtype=np.float32)
                Image.fromarray(crop).save(staging / "images" / f"{name}.jpg", quality=95)
                record["image"] = f"images/{name}.jpg"
                placeholder, tilt_points = contract.IMAGE_PLACEHOLDER, landmarks
            np.save(staging / "landmarks" / f"{name}.npy", landmarks)
            record["landmarks_2d"] = f"landmarks/{name}.npy"
            record["conversations"] = conversation(task, question, tilt_points, placeholder, follow_up=i % 3 == 2)
            records.append(record)
        (staging / "data.json").write_text(json.dumps(records, indent=1, ensure_ascii=False))
    return out / "data.json"


def _between(start: dict, end: dict, t: float) -> dict:
    """The view a fraction t of the way from `start` to `end` (the flip stays)."""
    mix = lambda a, b: a + (b - a) * t  # noqa: E731
    return {"centre": (mix(start["centre"][0], end["centre"][0]), mix(start["centre"][1], end["centre"][1])),
            "side": mix(start["side"], end["side"]), "angle": mix(start["angle"], end["angle"]),
            "flip": start["flip"], "brightness": mix(start["brightness"], end["brightness"])}
