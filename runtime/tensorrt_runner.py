"""Running a TensorRT engine of the vision graph with TensorRT's own Python API and CUDA buffers from cuda-python.

No torch here: a Jetson needs only `tensorrt` (JetPack ships it), `cuda-python` and numpy. Works with TensorRT 10
and 11 (the name-based tensor API: `set_input_shape`, `set_tensor_address`, `execute_async_v3`).
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facellava.errors import FaceLlavaError


def import_tensorrt() -> Any:
    """The `tensorrt` module. Raises FaceLlavaError saying how to get it when it is not installed."""
    try:
        import tensorrt
    except ImportError:
        raise FaceLlavaError("TensorRT is not installed: on a Jetson it comes with JetPack; elsewhere "
                             "`pip install facellava-edge[tensorrt]` on a machine with an NVIDIA GPU") from None
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime API module (`cuda.bindings.runtime`, or `cuda.cudart` in cuda-python < 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise FaceLlavaError("cuda-python is not installed: `pip install cuda-python` (or "
                                 "facellava-edge[tensorrt])") from None
    return runtime


def cuda_call(result: Any) -> Any:
    """Unpack a cuda-python call's `(error, *values)`; raise FaceLlavaError when the error is not success."""
    cudart = import_cudart()
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        name = getattr(error, "name", str(error))
        raise FaceLlavaError(f"CUDA call failed with {name}: no usable NVIDIA GPU or driver")
    return values[0] if len(values) == 1 else tuple(values) or None


@functools.cache
def _collecting_logger(trt: Any) -> Any:
    """A TensorRT logger that prints warnings to stderr, as `trt.Logger(WARNING)` does, but keeps errors back
    for the one-line FaceLlavaError that reports them (TensorRT's Python API says only None when it fails).
    One per process: TensorRT warns when runtimes are created with different loggers."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(" ".join(str(msg).split()))
            elif severity == trt.ILogger.Severity.WARNING:
                sys.stderr.write(f"[TensorRT] {msg}\n")

        def last_error(self) -> str:
            return self.errors[-1][:300] if self.errors else "no message from TensorRT"

    return CollectingLogger()


@dataclass(frozen=True)
class GpuInfo:
    """The GPU engines are built for: its name and compute capability ("8.7" for Orin)."""

    name: str
    compute_capability: str

    @property
    def slug(self) -> str:
        """A folder-safe name: "NVIDIA GeForce RTX 4060 Laptop GPU" -> "nvidia-geforce-rtx-4060-laptop-gpu"."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"


