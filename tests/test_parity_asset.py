"""The export's face-photograph parity inputs come from the real front end: the shipped photograph's crops and
landmarks, made once by `FaceFrontEnd` and shipped as runtime/assets/astronaut_face.npz, still equal what the
front end makes; the pixels are the runtime's preprocessing of the front end's crop; no MediaPipe is needed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facellava import contract
from facellava.export import parity
from facellava.runtime.assets import face_photo_record
from facellava.runtime.preprocess import preprocess_image, preprocess_video

# The face mesh on the same pixels gives the same points on one machine; across MediaPipe builds and CPUs they may
# move by float rounding. 1e-3 of the crop (a quarter of a crop pixel) is far below the landmarks' own error
# against a 68-point detector (about 4 % of the eye distance, ~1.5 crop pixels).
LANDMARK_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def made_now(photo: np.ndarray) -> dict[str, np.ndarray]:
    return parity.front_end_record(photo)


def test_the_shipped_record_is_what_the_front_end_makes(made_now, face_photo: Path):
    shipped = face_photo_record()
    assert str(shipped["photo_sha256"]) == contract.file_sha256(face_photo)
    for name in ("image_box", "video_boxes"):  # detection: exactly the same boxes
        np.testing.assert_array_equal(shipped[name], made_now[name], err_msg=f"{name}: run write_face_photo_asset()")
    for name in ("image_landmarks", "video_landmarks"):
        worst = float(np.abs(shipped[name] - made_now[name]).max())
        assert worst <= LANDMARK_TOLERANCE, f"{name} moved by {worst}: run write_face_photo_asset()"
    # a face, not noise: eyes left and right of the nose, brows over eyes over nostrils over lips, chin lowest
    points = shipped["image_landmarks"]
    regions = {name: points[start:stop].mean(0) for name, start, stop in contract.LANDMARK_REGIONS}
    assert regions["eye1"][0] < regions["nose"][0] < regions["eye2"][0]
    assert regions["eyebrow1"][1] < regions["eye1"][1] < regions["nostril"][1] < regions["lips"][1]
    assert points[8, 1] == points[:, 1].max()
    # the drifting video: the face moves VIDEO_DRIFT_PX left and up per frame in the window
    centres = shipped["video_boxes"][:, :2] + shipped["video_boxes"][:, 2:] / 2
    assert np.all(np.diff(centres, axis=0) < 0)


def test_parity_inputs_are_the_runtimes_crop_preprocessed(front_end, photo: np.ndarray, face_photo: Path):
    image = parity.face_photo_inputs("image", True, face_photo)
    found = front_end.process_image(photo)
    np.testing.assert_array_equal(image["pixel_values"][0], preprocess_image(found.crop))
    np.testing.assert_allclose(image["landmarks"][0], found.landmarks, atol=LANDMARK_TOLERANCE)
    video = parity.face_photo_inputs("video", False, None)
    crops = front_end.process_video(parity.drifting_frames(photo), landmarks=False)
    assert set(video) == {"pixel_values"} and video["pixel_values"].shape == (1, 3, 8, 224, 224)
    np.testing.assert_array_equal(video["pixel_values"][0], preprocess_video([c.crop for c in crops]))


def test_another_photograph_runs_the_front_end(photo: np.ndarray, tmp_path: Path, face_photo: Path):
    from PIL import Image

    copy = tmp_path / "same.jpg"
    shutil.copy(face_photo, copy)  # the same bytes elsewhere: the shipped record
    np.testing.assert_array_equal(parity.face_photo_inputs("image", True, copy)["landmarks"],
                                  parity.face_photo_inputs("image", True)["landmarks"])
    mirrored = tmp_path / "mirrored.png"
    Image.fromarray(photo[:, ::-1]).save(mirrored)
    inputs = parity.face_photo_inputs("image", True, mirrored)
    # the mirrored face: its landmarks are the shipped ones mirrored, renumbered, within the face mesh's noise
    shipped = face_photo_record()["image_landmarks"]
    expected = np.stack([1 - shipped[:, 0], shipped[:, 1]], axis=1)[list(contract.IBUG68_MIRROR)]
    assert np.abs(inputs["landmarks"][0] - expected).mean() < 0.02


def test_the_export_inputs_need_no_mediapipe():
    code = ("import sys; sys.modules['mediapipe'] = None\n"
            "from facellava.export import parity\n"
            "for modality in ('image', 'video'):\n"
            "    inputs = parity.parity_inputs(modality, True, seed=0)\n"
            "    print(modality, inputs['face_photo']['pixel_values'].shape, inputs['face_photo']['landmarks'].shape)\n"
            "print('mediapipe' in sys.modules and sys.modules['mediapipe'] is not None)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["image (1, 3, 224, 224) (1, 68, 2)",
                                            "video (1, 3, 8, 224, 224) (1, 8, 68, 2)", "False"]


def test_the_synthetic_data_carries_the_same_landmarks(front_end, photo: np.ndarray):
    """model/synthetic.py draws its views around the shipped record's face and can carry its landmarks through
    each augmentation instead of running the face mesh: both agree with the front end on the augmented crop
    (mirrored crops renumbered by the contract's mirror table) to about 1 % of the eye distance."""
    from facellava.model import synthetic

    box, _ = synthetic.photo_face()
    np.testing.assert_array_equal(box[:2], face_photo_record()["image_box"][:2])
    rng = np.random.default_rng(3)
    for flip in (False, True, False, True):
        view = {**synthetic._random_view(rng, box), "flip": flip}
        affine = synthetic.crop_affine(view["centre"], view["side"], view["angle"], view["flip"])
        crop = synthetic.warp(photo, affine, view["brightness"])
        carried = synthetic.carried_landmarks(crop, affine)
        found = front_end.landmarks(crop) * contract.LANDMARK_SCALE
        eyes = np.linalg.norm(carried[45] - carried[36])
        assert np.linalg.norm(carried - found, axis=1).mean() < 0.03 * eyes, (flip, view)
