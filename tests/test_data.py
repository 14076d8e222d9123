"""The training data reads its media through the runtime's one input path (`prepare_medium`), with the official
training's treatment of a face crop: an image padded to a square (`expand2square`) then the image processor, a
video's 8 official frames through the video processor, landmark files in crop pixels divided by 256."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_video
from PIL import Image

from facellava import contract
from facellava.model.data import ConversationDataset, ConversationTokenizer, UnusableRecord
from facellava.runtime import face
from facellava.runtime.preprocess import expand2square, preprocess_image, preprocess_video


def conversation(placeholder: str) -> list[dict]:
    return [{"from": "human", "value": f"{placeholder}\nHow old is this person?"},
            {"from": "gpt", "value": "About 40 years old."}]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, face_photo: Path) -> Path:
    """An image that is not square (300 x 256), a 12-frame video, their landmark files, and two bad landmark files
    (a NaN; 5 rows for a 12-frame video)."""
    folder = tmp_path_factory.mktemp("data")
    Image.open(face_photo).convert("RGB").crop((100, 20, 400, 276)).save(folder / "wide.png")
    write_video(folder / "clip.mp4", 12, face_photo)
    rng = np.random.default_rng(0)
    np.save(folder / "wide.npy", rng.uniform(20, 230, (68, 2)).astype(np.float32))
    np.save(folder / "clip.npy", rng.uniform(20, 230, (12, 68, 2)).astype(np.float32))
    nan = np.load(folder / "wide.npy")
    nan[3, 0] = np.nan
    np.save(folder / "nan.npy", nan)
    np.save(folder / "short.npy", np.load(folder / "clip.npy")[:5])
    records = [
        {"image": "wide.png", "landmarks_2d": "wide.npy", "conversations": conversation("<image>")},
        {"video": "clip.mp4", "landmarks_2d": "clip.npy", "conversations": conversation("<video>")},
        {"image": "wide.png", "conversations": conversation("<image>")},
        {"image": "wide.png", "landmarks_2d": "nan.npy", "conversations": conversation("<image>")},
        {"video": "clip.mp4", "landmarks_2d": "short.npy", "conversations": conversation("<video>")},
    ]
    (folder / "data.json").write_text(json.dumps(records))
    return folder


def test_examples_are_the_official_training_inputs(data: Path, tiny_model):
    dataset = ConversationDataset.load(data / "data.json", ConversationTokenizer(tiny_model.tokenizer))
    assert len(dataset) == 5
    image, video, plain, nan, short = (dataset.load_example(r) if i < 3 else r for i, r in enumerate(dataset.records))

    expected = preprocess_image(expand2square(face.load_image(data / "wide.png")))  # 300 x 300, then 224
    np.testing.assert_array_equal(image.pixel_values.numpy(), expected)
    np.testing.assert_array_equal(image.landmarks.numpy(), np.load(data / "wide.npy") / contract.LANDMARK_SCALE)
    assert plain.landmarks is None
    np.testing.assert_array_equal(plain.pixel_values.numpy(), expected)

    clip = face.read_video(data / "clip.mp4")
    assert clip.frame_indices == [0, 1, 3, 4, 6, 7, 9, 11]
    np.testing.assert_array_equal(video.pixel_values.numpy(), preprocess_video(clip.frames))
    np.testing.assert_array_equal(video.landmarks.numpy(),
                                  np.load(data / "clip.npy")[clip.frame_indices] / contract.LANDMARK_SCALE)

    with pytest.raises(UnusableRecord, match=r"^landmarks file that cannot be used \(holds NaN or infinite values"):
        dataset.load_example(nan)
    with pytest.raises(UnusableRecord, match=r"\(has landmarks for 5 frames but the video decodes to 12"):
        dataset.load_example(short)
    (data / "broken.png").write_bytes(b"not a png")
    broken = type(nan)(**{**nan.__dict__, "media": data / "broken.png", "landmarks": None})
    with pytest.raises(UnusableRecord, match="^image file that cannot be decoded$"):
        dataset.load_example(broken)
