"""`facellava export llm`: a thin layer over `facellava.export.llm.export_llm_bundle`."""

from __future__ import annotations

import argparse
from pathlib import Path

from facellava.model.cli import tower_arguments


def export_llm_arguments(parser: argparse.ArgumentParser) -> None:
    from facellava.export.llm import DEFAULT_TYPES
    from facellava.export.quantize import QUANT_TYPES

    plain = ",".join(t for t, q in QUANT_TYPES.items() if not q.needs_imatrix)
    with_imatrix = ",".join(t for t, q in QUANT_TYPES.items() if q.needs_imatrix)
    parser.add_argument("--checkpoint", type=Path, required=True, help="Face-LLaVA checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory (created or updated)")
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES),
                        help=f"comma-separated GGUF types (default %(default)s): f32, f16, {plain}; "
                             f"with --imatrix also {with_imatrix}")
    parser.add_argument("--imatrix", type=Path, help="importance matrix for the quantizer (llama.cpp's GGUF or .dat)")
    parser.add_argument("--allow-drift", action="store_true",
                        help="keep files that miss their parity limits (the figures still go into the manifest)")
    tower_arguments(parser)
    parser.add_argument("--threads", type=int, default=0, help="quantizer threads (0: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def export_llm(args: argparse.Namespace) -> int:
    from facellava.export.llm import export_llm_bundle

    results = export_llm_bundle(args.checkpoint, args.out, args.types, imatrix=args.imatrix,
                                allow_drift=args.allow_drift, image_tower=args.image_tower,
                                video_tower=args.video_tower, threads=args.threads, progress=not args.quiet)
    for name, figures in results.items():
        if "greedy_identical" in figures and name.endswith(("f32.gguf", "f16.gguf")):
            shown = (f"first-token rel. error {figures['first_token_rel_error']:.2e}, greedy identical "
                     f"{figures['greedy_identical']}/{figures['prompts']}")
        else:
            shown = f"top-1 agreement {figures['top1_agreement']:.3f}, mean KL {figures['mean_kl']:.4f}"
        verdict = "ok" if figures["passed"] else "DRIFT (kept: --allow-drift)"
        print(f"{args.out / name}: {shown}, tokenization mismatches {figures['tokenization_mismatches']}: {verdict}")
    return 0
