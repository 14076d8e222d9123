"""MediaPipe's face models -> ONNX graphs in the bundle (`facellava export front-end`).

The face front end (detection, then the 478-point attention face mesh) runs MediaPipe's own models; here they are
converted once, at export, from the `.tflite` files the mediapipe wheel ships (or a directory the user names), so
that every runtime runs the same graphs without MediaPipe:

    face_detector_short_range.onnx   input [1,128,128,3] in [-1, 1] -> regressors [1,896,16], classificators [1,896,1]
    face_detector_full_range.onnx    input_1 [1,192,192,3] in [-1, 1] -> Identity [1,2304,16], Identity_1 [1,2304,1]
    face_mesh.onnx                   input_1 [1,192,192,3] in [0, 1] -> output_mesh_identity [1,1,1,1404], output_lips,
                                     output_left_eye, output_right_eye, output_left_iris, output_right_iris,
                                     conv_faceflag (the attention model: MediaPipe's refine_landmarks=True mesh)

Each graph is checked against MediaPipe itself: its C++ TFLite inference (InferenceCalculator with MediaPipe's
custom-op resolver, the one its face mesh uses) runs the same `.tflite` on the same images (the shipped
photograph and face crops of it, fed at the model's input size so MediaPipe's ImageToTensor resamples nothing),
and every raw output tensor is compared. The figures go into the manifest; a graph that misses its limit fails the
export. MediaPipe's models are Apache-2.0: their notice travels in the bundle (`NOTICE-mediapipe.txt`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from facellava import contract
from facellava.bundle import BundleWriter
from facellava.errors import FaceLlavaError
from facellava.export import fidelity
from facellava.export.tflite_onnx import OPSET, convert_tflite, read_tflite
from facellava.runtime.assets import face_photo
from facellava.runtime.face_graphs import (
    DETECTOR_RANGE,
    DETECTORS,
    FRONT_END_KIND,
    FULL_RANGE_FILE,
    MESH_FILE,
    MESH_RANGE,
    MESH_SIDE,
    SHORT_RANGE_FILE,
    has_front_end_graphs,
)

KIND = FRONT_END_KIND
NOTICE_NAME = "NOTICE-mediapipe.txt"


@dataclass(frozen=True)
class FrontEndModel:
    """One MediaPipe model and the graph made from it."""

    file: str  # the ONNX file in the bundle
    tflite: str  # its path under mediapipe/modules
    size: int  # the square input, in pixels
    input_range: tuple[float, float]  # what pixel 0 and pixel 255 become (MediaPipe's ImageToTensor range)
    limits: Mapping[str, float]  # fidelity limits of the worst output over every parity input


# Limits: several times the worst figures measured on the parity inputs (max-abs 1.4e-4 mesh, 3.1e-4 detector
# logits; rel_err <= 1.2e-6: the float sums run in another order). Mesh coordinates are input pixels (0..192).
MODELS: dict[str, FrontEndModel] = {
    "short_range": FrontEndModel(SHORT_RANGE_FILE,
                                 "face_detection/face_detection_short_range.tflite", DETECTORS["short_range"].side,
                                 DETECTOR_RANGE, {"max_abs_max": 2e-3, "rel_err_max": 1e-5}),
    "full_range": FrontEndModel(FULL_RANGE_FILE,
                                "face_detection/face_detection_full_range_sparse.tflite", DETECTORS["full_range"].side,
                                DETECTOR_RANGE, {"max_abs_max": 2e-3, "rel_err_max": 1e-5}),
    "face_mesh": FrontEndModel(MESH_FILE, "face_landmark/face_landmark_with_attention.tflite", MESH_SIDE,
                               MESH_RANGE, {"max_abs_max": 5e-3, "rel_err_max": 1e-5}),
}

# The face in the shipped 512x512 photograph: the 1.5x square (x0, y0, x1, y1) around MediaPipe's short-range
# detection (centre 224.7, 130.6; size 143.9), the kind of crop the face mesh is fed.
PHOTO_FACE_SQUARE = (117, 23, 333, 239)
PHOTO_ROTATION_DEG = 20.0  # a tilted head, so the mesh's attention crops rotate

NOTICE = """\
This bundle holds ONNX graphs converted by facellava-edge from MediaPipe's face models:
{models}
taken from {source}.