def gpu_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of a CUDA device. Raises FaceLlavaError when there is none."""
    cudart = import_cudart()
    count = cuda_call(cudart.cudaGetDeviceCount())
    if not count or device >= count:
        raise FaceLlavaError(f"no CUDA device {device} (found {count or 0})")
    props = cuda_call(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name=name.rstrip("\x00").strip(), compute_capability=f"{props.major}.{props.minor}")


def engines_for_this_device(files: Mapping[str, Mapping[str, Any]], kind: str) -> dict[str, Mapping[str, Any]]:
    """A manifest's entries of `kind` ("engine", "front_end_engine") built for GPU 0 with the installed TensorRT
    ({file name: entry}): engines only load on the GPU model and TensorRT version that built them. Empty where
    TensorRT, cuda-python or a GPU is missing."""
    try:
        trt, gpu = import_tensorrt(), gpu_info(0)
    except FaceLlavaError:
        return {}
    return {name: entry for name, entry in files.items() if entry.get("kind") == kind
            and entry.get("gpu") == gpu.name and entry.get("tensorrt") == trt.__version__}


class TensorRTRunner:
    """One deserialized engine and an execution context; `run({input name: array}) -> {output name: array}`.

    Device buffers are allocated on first use and grown when a larger batch comes; inputs are copied in, the
    engine is enqueued on the runner's own stream, the outputs are copied back, and the stream is synchronized.
    Use as a context manager (or call `close`) to free the GPU memory.
    """

    def __init__(self, engine_path: str | Path, device: int = 0):
        trt = import_tensorrt()
        cudart = import_cudart()
        self._trt, self._cudart = trt, cudart
        self._buffers: dict[str, tuple[int, int]] = {}
        self._stream = None
        cuda_call(cudart.cudaSetDevice(device))
        path = Path(engine_path)
        if not path.is_file():
            raise FaceLlavaError(f"engine {path} does not exist; build it with `facellava build-engine`")
        self._logger = _collecting_logger(trt)
        self._logger.errors.clear()
        self._runtime = trt.Runtime(self._logger)
        try:
            self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        except (RuntimeError, TypeError) as error:  # some builds raise instead of returning None
            self._logger.errors.append(str(error).strip().splitlines()[0] if str(error).strip() else repr(error))
            self.engine = None
        if self.engine is None:
            raise FaceLlavaError(f"TensorRT {trt.__version__} cannot load {path} ({self._logger.last_error()}): "
                                 "engines only run with the TensorRT version and GPU they were built with; rebuild "
                                 "it here with `facellava build-engine`")
        self.context = self.engine.create_execution_context()
        if self.context is None:  # TensorRT 10 returns None when, e.g., the GPU lacks memory for the context
            raise FaceLlavaError(f"TensorRT cannot create an execution context for {path} "
                                 f"({self._logger.last_error()}); free GPU memory or rebuild the engine")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self._stream = cuda_call(cudart.cudaStreamCreate())

    def io_specs(self) -> tuple[dict[str, tuple[tuple[int | None, ...], str]],
                                dict[str, tuple[tuple[int | None, ...], str]]]:
        """({input name: (shape, numpy type name)}, {output name: ...}) as the engine declares them, None for
        a dynamic dimension (TensorRT's -1), for checking the engine against a contract before it runs."""

        def spec(name: str) -> tuple[tuple[int | None, ...], str]:
            shape = tuple(None if int(d) < 0 else int(d) for d in self.engine.get_tensor_shape(name))
            dtype = self.engine.get_tensor_dtype(name)
            try:
                return shape, np.dtype(self._trt.nptype(dtype)).name
            except TypeError:  # a type numpy has no name for (bfloat16, FP8, INT4)
                return shape, str(dtype)

        return ({n: spec(n) for n in self.input_names}, {n: spec(n) for n in self.output_names})

    def max_batch(self) -> int:
        """The largest batch the engine's optimization profile allows (a static engine's own batch)."""
        static = int(self.engine.get_tensor_shape(self.input_names[0])[0])
        if static >= 0:
            return static
        _, _, largest = self.engine.get_tensor_profile_shape(self.input_names[0], 0)
        return int(largest[0])

    def _device_buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                cuda_call(self._cudart.cudaFree(pointer))
            pointer = int(cuda_call(self._cudart.cudaMalloc(nbytes)))
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine on host arrays (converted to the engine's input types). Raises FaceLlavaError for a
        missing input or a shape outside the engine's profile."""
        trt, cudart = self._trt, self._cudart
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise FaceLlavaError(f"the engine needs inputs {missing}")
        host_inputs = []
        for name in self.input_names:
            array = np.ascontiguousarray(feed[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            if not self.context.set_input_shape(name, tuple(array.shape)):
                raise FaceLlavaError(f"input {name} of shape {array.shape} is outside the engine's profile (batch "
                                     f"1 to {self.max_batch()}); rebuild with a larger --max-batch")
            pointer = self._device_buffer(name, array.nbytes)
            cuda_call(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
            self.context.set_tensor_address(name, pointer)
            host_inputs.append(array)  # alive until the stream is synchronized
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, self._device_buffer(name, outputs[name].nbytes))
        if not self.context.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT failed to enqueue the engine")
        for name, array in outputs.items():
            cuda_call(cudart.cudaMemcpyAsync(array.ctypes.data, self._buffers[name][0], array.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
        cuda_call(cudart.cudaStreamSynchronize(self._stream))
        del host_inputs
        return outputs

    def close(self) -> None:
        """Free the device buffers and the stream."""
        for pointer, _ in self._buffers.values():
            self._cudart.cudaFree(pointer)
        self._buffers.clear()
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
