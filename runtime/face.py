"""The face front end: image and video loading, MediaPipe face detection, the official square face crop, and
68 iBUG landmarks from MediaPipe's face mesh.

Face-LLaVA was trained on face crops made by the official `tools/crop_face.py`: MediaPipe's short-range
BlazeFace detector, a square of side (w + h) / 2 anchored at the detection box's top-left corner (margin 0),
clamped to the image, resized with `cv2.resize` to 256 x 256. `official_crop` reproduces it exactly. The model's
landmarks are the 68 iBUG-300W points on that crop, in crop pixels / 256; the official repository ships no
landmark detector, so we run MediaPipe's face mesh on the crop and map its points to the 68 through the data
table `MESH_TO_IBUG68`. Everything here is torch-free: numpy, OpenCV, Pillow, and the models on one of two
backends: the bundle's front-end ONNX graphs (`face_graphs`, MediaPipe's models converted at export, with its
processing restated in numpy; the device needs no MediaPipe) or MediaPipe itself (legacy solutions and the task
API, whose models ship inside the mediapipe wheel; the reference). Nothing is downloaded.

Typical use::

    front_end = FaceFrontEnd.from_bundle(Bundle.open("bundle"))    # its graphs; FaceFrontEnd() runs MediaPipe
    face = front_end.process_image(load_image("photo.jpg"))        # FaceCrop: crop, landmarks, box, timings
    video = read_video("clip.mp4")                                  # the 8 official frames
    faces = front_end.process_video(video.frames)                   # one FaceCrop per frame
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facellava.contract import (
    FACE_CROP_SIZE,
    LANDMARK_SCALE,
    LANDMARK_VALUES,
    NUM_LANDMARKS,
    Modality,
    video_frame_indices,
)
from facellava.errors import FaceLlavaError
from facellava.runtime.face_graphs import Detection, FrontEndGraphs, has_front_end_graphs
from facellava.runtime.preprocess import SQUARE_FILL, expand2square

if TYPE_CHECKING:
    from facellava.bundle import Bundle

# FFmpeg's own complaints about a broken video would reach the user's terminal before our one-line error.
# OpenCV reads this once, when it opens its first video, so it is set on import; a user's own setting wins.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's TFLite info lines


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what MediaPipe's C++ graphs write straight to file descriptor 2 (absl warnings about feedback
    tensors and ROIs, printed on every graph start); Python-level errors still raise as usual."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

# An image smaller than this on either side cannot hold a face the detector can find.
MIN_IMAGE_SIDE = 32
# Each view of the image is shrunk to at most this side before detection (BlazeFace looks at 128 or 192 pixels
# anyway); the crop is cut from the original.
VIEW_SIDE = 384
# The smallest face searched for, in image pixels: tiles get small enough for BlazeFace full range to see it; on
# large images at least this fraction of the long side (1280 pixels: 20; 1920: 30; 6000: 94), which bounds the
# number of tiles (and the time) whatever the resolution.
MIN_FACE_SIDE = 20
MIN_FACE_FRACTION = 1 / 64
# Tiles: the finest level has the smallest face at this fraction of its side (where full range scores it surely);
# neighbours overlap by this fraction of a tile; each level of tiles is this many times larger than the last.
TILE_FACE_FRACTION = 0.14
TILE_OVERLAP = 0.25
TILE_LEVEL_RATIO = 3
# BlazeFace full range finds faces down to about this fraction of the view's side (composites of the shipped
# photograph: scores >= 0.7 from 0.055 of the view in 2 of 4 cases, 0.0625 in 3 of 4, 0.078 in 4 of 4).
FULL_RANGE_MIN_FRACTION = 0.07
# MediaPipe's default threshold is 0.5, but on synthetic noise images both BlazeFace models scored up to 0.63,
# while the shipped photograph scores 0.92 (short range) and real faces we tried scored 0.76 or more.
MIN_FACE_SCORE = 0.7

# MediaPipe face mesh (468 points, 478 with the iris refinement) -> the 68 iBUG-300W points.
# Basis: the widely used Mediapipe_2_Dlib_Landmarks correspondence (Peizhi Yan), including its later brow
# variant; each entry lists one mesh vertex, or two whose mean is taken. "Right"/"left" are the subject's:
# the subject's right side is on the image's left, where iBUG starts. Every point was checked against the
# anatomy of the 68-point layout (the position along its contour in dlib's mean shape) on the mesh of the
# shipped photograph; the changes from the basis are marked "changed" with the reason.
MESH_TO_IBUG68: tuple[tuple[int, ...], ...] = (
    # jaw 0-16: from the subject's right ear level (0) down to the chin (8) and up to the left (16)
    (127,), (234,), (93,), (132, 58), (58, 172), (136,), (150,), (176,),
    (152,),  # chin (menton)
    (400,), (379,), (365,), (397, 288),
    (361, 288),  # changed from (361,): the mirror of point 3's (132, 58), so that the jaw is symmetric
    (323,), (454,), (356,),
    # right eyebrow 17-21, upper contour, outer tail (17) to inner end (21)
    (156,), (70, 63), (105,), (66,), (107, 55),
    # left eyebrow 22-26, inner end (22) to outer tail (26); mirrors of 21..17
    (336, 285), (296,), (334,), (293, 300), (383,),
    # nose bridge 27-30, from the nasion between the eyes down to the tip, about evenly spaced
    (168, 6), (197, 195),
    (5, 4),  # changed from (5,): with the tip moved to 1, the midpoint of 5 and 4 keeps the bridge evenly spaced
    (1,),  # changed from (4,): iBUG 30 is the nose tip; MediaPipe's mesh annotations name vertex 1 the tip
    # nostrils 31-35: right alar base (31), subnasale (33), left alar base (35)
    (75,), (97,), (2,), (326,), (305,),
    # right eye 36-41: outer corner, two upper-lid points, inner corner, two lower-lid points
    (33,),
    (160, 159),  # changed from (160,): 160 sits at 0.2 of the eye width, iBUG 37 at 0.3 (the mean is at 0.29)
    (158, 157),  # changed from (158,): 158 sits at 0.57, iBUG 38 at 0.68 (the mean is at 0.67)
    (133,), (153,), (144,),
    # left eye 42-47: inner corner, two upper-lid points, outer corner, two lower-lid points; mirrors of 39..36
    (362,), (384, 385), (386, 387), (263,), (373,), (380,),
    # outer lips 48-59: right corner (48), upper lip to the left corner (54), lower lip back; 51/57 are centred
    (61,),
    (40, 39),  # changed from (39,): iBUG 49 lies at 0.36 from the corner to the centre, 39 at 0.44, 40 at 0.25
    (37,), (0,), (267,),
    (269, 270),  # changed from (269,): the mirror of 49
    (291,), (321,), (314,), (17,), (84,), (91,),
    # inner lips 60-67: right inner corner (60), upper inner lip to the left inner corner (64), lower inner lip
    (78,), (82,), (13,), (312,), (308,), (317,), (14,), (87,),
)
assert len(MESH_TO_IBUG68) == NUM_LANDMARKS

# The mapped points sit systematically off where a 68-point detector puts them (the jaw and chin too high and too
# narrow, the nose bridge too low): this per-point offset, in the face's own frame (`correct_landmarks`), moves
# them there. Fitted by benchmarks/landmarks_vs_dlib.py against dlib's 68-point shape predictor (a yardstick only:
# its training data's licence excludes commercial use; nothing of it ships but these averages), each person
# weighing the same, mirror-symmetric, on 59 crops of only 3 people under 12 augmentations; on people held out of
# the fit it took the mean error from 5.2 % to 3.5 % of the eye-corner distance (jaw 10.5 % to 6.1 %). Refit it
# with more people when their photos can be used.
IBUG68_OFFSETS: tuple[tuple[float, float], ...] = (
    (-0.0294, +0.0193), (-0.0206, +0.0717), (-0.0010, +0.1192), (-0.0019, +0.0608),  # 0-3
    (+0.0160, +0.0894), (+0.0238, +0.0754), (+0.0789, +0.1084), (+0.0641, +0.0733),  # 4-7
    (+0.0000, +0.0391), (-0.0641, +0.0733), (-0.0789, +0.1084), (-0.0238, +0.0754),  # 8-11
    (-0.0160, +0.0894), (+0.0019, +0.0608), (+0.0010, +0.1192), (+0.0206, +0.0717),  # 12-15
    (+0.0294, +0.0193), (+0.0194, -0.0344), (+0.0428, -0.0281), (+0.0396, -0.0078),  # 16-19
    (+0.0510, -0.0053), (+0.0250, -0.0147), (-0.0250, -0.0147), (-0.0510, -0.0053),  # 20-23
    (-0.0396, -0.0078), (-0.0428, -0.0281), (-0.0194, -0.0344), (+0.0000, -0.0375),  # 24-27
    (+0.0000, -0.0568), (+0.0000, -0.0865), (+0.0000, -0.0686), (-0.0123, +0.0110),  # 28-31
    (+0.0084, -0.0011), (+0.0000, +0.0178), (-0.0084, -0.0011), (+0.0123, +0.0110),  # 32-35
    (+0.0090, +0.0070), (-0.0025, +0.0015), (-0.0186, -0.0063), (-0.0161, +0.0013),  # 36-39
    (-0.0084, -0.0003), (+0.0025, -0.0030), (+0.0161, +0.0013), (+0.0186, -0.0063),  # 40-43
    (+0.0025, +0.0015), (-0.0090, +0.0070), (-0.0025, -0.0030), (+0.0084, -0.0003),  # 44-47
    (-0.0109, +0.0008), (+0.0061, +0.0025), (+0.0074, +0.0073), (+0.0000, +0.0135),  # 48-51
    (-0.0074, +0.0073), (-0.0061, +0.0025), (+0.0109, +0.0008), (-0.0263, +0.0241),  # 52-55
    (+0.0009, +0.0041), (+0.0000, +0.0061), (-0.0009, +0.0041), (+0.0263, +0.0241),  # 56-59
    (+0.0071, +0.0039), (-0.0085, +0.0061), (+0.0000, +0.0138), (+0.0085, +0.0061),  # 60-63
    (-0.0071, +0.0039), (+0.0123, -0.0070), (+0.0000, -0.0029), (-0.0123, -0.0070),  # 64-67
)
assert len(IBUG68_OFFSETS) == NUM_LANDMARKS



@dataclass(frozen=True)
class FaceBox:
    """One detected face: its box in pixels of the original image and the detector's score.

    The official detector's convention (MediaPipe's task API, which `tools/crop_face.py` runs): integer pixels,
    the top-left corner clamped into the image, the size kept, so the box may reach past the right and bottom
    edges. `official`: the box is the official detector's own, as the official tool would have cropped it."""

    x: int
    y: int
    width: int
    height: int
    score: float
    official: bool = False

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.width / 2, self.y + self.height / 2


