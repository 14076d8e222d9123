"""Vision backends behind one small interface: visual tokens from preprocessed pixels and landmarks.

- `onnxruntime`: the bundle's ONNX graphs in ONNX Runtime, on the CUDA execution provider when onnxruntime-gpu
  is installed, else on the CPU.
- `tensorrt`: the bundle's TensorRT engines built on this device (`facellava build-engine`), through TensorRT's
  own runtime (no torch).
- `torch`: the PyTorch reference on the bundle's source checkpoint, only where torch is installed.

`open_vision(bundle, "auto")` picks TensorRT where engines for this GPU exist, else ONNX Runtime.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facellava import contract
from facellava.bundle import Bundle
from facellava.errors import FaceLlavaError

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


class VisionBackend(ABC):
    """Turns preprocessed pixels (and landmarks, crop pixels / 256) into visual tokens."""

    name: str
    precision: str

    @abstractmethod
    def encode(self, modality: contract.Modality, pixel_values: np.ndarray,
               landmarks: np.ndarray | None) -> np.ndarray:
        """image: [B,3,224,224], [B,68,2] | None -> [B,256,D]; video: [B,3,8,224,224], [B,8,68,2] | None ->
        [B,8,257,D]; float32 throughout."""

    def encode_timed(self, modality: contract.Modality, pixel_values: np.ndarray,
                     landmarks: np.ndarray | None) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        tokens = self.encode(modality, pixel_values, landmarks)
        return tokens, (time.perf_counter() - start) * 1000


def vision_file(bundle: Bundle, modality: str, precision: str, landmarks: bool) -> str:
    """The name of the bundle's ONNX graph for this modality, precision and landmark use.
    Raises FaceLlavaError (listing what the bundle has) when there is none."""
    names = bundle.find("vision", modality=modality, precision=precision, landmarks=landmarks)
    if not names:
        have = sorted({(e.get("modality"), e.get("precision"), e.get("landmarks"))
                       for e in bundle.files.values() if e.get("kind") == "vision"})
        listed = ", ".join(f"{m}/{p}/{'landmarks' if lm else 'no landmarks'}" for m, p, lm in have) or "none"
        raise FaceLlavaError(f"{bundle.path} has no {precision} {modality} vision graph "
                             f"{'with' if landmarks else 'without'} landmarks (it has: {listed}); export one with "
                             f"`facellava export vision --modalities {modality} --precision {precision}`")
    return names[0]


# A tensor as a loaded graph or engine declares it: its shape (None where the dimension is dynamic or symbolic)
# and its element type as a numpy name ("float32").
TensorSpec = tuple[tuple[int | None, ...], str]


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def check_vision_io(file: str, modality: contract.Modality, landmarks: bool, inputs: dict[str, TensorSpec],
                    outputs: dict[str, TensorSpec]) -> None:
    """Check a loaded vision graph or engine against `contract.vision_graph_io`: the same input and output names,
    float32, the same ranks, and the contract's size in every dimension the file fixes (a dimension left dynamic
    is checked when it runs). Raises FaceLlavaError naming the file and the first difference: a graph of
    another model, modality or landmark variant put under this name would otherwise fail deep in the runtime."""
    want_inputs, want_outputs = contract.vision_graph_io(modality, landmarks)
    variant = f"the contract's {modality} vision graph {'with' if landmarks else 'without'} landmarks"
    problems = []
    for role, want, have in (("inputs", want_inputs, inputs), ("outputs", want_outputs, outputs)):
        if set(have) != set(want):
            problems.append(f"{role} {sorted(have)}, expected {sorted(want)}")
            continue
        for name, shape in want.items():
            have_shape, dtype = have[name]
            if len(have_shape) != len(shape) or any(
                    w is not None and h is not None and w != h for w, h in zip(shape, have_shape, strict=True)):
                problems.append(f"{name} {_shape_text(have_shape)}, expected {_shape_text(shape)}")
            elif dtype != "float32":
                problems.append(f"{name} of type {dtype}, expected float32")
    if problems:
        raise FaceLlavaError(f"{file} is not {variant} ({'; '.join(problems)}); export the bundle again")


def check_vision_output(file: str, modality: contract.Modality, batch: int, tokens: np.ndarray) -> np.ndarray:
    """The visual tokens a graph or engine returned, checked against the contract's shape for this batch (the
    dimensions a file may leave dynamic). Raises FaceLlavaError naming the file."""
    _, outputs = contract.vision_graph_io(modality, landmarks=False)
    want = (batch, *outputs[contract.VISION_OUTPUT][1:])
    if tokens.ndim != len(want) or any(w is not None and w != d for w, d in zip(want, tokens.shape, strict=True)):
        raise FaceLlavaError(f"{file} returned visual tokens of shape {list(tokens.shape)}, expected "
                             f"{_shape_text(want)}; export the bundle again")
    return tokens


# ONNX Runtime's element types as numpy names (the contract's tensors are all float32)
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8"}


def _ort_specs(node_args: Sequence[Any]) -> dict[str, TensorSpec]:
    return {arg.name: (tuple(d if isinstance(d, int) else None for d in (arg.shape or ())),
                       _ORT_TYPES.get(arg.type, arg.type)) for arg in node_args}


def _first_line(error: BaseException, limit: int = 300) -> str:
    """An error's message cut to its first line (ORT and TensorRT messages run over several)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


