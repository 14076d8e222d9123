"""llama.cpp decode speed when the CPU is shared: a kiosk runs its camera, page and OS beside the model.

For each thread policy (threads x polling level of ggml's worker threads), decode speed is measured alone and
beside one competing busy process (a Python spin loop, one core's worth of other work), each measurement in its
own process, the policies interleaved in rounds so that drift in the machine's load spreads over all of them.
Ratios are against the unloaded speed of llama.cpp's default (all usable cores, poll 50).

    python benchmarks/decode_contention.py MODEL.gguf [--tokens 32] [--rounds 3]

Use a GGUF of real width (benchmarks/llm_export_7b.py --layers 8 --keep writes a 7B-wide Q4_K_M): on the tiny
model a token costs 0.25 ms and per-call overhead, not threading, decides the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
from facellava.runtime.llm import LlamaModel
path, threads, poll, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with LlamaModel.open(path, n_ctx=512, n_threads=threads, poll=poll) as llm:
    logits = llm.eval_tokens([llm.bos_id] + list(range(100, 116)))
    token = int(np.argmax(logits))
    llm.eval_tokens([token])  # warm-up step
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(llm.eval_tokens([token])))
    print(json.dumps({"tokens_per_s": tokens / (time.perf_counter() - start)}))
"""


def decode_rate(model: Path, threads: int, poll: int, tokens: int) -> float:
    result = subprocess.run([sys.executable, "-c", CHILD, str(model), str(threads), str(poll), str(tokens)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    policies = [(cores, 50), (cores, 0), (cores, 1), (max(1, cores - 1), 50), (max(1, cores - 1), 0)]
    policies = list(dict.fromkeys(policies))
    rates: dict[tuple[int, int, bool], list[float]] = {}
    for round_ in range(args.rounds):
        for loaded in (False, True):
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
            try:
                time.sleep(0.5 if loaded else 0)
                for threads, poll in policies:
                    rate = decode_rate(args.model, threads, poll, args.tokens)
                    rates.setdefault((threads, poll, loaded), []).append(rate)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    baseline = statistics.median(rates[(cores, 50, False)])
    print(f"{args.model.name}, {cores} cores, {args.tokens} tokens per run, median of {args.rounds} rounds; "
          f"ratios against {cores} threads / poll 50 unloaded ({baseline:.2f} tok/s)")
    print("| threads | poll | unloaded tok/s | ratio | beside 1 busy process tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for threads, poll in policies:
        alone = statistics.median(rates[(threads, poll, False)])
        busy = statistics.median(rates[(threads, poll, True)])
        print(f"| {threads} | {poll} | {alone:.2f} | {alone / baseline:.2f} | {busy:.2f} | {busy / baseline:.2f} |")


if __name__ == "__main__":
    main()
