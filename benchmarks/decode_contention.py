"""llama.cpp decode speed when the CPU is shared: a kiosk runs its camera, page and OS beside the model.

For each thread policy (threads x polling level of ggml's worker threads x the process's nice value x OpenMP's
wait policy: llama.cpp's CPU backend is built with OpenMP, whose idle threads spin unless
OMP_WAIT_POLICY=PASSIVE), prefill and decode speed are measured alone and beside one competing busy process at
normal priority (a Python spin loop, one core's worth of other work), each measurement in its own process, the
policies interleaved in rounds so that drift in the machine's load spreads over all of them. Ratios are against
the unloaded speed of llama.cpp's default (all usable cores, poll 50, nice 0, OpenMP's default wait policy).
Negative nice values are measured only as root.

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
path, threads, poll, tokens, nice = sys.argv[1], *map(int, sys.argv[2:6])
import os
os.setpriority(os.PRIO_PROCESS, 0, nice)  # before any thread starts: they inherit it
prompt = list(range(100, 100 + PREFILL))
with LlamaModel.open(path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, poll=poll) as llm:
    llm.eval_tokens([llm.bos_id] + prompt[:8])  # warm-up
    llm.reset()
    start = time.perf_counter()
    logits = llm.eval_tokens([llm.bos_id] + prompt)
    prefill = (len(prompt) + 1) / (time.perf_counter() - start)
    token = int(np.argmax(logits))
    llm.eval_tokens([token])  # warm-up step
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(llm.eval_tokens([token])))
    print(json.dumps({"tokens_per_s": tokens / (time.perf_counter() - start), "prefill_per_s": prefill}))
"""
PREFILL = 64  # prompt tokens prefilled in one batch before decoding


def decode_rate(model: Path, threads: int, poll: int, nice: int, wait_policy: str, tokens: int
                ) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) of one policy, in a process of its own (OMP_WAIT_POLICY set to
    `wait_policy`, or unset when it is empty: OpenMP reads it once, when the library loads)."""
    child = CHILD.replace("PREFILL", str(PREFILL))
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    result = subprocess.run([sys.executable, "-c", child, str(model), str(threads), str(poll), str(tokens),
                             str(nice)],
                            capture_output=True, text=True, check=True, env=env)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return figures["tokens_per_s"], figures["prefill_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    fewer = max(1, cores - 1)
    # (threads, poll, nice, OpenMP wait policy): raising the priority (a negative nice) needs root or CAP_SYS_NICE
    policies = [(cores, 50, 0, ""), (cores, 0, 0, ""), (cores, 0, 0, "PASSIVE"), (fewer, 0, 0, ""),
                (cores, 0, -10, ""), (cores, 0, -10, "PASSIVE")]
    if os.geteuid() != 0:
        policies = [policy for policy in policies if policy[2] >= 0]
    policies = list(dict.fromkeys(policies))
    rates: dict[tuple[int, int, int, str, bool], list[float]] = {}
    prefill: dict[tuple[int, int, int, str, bool], list[float]] = {}
    for round_ in range(args.rounds):
        for loaded in (False, True):
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
            try:
                time.sleep(0.5 if loaded else 0)
                for policy in policies:
                    rate, prefill_rate = decode_rate(args.model, *policy, args.tokens)
                    rates.setdefault((*policy, loaded), []).append(rate)
                    prefill.setdefault((*policy, loaded), []).append(prefill_rate)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    baseline = statistics.median(rates[(cores, 50, 0, "", False)])
    prefill_baseline = statistics.median(prefill[(cores, 50, 0, "", False)])
    print(f"{args.model.name}, {cores} cores, {PREFILL}-token prefill then {args.tokens} decoded tokens per run, "
          f"median of {args.rounds} rounds; ratios against {cores} threads / poll 50 / nice 0 unloaded "
          f"(decode {baseline:.2f} tok/s, prefill {prefill_baseline:.1f} tok/s)")
    print("| threads | poll | nice | OMP wait | decode alone tok/s | ratio | decode beside 1 busy process | ratio "
          "| prefill alone tok/s | ratio | prefill beside 1 busy | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for policy in policies:
        cells = []
        for table, base in ((rates, baseline), (prefill, prefill_baseline)):
            for loaded in (False, True):
                value = statistics.median(table[(*policy, loaded)])
                cells += [f"{value:.2f}", f"{value / base:.2f}"]
        print("| " + " | ".join(str(part) or "default" for part in policy) + " | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
