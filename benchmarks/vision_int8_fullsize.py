"""Full-size image graph in ONNX Runtime on the CPU: FP32, FP16 and INT8 (Q/DQ) latency and cosine against FP32.

Builds the full-size vision modules with random weights (LanguageBind ViT-L/14 image tower, 23 of 24 layers used,
D = 4096, FRLP + simple FRGCA; the LLM is never allocated), exports the landmark image graph in FP32 and FP16 with
the real export path, makes a calibration set from the shipped photograph and augmented copies of it through the
runtime's front end, quantizes with `calibrate_vision` (minmax, target cosine --target, held-out crops), then times
the three graphs on the same held-out crop (batch 1) and prints their latency ratios from this one run.

    python benchmarks/vision_int8_fullsize.py [--out DIR] [--repeats 5] [--copies 8] [--target 0.98]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageEnhance
from vision_export_fullsize import full_size_configs, latency

from facellava.bundle import Bundle, BundleWriter
from facellava.calibration.dataset import build_calibration_set
from facellava.calibration.int8 import calibrate_vision, held_out_figures
from facellava.export.vision import export_vision_model, vision_only_model
from facellava.runtime.assets import face_photo


def augmented_photos(folder: Path, copies: int) -> Path:
    """The shipped photograph and `copies` rotated, brightened copies of it."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.open(face_photo()).convert("RGB")
    image.save(folder / "photo.png")
    rng = np.random.default_rng(0)
    for i in range(copies):
        angle, light = rng.uniform(-10, 10), rng.uniform(0.7, 1.3)
        ImageEnhance.Brightness(image.rotate(angle)).enhance(light).save(folder / f"aug{i}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="bundle directory to keep (default: a temporary one, deleted)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per graph")
    parser.add_argument("--copies", type=int, default=8, help="augmented copies of the photograph to calibrate on")
    parser.add_argument("--target", type=float, default=0.98, help="target cosine of the INT8 graph")
    parser.add_argument("--method", default="minmax")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fullsize-int8-"))
    try:
        start = time.perf_counter()
        model = vision_only_model(*full_size_configs(), seed=0)
        with BundleWriter.transaction(out / "bundle") as writer:
            export_vision_model(model, writer, variants=[("image", True)], precisions=("fp32", "fp16"), seed=0)
        del model
        print(f"export FP32 + FP16: {time.perf_counter() - start:.0f} s")

        data = build_calibration_set(augmented_photos(out / "faces", args.copies), modalities=["image"],
                                     seed=0, progress=False)
        start = time.perf_counter()
        entries = calibrate_vision(out / "bundle", data, method=args.method, target_cosine=args.target,
                                   allow_drift=True)
        print(f"INT8 calibration and sensitivity pass: {time.perf_counter() - start:.0f} s")
        bundle = Bundle.open(out / "bundle")
        manifest = bundle.manifest
        calibration = entries["vision_image.int8.onnx"]["calibration"]
        print(f"INT8: {calibration['calibration_samples']} calibration + {calibration['held_out_samples']} held-out "
              f"crops, {calibration['method']}, FP32 groups: {calibration['fp32_groups'] or 'none'}, held-out cosine "
              f"{manifest.parity['vision_image.int8.onnx']['cosine']:.5f} "
              f"({'meets' if manifest.parity['vision_image.int8.onnx']['passed'] else 'MISSES'} {args.target})")

        _, held = data.split("image", 0.25, 0)
        feed = data.feeds("image", True, held[:1])[0]
        names = ("vision_image.onnx", "vision_image.fp16.onnx", "vision_image.int8.onnx")
        outputs, times = {}, {}
        for name in names:
            session = onnxruntime.InferenceSession(str(bundle.path_of(name)), providers=["CPUExecutionProvider"])
            outputs[name] = session.run(["visual_tokens"], feed)[0]
            times[name] = latency(lambda s=session: s.run(["visual_tokens"], feed), args.repeats)
            del session
        fp32_ms = statistics.median(times[names[0]]) * 1e3
        print(f"\nfull-size image graph, batch 1, ORT {onnxruntime.__version__} CPU, median of {args.repeats}, "
              "on a held-out crop:")
        for name in names:
            ms = statistics.median(times[name]) * 1e3
            size = sum(manifest.files[n]["bytes"] for n in [name, *manifest.files[name]["external_data"]])
            cosine = held_out_figures([outputs[name]], [outputs[names[0]]])["cosine"]
            print(f"  {name:26s} {size / 1e9:5.2f} GB  {ms:9.1f} ms  {fp32_ms / ms:5.2f}x FP32's speed  "
                  f"cosine vs FP32 {cosine:.5f}")
        print(f"\npeak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
