"""`facellava make-tiny`, `inspect`, `train` and `make-synthetic-data`."""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def tower_arguments(parser: argparse.ArgumentParser) -> None:
    """--image-tower / --video-tower, for every command that loads a tower (see `loading.find_tower`)."""
    for kind, repo in (("image", "LanguageBind_Image"), ("video", "LanguageBind_Video_merge")):
        parser.add_argument(f"--{kind}-tower", type=Path, metavar="DIR",
                            help=f"{repo} directory (default: config.json's mm_{kind}_tower as a directory, then "
                                 "as a repo id in the Hugging Face hub cache or ./cache_dir, then tower weights "
                                 "inside the checkpoint)")


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
    tower_arguments(parser)
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
                            "hidden_act": c.hidden_act, "frames": c.num_frames, "parameters": count(tower),
                            "source": model.tower_sources.get(kind)}
    return {
        "llm": {"hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
                "heads": config.num_attention_heads, "vocab_size": config.vocab_size, "parameters": count(model.llm)},
        "towers": towers,
        "missing_towers": {kind: model.no_tower(kind) for kind in ("image", "video") if kind not in towers},
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
    # the LLM's tensors checked from the shards' headers, not loaded: a 7B LLM in float32 is 27 GB
    model = load_face_llava(args.checkpoint, image_tower=args.image_tower, video_tower=args.video_tower, llm=False,
                            check_llm=True)
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
              f"used, {tower['heads']} heads, {tower['hidden_act']}, {tower['frames']} frame(s), "
              f"from {tower['source']}")
    for kind, message in info["missing_towers"].items():
        print(f"{kind} tower  none: {message}")
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


def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", type=int, choices=[1, 2], required=True,
                        help="1: only the landmark modules learn; 2: everything but the towers")
    parser.add_argument("--data", type=Path, required=True, help="data file in the official LLaVA JSON format")
    parser.add_argument("--checkpoint", type=Path, required=True, help="base checkpoint directory (official layout)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory: the trained checkpoint, and checkpoint-<step>/ to resume from")
    parser.add_argument("--lora", action="store_true", help="stage 2: LoRA adapters on the LLM, merged on save")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, help="learning rate (default: 1e-4 in stage 1, 2e-5 in stage 2)")
    parser.add_argument("--batch", type=int, default=1, help="samples per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--max-length", type=int, default=3072, help="positions per sample (text + visual)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights stay float32)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest OUT/checkpoint-<step>")
    parser.add_argument("--max-steps", type=int, help="optimizer steps in all (default: epochs x steps per epoch)")
    parser.add_argument("--save-every", type=int, default=200, help="optimizer steps between training checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    tower_arguments(parser)
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def train(args: argparse.Namespace) -> int:
    from facellava.model.train import TrainConfig
    from facellava.model.train import train as run_training

    config = TrainConfig(stage=args.stage, lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                         lora_dropout=args.lora_dropout, epochs=args.epochs, lr=args.lr, batch_size=args.batch,
                         grad_accum=args.grad_accum, max_length=args.max_length, bf16=args.bf16,
                         max_steps=args.max_steps, seed=args.seed, save_every=args.save_every)
    result = run_training(args.data, args.checkpoint, args.out, config, image_tower=args.image_tower,
                          video_tower=args.video_tower, resume=args.resume, device=args.device)
    first, last = result.losses[0], sum(result.losses[-5:]) / len(result.losses[-5:])
    skipped = ", ".join(f"{count} {reason}" for reason, count in result.skipped.items()) or "none"
    print(f"trained {result.steps} steps in {result.seconds:.1f} s: loss {first:.4f} -> {last:.4f} "
          f"(mean of the last 5 steps); records skipped: {skipped}")
    print(f"wrote the trained checkpoint to {result.out}")
    return 0


def make_synthetic_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="directory to create (must not exist, or be empty)")
    parser.add_argument("--n", type=int, default=32, help="number of records")
    parser.add_argument("--videos", type=int, help="how many of them are videos (default: n // 8, at least 1)")
    parser.add_argument("--seed", type=int, default=0)


def make_synthetic_data(args: argparse.Namespace) -> int:
    from facellava.model.synthetic import make_synthetic_data as write_data

    path = write_data(args.out_dir, n=args.n, seed=args.seed, videos=args.videos)
    print(f"wrote {args.n} synthetic records (seed {args.seed}) to {path}")
    return 0
