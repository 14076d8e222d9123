"""`facellava demo`: the whole job on a built-in default, with no downloads.

It builds a tiny Face-LLaVA checkpoint in the official layout, exports both halves into a bundle (both cached
under ~/.cache/facellava), and answers a question about the face photograph the package ships, printing the
answer, the time each stage took and the parity figures the exports measured.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from facellava.bundle import Manifest, user_cache_dir
from facellava.runtime.assets import face_photo

TINY_VERSION = "tiny-v1-seed0"  # bump when model/tiny.py changes what it writes
DEMO_LLM_TYPES = ("f32", "q8_0")
DEMO_QUESTION = "What emotion is shown in the picture?"


def cache_dir() -> Path:
    """Where the demo keeps what it builds: the user's cache directory (`facellava.bundle.user_cache_dir`)."""
    return user_cache_dir()


def tiny_checkpoint() -> Path:
    """The demo's tiny checkpoint, built once and cached."""
    from facellava.model.tiny import make_tiny_checkpoint

    path = cache_dir() / TINY_VERSION
    if not (path / "config.json").is_file():
        print(f"building the tiny checkpoint in {path} ...", flush=True)
        make_tiny_checkpoint(path, seed=0)
    return path


def demo_bundle() -> Path:
    """The demo's bundle (FP32 vision graphs for image and video, with and without landmarks; F32 and Q8_0
    GGUFs; the face front end's graphs), exported once from the tiny checkpoint and cached. What a bundle cached by
    an older version lacks is added."""
    from facellava.export.front_end import export_front_end
    from facellava.export.llm import export_llm_bundle
    from facellava.export.vision import export_vision
    from facellava.runtime.face_graphs import has_front_end_graphs

    checkpoint = tiny_checkpoint()
    bundle = cache_dir() / f"{TINY_VERSION}-bundle"
    manifest = Manifest.read(Path(os.path.realpath(bundle))) if bundle.is_dir() else None
    kinds = {entry["kind"] for entry in manifest.files.values()} if manifest else set()
    if "vision" not in kinds:
        print(f"exporting the vision graphs to {bundle} ...", flush=True)
        export_vision(checkpoint, bundle, precisions=("fp32",))
    if "llm" not in kinds:
        print(f"exporting the LLM to {bundle} ...", flush=True)
        export_llm_bundle(checkpoint, bundle, types=DEMO_LLM_TYPES)
    if manifest is not None and "vision" in kinds and not has_front_end_graphs(manifest):
        print(f"adding the face front end's graphs to {bundle} (cached before they existed) ...", flush=True)
        export_front_end(bundle)
    return bundle


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question", default=DEMO_QUESTION)
    parser.add_argument("--max-tokens", type=int, default=24)


def _parity_lines(manifest: Manifest) -> list[str]:
    lines = []
    for name, figures in sorted(manifest.parity.items()):
        shown = {k: figures[k] for k in ("cosine", "rel_err", "first_token_rel_error", "greedy_identical",
                                         "prompts", "top1_agreement", "mean_kl", "passed") if k in figures}
        values = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        lines.append(f"  {name}: {values}")
    return lines


def demo(args: argparse.Namespace) -> int:
    from facellava.runtime.pipeline import Pipeline

    bundle = demo_bundle()
    print("\nThe tiny model has Face-LLaVA's architecture and input contract but RANDOM weights: its answer is "
          "noise.\nFor real answers, export the released checkpoint (chaubeyG/FaceLLaVA with LanguageBind_Image "
          "and LanguageBind_Video_merge, downloaded yourself):\n  facellava export vision --checkpoint FaceLLaVA "
          "--image-tower LanguageBind_Image --video-tower LanguageBind_Video_merge --out bundle\n"
          "  facellava export llm --checkpoint FaceLLaVA --out bundle --types f16,q4_k_m\n"
          "  facellava run bundle --image face.jpg \"What emotion is shown in the picture?\"\n")
    pipeline = Pipeline.open(bundle)
    manifest = pipeline.bundle.manifest
    try:
        print(f"Q: {args.question}  [image: {face_photo().name}]")
        print("A: ", end="", flush=True)
        stream = pipeline.ask(args.question, image=face_photo(), max_tokens=args.max_tokens, stream=True)
        for piece in stream:
            print(piece, end="", flush=True)
        answer = stream.answer
        assert answer is not None
        print(f"\n\nlandmarks: {answer.landmarks}; vision backend: {pipeline.vision.name}; "
              f"{answer.prompt_positions} prompt positions, {len(answer.tokens)} tokens ({answer.finish_reason})")
        print(answer.timings.line())
    finally:
        pipeline.close()
    print("\nparity against the PyTorch reference, measured at export:")
    print("\n".join(_parity_lines(manifest)))
    return 0
