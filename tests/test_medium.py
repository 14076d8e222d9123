"""The one input path (`runtime/medium.py`): a file, an array (a camera frame) and a video's decoded frames give the
same crop, landmarks and pixel values; the calibration set reads through it too. Real photograph, MediaPipe's real
models, nothing mocked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_video

from facellava.calibration.dataset import build_calibration_set
from facellava.errors import FaceLlavaError
from facellava.runtime import face
from facellava.runtime.medium import prepare_medium
from facellava.runtime.preprocess import preprocess_image


def test_a_file_and_its_array_give_the_same_medium(front_end, face_photo: Path):
    from_file = prepare_medium(front_end, image=face_photo)
    from_array = prepare_medium(front_end, image=face.load_image(face_photo))
    assert from_file.modality == "image" and from_file.pixel_values.shape == (3, 224, 224)
    assert from_file.landmarks.shape == (68, 2) and from_file.landmarks_source == "face mesh"
    assert np.array_equal(from_file.pixel_values, from_array.pixel_values)
    assert np.array_equal(from_file.landmarks, from_array.landmarks)
    assert np.array_equal(from_file.pixel_values, preprocess_image(from_file.crops[0].crop))
    assert from_file.crops[0].box.official and from_file.detect_ms > 0 and from_file.preprocessing_ms > 0


def test_a_video_file_and_its_decoded_frames_give_the_same_medium(front_end, tmp_path: Path):
    path = write_video(tmp_path / "clip.mp4", 10)
    from_file = prepare_medium(front_end, video=path)
    clip = face.read_video(path)
    decoded = [None] * clip.num_frames  # only the official 8 of the 10 are read from the list
    for index, frame in zip(clip.frame_indices, clip.frames, strict=True):
        decoded[index] = frame
    from_frames = prepare_medium(front_end, video=decoded)
    assert from_file.pixel_values.shape == (3, 8, 224, 224) and from_file.landmarks.shape == (8, 68, 2)
    assert from_file.num_frames == from_frames.num_frames == 10
    assert np.array_equal(from_file.pixel_values, from_frames.pixel_values)
    assert np.array_equal(from_file.landmarks, from_frames.landmarks)


def test_landmark_choices(front_end, face_photo: Path, tmp_path: Path):
    found = prepare_medium(front_end, image=face_photo)
    np.save(tmp_path / "points.npy", found.landmarks * 256.0)
    from_file = prepare_medium(front_end, image=face_photo, landmarks=tmp_path / "points.npy")
    assert from_file.landmarks_source == "file" and np.allclose(from_file.landmarks, found.landmarks, atol=1e-6)
    assert from_file.landmarks_ms == 0.0  # the face mesh did not run
    none = prepare_medium(front_end, image=face_photo, no_landmarks=True)
    assert none.landmarks is None and none.landmarks_source == "none"
    assert np.array_equal(none.pixel_values, found.pixel_values)


def test_the_calibration_set_reads_through_the_same_path(front_end, face_photo: Path, tmp_path: Path):
    folder = tmp_path / "faces"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(face_photo.read_bytes())
    data = build_calibration_set(folder, front_end=front_end, progress=False)
    medium = prepare_medium(front_end, image=folder / "photo.jpg")
    assert np.array_equal(data.pixel_values["image"][0], medium.pixel_values)
    assert np.array_equal(data.landmarks["image"][0], medium.landmarks)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give exactly one of an image or a video"),
        ({"image": "x.jpg", "video": "y.mp4"}, "give exactly one of an image or a video"),
        ({"image": "x.jpg", "landmarks": "p.npy", "no_landmarks": True}, "give landmarks or ask for none"),
        ({"video": []}, "a video needs at least one frame"),
        ({"image": "missing.jpg"}, "image not found"),
    ],
)
def test_bad_media_are_one_line_errors(front_end, kwargs, message):
    with pytest.raises(FaceLlavaError, match=message):
        prepare_medium(front_end, **kwargs)
