"""Which ONNX Runtime execution providers to ask for: TensorRT, then CUDA, then CPU, among those installed.

`onnxruntime` (CPU) lists only the CPU provider; `onnxruntime-gpu` adds CUDA and, where TensorRT's libraries are
found, TensorRT. The FP16 graphs carry their precision themselves, so the TensorRT provider builds them strongly
typed without any FP16 flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from facellava.errors import FaceLlavaError

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
TENSORRT_CACHE = "onnxruntime-tensorrt"  # the TensorRT provider's engine cache, in the user's cache directory
_ORDER = {
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}


def execution_providers(device: str = "auto", cache_dir: str | Path | None = None) -> list[Any]:
    """The `providers` argument for `onnxruntime.InferenceSession`.

    device "auto" takes the best one installed; "tensorrt" or "cuda" insist on it (with the rest as fallback for
    ops it lacks); "cpu" uses the CPU alone. The TensorRT provider keeps its engines and timing cache in
    `cache_dir` (default: `onnxruntime-tensorrt` in the user's cache directory, `bundle.user_cache_dir`), so only
    the first start builds them (minutes for a vision graph). Raises FaceLlavaError for an unknown device or one
    that the installed onnxruntime cannot use.
    """
    import onnxruntime

    if device not in DEVICES:
        raise FaceLlavaError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    available = set(onnxruntime.get_available_providers())
    if device == "auto":
        device = next((d for d in ("tensorrt", "cuda") if _ORDER[d][0] in available), "cpu")
    elif _ORDER[device][0] not in available:
        raise FaceLlavaError(f"onnxruntime {onnxruntime.__version__} has no {_ORDER[device][0]} (it has "
                             f"{', '.join(sorted(available))}); install onnxruntime-gpu, with TensorRT for "
                             "'tensorrt'")
    providers: list[Any] = []
    for name in _ORDER[device]:
        if name not in available:
            continue
        if name == "TensorrtExecutionProvider":
            from facellava.bundle import user_cache_dir

            cache = str(Path(cache_dir) if cache_dir is not None else user_cache_dir() / TENSORRT_CACHE)
            try:
                Path(cache).mkdir(parents=True, exist_ok=True)
            except OSError:  # a read-only home: the provider builds its engines at every start, as before
                providers.append(name)
                continue
            providers.append((name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                                     "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}))
        else:
            providers.append(name)
    return providers
