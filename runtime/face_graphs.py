"""The face front end on graphs: MediaPipe's face detectors and face mesh as ONNX graphs (from the bundle, written
by `facellava export front-end`), with MediaPipe's own pre- and post-processing restated in numpy, so that a
device needs neither MediaPipe nor its dependencies.

What MediaPipe's graphs do around the networks, and where it was read (mediapipe/modules/face_detection,
face_landmark, calculators/tensor and calculators/util, MediaPipe 0.10):

- image to tensor (ImageToTensorCalculator, OpenCV converter): the region of interest, a rotated rectangle in
  pixels, is mapped onto the tensor by a perspective warp (cv2.boxPoints corners to the tensor's corners, bilinear,
  zero border for the detectors and replicated border for the mesh), then the uint8 values are scaled to the
  model's range ([-1, 1] detectors, [0, 1] mesh). The detectors keep the aspect ratio: the region is padded to a
  square around the image's centre (letterbox).
- detection (SsdAnchorsCalculator, TensorsToDetectionsCalculator, NonMaxSuppressionCalculator,
  DetectionProjectionCalculator): fixed-size SSD anchors at cell centres (short range: 128 pixels, strides 8, 16,
  16, 16 with two anchors per cell and layer, 896 anchors; full range: 192 pixels, stride 4, one anchor, 2304);
  the regressors are x, y, w, h and six keypoints in tensor pixels relative to the anchor; scores are the sigmoid
  of the logit clipped to +-100, kept from `min_score` up (0.5 short range, 0.6 full range, the task API's 0.5);
  weighted non-maximum suppression at IoU 0.3 (every box overlapping the best one by more than that is averaged
  into it, weighted by score, keeping the best score), then the letterbox is removed.
- the official detector (the task API's FaceDetector, which the official crop tool runs) is the short-range
  pipeline above; its pixel box is each relative value times the image side, truncated and clamped into [0, side].
- the face mesh in static mode (FaceLandmarkFrontCpu): the short-range detection with the best score on the image;
  its box's centre and size with a rotation that levels the eyes (keypoints 0 and 1), squared on its long side in
  pixels and scaled by 1.5; that rectangle warped to 192 x 192; the mesh is kept when the sigmoid of its face flag
  exceeds 0.5; the attention model's lips, eyes and irises overwrite the mesh's points at the indices of
  LandmarksRefinementCalculator's configuration (irises appended: 478 points); points are projected back by the
  rectangle's rotation, size and centre.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facellava.errors import FaceLlavaError

# A network: one NHWC float32 input tensor -> its outputs by name.
Network = Callable[[np.ndarray], Mapping[str, np.ndarray]]

# The bundle's front-end graphs (`facellava export front-end`): their file names.
SHORT_RANGE_FILE = "face_detector_short_range.onnx"
FULL_RANGE_FILE = "face_detector_full_range.onnx"
MESH_FILE = "face_mesh.onnx"
FRONT_END_FILES = {"short_range": SHORT_RANGE_FILE, "full_range": FULL_RANGE_FILE, "mesh": MESH_FILE}
FRONT_END_KIND = "front_end"  # their manifest kind
FRONT_END_ENGINE_KIND = "front_end_engine"  # the TensorRT engines `facellava build-engine` makes of them
DEVICES = ("auto", "tensorrt", "onnxruntime", "cpu")  # FrontEndGraphs.from_bundle's choices


def has_front_end_graphs(manifest: Any) -> bool:
    """Whether a bundle's manifest (a `Bundle` or `Manifest`: anything with `find(kind)`) lists the three
    front-end graphs."""
    present = set(manifest.find(FRONT_END_KIND))
    return all(name in present for name in FRONT_END_FILES.values())

MESH_SIDE = 192
DETECTOR_RANGE = (-1.0, 1.0)  # the input value ranges ImageToTensorCalculator scales the uint8 pixels to
MESH_RANGE = (0.0, 1.0)
MESH_BORDER = cv2.BORDER_REPLICATE  # the mesh's warp replicates the image's edge; the detectors' pad with zeros
MESH_SCALE = 1.5  # RectTransformationCalculator around the face detection, on the square of its long side
MESH_PRESENCE = 0.5  # the face flag's sigmoid must exceed this (legacy FaceMesh's min_tracking_confidence)
TASK_API_MIN_SCORE = 0.5  # the task API's FaceDetector defaults: min_detection_confidence, suppression threshold
SUPPRESSION_IOU = 0.3
SCORE_CLIP = 100.0
NUM_KEYPOINTS = 6


@dataclass(frozen=True)
class DetectorSpec:
    """One BlazeFace model as MediaPipe's graph configures it: the tensor side, the anchors' strides, whether each
    layer adds an interpolated anchor (interpolated_scale_aspect_ratio > 0), and the graph's min_score_thresh."""

    side: int
    strides: tuple[int, ...]
    interpolated: bool
    min_score: float