MediaPipe (https://github.com/google-ai-edge/mediapipe) and these models are
Copyright The MediaPipe Authors, licensed under the Apache License, Version 2.0
(the "License"); you may not use these files except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed
under the License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR
CONDITIONS OF ANY KIND, either express or implied. See the License for the
specific language governing permissions and limitations under the License.

Changes: the TFLite graphs were converted to ONNX (FP16 and sparse weights made
dense FP32; MediaPipe's custom operators Landmarks2TransformMatrix,
TransformTensorBilinear and TransformLandmarks expressed in standard ONNX ops).
"""


@dataclass
class FrontEndExport:
    files: dict[str, dict[str, Any]]  # file name -> its manifest entry
    parity: dict[str, dict[str, Any]]  # file name -> its parity record
    seconds: dict[str, float]  # file name -> conversion + parity time


# --- where the models are -----------------------------------------------------------------------------------


def mediapipe_modules_dir() -> Path | None:
    """`mediapipe/modules` of the installed mediapipe wheel (found without importing mediapipe), or None."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "modules"


def find_models(models_dir: str | Path | None = None) -> dict[str, Path]:
    """The `.tflite` file of each front-end model: under `models_dir` (as in mediapipe/modules, or all in one
    folder) when given, else in the installed mediapipe wheel. Raises FaceLlavaError naming where it looked."""
    if models_dir is not None:
        root = Path(models_dir)
        if not root.is_dir():
            raise FaceLlavaError(f"--mediapipe-models {root} is not a directory")
    else:
        root = mediapipe_modules_dir()
        if root is None:
            raise FaceLlavaError("mediapipe is not installed, so its face models cannot be found: pip install "
                                 "'facellava-edge[export]', or give --mediapipe-models DIR")
    found = {}
    for key, model in MODELS.items():
        candidates = [root / model.tflite, root / Path(model.tflite).name]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FaceLlavaError(f"MediaPipe model {Path(model.tflite).name} not found (looked for "
                                 f"{' and '.join(str(p) for p in candidates)})")
        found[key] = path
    return found


# --- parity inputs and the MediaPipe reference --------------------------------------------------------------


def parity_images(size: int, photo: str | Path | None = None) -> dict[str, np.ndarray]:
    """The images each graph is checked on, RGB uint8 [size, size, 3]: the whole photograph (what a detector
    sees), the face square of it, that square mirrored, and tilted by PHOTO_ROTATION_DEG."""
    from PIL import Image

    image = Image.open(photo or face_photo()).convert("RGB")
    scale = image.width / 512.0
    face = image.crop(tuple(round(v * scale) for v in PHOTO_FACE_SQUARE))
    resample = Image.Resampling.BILINEAR
    square = face.resize((size, size), resample)
    return {
        "photo": np.asarray(image.resize((size, size), resample)),
        "face": np.asarray(square),
        "face_mirrored": np.asarray(square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        "face_tilted": np.asarray(square.rotate(PHOTO_ROTATION_DEG, resample=resample)),
    }


def input_tensor(image: np.ndarray, input_range: tuple[float, float]) -> np.ndarray:
    """[1, H, W, 3] float32 as MediaPipe's ImageToTensor makes it: pixel * (max - min) / 255 + min."""
    low, high = input_range
    return (image.astype(np.float32) * np.float32((high - low) / 255.0) + np.float32(low))[None]


@contextlib.contextmanager
def mediapipe_inference(tflite_path: Path, size: int, input_range: tuple[float, float], outputs: int,
                        threads: int = -1) -> Iterator[Any]:
    """A function image -> [flat float32 output tensors] that runs `tflite_path` in MediaPipe's own C++ inference
    (ImageToTensorCalculator, InferenceCalculator with MediaPipe's custom-op resolver on XNNPACK with `threads`
    threads, -1 for MediaPipe's default), for images of exactly `size` x `size` so that nothing is resampled."""
    from google.protobuf import text_format
    from mediapipe.framework import calculator_pb2
    from mediapipe.python.solution_base import PacketDataType, SolutionBase

    names = [f"output_{i}" for i in range(outputs)]
    config = f"""
        input_stream: "image"
        {" ".join(f'output_stream: "{n}"' for n in names)}
        node {{ calculator: "ImageToTensorCalculator" input_stream: "IMAGE:image" output_stream: "TENSORS:input"
          options {{ [mediapipe.ImageToTensorCalculatorOptions.ext] {{
            output_tensor_width: {size} output_tensor_height: {size}
            output_tensor_float_range {{ min: {input_range[0]} max: {input_range[1]} }} }} }} }}
        node {{ calculator: "TfLiteCustomOpResolverCalculator" output_side_packet: "OP_RESOLVER:op_resolver" }}
        node {{ calculator: "InferenceCalculator" input_stream: "TENSORS:input" output_stream: "TENSORS:tensors"
          input_side_packet: "OP_RESOLVER:op_resolver"
          options {{ [mediapipe.InferenceCalculatorOptions.ext] {{
            model_path: {str(tflite_path.resolve())!r} cpu_num_thread: {threads}
            delegate {{ xnnpack {{ num_threads: {threads} }} }} }} }} }}
        node {{ calculator: "SplitTensorVectorCalculator" input_stream: "tensors"
          {" ".join(f'output_stream: "tensor_{i}"' for i in range(outputs))}
          options {{ [mediapipe.SplitVectorCalculatorOptions.ext] {{
            {" ".join(f"ranges {{ begin: {i} end: {i + 1} }}" for i in range(outputs))} }} }} }}
        {" ".join(f'node {{ calculator: "TensorsToFloatsCalculator" input_stream: "TENSORS:tensor_{i}" '
                  f'output_stream: "FLOATS:{n}" }}' for i, n in enumerate(names))}
    """
    graph = text_format.Parse(config, calculator_pb2.CalculatorGraphConfig())
    solution = SolutionBase(graph_config=graph, outputs=names,
                            stream_type_hints={n: PacketDataType.FLOAT_LIST for n in names})
    try:
        def run(image: np.ndarray) -> list[np.ndarray]:
            result = solution.process({"image": np.ascontiguousarray(image)})
            return [np.asarray(getattr(result, n), np.float32) for n in names]
        yield run
    finally:
        solution.close()


def check_graph(model: FrontEndModel, graph: onnx.ModelProto, tflite_path: Path,
                photo: str | Path | None = None) -> dict[str, Any]:
    """The parity record of one converted graph against MediaPipe's inference of its `.tflite`: for every output
    and parity image, `fidelity.compare` figures; the worst of each over all of them, judged against the model's
    limits ("limits", "passed")."""
    import onnxruntime

    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]
    per_output: dict[str, dict[str, dict[str, float]]] = {name: {} for name in output_names}
    with mediapipe_inference(tflite_path, model.size, model.input_range, len(output_names)) as reference:
        for image_name, image in parity_images(model.size, photo).items():
            ours = session.run(None, {input_name: input_tensor(image, model.input_range)})
            for name, actual, expected in zip(output_names, ours, reference(image), strict=True):
                per_output[name][image_name] = fidelity.compare(actual, expected.reshape(actual.shape))
    figures = {name: fidelity.worst(list(by_image.values())) for name, by_image in per_output.items()}
    record = {
        "reference": f"MediaPipe {_version('mediapipe')} InferenceCalculator (XNNPACK, MediaPipe custom ops) on "
                     f"{tflite_path.name}",
        "runtime": f"onnxruntime {_version('onnxruntime')} CPUExecutionProvider",
        "images": f"the shipped photograph and its face square (plain, mirrored, tilted "
                  f"{PHOTO_ROTATION_DEG:g} deg), at {model.size}x{model.size}",
        **fidelity.worst(list(figures.values())),
        "outputs": figures,
        "inputs": {image: {name: per_output[name][image]["max_abs"] for name in output_names}
                   for image in next(iter(per_output.values()))},
    }
    fidelity.judge(record, model.limits)
    return record


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


# --- the export ---------------------------------------------------------------------------------------------


def io_shapes(graph: onnx.ModelProto) -> tuple[dict[str, Any], dict[str, Any]]:
    def shapes(values: Any) -> dict[str, Any]:
        return {v.name: {"dtype": "float32", "shape": [d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values}
    return shapes(graph.graph.input), shapes(graph.graph.output)


@functools.lru_cache(maxsize=8)
def _converted(key: str, path: Path, sha256: str, photo: str | Path | None, photo_sha256: str | None
               ) -> tuple[bytes, str]:
    """One model's ONNX graph (serialized) and its parity record against MediaPipe (JSON; each caller judges it
    against the limits again), made once per process for a `.tflite` content and parity photograph: conversion and
    MediaPipe's reference take seconds, and an `export vision` after an `export front-end` needs the same."""
    graph = convert_tflite(path)
    return graph.SerializeToString(), json.dumps(check_graph(MODELS[key], graph, path, photo))


def write_front_end(writer: BundleWriter, models_dir: str | Path | None = None, allow_drift: bool = False,
                    photo: str | Path | None = None, progress: bool = True) -> FrontEndExport:
    """Convert the three front-end models, check each against MediaPipe, and add them (and the licence notice)
    to the writer's transaction. Raises FaceLlavaError for missing or unreadable models, and for a graph that
    misses its parity limits unless `allow_drift`."""
    paths = find_models(models_dir)
    for path in paths.values():
        read_tflite(path)  # every file is a TFLite model before any work is done
    entries: dict[str, dict[str, Any]] = {}
    records: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    photo_sha256 = None if photo is None else contract.file_sha256(photo)
    with tqdm(total=len(MODELS), desc="export front-end", unit="model", disable=not progress) as bar:
        for key, model in MODELS.items():
            start = time.perf_counter()
            bar.set_postfix_str(f"{model.file}: convert and check")
            sha256 = contract.file_sha256(paths[key])
            data, record = _converted(key, paths[key], sha256, photo, photo_sha256)
            writer.stage(model.file).write_bytes(data)
            records[model.file] = json.loads(record)
            fidelity.judge(records[model.file], model.limits)
            bar.update()
            seconds[model.file] = time.perf_counter() - start
            inputs, outputs = io_shapes(onnx.load_from_string(data))
            entries[model.file] = {
                "kind": KIND, "model": key, "precision": "fp32", "inputs": inputs, "outputs": outputs,
                "input_range": list(model.input_range), "layout": "NHWC", "opset": OPSET,
                "source_file": paths[key].name,
                "source_file_sha256": sha256, "converter": "facellava.export.tflite_onnx",
                "licence": "Apache-2.0", "notice": NOTICE_NAME,
            }
    misses = [f"{name} misses its parity limits against MediaPipe ({fidelity.describe_limits(r['limits'])}): "
              f"max_abs {r['max_abs']:.3g}, rel_err {r['rel_err']:.3g}; rerun with --allow-drift to keep it anyway"
              for name, r in records.items() if not r["passed"]]
    if misses and not allow_drift:
        raise FaceLlavaError(misses[0] + (f" (and {len(misses) - 1} more)" if len(misses) > 1 else ""))
    listing = "\n".join(f"  {e['source_file']} (sha256 {e['source_file_sha256']}) -> {name}"
                        for name, e in entries.items())
    writer.stage(NOTICE_NAME).write_text(NOTICE.format(models=listing,
                                                       source=f"the mediapipe {_version('mediapipe')} wheel"
                                                       if models_dir is None else "a directory of MediaPipe models"))
    writer.add(NOTICE_NAME, "data", licence="Apache-2.0")
    for name, entry in entries.items():
        writer.add(name, parity=records[name], **entry)
    return FrontEndExport(files={n: writer.manifest.files[n] for n in entries}, parity=records, seconds=seconds)


def export_front_end(bundle_dir: str | Path, models_dir: str | Path | None = None, allow_drift: bool = False,
                     photo: str | Path | None = None, progress: bool = True) -> FrontEndExport:
    """Write the front-end graphs into the bundle `bundle_dir` (made when missing) in one transaction; see
    `write_front_end`. Returns what was written."""
    find_models(models_dir)  # a missing model is reported before the bundle is touched
    with BundleWriter.transaction(bundle_dir) as writer:
        return write_front_end(writer, models_dir, allow_drift, photo, progress)


def add_front_end_if_missing(writer: BundleWriter, models_dir: str | Path | None = None,
                             progress: bool = True) -> FrontEndExport | None:
    """For the other exports, inside their own transaction: the front-end graphs when the bundle lacks any of
    them (see `write_front_end`); None, and nothing done, when it has them all."""
    if has_front_end_graphs(writer.manifest):
        return None
    return write_front_end(writer, models_dir, progress=progress)
