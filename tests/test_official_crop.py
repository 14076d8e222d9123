"""The official crop exactly, border behaviour included: composites of the shipped photograph with the face at each
border, cropped by the front end and by the official `tools/crop_face.py` procedure (its detector: MediaPipe's task
API on the short-range model, reading the file; its crop arithmetic on `cv2.imread`), compared pixel for pixel.
MediaPipe's real models, nothing mocked."""

from __future__ import annotations

from pathlib import Path

import cv2
import mediapipe as mp
import numpy as np
import pytest
from mediapipe.tasks.python import BaseOptions, vision

from facellava.errors import FaceLlavaError
from facellava.runtime.face import FaceBox, load_image, official_crop

SHORT_RANGE = Path(mp.__file__).parent / "modules" / "face_detection" / "face_detection_short_range.tflite"

# Windows of the 512 x 512 photograph (rows, columns) that cut through the face's box (176, 82, 95 x 95), so that
# the detector's box leaves the image on that side; each was checked to score >= 0.82 with the official detector.
BORDERS = {
    "centre": (slice(None), slice(None)),
    "left": (slice(None), slice(185, None)),
    "top": (slice(90, None), slice(None)),
    "right": (slice(None), slice(None, 265)),
    "bottom": (slice(None, 160), slice(None)),
    "top-left": (slice(90, None), slice(185, None)),
    "bottom-right": (slice(None, 165), slice(None, 265)),
    "bottom-left": (slice(None, 165), slice(180, None)),
    "top-right": (slice(90, None), slice(None, 265)),
}


@pytest.fixture(scope="module")
def official_detector():
    options = vision.FaceDetectorOptions(base_options=BaseOptions(model_asset_path=str(SHORT_RANGE)))
    with vision.FaceDetector.create_from_options(options) as detector:
        yield detector


def official_tool(path: Path, detector) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """What tools/crop_face.py makes of an image file: the box of its one detection (None unless exactly one),
    and its 256 x 256 crop (RGB here; the tool writes BGR). The arithmetic restated from the tool: margin 0
    limited by the room on the left, right, top and bottom of the box; start at the origin less the margin,
    clamped at 0; end at origin + (w + h) / 2 + margin, clamped at size - 1; `int` of each; `cv2.resize`."""
    detections = detector.detect(mp.Image.create_from_file(str(path))).detections
    if len(detections) != 1:
        return None
    box = detections[0].bounding_box
    x, y, w, h = box.origin_x, box.origin_y, box.width, box.height
    image = cv2.imread(str(path))
    rows, cols = image.shape[:2]
    margin = min(min(0, x, cols - x - w), min(0, y, rows - y - h))
    side = (w + h) / 2
    x0, y0 = int(max(0, x - margin)), int(max(0, y - margin))
    x1, y1 = int(min(x + side + margin, cols - 1)), int(min(y + side + margin, rows - 1))
    crop = cv2.resize(image[y0:y1, x0:x1], (256, 256))
    return (x, y, w, h), cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("border", list(BORDERS))
def test_face_at_each_border_is_cropped_exactly_as_the_official_tool(front_end, photo, official_detector, tmp_path,
                                                                     border):
    window = np.ascontiguousarray(photo[BORDERS[border]])
    path = tmp_path / f"{border}.png"
    cv2.imwrite(str(path), cv2.cvtColor(window, cv2.COLOR_RGB2BGR))
    official = official_tool(path, official_detector)
    assert official is not None, "the official tool finds exactly one face here"
    official_box, official_crop_rgb = official

    face = front_end.process_image(load_image(path))
    assert face.box.official and (face.box.x, face.box.y, face.box.width, face.box.height) == official_box
    assert np.array_equal(face.crop, official_crop_rgb)
    rows, cols = window.shape[:2]
    x, y, w, h = official_box
    # the composites really put the box across that border (the origin clamped to 0 on the left and top, the
    # box past the edge on the right and bottom)
    assert ("left" in border) == (x == 0) and ("top" in border) == (y == 0)
    assert ("right" in border) == (x + w > cols) and ("bottom" in border) == (y + h > rows)


def test_box_past_the_right_or_bottom_edge_shrinks_the_square_on_every_side(photo):
    # the official margin: min(0, x, W - x - w, y, H - y - h) = 265 - 177 - 97 = -9 for this box in a 265-wide
    # image, so the square of side 97 starts 9 pixels in and ends 9 pixels early on both axes
    window = np.ascontiguousarray(photo[:, :265])
    crop = official_crop(window, FaceBox(x=177, y=79, width=97, height=97, score=1.0))
    assert np.array_equal(crop, cv2.resize(window[88:167, 186:264], (256, 256)))
    # inside the image the margin is 0 (1 pixel of room on the right and bottom here), the square of side 101
    # ends at column 501, and at the bottom it stops one pixel short of the edge (min(521, 512 - 1))
    crop = official_crop(photo, FaceBox(x=400, y=420, width=111, height=91, score=1.0))
    assert np.array_equal(crop, cv2.resize(photo[420:511, 400:501], (256, 256)))


def test_a_box_the_official_arithmetic_leaves_nothing_of_is_a_clear_error(photo):
    # 60 x 60 at (480, 490) in 512: margin -38, so the square would run from 518 to 502 (the official tool's
    # cv2.resize fails on the empty slice)
    with pytest.raises(FaceLlavaError, match="leaves nothing of the 512x512 image to crop"):
        official_crop(photo, FaceBox(x=480, y=490, width=60, height=60, score=1.0))


def test_two_faces_are_not_the_official_rule(front_end, photo):
    # the official tool crops nothing when it finds two faces; the front end still picks one, by its own boxes
    pair = np.ascontiguousarray(np.concatenate([photo, photo[:, ::-1]], axis=1))
    assert front_end.official_box(pair) is None
    faces = front_end.detect(pair)
    assert len(faces) == 2 and not any(face.official for face in faces)
    assert all(face.x >= 0 and face.y >= 0 for face in faces)
