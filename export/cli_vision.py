"""`facellava export vision` and `facellava build-engine`: thin layers over `export_vision` and `build_engines`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from facellava import contract
from facellava.model.cli import tower_arguments


def export_vision_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="Face-LLaVA checkpoint directory")
    tower_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="bundle directory (created or updated)")
    parser.add_argument("--modalities", default="image,video", help="comma list of image, video (default both)")
    parser.add_argument("--precision", default="fp32,fp16", help="comma list of fp32, fp16 (default both)")
    parser.add_argument("--without-landmarks", action="store_true",
                        help="export only the graphs without landmark inputs (default: both variants when the "
                             "checkpoint has FRLP/FRGCA)")
    parser.add_argument("--allow-drift", action="store_true",
                        help="keep graphs that miss their parity threshold (the figures are still recorded)")
    parser.add_argument("--seed", type=int, help="seed of the random parity inputs (default: fresh, recorded)")
    parser.add_argument("--no-front-end", action="store_true",
                        help="do not add the face front end's graphs (export front-end) when the bundle lacks them")


def _figures(record: dict[str, Any]) -> str:
    return (f"cosine {record['cosine']:.7f}  rel_err {record['rel_err']:.2e}  max_abs {record['max_abs']:.2e}  "
            + ("pass" if record["passed"] else "DRIFT"))


def _check_choices(args: argparse.Namespace, engines: bool = False) -> None:
    """Refuse an unknown modality or precision before torch or TensorRT is imported (seconds on a Jetson)."""
    from facellava.export import parity

    parity.parse_choices(args.modalities, parity.MODALITIES, "modality")
    parity.parse_choices(args.precision, parity.ENGINE_PRECISIONS if engines else parity.PRECISIONS, "precision")


def export_vision(args: argparse.Namespace) -> int:
    _check_choices(args)
    from facellava.export.vision import export_vision as run

    result = run(args.checkpoint, args.out, image_tower=args.image_tower, video_tower=args.video_tower,
                 modalities=args.modalities, precisions=args.precision,
                 landmarks=False if args.without_landmarks else None, allow_drift=args.allow_drift, seed=args.seed,
                 front_end=not args.no_front_end)
    for name, entry in result.files.items():
        print(f"{name:32s} {entry['bytes'] / 1e6:9.1f} MB  {_figures(result.parity[name])}")
    print(f"wrote {len(result.files)} vision graphs to {args.out}")
    return 0


def build_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle directory with vision graphs")
    parser.add_argument("--modalities", default="image,video", help="comma list of image, video (default both)")
    parser.add_argument("--precision", default="fp32,fp16,int8",
                        help="comma list of fp32, fp16, int8 (default: all of them the bundle has)")
    parser.add_argument("--max-batch", type=int, default=4, help="largest batch the engines accept (default 4)")
    parser.add_argument("--opt-batch", type=int, default=1, help="batch the engines are tuned for (default 1)")
    parser.add_argument("--workspace-gb", type=float, default=2.0, help="builder workspace limit (default 2 GB)")
    parser.add_argument("--allow-drift", action="store_true", help="keep engines that miss their parity threshold")
    parser.add_argument("--seed", type=int, help="seed of the random parity inputs (default: fresh, recorded)")
    parser.add_argument("--no-front-end", action="store_true",
                        help="leave the face front end's graphs to ONNX Runtime (default: engines of them too)")


def build_engine(args: argparse.Namespace) -> int:
    _check_choices(args, engines=True)
    from facellava.export.tensorrt import build_engines

    entries = build_engines(args.bundle, modalities=args.modalities, precisions=args.precision,
                            max_batch=args.max_batch, opt_batch=args.opt_batch, workspace_gb=args.workspace_gb,
                            allow_drift=args.allow_drift, seed=args.seed, front_end=not args.no_front_end)
    parity = json.loads((args.bundle / contract.MANIFEST_NAME).read_text())["parity"]
    for name, entry in entries.items():
        print(f"{name}  {entry['bytes'] / 1e6:.1f} MB  built in {entry['build_seconds']:.0f} s  "
              f"{_figures(parity[name])}")
    print(f"built {len(entries)} engines in {args.bundle}")
    return 0
