"""Full-size vision export: LanguageBind ViT-L/14 towers (24 layers, 23 used, hidden 1024, 16 heads), D = 4096,
FRLP + simple FRGCA, random weights (the LLM is never allocated).

Exports the landmark graphs of the modalities asked for, FP32 and FP16, with the real export path (checker, shape
inference, FP16 conversion, parity against PyTorch in ONNX Runtime; each modality's model built with its tower only
and released before its ONNX Runtime steps, as `export vision` loads it) and reports: seconds per file and step,
file sizes, peak resident memory and peak anonymous memory (RssAnon, sampled every 0.5 s by a thread), the parity
figures; then the latency of the full-size FP32 image graph in ONNX Runtime on the CPU against PyTorch eager on the
same input (batch 1, the face photograph), as a ratio measured in this one run.

    python benchmarks/vision_export_fullsize.py [--modalities image,video] [--out DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from facellava.bundle import Bundle, BundleWriter
from facellava.export import parity
from facellava.export.vision import export_vision_model, vision_only_model
from facellava.model.modeling import FaceLlavaConfig, TowerConfig

FULL_LLM = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000)


def full_size_configs() -> tuple[FaceLlavaConfig, TowerConfig, TowerConfig]:
    config = FaceLlavaConfig(**FULL_LLM, mm_projector_type="mlp2x_gelu", mm_hidden_size=1024,
                             landmarks_projector_type="landmarks_region_projector",
                             global_landmarks_projector_type="linear", cross_attn_type="simple")

    def tower(video: bool) -> TowerConfig:
        return TowerConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                           num_used_layers=23, hidden_act="gelu", num_frames=8 if video else 1, add_time_attn=video)

    return config, tower(False), tower(True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


class AnonPeak(threading.Thread):
    """The largest RssAnon of this process, sampled every `interval` seconds by a thread of its own."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.peak_kb, self.done = interval, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            self.done.wait(self.interval)

    @property
    def peak_gb(self) -> float:
        return self.peak_kb / 2**20


def latency(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modalities", default="image,video")
    parser.add_argument("--out", type=Path, help="bundle directory to keep (default: a temporary one, deleted)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs for the latency comparison")
    args = parser.parse_args()
    modalities = parity.parse_choices(args.modalities, parity.MODALITIES, "modality")
    out = args.out or Path(tempfile.mkdtemp(prefix="fullsize-vision-"))

    config, image_tower, video_tower = full_size_configs()

    def load(modality: str):
        """One modality's model, with that tower only (what `export vision` holds while it exports it)."""
        start = time.perf_counter()
        model = vision_only_model(config, image_tower if modality == "image" else None,
                                  video_tower if modality == "video" else None, seed=0)
        parameters = {name: sum(p.numel() for p in module.parameters())
                      for name, module in model.named_children() if name != "llm" and module is not None}
        print(f"built the {modality} model in {time.perf_counter() - start:.1f} s: "
              + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in parameters.items())
              + f"; resident {current_rss_gb():.2f} GB", flush=True)
        return model

    sampler = AnonPeak()
    sampler.start()
    try:
        start = time.perf_counter()
        with BundleWriter.transaction(out) as writer:
            result = export_vision_model(load, writer, variants=[(m, True) for m in modalities],
                                         precisions=("fp32", "fp16"), seed=0)
        export_seconds = time.perf_counter() - start
        export_peak, export_anon = peak_rss_gb(), sampler.peak_gb
        print(f"\nexport of {len(result.files)} graphs: {export_seconds:.0f} s, peak resident memory "
              f"{export_peak:.2f} GB, peak anonymous memory {export_anon:.2f} GB (machine: "
              f"{Path('/proc/meminfo').read_text().split()[1]} kB)")
        manifest = Bundle.open(out).manifest
        for name, entry in result.files.items():
            data = sum(manifest.files[d]["bytes"] for d in entry["external_data"])
            steps = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds[name].items())
            record = result.parity[name]
            print(f"  {name:24s} graph {entry['bytes'] / 1e6:8.1f} MB + external data {data / 1e9:5.2f} GB | "
                  f"{steps} | cosine {record['cosine']:.6f} rel_err {record['rel_err']:.2e} "
                  f"min token cosine {record['min_token_cosine']:.5f} {'pass' if record['passed'] else 'MISS'}")

        if "image" in modalities:
            model = load("image")
            feed = parity.face_photo_inputs("image", True)
            pixels, landmarks = torch.from_numpy(feed["pixel_values"]), torch.from_numpy(feed["landmarks"])
            results = {}
            for name in ("vision_image.onnx", "vision_image.fp16.onnx"):
                session = onnxruntime.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
                results[name] = latency(lambda s=session: s.run(["visual_tokens"], feed), args.repeats)
                del session

            def eager() -> None:
                with torch.no_grad():
                    model.encode_image(pixels, landmarks)

            results["pytorch eager"] = latency(eager, args.repeats)
            eager_ms = statistics.median(results["pytorch eager"]) * 1e3
            print(f"\nimage graph latency, batch 1, CPU ({torch.get_num_threads()} torch threads, ORT default), "
                  f"median of {args.repeats}:")
            for name, times in results.items():
                ms = statistics.median(times) * 1e3
                print(f"  {name:24s} {ms:8.1f} ms  ({eager_ms / ms:.2f}x PyTorch eager's speed)")
        print(f"\npeak resident memory of the whole run: {peak_rss_gb():.2f} GB, anonymous {sampler.peak_gb:.2f} GB")
        print(f"numpy {np.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
