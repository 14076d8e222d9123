"""Torch-free preprocessing that matches the official Face-LLaVA processors.

Whole image (no face crop): LLaVA's `expand2square` (the training-time `image_aspect_ratio pad`): the image pasted
centred on a square of the processor's mean colour, at its own size; the image processor then resizes it to 224 in
one step (`expand2square` here, then `preprocess_image`).
Image (`LanguageBindImageProcessor`): ToTensor -> Resize(224, BICUBIC) on the float tensor (torchvision's
tensor resize, antialias on: `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`) ->
CenterCrop(224) -> Normalize(CLIP mean, std).
Video (`LanguageBindVideoProcessor`): 8 frames -> /255 -> Normalize -> ShortSideScale(224) (pytorchvideo:
`F.interpolate(mode="bilinear", align_corners=False)`, no antialias) -> CenterCropVideo(224) -> [3, 8, 224, 224].

Resampling kernels differ between libraries, so each step uses the one that computes the same function:
- bicubic with antialias: Pillow's BICUBIC on single-channel float ('F') images uses the same a = -0.5 kernel,
  stretched by the scale factor when shrinking, as PyTorch's antialiased bicubic. Measured against
  `F.interpolate` on [0, 1] data: max-abs 4e-6 on a face crop (256 -> 224), 2e-5 on uniform noise.
  OpenCV's INTER_CUBIC (a = -0.75, no antialias) differs by 0.017 on the crop and 0.22 on noise.
- bilinear without antialias: OpenCV's INTER_LINEAR on float32 is half-pixel-centred bilinear, like
  `align_corners=False`: max-abs 4e-6 on the crop, 3e-5 on noise. Pillow's BILINEAR antialiases when
  shrinking and differs by 0.016 on the crop.
(`tests/test_preprocess.py` measures both against PyTorch on the real face crop.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from facellava.contract import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, NUM_FRAMES

_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32)
_STD = np.asarray(CLIP_STD, dtype=np.float32)
# `expand2square`'s fill: the processor's `image_mean` as 8-bit RGB, truncated as LLaVA's `int(x * 255)` does
SQUARE_FILL = tuple(int(channel * 255) for channel in CLIP_MEAN)  # (122, 116, 104)


def expand2square(image: np.ndarray) -> np.ndarray:
    """LLaVA's `expand2square` of an RGB uint8 [H, W, 3] image: pasted on a square of side max(H, W) filled with
    `SQUARE_FILL`, at offset ((side - W) // 2, (side - H) // 2); a square image is returned as it is.

    No resampling: `preprocess_image` then takes the square to 224 in one step, as the official processor does.
    Landmarks of the square in its pixels divided by its side are in the model's units (crop pixels / 256 of a
    256 crop). Raises ValueError for an array that is not RGB uint8.
    """
    _check_rgb(image)
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[:] = SQUARE_FILL
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = image
    return square


def preprocess_image(image: np.ndarray) -> np.ndarray:
    """The official image preprocessing of an RGB uint8 [H, W, 3] image (the 256 face crop).

    Returns float32 [3, 224, 224], CLIP-normalized, ready for the vision graph's `pixel_values` (add the batch
    axis). Raises ValueError for an array that is not RGB uint8.
    """
    _check_rgb(image)
    pixels = image.astype(np.float32) / 255.0  # ToTensor
    height, width = pixels.shape[:2]
    # torchvision's Resize(int): the short side becomes 224, the long side int(224 * long / short)
    if height <= width:
        size = (IMAGE_SIZE, int(IMAGE_SIZE * width / height))
    else:
        size = (int(IMAGE_SIZE * height / width), IMAGE_SIZE)
    if size != (height, width):  # torchvision returns the image untouched when it already has the size
        pixels = np.stack([_bicubic_antialias(pixels[:, :, c], size) for c in range(3)], axis=2)
    pixels = _center_crop(pixels, IMAGE_SIZE)
    return np.ascontiguousarray(((pixels - _MEAN) / _STD).transpose(2, 0, 1))


def preprocess_video(frames: Sequence[np.ndarray]) -> np.ndarray:
    """The official video preprocessing of 8 RGB uint8 [H, W, 3] frames (the 256 face crops, one per frame).

    Returns float32 [3, 8, 224, 224] (channels, time, height, width), ready for the vision graph's
    `pixel_values` (add the batch axis). Raises ValueError for a frame count other than 8, frames of
    different sizes, or frames that are not RGB uint8.
    """
    if len(frames) != NUM_FRAMES:
        raise ValueError(f"the video tower takes exactly {NUM_FRAMES} frames, got {len(frames)}")
    for frame in frames:
        _check_rgb(frame)
    if len({frame.shape for frame in frames}) != 1:
        raise ValueError(f"video frames differ in size: {sorted({frame.shape for frame in frames})}")
    pixels = (np.stack(frames).astype(np.float32) / 255.0 - _MEAN) / _STD  # [T, H, W, C]
    height, width = pixels.shape[1:3]
    # pytorchvideo's short_side_scale: the short side becomes 224, the long side floor(224 * long / short)
    if width < height:
        size = (int(math.floor(height / width * IMAGE_SIZE)), IMAGE_SIZE)
    else:
        size = (IMAGE_SIZE, int(math.floor(width / height * IMAGE_SIZE)))
    # pytorchvideo interpolates even to the same size; bilinear at scale 1 returns the input unchanged
    pixels = np.stack([cv2.resize(frame, size[::-1], interpolation=cv2.INTER_LINEAR) for frame in pixels])
    pixels = np.stack([_center_crop(frame, IMAGE_SIZE) for frame in pixels])
    return np.ascontiguousarray(pixels.transpose(3, 0, 1, 2))


def _bicubic_antialias(channel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One float32 channel resized to (height, width) by Pillow's float BICUBIC (see the module docstring)."""
    resized = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32)).resize(size[::-1], Image.BICUBIC)
    return np.asarray(resized, dtype=np.float32)


def _center_crop(pixels: np.ndarray, side: int) -> np.ndarray:
    """torchvision's CenterCrop of an [H, W, ...] array to side x side (offsets rounded as torchvision does)."""
    height, width = pixels.shape[:2]
    if height < side or width < side:
        raise ValueError(f"cannot centre-crop {height}x{width} to {side}x{side}")
    top, left = int(round((height - side) / 2.0)), int(round((width - side) / 2.0))
    return pixels[top : top + side, left : left + side]


def _check_rgb(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}")