@dataclass
class FaceCrop:
    """What the front end makes of one image or video frame.

    `crop`: uint8 RGB [256, 256, 3], or for a whole-image crop (`no_face_crop`) the image padded to a square by
    `expand2square` at its own size (the image processor resizes it in one step). `landmarks`: float32 [68, 2] in
    crop pixels / 256 (x, y per point, the iBUG-300W order; for a whole-image crop, square pixels / side, the same
    units), or None when they were not asked for or the face mesh found no face. `box`: the face the crop was cut
    around, None for a whole-image crop. `detect_ms` (detection and crop) and `landmarks_ms`
    (face mesh) are wall-clock milliseconds.
    """

    crop: np.ndarray
    landmarks: np.ndarray | None
    box: FaceBox | None
    detect_ms: float
    landmarks_ms: float


@dataclass
class Video:
    """The frames the official video processor would use: `frames` (8 RGB uint8 arrays) at `frame_indices`
    among the `num_frames` decoded frames, and the video's `fps` as the container reports it."""

    frames: list[np.ndarray]
    frame_indices: list[int]
    num_frames: int
    fps: float


# --- loading ------------------------------------------------------------------------------------------------


def check_image(rgb: np.ndarray, name: str = "the image") -> np.ndarray:
    """Check that `rgb` is an RGB uint8 [H, W, 3] image big enough to hold a face; return it contiguous.

    Raises FaceLlavaError for an image smaller than MIN_IMAGE_SIDE on a side, ValueError for an array that is
    not [H, W, 3] uint8 (a programming error: `load_image` always returns that).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {rgb.dtype} {list(rgb.shape)}")
    height, width = rgb.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise FaceLlavaError(
            f"{name} is {width}x{height} pixels, too small to hold a face; "
            f"give an image at least {MIN_IMAGE_SIDE} pixels on each side"
        )
    return np.ascontiguousarray(rgb)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 [H, W, 3], upright.

    Applies the EXIF orientation; grayscale, palette, CMYK and RGBA (alpha dropped, as `cv2.imread` in the
    official crop tool does) become RGB; 16-bit images are scaled to 8 bits. Raises FaceLlavaError for a
    missing path, a file that is not an image, a truncated or corrupt image, and an image too small for a face.
    """
    path = Path(path)
    if not path.is_file():
        raise FaceLlavaError(f"image not found: {path}" + (" is a directory" if path.is_dir() else ""))
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _pil_to_rgb(image)
    except UnidentifiedImageError:
        message = f"{path} is not an image Pillow can read; give a JPEG, PNG, BMP, TIFF or WebP file"
        raise FaceLlavaError(message) from None
    except Image.DecompressionBombError as error:
        raise FaceLlavaError(f"{path} is too large to decode safely ({error}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise FaceLlavaError(f"{path} could not be decoded ({error}); the file may be truncated or corrupt") from None
    return check_image(rgb, str(path))


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode as RGB uint8; 16-bit and 32-bit grey levels are scaled, not clipped."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        grey = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and grey.max(initial=0.0) <= 1.0:
            grey = grey * 255.0  # a float image in [0, 1]
        elif image.mode != "F" and (image.mode != "I" or grey.max(initial=0.0) > 255):
            grey = grey / 257.0  # 16-bit levels: 65535 -> 255
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        # palette images with transparency go through RGBA so that Pillow resolves the palette correctly
        image = image.convert("RGBA").convert("RGB") if image.mode in ("P", "PA") else image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def read_video(path: str | Path) -> Video:
    """Decode a video with OpenCV and keep the 8 frames the official processor uses.

    The frames are `np.linspace(0, n - 1, 8, dtype=int)` of the n decoded frames
    (`contract.video_frame_indices`), so a video shorter than 8 frames repeats frames, as the official processor
    does. Frames are decoded in order (exact frame counts, no seeking), keeping only the chosen ones. Raises
    FaceLlavaError for a missing path, a file OpenCV cannot decode, and a video without frames.
    """
    path = Path(path)
    if not path.is_file():
        raise FaceLlavaError(f"video not found: {path}" + (" is a directory" if path.is_dir() else ""))
    # the container's frame count is usually exact; when it is not, a second pass uses the decoded count
    reported, fps = _video_properties(path)
    wanted = video_frame_indices(reported) if reported > 0 else []
    frames, decoded = _decode_frames(path, wanted)
    if decoded == 0:
        raise FaceLlavaError(f"no frames could be decoded from {path}; the video may be corrupt")
    if decoded != reported:
        wanted = video_frame_indices(decoded)
        frames, _ = _decode_frames(path, wanted)
    return Video(frames=[frames[index] for index in wanted], frame_indices=wanted, num_frames=decoded, fps=fps)


def _open_video(path: Path) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise FaceLlavaError(f"{path} is not a video OpenCV can decode; give an MP4, AVI, MOV, MKV or WebM file")
    return capture


def _video_properties(path: Path) -> tuple[int, float]:
    capture = _open_video(path)
    try:
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), float(capture.get(cv2.CAP_PROP_FPS))
    finally:
        capture.release()


