"""`--no-face-crop` against the official path: LLaVA's `expand2square` (PIL, as the official training code pads)
then the official image processor (LanguageBind's ToTensor -> Resize(224, BICUBIC) -> CenterCrop -> Normalize, as
PyTorch computes it), pixel for pixel; landmarks in the model's units (square pixels / side). Real photographs,
MediaPipe's real models, nothing mocked."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
from test_preprocess import official_image  # noqa: E402

from facellava.contract import CLIP_MEAN  # noqa: E402
from facellava.runtime.preprocess import SQUARE_FILL, expand2square, preprocess_image  # noqa: E402

TOLERANCE = 1e-4  # as tests/test_preprocess.py: float32 rounding is ~4e-6, another kernel costs 1e-2 or more


def official_expand2square(image: np.ndarray) -> Image.Image:
    """LLaVA's expand2square on a PIL image, with the processor's `image_mean` as `int(x * 255)`."""
    pil = Image.fromarray(image)
    width, height = pil.size
    colour = tuple(int(x * 255) for x in CLIP_MEAN)
    if width == height:
        return pil
    side = max(width, height)
    square = Image.new(pil.mode, (side, side), colour)
    square.paste(pil, ((side - width) // 2, 0) if height > width else (0, (side - height) // 2))
    return square


def official_processor(image: Image.Image) -> np.ndarray:
    """LanguageBindImageProcessor's transform on a PIL image (tests/test_preprocess.py's reference)."""
    return official_image(np.asarray(image.convert("RGB")))


def scene(photo: np.ndarray, height: int, width: int) -> np.ndarray:
    """The photograph resized to fill a height x width frame (a real image of that shape)."""
    return cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)


# 224 x 224: the size the issue measured (it came out blurred, max 0.87, through the old 256 resample); a
# landscape and a portrait frame with odd padding; a frame larger than the photograph; one smaller than 224
@pytest.mark.parametrize("shape", [(224, 224), (480, 640), (500, 301), (900, 700), (150, 200)])
def test_no_face_crop_pixels_equal_expand2square_then_the_official_processor(front_end, photo, shape):
    image = scene(photo, *shape)
    whole = front_end.process_image(image, no_face_crop=True, landmarks=False)
    ours = preprocess_image(whole.crop)
    reference = official_processor(official_expand2square(image))
    assert whole.box is None and whole.crop.shape == (max(shape), max(shape), 3)  # no resample before the processor
    difference = np.abs(ours - reference).max()
    print(f"--no-face-crop {shape[1]}x{shape[0]}: max-abs {difference:.2e} against the official path")
    assert difference < TOLERANCE


def test_expand2square_is_the_official_padding(photo):
    for shape in [(480, 640), (500, 301), (301, 500), (333, 334)]:
        image = scene(photo, *shape)
        assert np.array_equal(expand2square(image), np.asarray(official_expand2square(image)))
    assert SQUARE_FILL == (122, 116, 104)
    assert expand2square(photo) is photo  # a square image is untouched


def test_the_old_resample_would_fail_this_test(photo):
    # what --no-face-crop did before: the whole image resized to 256 (area), then the processor to 224. On a
    # 224 x 224 image that blurs the input; the pixel test above must be able to see it
    image = scene(photo, 224, 224)
    old = preprocess_image(cv2.resize(image, (256, 256), interpolation=cv2.INTER_LINEAR))
    assert np.abs(old - official_processor(official_expand2square(image))).max() > 0.3


def test_no_face_crop_landmarks_are_in_square_units(front_end, photo):
    # the photograph on a wider canvas: the square is the canvas padded top and bottom. Its landmarks times the
    # square's side, less the padding and the paste offset, must land where the face-crop landmarks put them
    canvas = np.full((512, 760, 3), 40, np.uint8)
    canvas[:, 200:712] = photo
    whole = front_end.process_image(canvas, no_face_crop=True)
    assert whole.crop.shape == (760, 760, 3) and whole.landmarks is not None
    pad_top = (760 - 512) // 2
    in_photo = whole.landmarks.astype(np.float64) * 760 - np.array([200, pad_top])

    face = front_end.process_image(photo)
    box = face.box
    side = (box.width + box.height) / 2
    width, height = int(box.x + side) - box.x, int(box.y + side) - box.y
    expected = face.landmarks.astype(np.float64) * np.array([width, height]) + np.array([box.x, box.y])
    error = np.linalg.norm(in_photo - expected, axis=1)
    print(f"--no-face-crop landmarks against the face crop's, in photo pixels: mean {error.mean():.2f}, "
          f"max {error.max():.2f} (face about {box.width} px wide)")
    assert error.mean() < 2.5 and error.max() < 6.0