SHORT_RANGE = DetectorSpec(side=128, strides=(8, 16, 16, 16), interpolated=True, min_score=0.5)
FULL_RANGE = DetectorSpec(side=192, strides=(4,), interpolated=False, min_score=0.6)
DETECTORS = {"short_range": SHORT_RANGE, "full_range": FULL_RANGE}

# LandmarksRefinementCalculator (tensors_to_face_landmarks_with_attention): which mesh points each refinement
# output overwrites, in its output's point order. The irises are new points 468-477.
LIPS_INDICES = (
    61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409,
    78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415,
    76, 77, 90, 180, 85, 16, 315, 404, 320, 307, 306, 184, 74, 73, 72, 11, 302, 303, 304, 408,
    62, 96, 89, 179, 86, 15, 316, 403, 319, 325, 292, 183, 42, 41, 38, 12, 268, 271, 272, 407,
)
LEFT_EYE_INDICES = (
    33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173,
    130, 25, 110, 24, 23, 22, 26, 112, 243, 247, 30, 29, 27, 28, 56, 190,
    226, 31, 228, 229, 230, 231, 232, 233, 244, 113, 225, 224, 223, 222, 221, 189,
    35, 124, 46, 53, 52, 65, 143, 111, 117, 118, 119, 120, 121, 128, 245,
    156, 70, 63, 105, 66, 107, 55, 193,
)
RIGHT_EYE_INDICES = (
    263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398,
    359, 255, 339, 254, 253, 252, 256, 341, 463, 467, 260, 259, 257, 258, 286, 414,
    446, 261, 448, 449, 450, 451, 452, 453, 464, 342, 445, 444, 443, 442, 441, 413,
    265, 353, 276, 283, 282, 295, 372, 340, 346, 347, 348, 349, 350, 357, 465,
    383, 300, 293, 334, 296, 336, 285, 417,
)
LEFT_IRIS_INDICES = (468, 469, 470, 471, 472)
RIGHT_IRIS_INDICES = (473, 474, 475, 476, 477)
# the attention model's outputs, in the refinement's order, with the mesh points each one sets
MESH_REFINEMENTS = (
    ("output_lips", LIPS_INDICES),
    ("output_left_eye", LEFT_EYE_INDICES),
    ("output_right_eye", RIGHT_EYE_INDICES),
    ("output_left_iris", LEFT_IRIS_INDICES),
    ("output_right_iris", RIGHT_IRIS_INDICES),
)
MESH_POINTS = 468
REFINED_MESH_POINTS = 478


@dataclass(frozen=True)
class Detection:
    """A face detection relative to the image the detector saw: box (xmin, ymin, width, height) and six keypoints
    (right eye, left eye, nose tip, mouth, right ear, left ear; the subject's sides) in [0, 1] units of its width
    and height, and the score."""

    box: tuple[float, float, float, float]
    keypoints: np.ndarray
    score: float


@dataclass(frozen=True)
class Roi:
    """A rotated rectangle in pixels: centre, size, rotation in radians (clockwise in image coordinates)."""

    center_x: float
    center_y: float
    width: float
    height: float
    rotation: float = 0.0


