"""Composites of the shipped photograph for detection tests and `benchmarks/face_detection.py`: the photograph's face
(with some hair and shoulders around it) scaled to a given face size and pasted, several at a time, onto a smooth
random background with no face in it; rotated composites too. Each composite comes with the true face boxes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# The official detector's box of the face in runtime/assets/astronaut.jpg (x, y, width, height).
PHOTO_FACE = (176, 82, 95, 95)
# The pasted patch is this many face sides wide, centred on the face.
CONTEXT = 1.6


@dataclass(frozen=True)
class TrueFace:
    cx: float
    cy: float
    side: float

    def matches(self, x: float, y: float, width: float, height: float) -> bool:
        """A detected box is this face when its centre lies within half a face side of the true centre and its
        size is within a factor of 1.6 of the true side."""
        cx, cy, side = x + width / 2, y + height / 2, (width + height) / 2
        return math.hypot(cx - self.cx, cy - self.cy) < 0.5 * self.side and 1 / 1.6 < side / self.side < 1.6


def background(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth random colour clouds with a little grain: texture, but no face."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(30, 225, (max(2, height // 80), max(2, width // 80), 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 5, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def face_patch(photo: np.ndarray, face_side: int) -> np.ndarray:
    """The photograph's face with CONTEXT around it, resized so that the face is face_side pixels."""
    x, y, width, _ = PHOTO_FACE
    cx, cy = x + width / 2, y + width / 2
    half = CONTEXT * width / 2
    region = photo[int(cy - half) : int(cy + half), int(cx - half) : int(cx + half)]
    side = max(2, round(CONTEXT * face_side))
    interpolation = cv2.INTER_AREA if side < region.shape[0] else cv2.INTER_CUBIC
    return cv2.resize(region, (side, side), interpolation=interpolation)


def compose(photo: np.ndarray, face_sides: list[int], height: int, width: int, seed: int = 0,
            angle: float = 0.0) -> tuple[np.ndarray, list[TrueFace]]:
    """Faces of the given sides pasted without overlap (largest first, shelf by shelf, with seeded gaps) onto a
    height x width background, each turned by `angle` degrees (counter-clockwise) about its centre. Raises
    ValueError when the faces do not fit."""
    rng = np.random.default_rng(seed)
    image = background(height, width, seed)
    faces = []
    x = y = shelf = 0
    for face_side in sorted(face_sides, reverse=True):
        patch = face_patch(photo, face_side)
        side = patch.shape[0]
        if angle:
            turn = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
            patch = cv2.warpAffine(patch, turn, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        gap = int(rng.integers(4, 24))
        if x + gap + side > width:
            x, y, shelf = 0, y + shelf, 0
        x += gap
        top = y + int(rng.integers(4, 24))
        if top + side > height or x + side > width:
            raise ValueError(f"faces of sides {face_sides} do not fit in {width}x{height}")
        image[top : top + side, x : x + side] = patch
        faces.append(TrueFace(x + side / 2, top + side / 2, face_side))
        x += side
        shelf = max(shelf, top - y + side)
    return image, faces


def tight_chip(photo: np.ndarray, fraction: float, side: int = 256) -> tuple[np.ndarray, TrueFace]:
    """A square image around the face in which the face is `fraction` of the image side (1.0: the face box is the
    whole image, as in an official crop), resized to side x side."""
    x, y, width, _ = PHOTO_FACE
    cx, cy = x + width / 2, y + width / 2
    half = width / fraction / 2
    padded = cv2.copyMakeBorder(photo, 300, 300, 300, 300, cv2.BORDER_REFLECT)
    region = padded[int(cy - half) + 300 : int(cy + half) + 300, int(cx - half) + 300 : int(cx + half) + 300]
    scale = side / region.shape[0]
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    chip = cv2.resize(region, (side, side), interpolation=interpolation)
    return chip, TrueFace(side / 2, side / 2, width * scale)
