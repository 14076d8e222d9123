"""Memory of the streamed PyTorch parity reference (`export.llm_parity.stream_reference`): it must not grow with
the number of decoder layers, and must stay within 3 GB of anonymous memory for a 7B checkpoint.

For each configuration it writes a LLaMA-shaped random checkpoint in the official layout (sharded
`pytorch_model-*.bin` with an index, the writer of `llm_export_7b.py`), converts it to an F32 GGUF (the file
whose greedy continuations the streamed passes verify, as the export uses its F32/F16 conversion), then, in a
fresh process, runs the reference on the five parity prompts (three image prompts of ~300 positions, two video
prompts of ~2100 positions; random visual blocks of the contract's shapes stand in for the vision half, which
is measured by the vision benchmarks). That process reports, sampled every 10 ms from /proc/self/status:

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


def child(checkpoint: str, gguf: str) -> dict:
    """Run the streamed reference on the parity prompts; return the figures (in this process)."""
    import numpy as np
    import sentencepiece

    from facellava import contract
    from facellava.calibration.bench import _rss_kib
    from facellava.export import llm_parity
    from facellava.model.loading import read_config
    from facellava.model.streaming import LayerStream, StreamedPrompt, greedy_continuations

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
    imports_mb = _rss_kib("RssAnon") / 1024
    propose = llm_parity.gguf_proposer(gguf)
    first_round: list[list[int]] = []
    with AnonSampler() as sampler:
        started = time.perf_counter()
        first_round = propose(prompts, [[] for _ in prompts], llm_parity.DECODE_TOKENS)
        propose_s = time.perf_counter() - started
        propose_mb = sampler.peak_mb()
        sampler.reset()
        rounds = [0]
        index = {id(p): i for i, p in enumerate(prompts)}

        def proposals(batch, prefixes, steps):  # the first round measured above; later ones (if any) live
            rounds[0] += 1
            if rounds[0] == 1:
                return [first_round[index[id(p)]] for p in batch]
            return propose(batch, prefixes, steps)

        started = time.perf_counter()
        results = greedy_continuations(LayerStream(checkpoint), prompts, llm_parity.DECODE_TOKENS, proposals,
                                       progress=False)
        stream_s = time.perf_counter() - started
        stream_mb = sampler.peak_mb()
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "positions": sum(p.positions for p in prompts), "passes": max(r.passes for r in results),
            "anon_after_imports_mb": imports_mb, "propose_peak_anon_mb": propose_mb, "propose_s": propose_s,
            "stream_peak_anon_mb": stream_mb, "stream_s": stream_s, "vm_hwm_mb": _rss_kib("VmHWM") / 1024,
            "finite": all(bool(np.isfinite(r.logits.numpy()).all()) for r in results)}


def measure(workdir: Path, width: int, layers: int) -> dict:
    """Write the checkpoint and its F32 GGUF (in this process), then measure the reference in a child."""
    from facellava.export.gguf import convert_to_gguf

    checkpoint, gguf = workdir / f"ckpt-{width}x{layers}", workdir / f"f32-{width}x{layers}.gguf"
    written = write_checkpoint(checkpoint, layers_per_shard=4, layers=layers, sizes=WIDTHS[width])
    convert_to_gguf(checkpoint, gguf, "f32", progress=False)
    result = subprocess.run([sys.executable, __file__, "--child", str(checkpoint), str(gguf)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{width}x{layers} failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    shutil.rmtree(checkpoint)
    gguf.unlink()
    return {"checkpoint_gb": written["checkpoint_gb"], **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/facellava-refmem"))
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="WIDTHxLAYERS,... (widths: 1024, 4096)")
    parser.add_argument("--child", nargs=2, metavar=("CHECKPOINT", "GGUF"), help=argparse.SUPPRESS)
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
