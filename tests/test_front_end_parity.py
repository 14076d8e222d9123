"""The face front end on ONNX graphs (runtime/face_graphs.py: MediaPipe's models converted by the export, with
MediaPipe's processing restated in numpy) against MediaPipe itself, on the shipped photograph and composites of
it (several faces, a face filling the image, a black border, rotations).

Measured on these images (ONNX Runtime 1.32 CPU against MediaPipe 0.10.21; 10 faces in 6 images): the official
detector's pixel boxes are identical (scores within 2.4e-7); the legacy detectors' relative boxes agree to within
3.6e-7 of the image side, keypoints 1.8e-7, scores 1.1e-6; the face mesh's 478 points to within 0.017 image pixels;
the front end's face boxes are identical, its 256 x 256 crops identical to the byte, and its 68 landmarks agree to
within 0.033 crop pixels (0.004 on the whole-image path). The limits below leave room for other CPUs' rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from composites import compose, tight_chip

from facellava.runtime.face import FaceFrontEnd, MediaPipeGraphs
from facellava.runtime.face_graphs import FRONT_END_FILES, FULL_RANGE, SHORT_RANGE, FrontEndGraphs, ssd_anchors

BOX_TOLERANCE = 1e-5  # relative units of the image side
SCORE_TOLERANCE = 1e-5
MESH_TOLERANCE_PX = 0.05  # image pixels
LANDMARK_TOLERANCE_PX = 0.1  # crop pixels of the 256 crop
QUESTION = "What is the facial expression?"


@pytest.fixture(scope="session")
def front_end_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle holding only the front-end graphs, written by `facellava export front-end`'s function."""
    from facellava.export.front_end import export_front_end

    bundle = tmp_path_factory.mktemp("front-end") / "bundle"
    export_front_end(bundle, progress=False)
    return bundle


@pytest.fixture(scope="session")
def graph_files(front_end_bundle: Path) -> dict[str, Path]:
    from facellava.bundle import Bundle

    opened = Bundle.open(front_end_bundle)
    return {model: opened.path_of(name) for model, name in FRONT_END_FILES.items()}


@pytest.fixture(scope="module")
def graphs(graph_files) -> FrontEndGraphs:
    return FrontEndGraphs.from_files(graph_files)


@pytest.fixture(scope="module")
def reference():
    graphs = MediaPipeGraphs()
    yield graphs
    graphs.close()


@pytest.fixture(scope="module")
def images(photo) -> dict[str, np.ndarray]:
    chip, _ = tight_chip(photo, 1.0)
    return {
        "photo": photo,
        "group": compose(photo, [30, 60, 90, 120], 480, 640, seed=1)[0],
        "face_fills_image": chip,
        "black_border": cv2.copyMakeBorder(chip, 64, 64, 64, 64, cv2.BORDER_CONSTANT, value=0),
        "turned_30": compose(photo, [150], 400, 400, seed=3, angle=30)[0],
        "turned_-60_two_faces": compose(photo, [120, 80], 400, 500, seed=4, angle=-60)[0],
    }


IMAGES = ["photo", "group", "face_fills_image", "black_border", "turned_30", "turned_-60_two_faces"]


def test_ssd_anchors_are_mediapipes():
    short, full = ssd_anchors(SHORT_RANGE), ssd_anchors(FULL_RANGE)
    assert short.shape == (896, 2) and full.shape == (2304, 2)
    # stride 8: 16 x 16 cells, two anchors each; strides 16 x 3: 8 x 8 cells, six anchors each
    np.testing.assert_allclose(short[:4], [[0.5 / 16, 0.5 / 16]] * 2 + [[1.5 / 16, 0.5 / 16]] * 2)
    np.testing.assert_allclose(short[512:519], [[0.5 / 8, 0.5 / 8]] * 6 + [[1.5 / 8, 0.5 / 8]])
    np.testing.assert_allclose(full[[0, 1, 48, 2303]], [[0.5 / 48, 0.5 / 48], [1.5 / 48, 0.5 / 48],
                                                        [0.5 / 48, 1.5 / 48], [47.5 / 48, 47.5 / 48]])


@pytest.mark.parametrize("name", IMAGES)
def test_detectors_and_mesh_equal_mediapipes(name, images, graphs, reference):
    image = images[name]
    ours, theirs = graphs.official_detections(image), reference.official_detections(image)
    assert [box[:4] for box in ours] == [box[:4] for box in theirs]  # pixel boxes: identical integers
    assert [box[4] for box in ours] == pytest.approx([box[4] for box in theirs], abs=SCORE_TOLERANCE)
    for model in ("short_range", "full_range"):
        ours = sorted(graphs.detections(image, model), key=lambda d: d.box)
        theirs = sorted(reference.detections(image, model), key=lambda d: d.box)
        assert len(ours) == len(theirs), model
        for a, b in zip(ours, theirs, strict=True):
            assert np.abs(np.subtract(a.box, b.box)).max() < BOX_TOLERANCE
            assert np.abs(a.keypoints - b.keypoints).max() < BOX_TOLERANCE
            assert abs(a.score - b.score) < SCORE_TOLERANCE
    ours, theirs = graphs.mesh(image), reference.mesh(image)
    assert ours.shape == theirs.shape == (478, 2)
    assert np.abs(ours - theirs).max() * max(image.shape[:2]) < MESH_TOLERANCE_PX