def _decode_frames(path: Path, wanted: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode every frame in order, converting only the wanted ones to RGB; returns them and the frame count."""
    wanted_set = set(wanted)
    frames: dict[int, np.ndarray] = {}
    capture = _open_video(path)
    try:
        index = 0
        while capture.grab():
            if index in wanted_set:
                ok, bgr = capture.retrieve()
                if not ok:
                    break
                frames[index] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()
    return frames, index


def load_landmarks(path: str | Path, modality: Modality = "image", num_video_frames: int | None = None) -> np.ndarray:
    """Read precomputed landmarks in the official data format and scale them like the official processors.

    The `.npy` file holds crop pixels (0..256) of the 68 iBUG points, x before y. Image: shape (68, 2) or
    (136,) (interleaved x0, y0, x1, y1, ...); returns float32 [68, 2]. (The official processor takes any
    136 values; a (2, 68) array would be silently misread there, so it is refused here.) Video: shape
    (num_video_frames, 68, 2) as the official processor requires, or (num_video_frames, 136), one row per
    decoded frame (the count must equal the video's, as the official processor asserts); the rows at the
    official frame indices are kept; returns float32 [8, 68, 2]. Values
    are divided by 256 (contract.LANDMARK_SCALE). Raises FaceLlavaError for a missing or unreadable file, a
    wrong shape, a frame count that does not match, non-finite values, and values that look already divided.
    """
    path = Path(path)
    if not path.is_file():
        raise FaceLlavaError(f"landmarks file not found: {path}")
    try:
        points = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise FaceLlavaError(f"{path} is not a readable .npy array ({error}); save landmarks with numpy.save") from None
    if not isinstance(points, np.ndarray) or not np.issubdtype(points.dtype, np.number):
        raise FaceLlavaError(f"{path} does not hold a numeric array; save a (68, 2) array with numpy.save")
    shape = tuple(points.shape)
    if modality == "image":
        if shape not in ((NUM_LANDMARKS, 2), (LANDMARK_VALUES,)):
            raise FaceLlavaError(
                f"{path} has shape {shape}; image landmarks must be (68, 2) or (136,): the 68 iBUG points, x then y"
            )
        points = points.reshape(NUM_LANDMARKS, 2)
    elif modality == "video":
        if len(shape) < 2 or shape[1:] not in ((NUM_LANDMARKS, 2), (LANDMARK_VALUES,)):
            raise FaceLlavaError(
                f"{path} has shape {shape}; video landmarks must be (frames, 68, 2) or (frames, 136), "
                "one row per decoded frame"
            )
        if num_video_frames is None:
            raise ValueError("video landmarks need the video's decoded frame count")
        if shape[0] != num_video_frames:
            raise FaceLlavaError(
                f"{path} has landmarks for {shape[0]} frames but the video decodes to {num_video_frames}; "
                "give one row per decoded frame"
            )
        points = points.reshape(shape[0], NUM_LANDMARKS, 2)[video_frame_indices(num_video_frames)]
    else:
        raise ValueError(f"unknown modality {modality!r}; expected 'image' or 'video'")
    points = points.astype(np.float64)
    if not np.isfinite(points).all():
        raise FaceLlavaError(f"{path} holds NaN or infinite values; every landmark needs a position")
    if np.abs(points).max() <= 2.0:
        raise FaceLlavaError(
            f"{path} holds values within [-2, 2], which look already divided by 256; "
            "the official format stores pixels of the 256x256 face crop"
        )
    return (points / LANDMARK_SCALE).astype(np.float32)


# --- the crop -----------------------------------------------------------------------------------------------


def official_crop(rgb: np.ndarray, box: FaceBox) -> np.ndarray:
    """The official `tools/crop_face.py` crop of one face, as uint8 RGB [256, 256, 3].

    A square of side (width + height) / 2 from the box's top-left corner, with the official margin: 0 (its
    `margin_pct`) capped by the room the box leaves on each side, min(0, x, W - x - w, y, H - y - h). That is
    0 for a box inside the image, and negative for a box that leaves it at the right or bottom, which then
    shrinks the square on every side by that amount. The square is clamped to the image, stopping one pixel
    short of the right and bottom edges (`min(..., size - 1)`), truncated to integers, and resized by
    `cv2.resize`'s default bilinear to 256 x 256: the crops the model was trained on. Raises FaceLlavaError when
    nothing of the square lies in the image (where the official tool's `cv2.resize` would fail).
    """
    height, width = rgb.shape[:2]
    margin = min(0, box.x, width - box.x - box.width, box.y, height - box.y - box.height)
    side = (box.width + box.height) / 2
    left, top = int(max(0, box.x - margin)), int(max(0, box.y - margin))
    right = int(min(box.x + side + margin, width - 1))
    bottom = int(min(box.y + side + margin, height - 1))
    if right <= left or bottom <= top:
        raise FaceLlavaError(f"the face box {box} leaves nothing of the {width}x{height} image to crop")
    return cv2.resize(rgb[top:bottom, left:right], (FACE_CROP_SIZE, FACE_CROP_SIZE))


def correct_landmarks(points: np.ndarray, offsets: Sequence[Sequence[float]] | np.ndarray | None = None
                      ) -> np.ndarray:
    """Move mapped points [68, 2] by per-point offsets given in the face's own frame (x along the outer eye
    corners 36 -> 45, y across, both in units of their distance), `IBUG68_OFFSETS` by default; any units in, the
    same out."""
    offsets = np.asarray(IBUG68_OFFSETS if offsets is None else offsets, dtype=np.float64)
    axis = points[45] - points[36]
    distance = float(np.hypot(*axis))
    cos, sin = axis / distance
    return points + (offsets * distance) @ np.array([[cos, sin], [-sin, cos]])


def mesh_to_ibug68(mesh_points: np.ndarray) -> np.ndarray:
    """Map face-mesh points [468 or 478, 2] to the 68 iBUG points [68, 2] through `MESH_TO_IBUG68`."""
    return np.stack([mesh_points[list(vertices)].mean(axis=0) for vertices in MESH_TO_IBUG68])


# --- the front end ------------------------------------------------------------------------------------------


def _process(graph: Any, image: np.ndarray) -> Any:
    with _quiet_native_stderr():
        return graph.process(image)


class MediaPipeGraphs:
    """The front end's reference backend: MediaPipe's own graphs (the legacy solutions' short- and full-range face
    detection and static face mesh, and the task API's face detector, the official tool's), answering like
    `face_graphs.FrontEndGraphs`. Needs the mediapipe package (the `dev` extra, not the `runtime` one)."""

    name = "mediapipe"

    def __init__(self, refine_landmarks: bool = True) -> None:
        try:
            import mediapipe as mp  # imported here so that loading images and videos does not pay for it
            from mediapipe.tasks.python import BaseOptions, vision
        except ImportError:
            raise FaceLlavaError("the MediaPipe face front end needs the mediapipe package (the dev or train extra); "
                                 "or use the bundle's front-end graphs (`facellava export front-end --bundle DIR`)"
                                 ) from None

        detection = mp.solutions.face_detection
        with _quiet_native_stderr():
            # model_selection 0 is the short-range model: the same network as the official tools/detector.tflite
            # (229,746 bytes there; the wheel's copy lacks 32 bytes of metadata)
            self._detectors = {"short_range": detection.FaceDetection(model_selection=0),
                               "full_range": detection.FaceDetection(model_selection=1)}
            # the official tool's detector itself: MediaPipe's task API with its default options (score >= 0.5,
            # suppression 0.3) on the short-range model, the official tools/detector.tflite's network (the wheel's
            # copy lacks only 32 bytes of metadata, which the task API does not need)
            short_range = Path(mp.__file__).parent / "modules" / "face_detection" / "face_detection_short_range.tflite"
            self._official = vision.FaceDetector.create_from_options(
                vision.FaceDetectorOptions(base_options=BaseOptions(model_asset_path=str(short_range))))
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=1, refine_landmarks=refine_landmarks,
                min_detection_confidence=0.5)

    def detections(self, rgb: np.ndarray, model: str) -> list[Detection]:
        """The legacy FaceDetection (`model` "short_range" or "full_range") on an RGB image: relative boxes."""
        found = _process(self._detectors[model], np.ascontiguousarray(rgb)).detections or []
        return [Detection((d.location_data.relative_bounding_box.xmin, d.location_data.relative_bounding_box.ymin,
                           d.location_data.relative_bounding_box.width, d.location_data.relative_bounding_box.height),
                          np.array([(k.x, k.y) for k in d.location_data.relative_keypoints], dtype=np.float32),
                          float(d.score[0])) for d in found]

    def official_detections(self, rgb: np.ndarray) -> list[tuple[int, int, int, int, float]]:
        """The task API's FaceDetector on the whole image: (x, y, width, height, score) in pixels."""
        import mediapipe as mp

        with _quiet_native_stderr():
            found = self._official.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb)).detections
        return [(d.bounding_box.origin_x, d.bounding_box.origin_y, d.bounding_box.width, d.bounding_box.height,
                 float(d.categories[0].score)) for d in found]

    def mesh(self, rgb: np.ndarray) -> np.ndarray | None:
        """The static FaceMesh's points [478, 2] (468 without refinement) relative to the image, or None."""
        result = _process(self._mesh, rgb)
        if not result.multi_face_landmarks:
            return None
        return np.array([(point.x, point.y) for point in result.multi_face_landmarks[0].landmark], dtype=np.float64)

    def close(self) -> None:
        for graph in (*self._detectors.values(), self._official, self._mesh):
            graph.close()