class OnnxRuntimeVision(VisionBackend):
    """The bundle's ONNX graphs in ONNX Runtime on the best execution provider installed (TensorRT, CUDA,
    CPU); sessions are created on first use of each graph."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "auto"):
        from facellava.runtime.ort_providers import execution_providers

        self.bundle = bundle
        self.precision = precision
        self.providers = execution_providers(device)
        self._sessions: dict[tuple[str, bool], tuple[str, Any]] = {}

    def _session(self, modality: contract.Modality, landmarks: bool) -> tuple[str, Any]:
        """(file name, ONNX Runtime session) of the graph for this modality and landmark use, created on first
        use and checked against the contract. Raises FaceLlavaError for a graph ORT cannot load or that differs
        from the contract."""
        key = (modality, landmarks)
        if key not in self._sessions:
            import onnxruntime

            name = vision_file(self.bundle, modality, self.precision, landmarks)
            path = self.bundle.path_of(name)
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            # ORT's worker threads otherwise spin after each run and take the cores llama.cpp decodes on
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                session = onnxruntime.InferenceSession(str(path), options, providers=self.providers)
            except Exception as error:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...) for a bad file
                raise FaceLlavaError(f"ONNX Runtime cannot load {name} from {self.bundle.path} "
                                     f"({_first_line(error)}); export the bundle again") from None
            check_vision_io(name, modality, landmarks, _ort_specs(session.get_inputs()),
                            _ort_specs(session.get_outputs()))
            self._sessions[key] = (name, session)
        return self._sessions[key]

    def encode(self, modality, pixel_values, landmarks):
        name, session = self._session(modality, landmarks is not None)
        feeds = {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)}
        if landmarks is not None:
            feeds["landmarks"] = np.ascontiguousarray(landmarks, dtype=np.float32)
        try:
            tokens = session.run([contract.VISION_OUTPUT], feeds)[0]
        except Exception as error:  # a graph that loaded but cannot run the contract's inputs
            raise FaceLlavaError(f"ONNX Runtime failed to run {name} ({_first_line(error)}); export the bundle "
                                 "again") from None
        return check_vision_output(name, modality, len(pixel_values), tokens)


class TensorRTVision(VisionBackend):
    """The bundle's TensorRT engines built on this device for this GPU and TensorRT version."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str, engines: dict[tuple[str, bool], str]):
        self.bundle = bundle
        self.precision = precision
        self._engines = engines
        self._runners: dict[tuple[str, bool], Any] = {}

    @staticmethod
    def engines_here(bundle: Bundle, precision: str) -> dict[tuple[str, bool], str]:
        """{(modality, landmarks): engine name} for this GPU and TensorRT; empty where there is no TensorRT,
        no GPU, or no engine built for them."""
        from facellava.runtime.tensorrt_runner import engines_for_this_device

        return {(e["modality"], e["landmarks"]): name for name, e in engines_for_this_device(bundle.files,
                                                                                             "engine").items()
                if e.get("precision") == precision}

    def encode(self, modality, pixel_values, landmarks):
        key = (modality, landmarks is not None)
        if key not in self._engines:
            raise FaceLlavaError(f"no {self.precision} TensorRT engine for {modality} "
                                 f"{'with' if key[1] else 'without'} landmarks on this device; run "
                                 "`facellava build-engine BUNDLE`")
        name = self._engines[key]
        if key not in self._runners:
            from facellava.runtime.tensorrt_runner import TensorRTRunner

            runner = TensorRTRunner(self.bundle.path_of(name))
            try:
                check_vision_io(name, modality, key[1], *runner.io_specs())
            except FaceLlavaError:
                runner.close()
                raise
            self._runners[key] = runner
        feed = {"pixel_values": pixel_values}
        if landmarks is not None:
            feed["landmarks"] = landmarks
        tokens = self._runners[key].run(feed)[contract.VISION_OUTPUT]
        return check_vision_output(name, modality, len(pixel_values), tokens)


