"""The runtime's LLM speed against llama-cpp-python on the same GGUF, in one run.

All sides load the same GGUF with the same threads, context, KV cache type and flash-attention setting, take a
prompt of the same number of positions and generate the same number of tokens greedily. The runtime's prompt
is the real one (system prompt, 256 visual tokens injected as embeddings, the question); llama-cpp-python's
is that many text tokens. Two llama-cpp-python baselines: its own generation API (`Llama.generate`, greedy,
with its Python sampling), and a bare loop of `Llama.eval` + argmax (the floor any Python caller pays). The
three are measured in turns, repeat after repeat, so that load on a shared machine hits them alike. Reports
medians of time to first token and decode tokens/s, and the runtime's ratios to each baseline.

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

    from facellava.calibration.bench import llama_cpp_greedy
    from facellava.demo import demo_bundle
    from facellava.runtime.assets import face_photo
    from facellava.runtime.pipeline import Pipeline

    bundle = args.bundle or demo_bundle()
    threads = os.cpu_count() or 1
    settings = dict(n_ctx=4096, kv_type="f16", flash_attn=False, n_threads=threads)
    pipeline = Pipeline.open(bundle, vision="onnxruntime", llm=args.llm, **settings)
    question = "What emotion is shown in the picture?"
    pipeline.ask(question, image=face_photo(), max_tokens=4)  # warm-up: caches the system prefix, as in use
    pipeline.session.forget_medium()  # the whole prompt is prefilled, as llama-cpp-python's is
    answer = pipeline.ask(question, image=face_photo(), max_tokens=args.tokens)
    positions, generated = answer.prompt_positions, answer.tokens
    gguf = pipeline.bundle.path_of(f"llm-{args.llm}.gguf")

    raw = llama_cpp.Llama(model_path=str(gguf), n_ctx=settings["n_ctx"], n_threads=threads,
                          n_threads_batch=threads, n_batch=512, flash_attn=False, verbose=False)
    vocab = raw.n_vocab()
    prompt = [1] + [(7 * i) % (vocab - 300) + 259 for i in range(positions - 1)]  # ordinary (non-byte) pieces
    n_tokens = len(generated)

    def generate_api() -> tuple[float, float]:
        raw.reset()
        start = time.perf_counter()
        count = 0
        for _token in raw.generate(prompt, top_k=1, temp=0.0, reset=True):
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count == n_tokens:
                break
        return (first - start) * 1000, (count - 1) / (time.perf_counter() - first)

    def bare_loop() -> tuple[float, float]:
        raw.reset()
        _, first_ms, rate = llama_cpp_greedy(raw, prompt, None, n_tokens)
        return first_ms, rate

    def runtime() -> tuple[float, float]:
        pipeline.session.forget_medium()
        answer = pipeline.ask(question, image=face_photo(), max_tokens=args.tokens)
        return answer.timings.time_to_first_token_ms, answer.timings.decode_tokens_per_s

    results: dict[str, list[tuple[float, float]]] = {"runtime": [], "Llama.generate": [], "eval + argmax": []}
    for _ in range(args.repeats):
        for name, measure in (("runtime", runtime), ("Llama.generate", generate_api), ("eval + argmax", bare_loop)):
            results[name].append(measure())
    pipeline.close()

    median = statistics.median
    print(f"GGUF {gguf.name}, {threads} threads, prompt {positions} positions, {n_tokens} generated tokens, "
          f"{args.repeats} repeats in turns (medians)")
    ours_ttft, ours_tps = (median(v) for v in zip(*results["runtime"], strict=True))
    print(f"{'':18}{'TTFT ms':>10}{'decode tok/s':>14}{'runtime TTFT ratio':>20}{'runtime decode ratio':>22}")
    for name, values in results.items():
        ttft, tps = (median(v) for v in zip(*values, strict=True))
        print(f"{name:18}{ttft:10.1f}{tps:14.1f}{ours_ttft / ttft:20.2f}{ours_tps / tps:22.2f}")
    print("(the runtime's time to first token reuses the cached system prompt and injects 256 visual tokens as "
          "embeddings; llama-cpp-python evaluates every position as text)")


if __name__ == "__main__":
    main()
