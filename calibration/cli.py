"""`facellava calibrate vision`: a thin layer over `calibrate_vision`."""

from __future__ import annotations

import argparse
from pathlib import Path

from facellava.errors import FaceLlavaError


def calibrate_vision_arguments(parser: argparse.ArgumentParser) -> None:
    from facellava.calibration.int8 import DEFAULT_TARGET_COSINE, HELD_OUT_FRACTION, METHODS

    parser.add_argument("bundle", type=Path, help="bundle directory with FP32 vision graphs")
    parser.add_argument("--data", type=Path, required=True,
                        help="folder of face photos and videos, or a Face-LLaVA data .json")
    parser.add_argument("--method", default="minmax", choices=METHODS, help="activation range calibration")
    parser.add_argument("--target-cosine", type=float, default=DEFAULT_TARGET_COSINE,
                        help=f"worst held-out crop's cosine against FP32 to reach (default {DEFAULT_TARGET_COSINE})")
    parser.add_argument("--modalities", help="comma list of image, video (default: those with graphs and samples)")
    parser.add_argument("--limit", type=int, help="most samples per modality (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the file order and the held-out split")
    parser.add_argument("--held-out", type=float, default=HELD_OUT_FRACTION,
                        help=f"fraction of the samples kept apart to check the target (default {HELD_OUT_FRACTION})")
    parser.add_argument("--keep-fp32", default="",
                        help="comma list of node groups always kept FP32 (e.g. frgca,tower.layers.0)")
    parser.add_argument("--cache", type=Path, help="directory to cache the preprocessed calibration set in")
    parser.add_argument("--allow-drift", action="store_true", help="keep graphs that miss the target cosine")


def calibrate_vision(args: argparse.Namespace) -> int:
    if not 0.0 < args.held_out < 1.0:
        raise FaceLlavaError(f"--held-out must be between 0 and 1, got {args.held_out}")
    from facellava.calibration.int8 import calibrate_vision as run

    keep = [g.strip() for g in args.keep_fp32.split(",") if g.strip()]
    entries = run(args.bundle, args.data, method=args.method, target_cosine=args.target_cosine,
                  modalities=args.modalities, limit=args.limit, seed=args.seed, keep_fp32=keep,
                  held_out=args.held_out, allow_drift=args.allow_drift, cache=args.cache)
    for name, entry in entries.items():
        calibration = entry["calibration"]
        kept = ", ".join(calibration["fp32_groups"]) or "none"
        print(f"{name:32s} {entry['bytes'] / 1e6:8.1f} MB  held-out cosine >= "
              f"{_held_out_cosine(args.bundle, name):.5f} on {calibration['held_out_samples']} crop(s)  "
              f"({calibration['calibration_samples']} calibrated, {calibration['method']})  FP32 groups: {kept}")
    print(f"wrote {len(entries)} INT8 vision graphs to {args.bundle}")
    return 0


def _held_out_cosine(bundle: Path, name: str) -> float:
    import json

    from facellava import contract

    return json.loads((bundle / contract.MANIFEST_NAME).read_text())["parity"][name]["cosine"]