def ssd_anchors(spec: DetectorSpec) -> np.ndarray:
    """The anchor centres [N, 2] (x, y in [0, 1]) of SsdAnchorsCalculator with fixed anchor size (all 1 x 1):
    consecutive layers of one stride share their cells, each cell holding one anchor per layer (two with the
    interpolated anchor), cells in row-major order."""
    centres = []
    layer = 0
    while layer < len(spec.strides):
        stride = spec.strides[layer]
        same = 1
        while layer + same < len(spec.strides) and spec.strides[layer + same] == stride:
            same += 1
        per_cell = same * (2 if spec.interpolated else 1)
        cells = math.ceil(spec.side / stride)
        ys, xs = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(grid, per_cell, axis=0))
        layer += same
    return np.concatenate(centres).astype(np.float32)


def image_to_tensor(rgb: np.ndarray, roi: Roi, side: int, value_range: tuple[float, float],
                    border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    """MediaPipe's ImageToTensorCalculator on the CPU: the rotated rectangle `roi` warped onto a side x side tensor
    (bilinear), uint8 values scaled to `value_range`; returns float32 [1, side, side, 3]."""
    corners = cv2.boxPoints(((roi.center_x, roi.center_y), (roi.width, roi.height), math.degrees(roi.rotation)))
    target = np.float32([[0, side], [0, 0], [side, 0], [side, side]])
    matrix = cv2.getPerspectiveTransform(corners.astype(np.float32), target)
    warped = cv2.warpPerspective(rgb, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0)
    low, high = value_range
    return (warped.astype(np.float32) * np.float32((high - low) / 255.0) + np.float32(low))[None]


def letterbox_roi(width: int, height: int, side: int) -> Roi:
    """The whole image padded to a square around its centre (keep_aspect_ratio), as the detectors see it."""
    long_side = float(max(width, height))
    return Roi(width / 2, height / 2, long_side, long_side)


def decode_detections(regressors: np.ndarray, logits: np.ndarray, anchors: np.ndarray, side: int,
                      min_score: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorsToDetectionsCalculator: boxes [n, 4] (xmin, ymin, width, height), keypoints [n, 6, 2] and scores [n]
    in tensor units [0, 1], for the anchors scoring `min_score` or more (in anchor order)."""
    raw = regressors.reshape(-1, regressors.shape[-1]).astype(np.float32)
    with np.errstate(over="ignore"):  # exp(100) overflows float32 to inf: the score is 0, as in MediaPipe
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits.reshape(-1).astype(np.float32), -SCORE_CLIP, SCORE_CLIP)))
    keep = np.flatnonzero(scores >= min_score)
    raw, anchor = raw[keep], anchors[keep]
    scale = np.float32(side)
    centre = raw[:, 0:2] / scale + anchor
    size = raw[:, 2:4] / scale
    top_left = centre - size / np.float32(2)
    bottom_right = centre + size / np.float32(2)
    boxes = np.concatenate([top_left, bottom_right - top_left], axis=1)
    keypoints = raw[:, 4 : 4 + 2 * NUM_KEYPOINTS].reshape(-1, NUM_KEYPOINTS, 2) / scale + anchor[:, None, :]
    return boxes, keypoints, scores[keep].astype(np.float32)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one (xmin, ymin, width, height) box with each of `others`."""
    left = np.maximum(box[0], others[:, 0])
    top = np.maximum(box[1], others[:, 1])
    right = np.minimum(box[0] + box[2], others[:, 0] + others[:, 2])
    bottom = np.minimum(box[1] + box[3], others[:, 1] + others[:, 3])
    inter = np.where((right > left) & (bottom > top), (right - left) * (bottom - top), np.float32(0))
    union = box[2] * box[3] + others[:, 2] * others[:, 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), np.float32(0))


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                 threshold: float = SUPPRESSION_IOU) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """NonMaxSuppressionCalculator's WEIGHTED algorithm: take the best remaining detection; every remaining one
    overlapping it by IoU > `threshold` (itself included) is averaged into it, box corners and keypoints weighted by
    score; its score stays the best one's. Returns (box, keypoints, score), best first."""
    order = np.argsort(-scores, kind="stable")
    results = []
    while order.size:
        best = order[0]
        overlap = _iou(boxes[best], boxes[order]) > threshold
        overlap[0] = True  # the best is its own member even when its box is degenerate (IoU 0 with itself)
        members = order[overlap]
        weights = scores[members][:, None]
        total = weights.sum()
        corners = np.concatenate([boxes[members, :2], boxes[members, :2] + boxes[members, 2:]], axis=1)
        mean = (corners * weights).sum(axis=0) / total
        points = (keypoints[members] * weights[:, :, None]).sum(axis=0) / total
        results.append((np.array([mean[0], mean[1], mean[2] - mean[0], mean[3] - mean[1]], np.float32),
                        points.astype(np.float32), float(scores[best])))
        order = order[~overlap]
    return results


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def _normalize_radians(angle: float) -> float:
    return angle - 2 * math.pi * math.floor((angle + math.pi) / (2 * math.pi))


