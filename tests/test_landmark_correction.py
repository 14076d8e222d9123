"""The landmark correction (runtime/face.py IBUG68_OFFSETS): mirror-symmetric, turning with the face, and closer to
a 68-point detector than the plain mesh mapping. The last is measured against dlib's shape predictor when it is
installed (`pip install dlib-bin face_recognition_models`: a yardstick only, never a dependency); it is skipped,
with that reason, where it is not. benchmarks/landmarks_vs_dlib.py measures more people, held out."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from facellava.contract import IBUG68_MIRROR
from facellava.runtime.face import IBUG68_OFFSETS, FaceFrontEnd, correct_landmarks, load_image

REGIONS = {"jaw": slice(0, 17), "brows": slice(17, 27), "nose": slice(27, 36), "eyes": slice(36, 48),
           "mouth": slice(48, 68)}


def test_offsets_are_mirror_symmetric():
    offsets = np.array(IBUG68_OFFSETS)
    mirrored = offsets[list(IBUG68_MIRROR)] * np.array([-1.0, 1.0])
    assert np.array_equal(offsets, mirrored)
    assert (offsets[[6, 7, 8, 9, 10], 1] > 0.03).all()  # the chin moves down (the mesh's sits too high)


def test_the_correction_turns_and_scales_with_the_face(face_photo: Path):
    with FaceFrontEnd(landmark_correction=False) as front_end:
        raw = front_end.process_image(load_image(face_photo)).landmarks.astype(np.float64) * 256
    angle = np.deg2rad(25)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    turned = raw @ turn.T * 1.7 + 40
    assert np.allclose(correct_landmarks(turned), correct_landmarks(raw) @ turn.T * 1.7 + 40, atol=1e-9)
    assert np.allclose(correct_landmarks(raw, np.zeros((68, 2))), raw)


@pytest.fixture(scope="module")
def dlib_points():
    dlib = pytest.importorskip("dlib", reason="dlib is not installed (pip install dlib-bin), the yardstick here")
    models = importlib.util.find_spec("face_recognition_models")
    if models is None:
        pytest.skip("face_recognition_models (dlib's 68-point model) is not installed")
    model = Path(models.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    detector, predictor = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(model))

    def points(crop: np.ndarray) -> np.ndarray:
        rects = detector(crop, 1)
        rect = max(rects, key=lambda r: r.area()) if len(rects) else dlib.rectangle(0, 0, 255, 255)
        return np.array([(p.x, p.y) for p in predictor(crop, rect).parts()], dtype=np.float64)

    return points


def test_corrected_landmarks_are_closer_to_a_68_point_detector(face_photo: Path, dlib_points):
    photo = load_image(face_photo)
    height, width = photo.shape[:2]
    views = {"none": photo, "flip": np.ascontiguousarray(photo[:, ::-1]), "blur": cv2.GaussianBlur(photo, (0, 0), 2)}
    for angle in (-15, 15):
        turn = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
        views[f"rot{angle:+d}"] = cv2.warpAffine(photo, turn, (width, height), borderMode=cv2.BORDER_REPLICATE)
    errors = {"raw": [], "corrected": []}
    with FaceFrontEnd(landmark_correction=False) as raw_front_end, FaceFrontEnd() as front_end:
        for view in views.values():
            found = front_end.process_image(view)
            reference = dlib_points(found.crop)
            eyes = np.linalg.norm(reference[36] - reference[45])
            raw = raw_front_end.landmarks(found.crop).astype(np.float64) * 256
            corrected = found.landmarks.astype(np.float64) * 256
            for name, points in (("raw", raw), ("corrected", corrected)):
                errors[name].append(np.linalg.norm(points - reference, axis=1) / eyes)
    raw, corrected = np.array(errors["raw"]), np.array(errors["corrected"])
    summary = {region: (100 * raw[:, part].mean(), 100 * corrected[:, part].mean()) for region, part in REGIONS.items()}
    print("NME % raw -> corrected on the shipped photo (one of the 3 people fitted): " + ", ".join(
        f"{region} {a:.1f} -> {b:.1f}" for region, (a, b) in summary.items()) +
        f"; all {100 * raw.mean():.1f} -> {100 * corrected.mean():.1f}")
    assert corrected.mean() < 0.8 * raw.mean() and corrected.mean() < 0.04
    assert summary["jaw"][1] < 7.0
