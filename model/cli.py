"""`facellava make-tiny` and `facellava inspect`."""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def make_tiny_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="directory to create (must not exist, or be empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cross-attn", choices=["simple", "masked"], default="simple")
    parser.add_argument("--format", dest="weight_format", choices=["bin", "safetensors"], default="bin")
    parser.add_argument("--shards", type=int, default=3, help="number of weight shards (1: a single file)")
    parser.add_argument("--towers", choices=["directories", "embedded", "none"], default="directories",
                        help="LanguageBind tower directories beside the weights, tower weights inside the "
                             "checkpoint, or no towers")


def make_tiny(args: argparse.Namespace) -> int:
    from facellava.model.tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(args.out_dir, seed=args.seed, cross_attn=args.cross_attn,
                               weight_format=args.weight_format, shards=args.shards, towers=args.towers)
    print(f"wrote a tiny Face-LLaVA checkpoint (random weights, seed {args.seed}) to {out}")
    return 0


def inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a Face-LLaVA checkpoint directory (official layout)")
    parser.add_argument("--image-tower", type=Path, help="LanguageBind_Image directory")
    parser.add_argument("--video-tower", type=Path, help="LanguageBind_Video_merge directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def describe(model) -> dict:
    """What a loaded FaceLlava holds, as plain data."""
    config = model.config

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    towers = {}
    for kind in ("image", "video"):
        tower = getattr(model, f"{kind}_tower")
        if tower is not None:
            c = tower.config
            towers[kind] = {"hidden_size": c.hidden_size, "layers": c.num_hidden_layers,
                            "layers_used": c.num_used_layers, "heads": c.num_attention_heads,
                            "hidden_act": c.hidden_act, "frames": c.num_frames, "parameters": count(tower)}
    return {
        "llm": {"hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
                "heads": config.num_attention_heads, "vocab_size": config.vocab_size, "parameters": count(model.llm)},
        "towers": towers,
        "mm_projector": {"type": config.mm_projector_type, "parameters": count(model.mm_projector)},
        "landmarks": None if not config.has_landmark_modules else {
            "cross_attn_type": config.cross_attn_type, "branch_scale": config.branch_scale,
            "parameters": count(model.landmarks_projector) + count(model.global_landmarks_projector)
            + count(model.landmarks_cross_attn)},
        "tokenizer": None if model.tokenizer is None else {"pieces": model.tokenizer.get_piece_size()},
    }


def _resident_mb() -> float:
    """Current resident memory (Linux /proc; elsewhere the peak so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def inspect(args: argparse.Namespace) -> int:
    from facellava.model.loading import load_face_llava

    rss_before = _resident_mb()
    start = time.perf_counter()
    model = load_face_llava(args.checkpoint, image_tower=args.image_tower, video_tower=args.video_tower)
    info = describe(model)
    info["load_seconds"] = round(time.perf_counter() - start, 3)
    info["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    info["rss_before_load_mb"] = rss_before
    if args.json:
        print(json.dumps(info))
        return 0
    llm = info["llm"]
    print(f"checkpoint   {args.checkpoint}")
    print(f"LLM          LLaMA, hidden {llm['hidden_size']}, {llm['layers']} layers, {llm['heads']} heads, "
          f"vocab {llm['vocab_size']}, {llm['parameters']:,} parameters")
    for kind, tower in info["towers"].items():
        print(f"{kind} tower  ViT hidden {tower['hidden_size']}, {tower['layers_used']} of {tower['layers']} layers "
              f"used, {tower['heads']} heads, {tower['hidden_act']}, {tower['frames']} frame(s)")
    for kind in ("image", "video"):
        if kind not in info["towers"]:
            print(f"{kind} tower  none (pass --{kind}-tower DIR)")
    print(f"projector    {info['mm_projector']['type']}")
    landmarks, tokenizer = info["landmarks"], info["tokenizer"]
    if landmarks is None:
        print("landmarks    none (no FRLP/FRGCA in this checkpoint)")
    else:
        print(f"landmarks    FRLP + FRGCA ({landmarks['cross_attn_type']}, branch scale {landmarks['branch_scale']})")
    print("tokenizer    " + ("none" if tokenizer is None else f"SentencePiece, {tokenizer['pieces']} pieces"))
    print(f"loaded in {info['load_seconds']} s; peak resident memory {info['peak_rss_mb']} MB "
          f"({info['rss_before_load_mb']} MB before loading: Python, torch, transformers)")
    return 0
