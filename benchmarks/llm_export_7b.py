"""Scale benchmark of the LLM export: a full-size 7B-shaped Face-LLaVA checkpoint to F16 GGUF and Q4_K_M.

Writes a checkpoint in the official layout (config.json, sharded `pytorch_model-*.bin` with an index,
tokenizer.model) with LLaMA-2-7B shapes (hidden 4096, 32 layers, 32 heads, FFN 11008, vocab 32000) plus the
multimodal tensors the export must strip (mm projector 1024->4096->4096, FRLP, FRGCA), random fp16 weights,
generated shard by shard so that writing it costs one shard of memory. The tokenizer is the tiny SentencePiece
model grown to 32000 pieces with unused ones (`model.tiny.pad_tokenizer`): the benchmark measures weights, not
words.

Then it runs each export step in its own subprocess, so that the peak resident memory reported (getrusage
VmHWM, file-backed pages included) is that step's alone: the F16 conversion (`convert_to_gguf`), the
Q4_K_M quantization (`quantize_gguf`, llama.cpp), and a load + short decode of the Q4_K_M file in llama.cpp.
Goal: F16 conversion peak <= 3 GB (an 8 GB Jetson Orin Nano can export on the device). Everything it wrote is
deleted at the end unless --keep.

    python benchmarks/llm_export_7b.py [--workdir /tmp/facellava-7b] [--layers-per-shard 4] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

LLAMA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_theta=10000.0)
MM_HIDDEN = 1024
GOAL_F16_PEAK_GB = 3.0


def _peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, the high-water mark of its own address space. (getrusage's
    ru_maxrss is no use here: Linux carries it across exec, so a child would report its parent's size.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (the benchmark measures memory on Linux only)")


# --- the checkpoint -----------------------------------------------------------------------------------------


def _layer_tensors(layer: int, h: int = LLAMA_7B["hidden_size"], f: int = LLAMA_7B["intermediate_size"]
                   ) -> dict[str, tuple[int, ...]]:
    prefix = f"model.layers.{layer}."
    return {prefix + "input_layernorm.weight": (h,), prefix + "post_attention_layernorm.weight": (h,),
            **{prefix + f"self_attn.{p}_proj.weight": (h, h) for p in "qkvo"},
            prefix + "mlp.gate_proj.weight": (f, h), prefix + "mlp.up_proj.weight": (f, h),
            prefix + "mlp.down_proj.weight": (h, f)}


def _multimodal_tensors(h: int = LLAMA_7B["hidden_size"]) -> dict[str, tuple[int, ...]]:
    """The tensors of a Face-LLaVA checkpoint that are not the LLM (what the GGUF must leave out)."""
    from facellava import contract

    shapes: dict[str, tuple[int, ...]] = {
        "model.mm_projector.0.weight": (h, MM_HIDDEN), "model.mm_projector.0.bias": (h,),
        "model.mm_projector.2.weight": (h, h), "model.mm_projector.2.bias": (h,),
        "model.global_landmarks_projector.weight": (h, contract.LANDMARK_VALUES),
        "model.global_landmarks_projector.bias": (h,),
    }
    for name, start, stop in contract.LANDMARK_REGIONS:
        shapes[f"model.landmarks_projector.region_layers.{name}.weight"] = (h, 2 * (stop - start))
        shapes[f"model.landmarks_projector.region_layers.{name}.bias"] = (h,)
    cross = "model.landmarks_cross_attn."
    shapes.update({cross + "cross_attn.attn.in_proj_weight": (3 * h, h),
                   cross + "cross_attn.attn.in_proj_bias": (3 * h,),
                   cross + "cross_attn.attn.out_proj.weight": (h, h), cross + "cross_attn.attn.out_proj.bias": (h,),
                   cross + "cross_attn.ln.weight": (h,), cross + "cross_attn.ln.bias": (h,),
                   cross + "linear_proj.weight": (h, h), cross + "linear_proj.bias": (h,),
                   cross + "ln.weight": (h,), cross + "ln.bias": (h,)})
    return shapes


def write_checkpoint(directory: Path, layers_per_shard: int, layers: int = LLAMA_7B["num_hidden_layers"],
                     seed: int = 0, sizes: dict | None = None) -> dict:
    """Write the 7B-shaped checkpoint shard by shard (`layers` < 32 only for a quick smoke run; `sizes` overrides
    LLAMA_7B's fields, e.g. a narrower hidden size for a LLaMA-shaped model of another width); return its size
    figures."""
    import torch

    from facellava.model.tiny import pad_tokenizer, tiny_config, train_tokenizer

    llama = {**LLAMA_7B, **(sizes or {})}
    directory.mkdir(parents=True)
    h, f, v, n_layers = llama["hidden_size"], llama["intermediate_size"], llama["vocab_size"], layers
    groups = [range(i, min(i + layers_per_shard, n_layers)) for i in range(0, n_layers, layers_per_shard)]
    shards: list[dict[str, tuple[int, ...]]] = []
    for i, layers in enumerate(groups):
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)} if i == 0 else {}
        for layer in layers:
            shapes.update(_layer_tensors(layer, h, f))
        shards.append(shapes)
    shards[-1].update({"model.norm.weight": (h,), "lm_head.weight": (v, h), **_multimodal_tensors(h)})

    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    started = time.perf_counter()
    for i, shapes in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        state = {}
        for key, shape in shapes.items():
            tensor = torch.randn(shape, generator=generator, dtype=torch.float32).to(torch.float16)
            state[key] = tensor.mul_(0.02) if len(shape) == 2 else tensor.mul_(0.1).add_(1.0)
        torch.save(state, directory / name)
        total += sum(t.numel() * 2 for t in state.values())
        weight_map.update({key: name for key in state})
        del state
        print(f"  wrote {name} ({len(shapes)} tensors)", flush=True)
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = tiny_config(vocab_size=v, cross_attn="simple", towers="none")
    config.update(llama, num_hidden_layers=n_layers, mm_hidden_size=MM_HIDDEN, torch_dtype="float16")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer.model").write_bytes(pad_tokenizer(train_tokenizer(), v))
    return {"checkpoint_gb": total / 1e9, "shards": len(shards), "tensors": len(weight_map),
            "write_s": time.perf_counter() - started}


# --- the measured steps (each in its own process) -----------------------------------------------------------


def child_step(step: str, source: str, out: str) -> dict:
    started = time.perf_counter()
    if step == "convert":
        from facellava.export.gguf import convert_to_gguf

        imports_mb = _peak_rss_mb()
        summary = convert_to_gguf(source, out, "f16", progress=False)
        extra = {"tensors": summary.tensors, "parameters": summary.parameters, "stripped": len(summary.stripped)}
    elif step == "quantize":
        from facellava.export.quantize import quantize_gguf

        imports_mb = _peak_rss_mb()
        quantize_gguf(source, out, "q4_k_m")
        extra = {}
    elif step == "load":
        from facellava.runtime.llm import LlamaModel

        imports_mb = _peak_rss_mb()
        with LlamaModel.open(source, n_ctx=512) as llm:
            loaded = time.perf_counter()
            logits = llm.eval_tokens(llm.tokenize("What emotion does the face show?", add_bos=True))
            tokens = [int(logits.argmax())]
            decode_started = time.perf_counter()
            for _ in range(7):
                tokens.append(int(llm.eval_tokens(tokens[-1:]).argmax()))
            extra = {"load_s": loaded - started, "decode_tokens_per_s": 7 / (time.perf_counter() - decode_started),
                     "finite_logits": bool(__import__("numpy").isfinite(logits).all())}
    else:
        raise SystemExit(f"unknown step {step}")
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": _peak_rss_mb(),
            "rss_after_imports_mb": imports_mb, **extra}


def run_step(step: str, source: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", step, str(source), str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/facellava-7b"))
    parser.add_argument("--layers-per-shard", type=int, default=4)
    parser.add_argument("--layers", type=int, default=LLAMA_7B["num_hidden_layers"],
                        help="decoder layers (32 for 7B; fewer only for a quick smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the GGUF files")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_step(*args.child)))
        return

    if args.workdir.exists():
        raise SystemExit(f"{args.workdir} exists; remove it or choose another --workdir")
    checkpoint, f16, q4 = args.workdir / "checkpoint", args.workdir / "llm-f16.gguf", args.workdir / "llm-q4_k_m.gguf"
    report: dict = {}
    try:
        print(f"writing a 7B-shaped checkpoint to {checkpoint}", flush=True)
        report["checkpoint"] = write_checkpoint(checkpoint, args.layers_per_shard, args.layers)
        print(f"  {report['checkpoint']}", flush=True)
        for step, source, out in (("convert", checkpoint, f16), ("quantize", f16, q4), ("load", q4, q4)):
            print(f"{step} ...", flush=True)
            report[step] = run_step(step, source, out)
            print(f"  {report[step]}", flush=True)
        report["sizes_gb"] = {"f16": f16.stat().st_size / 1e9, "q4_k_m": q4.stat().st_size / 1e9}
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)

    convert, quantize = report["convert"], report["quantize"]
    print(f"\n== {args.layers}-layer LLaMA-7B-shaped LLM export ==")
    print(f"checkpoint: {report['checkpoint']['checkpoint_gb']:.2f} GB fp16 in {report['checkpoint']['shards']} "
          f"shards, {report['checkpoint']['tensors']} tensors ({convert['stripped']} stripped)")
    print(f"F16 conversion: {convert['seconds']:.0f} s, peak RSS {convert['peak_rss_mb'] / 1024:.2f} GB "
          f"({convert['rss_after_imports_mb'] / 1024:.2f} GB after imports); goal <= {GOAL_F16_PEAK_GB} GB: "
          f"{'met' if convert['peak_rss_mb'] / 1024 <= GOAL_F16_PEAK_GB else 'MISSED'}")
    print(f"Q4_K_M quantization (llama.cpp): {quantize['seconds']:.0f} s, peak RSS "
          f"{quantize['peak_rss_mb'] / 1024:.2f} GB")
    print(f"GGUF sizes: F16 {report['sizes_gb']['f16']:.2f} GB, Q4_K_M {report['sizes_gb']['q4_k_m']:.2f} GB "
          f"(ratio {report['sizes_gb']['f16'] / report['sizes_gb']['q4_k_m']:.2f})")
    load = report["load"]
    print(f"Q4_K_M in llama.cpp: loaded in {load['load_s']:.1f} s, {load['decode_tokens_per_s']:.1f} tokens/s, "
          f"finite logits {load['finite_logits']}, peak RSS {load['peak_rss_mb'] / 1024:.2f} GB")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