@pytest.mark.parametrize("name", IMAGES)
def test_front_end_equals_mediapipes(name, images, graphs, front_end):
    image = images[name]
    on_graphs = FaceFrontEnd(graphs=graphs)
    assert on_graphs.backend == "graphs" and front_end.backend == "mediapipe"
    ours, theirs = on_graphs.detect(image), front_end.detect(image)
    assert [(b.x, b.y, b.width, b.height, b.official) for b in ours] == \
        [(b.x, b.y, b.width, b.height, b.official) for b in theirs]
    assert [b.score for b in ours] == pytest.approx([b.score for b in theirs], abs=SCORE_TOLERANCE)
    for face_index in range(len(ours)):
        a, b = on_graphs.process_image(image, face_index), front_end.process_image(image, face_index)
        assert (a.box.x, a.box.y, a.box.width, a.box.height) == (b.box.x, b.box.y, b.box.width, b.box.height)
        assert np.array_equal(a.crop, b.crop)
        assert np.abs(a.landmarks - b.landmarks).max() * 256 < LANDMARK_TOLERANCE_PX
    a, b = on_graphs.process_image(image, no_face_crop=True), front_end.process_image(image, no_face_crop=True)
    assert np.array_equal(a.crop, b.crop)
    assert np.abs(a.landmarks - b.landmarks).max() * 256 < LANDMARK_TOLERANCE_PX


def test_video_front_end_equals_mediapipes(tmp_path, graphs, front_end):
    """The 8 official frames of a clip in which the face drifts: the face followed frame to frame (`detect_near`)."""
    from conftest import write_video

    from facellava.runtime.face import read_video

    frames = read_video(write_video(tmp_path / "clip.mp4", 8)).frames
    ours, theirs = FaceFrontEnd(graphs=graphs).process_video(frames), front_end.process_video(frames)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.box.x, a.box.y, a.box.width, a.box.height) == (b.box.x, b.box.y, b.box.width, b.box.height)
        assert np.array_equal(a.crop, b.crop)
        assert np.abs(a.landmarks - b.landmarks).max() * 256 < LANDMARK_TOLERANCE_PX


def _copy_bundle(source: Path, target: Path, front_end: bool) -> Path:
    """A copy of the bundle `source` with (exported when missing) or without the front-end graphs."""
    from facellava.bundle import Bundle, BundleWriter
    from facellava.export.front_end import export_front_end

    shutil.copytree(source, target)
    present = [name for name in FRONT_END_FILES.values() if name in Bundle.open(target).files]
    if front_end and len(present) < len(FRONT_END_FILES):
        export_front_end(target, progress=False)
    elif not front_end and present:
        with BundleWriter.transaction(target, create=False) as writer:
            for name in present:
                writer.remove(name)
    return target


def test_run_answers_alike_with_either_front_end(tiny_bundle, face_photo, tmp_path):
    from test_runtime import expect_answer, expect_error

    from facellava.runtime.pipeline import Pipeline

    graphs_bundle = _copy_bundle(tiny_bundle, tmp_path / "with", front_end=True)
    plain_bundle = _copy_bundle(tiny_bundle, tmp_path / "without", front_end=False)

    answers = {choice: expect_answer(graphs_bundle, "--front-end", choice, "--max-tokens", "12", "--image",
                                     face_photo, QUESTION) for choice in ("graphs", "mediapipe")}
    assert answers["graphs"]["text"] == answers["mediapipe"]["text"]
    assert answers["graphs"]["tokens"] == answers["mediapipe"]["tokens"] and len(answers["graphs"]["tokens"]) > 0
    assert answers["graphs"]["landmarks"] == answers["mediapipe"]["landmarks"] == "face mesh"
    # auto takes the graphs where the bundle has them and MediaPipe where it has not
    for bundle, expected in ((graphs_bundle, "graphs"), (plain_bundle, "mediapipe")):
        pipeline = Pipeline.open(bundle, vision="onnxruntime")
        try:
            assert pipeline.front_end.backend == expected
        finally:
            pipeline.close()
    expect_error(plain_bundle, "has no front-end graphs", "--front-end", "graphs", "--image", face_photo, QUESTION)


def test_weighted_nms_keeps_a_degenerate_best_box_alone() -> None:
    """A box of no area has IoU 0 with itself: it must still be taken (and the loop end), alone, not averaged."""
    from facellava.runtime.face_graphs import NUM_KEYPOINTS, weighted_nms

    boxes = np.float32([[10, 10, 0, 0], [0, 0, 8, 8], [1, 1, 8, 8], [50, 50, 4, 4]])
    keypoints = np.arange(4 * NUM_KEYPOINTS * 2, dtype=np.float32).reshape(4, NUM_KEYPOINTS, 2)
    scores = np.float32([0.9, 0.8, 0.7, 0.6])
    found = weighted_nms(boxes, keypoints, scores)
    assert [round(score, 6) for _, _, score in found] == [0.9, 0.8, 0.6]
    assert np.array_equal(found[0][0], boxes[0]) and np.allclose(found[0][1], keypoints[0], rtol=1e-6)
    weights = np.float32([0.8, 0.7])  # the two overlapping boxes (IoU 49/79) averaged, weighted by score
    assert np.allclose(found[1][0][:2], (boxes[1:3, :2] * weights[:, None]).sum(0) / weights.sum())


def test_following_a_box_of_no_size_finds_nothing_new(graphs, photo) -> None:
    from facellava.runtime.face import FaceBox

    front_end = FaceFrontEnd(graphs=graphs)  # not closed: the graphs are the module's
    found = front_end.detect_near(photo, FaceBox(100, 100, 0, 0, 1.0))
    assert [box.official for box in found] == [True]  # the whole image's official detection, no traceback
