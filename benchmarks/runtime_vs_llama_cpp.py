"""The runtime's LLM speed against llama-cpp-python's own generation, on the same GGUF, in one run.

Both sides load the same GGUF with the same threads, context, KV cache type and flash-attention setting, take a
prompt of the same number of positions and generate the same number of tokens greedily. The runtime's prompt
is the real one (system prompt, 256 visual tokens injected as embeddings, the question); llama-cpp-python's
is that many text tokens. Reports median time to first token and decode tokens/s of each, and their ratios.

    python benchmarks/runtime_vs_llama_cpp.py [BUNDLE] [--llm f32] [--repeats 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path, help="a bundle (default: the demo's tiny bundle)")
    parser.add_argument("--llm", default="f32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    import llama_cpp

    from facellava.demo import demo_bundle, face_photo
    from facellava.runtime.pipeline import Pipeline

    bundle = args.bundle or demo_bundle()
    threads = os.cpu_count() or 1
    settings = dict(n_ctx=4096, kv_type="f16", flash_attn=False, n_threads=threads)
    pipeline = Pipeline.open(bundle, vision="onnxruntime", llm=args.llm, **settings)
    question = "What emotion is shown in the picture?"
    ours_ttft, ours_tps, positions, generated = [], [], 0, []
    pipeline.ask(question, image=face_photo(), max_tokens=4)  # warm-up: caches the system prefix, as in use
    for _ in range(args.repeats):
        answer = pipeline.ask(question, image=face_photo(), max_tokens=args.tokens)
        ours_ttft.append(answer.timings.time_to_first_token_ms)
        ours_tps.append(answer.timings.decode_tokens_per_s)
        positions, generated = answer.prompt_positions, answer.tokens
    gguf = pipeline.bundle.path_of(f"llm-{args.llm}.gguf")
    pipeline.close()

    raw = llama_cpp.Llama(model_path=str(gguf), n_ctx=settings["n_ctx"], n_threads=threads,
                          n_threads_batch=threads, n_batch=512, flash_attn=False, verbose=False)
    vocab = raw.n_vocab()
    prompt = [1] + [(7 * i) % (vocab - 300) + 259 for i in range(positions - 1)]  # ordinary (non-byte) pieces
    n_tokens = len(generated)
    raw_ttft, raw_tps = [], []
    for _ in range(args.repeats):
        raw.reset()
        start = time.perf_counter()
        count = 0
        for _token in raw.generate(prompt, top_k=1, temp=0.0, reset=True):
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count == n_tokens:
                break
        end = time.perf_counter()
        raw_ttft.append((first - start) * 1000)
        raw_tps.append((count - 1) / (end - first) if count > 1 else 0.0)

    median = statistics.median
    print(f"GGUF {gguf.name}, {threads} threads, prompt {positions} positions, {n_tokens} generated tokens, "
          f"{args.repeats} repeats (medians)")
    print(f"{'':24}{'runtime':>12}{'llama-cpp-python':>20}{'ratio':>10}")
    print(f"{'time to first token ms':24}{median(ours_ttft):12.1f}{median(raw_ttft):20.1f}"
          f"{median(ours_ttft) / median(raw_ttft):10.2f}")
    print(f"{'decode tokens/s':24}{median(ours_tps):12.1f}{median(raw_tps):20.1f}"
          f"{median(ours_tps) / median(raw_tps):10.2f}")
    print("(the runtime's time to first token reuses the cached system prompt and injects 256 visual tokens as "
          "embeddings; llama-cpp-python's evaluates every position as text)")


if __name__ == "__main__":
    main()
