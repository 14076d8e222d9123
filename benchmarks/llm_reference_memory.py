"""Memory of the streamed PyTorch parity reference (`export.llm_parity.stream_reference`): it must not grow with
the number of decoder layers, and must stay within 3 GB of anonymous memory for a 7B checkpoint.

For each configuration it writes a LLaMA-shaped random checkpoint in the official layout (sharded
`pytorch_model-*.bin` with an index, the writer of `llm_export_7b.py`), converts it to an F32 GGUF (the file
whose greedy continuations the streamed passes verify, as the export uses its F32/F16 conversion), then, in a
fresh process, runs the reference on the five parity prompts (three image prompts of ~300 positions, two video
prompts of ~2100 positions; random visual blocks of the contract's shapes stand in for the vision half, which
is measured by the vision benchmarks), each phase in a process of its own (llama.cpp's proposals first, then
the streamed passes), so that each peak is that phase's alone. Sampled every 10 ms from /proc/self/status:

- peak RssAnon of the llama.cpp proposals (its F32 KV cache grows with layers and context, as in the parity
  measurement `measure_gguf` itself) and of the streamed PyTorch passes (what this benchmark is about);
- VmHWM (file-backed pages of the memory-mapped shards included), wall time, streamed passes.

Default configurations: width 1024 (FFN 2752, 8 heads, vocab 32000) at 8 and 32 layers, and 7B width (4096,
FFN 11008, 32 heads) at 2 layers. Goal: the streamed passes' peak at 32 layers within 20 % of that at 8, and
<= 3 GB at 7B width.

    python benchmarks/llm_reference_memory.py [--workdir /tmp/facellava-refmem] [--configs 1024x8,1024x32,4096x2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_export_7b import write_checkpoint  # noqa: E402  (the benchmarks directory is not a package)

WIDTHS = {1024: dict(hidden_size=1024, intermediate_size=2752, num_attention_heads=8, num_key_value_heads=8),
          4096: dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)}
DEFAULT_CONFIGS = "1024x8,1024x32,4096x2"
GOAL_7B_GB = 3.0
GOAL_GROWTH = 0.20


class AnonSampler:
    """Samples RssAnon every `interval` seconds in a thread; `peak()` is the largest value since `reset()`."""

    def __init__(self, interval: float = 0.01):
        from facellava.calibration.bench import _rss_kib

        self._read = _rss_kib
        self._interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._read("RssAnon"))
            time.sleep(self._interval)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self._peak = self._read("RssAnon")

    def peak_mb(self) -> float:
        self._peak = max(self._peak, self._read("RssAnon"))
        return self._peak / 1024


def _prompts(checkpoint: str) -> list:
    """The parity prompts tokenized with the checkpoint's tokenizer, random visual blocks of the contract's
    shapes (seeded)."""
    import numpy as np
    import sentencepiece

    from facellava import contract
    from facellava.export import llm_parity
    from facellava.model.loading import read_config
    from facellava.model.streaming import StreamedPrompt

    config = read_config(checkpoint)
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(Path(checkpoint) / "tokenizer.model"))
    rng = np.random.default_rng(0)
    prompts = []
    for question, modality in llm_parity.PARITY_PROMPTS:
        ids = contract.tokenize_chunks(contract.prompt_chunks(question, modality), tokenizer.encode,
                                       config.bos_token_id)
        count, size = (1, 256) if modality == "image" else (contract.NUM_FRAMES, 257)
        blocks = [(0.02 * rng.standard_normal((size, config.hidden_size))).astype(np.float32) for _ in range(count)]
        prompts.append(StreamedPrompt(ids, blocks))
    return prompts


def child(mode: str, checkpoint: str, gguf: str, proposals_file: str) -> dict:
    """One phase in this fresh process, so that its peak is its own: "propose" (llama.cpp's greedy
    continuations, written to `proposals_file`) or "stream" (the streamed PyTorch passes verifying them; a
    later round, if any, asks llama.cpp again). Returns the figures."""
    import numpy as np

    from facellava.calibration.bench import _rss_kib
    from facellava.export import llm_parity
    from facellava.model.streaming import LayerStream, greedy_continuations

    prompts = _prompts(checkpoint)
    propose = llm_parity.gguf_proposer(gguf)
    imports_mb = _rss_kib("RssAnon") / 1024
    with AnonSampler() as sampler:
        started = time.perf_counter()
        if mode == "propose":
            first = propose(prompts, [[] for _ in prompts], llm_parity.DECODE_TOKENS)
            Path(proposals_file).write_text(json.dumps(first))
            extra: dict = {}
        else:
            first = json.loads(Path(proposals_file).read_text())
            index = {id(p): i for i, p in enumerate(prompts)}
            rounds = [0]

            def proposals(batch, prefixes, steps):  # round one from the propose phase; later ones live
                rounds[0] += 1
                return [first[index[id(p)]] for p in batch] if rounds[0] == 1 else propose(batch, prefixes, steps)

            stream = LayerStream(checkpoint)
            results = greedy_continuations(stream, prompts, llm_parity.DECODE_TOKENS, proposals, progress=False)
            extra = {"layers": stream.num_layers, "hidden": stream.config.hidden_size,
                     "positions": sum(p.positions for p in prompts), "passes": max(r.passes for r in results),
                     "finite": all(bool(np.isfinite(r.logits.numpy()).all()) for r in results)}
        seconds = time.perf_counter() - started
        peak = sampler.peak_mb()
    return {"seconds": seconds, "peak_anon_mb": peak, "anon_after_imports_mb": imports_mb,
            "vm_hwm_mb": _rss_kib("VmHWM") / 1024, **extra}


def _run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(workdir: Path, width: int, layers: int) -> dict:
    """Write the checkpoint and its F32 GGUF (in this process), then measure the reference in a child."""
    from facellava.export.gguf import convert_to_gguf

    checkpoint, gguf = workdir / f"ckpt-{width}x{layers}", workdir / f"f32-{width}x{layers}.gguf"
    written = write_checkpoint(checkpoint, layers_per_shard=4, layers=layers, sizes=WIDTHS[width])
    convert_to_gguf(checkpoint, gguf, "f32", progress=False)
    proposals = workdir / f"proposals-{width}x{layers}.json"
    propose = _run_child("propose", str(checkpoint), str(gguf), str(proposals))
    figures = _run_child("stream", str(checkpoint), str(gguf), str(proposals))
    figures.update(stream_peak_anon_mb=figures.pop("peak_anon_mb"), stream_s=figures.pop("seconds"),
                   propose_peak_anon_mb=propose["peak_anon_mb"], propose_s=propose["seconds"],
                   vm_hwm_mb=max(figures["vm_hwm_mb"], propose["vm_hwm_mb"]))
    shutil.rmtree(checkpoint)
    gguf.unlink()
    return {"checkpoint_gb": written["checkpoint_gb"], **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/facellava-refmem"))
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="WIDTHxLAYERS,... (widths: 1024, 4096)")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "CHECKPOINT", "GGUF", "PROPOSALS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.workdir.exists():
        raise SystemExit(f"{args.workdir} exists; remove it or choose another --workdir")
    args.workdir.mkdir(parents=True)
    rows = []
    try:
        for config in args.configs.split(","):
            width, layers = (int(x) for x in config.split("x"))
            print(f"{width}x{layers} ...", flush=True)
            rows.append(measure(args.workdir, width, layers))
            print(f"  {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)

    print("\n| hidden | layers | checkpoint GB | positions | passes | stream peak anon MB | stream s | "
          "proposals peak anon MB | proposals s | VmHWM MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['hidden']} | {r['layers']} | {r['checkpoint_gb']:.2f} | {r['positions']} | {r['passes']} | "
              f"{r['stream_peak_anon_mb']:.0f} | {r['stream_s']:.0f} | {r['propose_peak_anon_mb']:.0f} | "
              f"{r['propose_s']:.0f} | {r['vm_hwm_mb']:.0f} |")
    by_width: dict[int, list[dict]] = {}
    for r in rows:
        by_width.setdefault(r["hidden"], []).append(r)
    for width, group in by_width.items():
        if len(group) > 1:
            low, high = min(group, key=lambda r: r["layers"]), max(group, key=lambda r: r["layers"])
            growth = high["stream_peak_anon_mb"] / low["stream_peak_anon_mb"] - 1
            print(f"width {width}: streamed peak {low['layers']} -> {high['layers']} layers: {growth:+.1%} "
                  f"(goal within {GOAL_GROWTH:.0%}: {'met' if abs(growth) <= GOAL_GROWTH else 'MISSED'})")
    for r in by_width.get(4096, []):
        print(f"7B width, {r['layers']} layers: streamed peak {r['stream_peak_anon_mb'] / 1024:.2f} GB "
              f"(goal <= {GOAL_7B_GB} GB: {'met' if r['stream_peak_anon_mb'] / 1024 <= GOAL_7B_GB else 'MISSED'})")


if __name__ == "__main__":
    main()
