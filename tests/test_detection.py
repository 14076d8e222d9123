"""Detection at every size on composites of the shipped photograph (tests/composites.py): several faces of very
different sizes in one image, small faces, rotations, faces larger than the image; ordered left to right, the
largest picked by default. MediaPipe's real models, nothing mocked. `benchmarks/face_detection.py` measures the
rates per size over more scenes."""

from __future__ import annotations

import pytest
from composites import compose, tight_chip

from facellava.runtime.face import FaceFrontEnd
from facellava.runtime.pipeline import Pipeline


def found(boxes, faces) -> list[bool]:
    return [any(face.matches(b.x, b.y, b.width, b.height) for b in boxes) for face in faces]


def false_positives(boxes, faces) -> int:
    return sum(not any(face.matches(b.x, b.y, b.width, b.height) for face in faces) for b in boxes)


def test_faces_from_24_to_400_pixels_in_one_image_are_all_found_ordered_and_picked(front_end, photo):
    image, faces = compose(photo, [24, 48, 100, 200, 400], 960, 1280, seed=1)
    boxes = front_end.detect(image)
    assert found(boxes, faces) == [True] * 5 and false_positives(boxes, faces) == 0
    assert len(boxes) == 5
    centres = [box.center[0] for box in boxes]
    assert centres == sorted(centres)  # left to right
    largest = front_end.process_image(image, landmarks=False)
    assert largest.box == max(boxes, key=lambda box: box.area)
    assert faces[0].matches(largest.box.x, largest.box.y, largest.box.width, largest.box.height)  # the 400 px one
    # --face-index picks each, counted left to right
    for index, box in enumerate(boxes):
        assert front_end.process_image(image, face_index=index, landmarks=False).box == box


def test_the_smallest_face_searched_for_is_a_setting(front_end, photo, tiny_bundle):
    # tiles look for faces down to the setting only: a 24 px face is found by default and missed at 100 (larger
    # faces are found either way, by the looks at the whole image)
    image, faces = compose(photo, [200, 60, 24], 720, 960, seed=3)
    assert found(front_end.detect(image), faces) == [True, True, True]
    with FaceFrontEnd(min_face_side=100) as large_only:
        hits = found(large_only.detect(image), faces)
        assert hits[0] and not hits[2]
    pipeline = Pipeline.open(tiny_bundle, vision="onnxruntime", min_face=100)
    try:
        assert pipeline.front_end.min_face_side == 100
        hits = found(pipeline.front_end.detect(image), faces)
        assert hits[0] and not hits[2]
    finally:
        pipeline.close()


def test_faces_down_to_20_pixels_are_found(front_end, photo):
    # the smallest face searched for is 20 px (MIN_FACE_SIDE); 16 px ones are below it and found when upright
    # (measured: all 8 of these; the cascade before found none of them, nor the 32 and 64 px faces)
    for seed in (1, 8, 15, 22):
        image, faces = compose(photo, [300, 150, 64, 32, 20, 16], 800, 1280, seed=seed)
        boxes = front_end.detect(image)
        assert found(boxes, faces) == [True] * 6 and false_positives(boxes, faces) == 0, f"seed {seed}"


@pytest.mark.parametrize("angle", [-30, -15, 15, 30])
def test_turned_faces_are_found(front_end, photo, angle):
    # turned 15 degrees, faces of every size here are found; turned 30, those of 64 px and more (BlazeFace's
    # scores fall with the turn, the smallest faces first: the 32 px one was missed at +30 degrees)
    image, faces = compose(photo, [300, 150, 64, 32], 640, 960, seed=2, angle=angle)
    boxes = front_end.detect(image)
    hits = found(boxes, faces)
    assert (hits[:3] if abs(angle) == 30 else hits) == [True] * (3 if abs(angle) == 30 else 4)
    assert false_positives(boxes, faces) == 0


@pytest.mark.parametrize("fraction", [0.5, 1.0, 1.2])
def test_a_face_filling_the_image_or_larger_is_found(front_end, photo, fraction):
    # 1.0: the face box is the whole image (an official crop fed back in); 1.2: the face is larger than the image
    chip, face = tight_chip(photo, fraction)
    boxes = front_end.detect(chip)
    assert len(boxes) == 1 and found(boxes, [face]) == [True]