FRONT_ENDS = ("auto", "graphs", "mediapipe")


class FaceFrontEnd:
    """Face detection, the official crop, and face-mesh landmarks, for images and video frames.

    Detection finds faces of every size (`detect`: BlazeFace short and full range, whole, bordered and tiled),
    with the official detector's box wherever the official tool would crop. `min_face_side` is the smallest face
    searched for, in pixels; on images whose long side is over 64 times that, the smallest is 1/64 of the long
    side (`MIN_FACE_FRACTION`: the tiles, and the time, grow with the square of the ratio). The face mesh (with
    the iris/lips/eyes refinement when `refine_landmarks`) runs on the crop.

    The models run on one of two backends that answer alike: `graphs`, a `face_graphs.FrontEndGraphs` (the ONNX
    graphs a bundle carries, `from_bundle`, with MediaPipe's processing restated in numpy: no MediaPipe needed),
    or by default MediaPipe's own graphs (`MediaPipeGraphs`, the reference). The graphs' mesh is the attention
    model, so they always refine. Holds the models: reuse one instance, and `close()` it (or use it as a context
    manager) when done.
    """

    def __init__(
        self,
        min_face_score: float = MIN_FACE_SCORE,
        refine_landmarks: bool = True,
        min_face_side: int = MIN_FACE_SIDE,
        landmark_correction: bool = True,
        graphs: FrontEndGraphs | None = None,
    ) -> None:
        self.min_face_side = min_face_side
        self.landmark_correction = landmark_correction
        # the short-range graph does not apply min_detection_confidence (set to 0.7, it still returned a 0.52
        # detection: the graph's own min_score_thresh 0.5 applies), so scores are filtered here
        self.min_face_score = min_face_score
        if graphs is not None and not refine_landmarks:
            raise ValueError("the front-end graphs hold the attention face mesh: refine_landmarks must be True")
        self._graphs: FrontEndGraphs | MediaPipeGraphs = graphs if graphs is not None else MediaPipeGraphs(
            refine_landmarks)
        self.backend = "graphs" if graphs is not None else "mediapipe"

    @classmethod
    def from_bundle(cls, bundle: Bundle, front_end: str = "auto", device: str = "auto", ort_device: str = "auto",
                    **options: Any) -> FaceFrontEnd:
        """The front end for a bundle: `front_end` "graphs" runs the bundle's front-end graphs on `device`
        (`FrontEndGraphs.from_bundle`: their TensorRT engines where built for this GPU, else ONNX Runtime on
        `ort_device`, default the best provider installed; "cpu" for the CPU alone), "mediapipe" runs MediaPipe,
        "auto" the graphs when the bundle has them and MediaPipe otherwise. `options` go to the constructor. Raises
        FaceLlavaError for an unknown choice, graphs asked for that the bundle lacks, or neither graphs nor
        MediaPipe available."""
        if front_end not in FRONT_ENDS:
            raise FaceLlavaError(f"unknown front end {front_end!r}; choose from {', '.join(FRONT_ENDS)}")
        has_graphs = has_front_end_graphs(bundle)
        if front_end == "graphs" and not has_graphs:
            raise FaceLlavaError(f"{bundle.path} has no front-end graphs; add them with `facellava export front-end "
                                 "--bundle DIR`, or use --front-end mediapipe")
        if front_end == "mediapipe" or not has_graphs:
            return cls(**options)
        return cls(graphs=FrontEndGraphs.from_bundle(bundle, device, ort_device), **options)

    def close(self) -> None:
        """Release the models."""
        self._graphs.close()

    def __enter__(self) -> FaceFrontEnd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        """All faces in an RGB uint8 image, from the smallest searched for (see the class) to larger than the
        image, ordered left to right by their box centre.

        BlazeFace sees 128 (short range) or 192 (full range) pixels, so one look at a large image misses small
        faces, and a face filling the image edge to edge is missed too. Measured on composites of the shipped
        photograph (`benchmarks/face_detection.py`): full range finds faces from about 1/14 of what it sees
        (`FULL_RANGE_MIN_FRACTION`) to 0.8 of it, short range from about 1/6 to the whole image. So the image is
        looked at: whole by the official detector (short range, the task API) and by full range; inside a border
        by short range (faces larger than the image); and in overlapping square tiles (half a tile apart) by full
        range, each level of tiles half the side of the one before, down to tiles in which full range sees the
        smallest face searched for. A detection touching a tile's inner edge is dropped (the face lies whole in
        a neighbouring tile); of overlapping detections the official one, else the best scored, is kept. Views
        are shrunk (area averaging) to at most `VIEW_SIDE` before MediaPipe sees them. Boxes are in the original
        image's pixels, in the official detector's convention (`FaceBox`).
        """
        rgb = check_image(rgb)
        height, width = rgb.shape[:2]
        official, candidates = self._official_detections(rgb)
        full_range, short_range = "full_range", "short_range"
        candidates += self._look(full_range, rgb, 0, 0, width, height)
        border = max(height, width) // 4
        candidates += self._look(short_range, rgb, 0, 0, width, height, border=border)
        for side in self._tile_sides(height, width):
            for top in _tile_starts(height, side):
                for left in _tile_starts(width, side):
                    candidates += self._look(full_range, rgb, left, top, min(side, width - left),
                                             min(side, height - top), tile=True)
        return sorted(_merge(candidates, official, self.min_face_score), key=lambda box: box.center[0])

    def detect_near(self, rgb: np.ndarray, box: FaceBox) -> list[FaceBox]:
        """The faces in a square of three times `box`'s side around its centre (a face followed from one video
        frame to the next), with the official detector's box where the official rule applies; `detect`'s views
        of that square, without tiles."""
        rgb = check_image(rgb)
        height, width = rgb.shape[:2]
        official, candidates = self._official_detections(rgb)
        side = 3 * max(box.width, box.height)
        cx, cy = box.center
        left, top = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
        right, bottom = min(width, int(cx + side / 2)), min(height, int(cy + side / 2))
        if right > left and bottom > top:  # an empty square (a box of no size, or outside the frame): no view
            for detector in ("short_range", "full_range"):
                candidates += self._look(detector, rgb, left, top, right - left, bottom - top, tile=True)
        return sorted(_merge(candidates, official, self.min_face_score), key=lambda box: box.center[0])

    def _tile_sides(self, height: int, width: int) -> list[int]:
        """The sides of the tile levels, finest first: the finest has the smallest face searched for at
        `TILE_FACE_FRACTION` of its side; each next is `TILE_LEVEL_RATIO` times larger, until the tiles' overlap
        holds every face too small for the whole-image view (below `FULL_RANGE_MIN_FRACTION` of the long side)."""
        long_side = max(height, width)
        smallest = max(self.min_face_side, MIN_FACE_FRACTION * long_side)
        sides = []
        side = smallest / TILE_FACE_FRACTION
        while side < long_side:
            sides.append(round(side))
            if TILE_OVERLAP * side >= FULL_RANGE_MIN_FRACTION * long_side:
                break
            side *= TILE_LEVEL_RATIO
        return sides

    def _look(self, detector: str, rgb: np.ndarray, left: int, top: int, width: int, height: int, border: int = 0,
              tile: bool = False) -> list[FaceBox]:
        """Run one legacy detector ("short_range" or "full_range") on a view of the image (a region, optionally
        inside a border of the processor's mean colour); the detections in image pixels. In a tile, detections
        touching an inner edge are dropped."""
        view = rgb[top : top + height, left : left + width]
        if border:
            view = cv2.copyMakeBorder(view, border, border, border, border, cv2.BORDER_CONSTANT, value=SQUARE_FILL)
        view_height, view_width = view.shape[:2]
        scale = VIEW_SIDE / max(view_height, view_width)
        if scale < 1:
            view = cv2.resize(view, (max(1, round(view_width * scale)), max(1, round(view_height * scale))),
                              interpolation=cv2.INTER_AREA)
        image_height, image_width = rgb.shape[:2]
        edge = 0.02 * max(width, height)
        boxes = []
        for detection in self._graphs.detections(np.ascontiguousarray(view), detector):
            xmin, ymin, relative_width, relative_height = detection.box
            x = left - border + xmin * view_width
            y = top - border + ymin * view_height
            box_width, box_height = relative_width * view_width, relative_height * view_height
            if tile and ((left > 0 and x < left + edge) or (top > 0 and y < top + edge)
                         or (left + width < image_width and x + box_width > left + width - edge)
                         or (top + height < image_height and y + box_height > top + height - edge)):
                continue
            boxes.append(FaceBox(max(0, int(x)), max(0, int(y)), int(box_width), int(box_height),
                                 detection.score))
        return boxes

    def _official_detections(self, rgb: np.ndarray) -> tuple[FaceBox | None, list[FaceBox]]:
        """The official detector on the whole image: (its box when it finds exactly one face, else None; all its
        detections, scored 0.5 or more)."""
        found = self._graphs.official_detections(rgb)
        boxes = [FaceBox(x, y, width, height, score, official=len(found) == 1) for x, y, width, height, score in found]
        return (boxes[0] if len(boxes) == 1 else None), boxes

    def official_box(self, rgb: np.ndarray) -> FaceBox | None:
        """The box the official `tools/crop_face.py` would crop: its detector (the task API, short-range
        model, default options) on the whole image, when it finds exactly one face (the official rule); else
        None."""
        return self._official_detections(check_image(rgb))[0]

    def landmarks(self, crop: np.ndarray) -> np.ndarray | None:
        """The 68 iBUG landmarks of the face in a square crop (the 256 face crop, or a whole image squared by
        `expand2square`), float32 [68, 2] in crop pixels / crop side (= crop pixels / 256 of a 256 crop), or None
        when the face mesh finds no face (it is retried once on the crop inside a black border, which helps when
        the face fills the crop edge to edge)."""
        crop_side = crop.shape[0]
        for border in (0, crop_side // 4):
            image = crop if border == 0 else cv2.copyMakeBorder(crop, *[border] * 4, cv2.BORDER_CONSTANT, value=0)
            mesh = self._graphs.mesh(image)
            if mesh is not None:
                # the mesh's coordinates are relative to the image it saw; bring them back to the crop's
                points = mesh * image.shape[0] - border
                points = mesh_to_ibug68(points)
                if self.landmark_correction:
                    points = correct_landmarks(points)
                return (points / crop_side).astype(np.float32)
        return None

    def process_image(
        self,
        rgb: np.ndarray,
        face_index: int | None = None,
        no_face_crop: bool = False,
        landmarks: bool = True,
        name: str = "the image",
    ) -> FaceCrop:
        """Crop one face from an RGB uint8 image and find its landmarks.

        `face_index` picks a face among those found, counted from 0 left to right; by default the largest
        face. `no_face_crop` skips detection and uses the whole image padded to a square (`expand2square`, the
        official treatment of a non-square image, without resampling); its landmarks then come from the face mesh
        on that square, in the same units, or are None if the mesh finds no face. `landmarks=False` skips
        the face mesh (for precomputed landmarks or the no-landmarks path). `name` names the input in errors.
        Raises FaceLlavaError when no face is found, or `face_index` is out of range.
        """
        rgb = check_image(rgb, name)
        start = time.perf_counter()
        if no_face_crop:
            box, crop = None, expand2square(rgb)
        else:
            box = _pick_face(self.detect(rgb), face_index, name)
            crop = official_crop(rgb, box)
        detect_ms = (time.perf_counter() - start) * 1000
        points, landmarks_ms = self._timed_landmarks(crop) if landmarks else (None, 0.0)
        return FaceCrop(crop=crop, landmarks=points, box=box, detect_ms=detect_ms, landmarks_ms=landmarks_ms)

    def process_video(
        self,
        frames: Sequence[np.ndarray],
        face_index: int | None = None,
        no_face_crop: bool = False,
        landmarks: bool = True,
        name: str = "the video",
    ) -> list[FaceCrop]:
        """Crop the face and find its landmarks in every frame (the 8 frames of `read_video`).

        The face is chosen in the first frame where one is found (`face_index`, or the largest) and followed
        through the others (the detection nearest to the previous frame's); a frame without a detection uses
        the box of the nearest frame that has one. Frames where the face mesh finds no face take the landmarks
        of the nearest frame where it does; if it finds none in any frame, every frame's landmarks are None.
        Raises FaceLlavaError when no frame has a face (suggesting `--no-face-crop`).
        """
        frames = [check_image(frame, f"frame {i} of {name}") for i, frame in enumerate(frames)]
        if no_face_crop:
            return [self.process_image(frame, no_face_crop=True, landmarks=landmarks) for frame in frames]

        detect_ms, found = [], []
        followed: FaceBox | None = None
        for frame in frames:
            start = time.perf_counter()
            # every size until the face is chosen; after that, only around it (a few views instead of tiles)
            faces = self.detect(frame) if followed is None else self.detect_near(frame, followed)
            if faces:
                followed = _pick_face(faces, face_index, name) if followed is None else _nearest(faces, followed)
            found.append(faces)
            detect_ms.append((time.perf_counter() - start) * 1000)
        boxes = _follow_face(found, face_index, name)

        results = []
        for frame, box, ms in zip(frames, boxes, detect_ms, strict=True):
            start = time.perf_counter()
            crop = official_crop(frame, box)
            ms += (time.perf_counter() - start) * 1000
            points, landmarks_ms = self._timed_landmarks(crop) if landmarks else (None, 0.0)
            results.append(FaceCrop(crop=crop, landmarks=points, box=box, detect_ms=ms, landmarks_ms=landmarks_ms))
        if landmarks:
            _fill_from_nearest(results)
        return results

    def _timed_landmarks(self, crop: np.ndarray) -> tuple[np.ndarray | None, float]:
        start = time.perf_counter()
        points = self.landmarks(crop)
        return points, (time.perf_counter() - start) * 1000


def _iou(a: FaceBox, b: FaceBox) -> float:
    width = min(a.x + a.width, b.x + b.width) - max(a.x, b.x)
    height = min(a.y + a.height, b.y + b.height) - max(a.y, b.y)
    inter = max(0, width) * max(0, height)
    return inter / (a.area + b.area - inter) if inter else 0.0


def _overlaps(a: FaceBox, b: FaceBox) -> bool:
    """The same face: IoU >= 0.3, or most of the smaller box inside the larger (a partial face seen in a tile)."""
    width = min(a.x + a.width, b.x + b.width) - max(a.x, b.x)
    height = min(a.y + a.height, b.y + b.height) - max(a.y, b.y)
    inter = max(0, width) * max(0, height)
    return _iou(a, b) >= 0.3 or inter >= 0.6 * min(a.area, b.area)


def _merge(candidates: list[FaceBox], official: FaceBox | None, min_score: float) -> list[FaceBox]:
    """One box per face. Where the official rule applies, the official detector's box is the face's box, so that
    the crop is the official tool's; it counts as a face when it scores `min_score` or another view confirms it
    (IoU >= 0.5 with a detection scoring that much): official scores from 0.5 up are also what noise scores.
    Otherwise the best-scored of overlapping detections is kept."""
    kept: list[FaceBox] = []
    if official is not None and (official.score >= min_score or any(
            box.score >= min_score and _iou(box, official) >= 0.5 for box in candidates)):
        kept.append(official)
    for box in sorted(candidates, key=lambda box: -box.score):
        if box.score >= min_score and not box.official and not any(_overlaps(box, other) for other in kept):
            kept.append(box)
    return kept


def _tile_starts(length: int, side: int) -> list[int]:
    """Where square tiles of `side` start along an axis of `length`: evenly spaced so that neighbours overlap by
    at least `TILE_OVERLAP` of a tile (a face that small lies whole in one of them), the last one ending at the
    edge (one tile when the axis is no longer than a tile)."""
    if length <= side:
        return [0]
    count = math.ceil((length - side) / ((1 - TILE_OVERLAP) * side)) + 1
    return [round(i * (length - side) / (count - 1)) for i in range(count)]


def _pick_face(faces: list[FaceBox], face_index: int | None, name: str) -> FaceBox:
    if not faces:
        raise FaceLlavaError(f"no face found in {name}; use --no-face-crop to use the whole image")
    if face_index is None:
        return max(faces, key=lambda box: box.area)
    if not 0 <= face_index < len(faces):
        raise FaceLlavaError(
            f"face index {face_index} is out of range: {len(faces)} face(s) found in {name}, "
            f"numbered 0 to {len(faces) - 1} from left to right"
        )
    return faces[face_index]


def _follow_face(found: list[list[FaceBox]], face_index: int | None, name: str) -> list[FaceBox]:
    """One box per frame: the chosen face in the first frame that has faces, then the nearest one onward."""
    first = next((i for i, faces in enumerate(found) if faces), None)
    if first is None:
        raise FaceLlavaError(f"no face found in any frame of {name}; use --no-face-crop to use the whole frames")
    chosen: list[FaceBox | None] = [None] * len(found)
    chosen[first] = previous = _pick_face(found[first], face_index, name)
    for i in range(first + 1, len(found)):
        if found[i]:
            chosen[i] = previous = _nearest(found[i], previous)
    return [chosen[_nearest_present(chosen, i)] for i in range(len(found))]


def _nearest(faces: list[FaceBox], previous: FaceBox) -> FaceBox:
    """The face whose centre is nearest to `previous`'s."""
    px, py = previous.center
    return min(faces, key=lambda box: (box.center[0] - px) ** 2 + (box.center[1] - py) ** 2)


def _fill_from_nearest(results: list[FaceCrop]) -> None:
    present = [result.landmarks for result in results]
    if any(points is not None for points in present) and any(points is None for points in present):
        for i, result in enumerate(results):
            if result.landmarks is None:
                result.landmarks = present[_nearest_present(present, i)].copy()


def _nearest_present(items: Sequence[object | None], i: int) -> int:
    """The index of the item nearest to i that is not None (earlier on a tie)."""
    return min((j for j, item in enumerate(items) if item is not None), key=lambda j: (abs(j - i), j))