class TorchVision(VisionBackend):
    """The PyTorch reference on the bundle's source checkpoint (needs torch and the checkpoint, given by the user:
    the path the manifest records lies outside the bundle and is never followed)."""

    name = "torch"
    precision = "fp32"

    def __init__(self, bundle: Bundle, checkpoint: str | Path | None = None, image_tower: str | Path | None = None,
                 video_tower: str | Path | None = None):
        try:
            import torch

            from facellava.model import FaceLlava
        except ImportError:
            raise FaceLlavaError("the torch vision backend needs torch: install the `export` extra, or choose "
                                 "--vision onnxruntime") from None
        from facellava.model.loading import bundle_source_checkpoint

        source = bundle_source_checkpoint(bundle, checkpoint, "--checkpoint (checkpoint= in Python)")
        self._torch = torch
        self.model = FaceLlava.from_pretrained(source, image_tower=image_tower, video_tower=video_tower)

    def encode(self, modality, pixel_values, landmarks):
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
            lm = None if landmarks is None else torch.from_numpy(np.ascontiguousarray(landmarks, dtype=np.float32))
            return self.model.encode(x, lm).float().numpy()  # image or video by the pixels' rank


def open_vision(bundle: Bundle, backend: str = "auto", precision: str = "fp32", checkpoint: str | Path | None = None,
                image_tower: str | Path | None = None, video_tower: str | Path | None = None,
                device: str = "auto") -> VisionBackend:
    """A vision backend for the bundle. `auto`: TensorRT when this device has engines for the bundle and
    TensorRT is installed, else ONNX Runtime on `device`'s execution providers (`execution_providers`). `torch`
    takes the source checkpoint (and optional tower directories). Raises FaceLlavaError for an unknown or
    unavailable backend or device."""
    if backend not in BACKENDS:
        raise FaceLlavaError(f"unknown vision backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "torch" and (checkpoint, image_tower, video_tower) != (None, None, None):
        raise FaceLlavaError("a checkpoint and tower directories are used by the torch vision backend only; add "
                             "--vision torch or leave them out")
    if backend in ("auto", "tensorrt"):
        engines = TensorRTVision.engines_here(bundle, precision)
        if engines:
            return TensorRTVision(bundle, precision, engines)
        if backend == "tensorrt":
            raise FaceLlavaError(f"no {precision} TensorRT engines for this device in {bundle.path} (or TensorRT "
                                 "is not installed); build them with `facellava build-engine BUNDLE`")
    if backend == "torch":
        return TorchVision(bundle, checkpoint, image_tower, video_tower)
    try:
        return OnnxRuntimeVision(bundle, precision, device)
    except ImportError:
        raise FaceLlavaError("onnxruntime is not installed: install the `runtime` extra") from None
