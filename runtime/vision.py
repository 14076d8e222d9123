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
from typing import Any

import numpy as np

from facellava import contract
from facellava.errors import FaceLlavaError
from facellava.runtime.bundle import Bundle

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


class OnnxRuntimeVision(VisionBackend):
    """The bundle's ONNX graphs in ONNX Runtime on the best execution provider installed (TensorRT, CUDA,
    CPU); sessions are created on first use of each graph."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "auto"):
        from facellava.runtime.ort_providers import execution_providers

        self.bundle = bundle
        self.precision = precision
        self.providers = execution_providers(device)
        self._sessions: dict[tuple[str, bool], Any] = {}

    def _session(self, modality: str, landmarks: bool) -> Any:
        key = (modality, landmarks)
        if key not in self._sessions:
            import onnxruntime

            path = self.bundle.path_of(vision_file(self.bundle, modality, self.precision, landmarks))
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            # ORT's worker threads otherwise spin after each run and take the cores llama.cpp decodes on
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._sessions[key] = onnxruntime.InferenceSession(str(path), options, providers=self.providers)
        return self._sessions[key]

    def encode(self, modality, pixel_values, landmarks):
        session = self._session(modality, landmarks is not None)
        feeds = {"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)}
        if landmarks is not None:
            feeds["landmarks"] = np.ascontiguousarray(landmarks, dtype=np.float32)
        return session.run(["visual_tokens"], feeds)[0]


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
        try:
            from facellava.runtime.tensorrt_runner import gpu_info, import_tensorrt

            trt, gpu = import_tensorrt(), gpu_info(0)
        except FaceLlavaError:
            return {}
        return {(e["modality"], e["landmarks"]): name for name, e in bundle.files.items()
                if e.get("kind") == "engine" and e.get("precision") == precision and e.get("gpu") == gpu.name
                and e.get("tensorrt") == trt.__version__}

    def encode(self, modality, pixel_values, landmarks):
        key = (modality, landmarks is not None)
        if key not in self._engines:
            raise FaceLlavaError(f"no {self.precision} TensorRT engine for {modality} "
                                 f"{'with' if key[1] else 'without'} landmarks on this device; run "
                                 "`facellava build-engine BUNDLE`")
        if key not in self._runners:
            from facellava.runtime.tensorrt_runner import TensorRTRunner

            self._runners[key] = TensorRTRunner(self.bundle.path_of(self._engines[key]))
        feed = {"pixel_values": pixel_values}
        if landmarks is not None:
            feed["landmarks"] = landmarks
        return self._runners[key].run(feed)["visual_tokens"].astype(np.float32, copy=False)


class TorchVision(VisionBackend):
    """The PyTorch reference on the bundle's source checkpoint (needs torch and the checkpoint on disk)."""

    name = "torch"
    precision = "fp32"

    def __init__(self, bundle: Bundle):
        try:
            import torch

            from facellava.model import FaceLlava
        except ImportError:
            raise FaceLlavaError("the torch vision backend needs torch: install the `export` extra, or choose "
                                 "--vision onnxruntime") from None
        checkpoint = bundle.manifest.get("source", {}).get("checkpoint")
        if not checkpoint:
            raise FaceLlavaError(f"{bundle.path}'s manifest names no source checkpoint for the torch backend")
        self._torch = torch
        self.model = FaceLlava.from_pretrained(checkpoint)

    def encode(self, modality, pixel_values, landmarks):
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
            lm = None if landmarks is None else torch.from_numpy(np.ascontiguousarray(landmarks, dtype=np.float32))
            encode = self.model.encode_image if modality == "image" else self.model.encode_video
            return encode(x, lm).float().numpy()


def open_vision(bundle: Bundle, backend: str = "auto", precision: str = "fp32") -> VisionBackend:
    """A vision backend for the bundle. `auto`: TensorRT when this device has engines for the bundle and
    TensorRT is installed, else ONNX Runtime. Raises FaceLlavaError for an unknown or unavailable backend."""
    if backend not in BACKENDS:
        raise FaceLlavaError(f"unknown vision backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend in ("auto", "tensorrt"):
        engines = TensorRTVision.engines_here(bundle, precision)
        if engines:
            return TensorRTVision(bundle, precision, engines)
        if backend == "tensorrt":
            raise FaceLlavaError(f"no {precision} TensorRT engines for this device in {bundle.path} (or TensorRT "
                                 "is not installed); build them with `facellava build-engine BUNDLE`")
    if backend == "torch":
        return TorchVision(bundle)
    try:
        return OnnxRuntimeVision(bundle, precision)
    except ImportError:
        raise FaceLlavaError("onnxruntime is not installed: install the `runtime` extra") from None