class FrontEndGraphs:
    """MediaPipe's face detectors and face mesh as networks with MediaPipe's pre- and post-processing in numpy.

    `networks` maps "short_range", "full_range" and "mesh" to callables from an NHWC float32 tensor to the
    network's outputs by name (`onnx_networks` makes them from ONNX files on ONNX Runtime). The mesh may be the
    attention model (478 points: output_mesh_identity with the lips/eyes/iris outputs) or the plain one (468).
    Each method answers what one MediaPipe API answers (see the module's docstring).
    """

    def __init__(self, networks: Mapping[str, Network]):
        missing = {"short_range", "full_range", "mesh"} - set(networks)
        if missing:
            raise ValueError(f"front-end networks missing: {sorted(missing)}")
        self.networks = dict(networks)
        self._anchors = {name: ssd_anchors(spec) for name, spec in DETECTORS.items()}

    @classmethod
    def from_files(cls, paths: Mapping[str, str | Path], providers: Sequence[object] | None = None) -> FrontEndGraphs:
        """Open the three ONNX graphs (`paths` keyed like `FRONT_END_FILES`) on ONNX Runtime with `providers`
        (default: CPU)."""
        return cls(onnx_networks(paths, providers))

    @classmethod
    def from_bundle(cls, bundle: Any, device: str = "auto", ort_device: str = "auto") -> FrontEndGraphs:
        """The bundle's three front-end graphs (`bundle`: an open `facellava.bundle.Bundle` that has them).

        `device` "tensorrt" runs the TensorRT engines `facellava build-engine` made of them for this GPU and
        TensorRT version; "onnxruntime" runs the ONNX graphs on ONNX Runtime's `ort_device` (`execution_providers`:
        "auto" the best installed, TensorRT's keeping its engines in the user's cache directory so that only the
        first start builds them, then CUDA, then the CPU; or "tensorrt", "cuda", "cpu" insisting); "cpu" on the CPU
        provider alone; "auto" the engines where they exist, else "onnxruntime". Raises FaceLlavaError for an
        unknown device, engines asked for that this device lacks, or an ONNX Runtime device it cannot use."""
        if device not in DEVICES:
            raise FaceLlavaError(f"unknown front-end device {device!r}; choose from {', '.join(DEVICES)}")
        if device in ("auto", "tensorrt"):
            from facellava.runtime.tensorrt_runner import engines_for_this_device

            engines = {entry["source"]: name for name, entry in
                       engines_for_this_device(bundle.files, FRONT_END_ENGINE_KIND).items()}
            if all(name in engines for name in FRONT_END_FILES.values()):
                return cls(tensorrt_networks({model: bundle.path_of(engines[name])
                                              for model, name in FRONT_END_FILES.items()}))
            if device == "tensorrt":
                raise FaceLlavaError(f"no TensorRT engines of the front-end graphs for this device in {bundle.path} "
                                     "(or TensorRT is not installed); build them with `facellava build-engine "
                                     "BUNDLE`")
        providers = None
        if device != "cpu":
            from facellava.runtime.ort_providers import execution_providers

            providers = execution_providers(ort_device)
        return cls.from_files({model: bundle.path_of(name) for model, name in FRONT_END_FILES.items()}, providers)

    def close(self) -> None:
        """Drop the networks (ONNX Runtime frees its sessions with them; TensorRT runners free their GPU memory)."""
        for network in self.networks.values():
            close = getattr(network, "close", None)
            if close is not None:
                close()
        self.networks.clear()

    def detections(self, rgb: np.ndarray, model: str, min_score: float | None = None) -> list[Detection]:
        """The legacy solution's FaceDetection (`model` "short_range" or "full_range") on the whole RGB image:
        detections relative to the image, best first."""
        spec = DETECTORS[model]
        height, width = rgb.shape[:2]
        roi = letterbox_roi(width, height, spec.side)
        outputs = list(self.networks[model](image_to_tensor(rgb, roi, spec.side, DETECTOR_RANGE)).values())
        regressors = next(array for array in outputs if array.shape[-1] == 4 + 2 * NUM_KEYPOINTS)
        logits = next(array for array in outputs if array.shape[-1] == 1)
        boxes, keypoints, scores = decode_detections(regressors, logits, self._anchors[model], spec.side,
                                                     spec.min_score if min_score is None else min_score)
        # letterbox removal: tensor [0, 1] -> image [0, 1] (DetectionProjectionCalculator with an unrotated ROI)
        scale = np.float32([roi.width / width, roi.height / height])
        offset = np.float32([roi.center_x / width, roi.center_y / height]) - scale / np.float32(2)
        found = []
        for box, points, score in weighted_nms(boxes, keypoints, scores):
            top_left = box[:2] * scale + offset
            bottom_right = (box[:2] + box[2:]) * scale + offset
            found.append(Detection((float(top_left[0]), float(top_left[1]), float(bottom_right[0] - top_left[0]),
                                    float(bottom_right[1] - top_left[1])), points * scale + offset, score))
        return found

    def official_detections(self, rgb: np.ndarray) -> list[tuple[int, int, int, int, float]]:
        """The task API's FaceDetector with its default options on the short-range model (the official crop tool's
        detector): (x, y, width, height, score) in pixels, best first."""
        height, width = rgb.shape[:2]
        boxes = []
        for found in self.detections(rgb, "short_range", TASK_API_MIN_SCORE):
            xmin, ymin, box_width, box_height = (np.float32(v) for v in found.box)
            # DetectionTransformationCalculator: float product truncated to int, clamped into [0, side]
            x = min(max(int(xmin * np.float32(width)), 0), width)
            y = min(max(int(ymin * np.float32(height)), 0), height)
            w = min(max(int(box_width * np.float32(width)), 0), width)
            h = min(max(int(box_height * np.float32(height)), 0), height)
            boxes.append((x, y, w, h, found.score))
        return boxes

    def mesh_roi(self, detection: Detection, width: int, height: int) -> Roi:
        """The face mesh's rectangle from a detection, in pixels (DetectionsToRectsCalculator with the eyes'
        rotation, then RectTransformationCalculator: square on the long side, scaled by 1.5)."""
        xmin, ymin, box_width, box_height = detection.box
        (x0, y0), (x1, y1) = detection.keypoints[0], detection.keypoints[1]
        rotation = _normalize_radians(-math.atan2(-(y1 - y0) * height, (x1 - x0) * width))
        long_side = max(box_width * width, box_height * height) * MESH_SCALE
        return Roi((xmin + box_width / 2) * width, (ymin + box_height / 2) * height, long_side, long_side, rotation)

    def mesh(self, rgb: np.ndarray) -> np.ndarray | None:
        """The legacy FaceMesh in static mode (one face): its points [478, 2] (or [468, 2] with the plain model)
        relative to the image, or None when no face is detected or the mesh's face flag says none."""
        found = self.detections(rgb, "short_range")
        if not found:
            return None
        height, width = rgb.shape[:2]
        roi = self.mesh_roi(found[0], width, height)
        outputs = self.networks["mesh"](image_to_tensor(rgb, roi, MESH_SIDE, MESH_RANGE, MESH_BORDER))
        points, flag = _mesh_points(outputs)
        if _sigmoid(flag) <= MESH_PRESENCE:
            return None
        # LandmarkProjectionCalculator: about the rectangle's centre, rotated, scaled by its size
        centred = points / MESH_SIDE - 0.5
        cos, sin = math.cos(roi.rotation), math.sin(roi.rotation)
        x = (cos * centred[:, 0] - sin * centred[:, 1]) * roi.width + roi.center_x
        y = (sin * centred[:, 0] + cos * centred[:, 1]) * roi.height + roi.center_y
        return np.stack([x / width, y / height], axis=1)


