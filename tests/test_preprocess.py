"""The torch-free preprocessing against the official processors' PyTorch operations, on the real face crop."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from facellava.contract import CLIP_MEAN, CLIP_STD, IMAGE_SIZE  # noqa: E402
from facellava.runtime.face import FaceFrontEnd, load_image  # noqa: E402
from facellava.runtime.preprocess import preprocess_image, preprocess_video  # noqa: E402

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)
# float32 rounding on [0, 1] data is about 1e-6; divided by the CLIP std (about 0.26) about 4e-6. A different
# resampling kernel costs 1e-2 or more (see test_other_kernels_do_not_match).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def face_crop(face_photo: Path) -> np.ndarray:
    with FaceFrontEnd() as front_end:
        return front_end.process_image(load_image(face_photo), landmarks=False).crop


def center_crop(tensor: torch.Tensor, side: int) -> torch.Tensor:
    """torchvision's center_crop offsets."""
    height, width = tensor.shape[-2:]
    top, left = int(round((height - side) / 2.0)), int(round((width - side) / 2.0))
    return tensor[..., top : top + side, left : left + side]


def official_image(image: np.ndarray) -> np.ndarray:
    """LanguageBindImageProcessor: ToTensor -> Resize(224, BICUBIC, antialias) -> CenterCrop(224) -> Normalize."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    height, width = tensor.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(IMAGE_SIZE * long / short)
    size = (IMAGE_SIZE, new_long) if height <= width else (new_long, IMAGE_SIZE)
    if size != (height, width):
        tensor = F.interpolate(tensor[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    return ((center_crop(tensor, IMAGE_SIZE) - MEAN) / STD).numpy()


def official_video(frames: list[np.ndarray]) -> np.ndarray:
    """LanguageBindVideoProcessor: /255 -> NormalizeVideo -> ShortSideScale(224) -> CenterCropVideo(224)."""
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 255  # C, T, H, W
    video = (video - MEAN[:, :, :, None]) / STD[:, :, :, None]
    _, _, height, width = video.shape
    if width < height:
        size = (int(math.floor(height / width * IMAGE_SIZE)), IMAGE_SIZE)
    else:
        size = (IMAGE_SIZE, int(math.floor(width / height * IMAGE_SIZE)))
    video = F.interpolate(video, size=size, mode="bilinear", align_corners=False)  # T as channels, C as batch
    return center_crop(video, IMAGE_SIZE).numpy()


def test_image_matches_the_official_processor_on_the_face_crop(face_crop):
    ours = preprocess_image(face_crop)
    reference = official_image(face_crop)
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
    difference = np.abs(ours - reference).max()
    print(f"image preprocessing max-abs vs PyTorch on the face crop: {difference:.2e}")
    assert difference < TOLERANCE


@pytest.mark.parametrize("shape", [(300, 256), (256, 320), (180, 200)])
def test_image_matches_on_other_shapes(face_crop, shape):
    # non-square inputs exercise the short-side rule and the centre crop; a small one is enlarged
    image = cv2.resize(face_crop, shape[::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(preprocess_image(image) - official_image(image)).max() < TOLERANCE


def test_video_matches_the_official_processor(face_crop):
    # eight 256 crops that differ, as the crops of a real clip do
    frames = [np.roll(face_crop, shift, axis=1) for shift in range(0, 32, 4)]
    ours = preprocess_video(frames)
    reference = official_video(frames)
    assert ours.shape == (3, 8, 224, 224) and ours.dtype == np.float32
    difference = np.abs(ours - reference).max()
    print(f"video preprocessing max-abs vs PyTorch on the face crops: {difference:.2e}")
    assert difference < TOLERANCE


@pytest.mark.parametrize("shape", [(256, 320), (300, 256), (200, 180)])
def test_video_matches_on_other_shapes(face_crop, shape):
    frames = [cv2.resize(np.roll(face_crop, 8 * i, axis=0), shape[::-1]) for i in range(8)]
    assert np.abs(preprocess_video(frames) - official_video(frames)).max() < TOLERANCE


def test_other_kernels_do_not_match(face_crop):
    """The claims behind the kernel choice: OpenCV's bicubic is not PyTorch's antialiased bicubic."""
    pixels = face_crop.astype(np.float32) / 255
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    bicubic = F.interpolate(tensor, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    opencv_cubic = cv2.resize(pixels, (224, 224), interpolation=cv2.INTER_CUBIC)
    assert np.abs(opencv_cubic - bicubic[0].permute(1, 2, 0).numpy()).max() > 1e-2


def test_wrong_inputs_are_rejected(face_crop):
    with pytest.raises(ValueError, match="exactly 8 frames"):
        preprocess_video([face_crop] * 7)
    with pytest.raises(ValueError, match="RGB uint8"):
        preprocess_image(face_crop.astype(np.float32))
    with pytest.raises(ValueError, match="differ in size"):
        preprocess_video([face_crop] * 7 + [face_crop[:200]])


def test_runtime_modules_do_not_import_torch():
    code = (
        "import sys, facellava.runtime.face as face, facellava.runtime.preprocess; face.FaceFrontEnd().close(); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