def _mesh_points(outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, float]:
    """The mesh points [N, 2] in tensor pixels and the face flag's logit, from either face-mesh model's outputs."""
    if "output_mesh_identity" in outputs:
        points = outputs["output_mesh_identity"].reshape(MESH_POINTS, 3)[:, :2].astype(np.float64)
        points = np.concatenate([points, np.zeros((REFINED_MESH_POINTS - MESH_POINTS, 2))])
        for name, indices in MESH_REFINEMENTS:
            points[list(indices)] = outputs[name].reshape(len(indices), 2)
        return points, float(outputs["conv_faceflag"].reshape(-1)[0])
    # the plain model: the 1404 values of 468 x, y, z points and a one-value face flag
    mesh = next(array for array in outputs.values() if array.size == MESH_POINTS * 3)
    flag = next(array for array in outputs.values() if array.size == 1)
    return mesh.reshape(MESH_POINTS, 3)[:, :2].astype(np.float64), float(flag.reshape(-1)[0])


def onnx_networks(paths: Mapping[str, str | Path], providers: Sequence[object] | None = None) -> dict[str, Network]:
    """ONNX Runtime sessions for the front-end graphs, as `Network` callables."""
    import onnxruntime

    networks: dict[str, Network] = {}
    for name, path in paths.items():
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        # one thread: these networks are small (1-10 MFLOP); on this 2-core machine, busy with other work, one
        # thread ran the short-range detector in 6.6 ms against 11.8 ms with ONNX Runtime's default pool
        options.intra_op_num_threads = 1
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=list(providers or
                                                                                       ["CPUExecutionProvider"]))
        except Exception as error:  # onnxruntime raises its own types for unreadable graphs
            raise FaceLlavaError(f"the front-end graph {path} cannot be loaded ({error}); export it again with "
                                 "`facellava export front-end`") from None
        networks[name] = _session_network(session)
    return networks


def _session_network(session: object) -> Network:
    input_name = session.get_inputs()[0].name  # type: ignore[attr-defined]
    output_names = [output.name for output in session.get_outputs()]  # type: ignore[attr-defined]

    def run(tensor: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(output_names, session.run(output_names, {input_name: tensor}), strict=True))  # type: ignore[attr-defined]

    return run


class _EngineNetwork:
    """A front-end TensorRT engine as a `Network` (closable: it holds GPU memory)."""

    def __init__(self, path: str | Path):
        from facellava.runtime.tensorrt_runner import TensorRTRunner

        self.runner = TensorRTRunner(path)
        self.input_name = self.runner.input_names[0]

    def __call__(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run({self.input_name: tensor})

    def close(self) -> None:
        self.runner.close()


def tensorrt_networks(paths: Mapping[str, str | Path]) -> dict[str, Network]:
    """TensorRT runners for the front-end engines (`paths` keyed like `FRONT_END_FILES`), as `Network` callables."""
    networks: dict[str, Network] = {}
    try:
        for name, path in paths.items():
            networks[name] = _EngineNetwork(path)
    except BaseException:
        for network in networks.values():
            network.close()  # type: ignore[attr-defined]
        raise
    return networks
