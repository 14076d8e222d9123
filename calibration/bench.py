"""`facellava bench`: latency, memory and fidelity of every vision precision x GGUF type of a bundle.

Per variant (one vision precision with one GGUF type), on the bench images:

- latency through `runtime.pipeline.Pipeline` (p50/p90 over images x repeats, after one warm-up answer): face
  detection, landmarks, preprocessing, vision, time to first token, decode tokens/s, total;
- peak memory: the process's resident-set high-water mark (VmHWM of /proc/self/status) while the variant is
  opened and run, reset before each variant by writing 5 to /proc/self/clear_refs (Linux); the RSS before the
  variant is reported beside it, since the process also holds the PyTorch reference's libraries;
- fidelity against PyTorch: the visual-token cosine of the vision graph against `FaceLlava.encode_image` on the
  same preprocessed input, and, with those visual tokens in the GGUF, the first-token KL, the top-1 agreement
  (teacher-forced over the reference's greedy continuation) and the greedy match length against PyTorch's greedy
  decode on the torch visual tokens (so the figure is the whole variant's). The reference streams the LLM one
  decoder layer at a time, as `export llm`'s parity does (`build_references`), so a 7B checkpoint is never
  loaded whole;
- the runtime's decode tokens/s over raw llama-cpp-python (`llama_cpp.Llama`, greedy) on the same GGUF after a
  prompt of the same length, measured in the same run, same settings (F16 KV cache, no flash attention);
- file sizes of the variant's vision graph and GGUF.

Each finished variant is written at once to `OUT/variants/<variant>.json` (atomically) and skipped by a re-run
with the same settings, so an interrupted run resumes. The summary goes to `bench.json`, `bench.csv`,
`bench.md` and `bench.png` (latency against first-token KL, Pareto front marked).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from facellava.atomic import atomic_file, write_text_atomically
from facellava.calibration.answers import TASK_PROMPTS
from facellava.errors import FaceLlavaError
from facellava.export import fidelity
from facellava.runtime.assets import face_photo

DEFAULT_QUESTION = TASK_PROMPTS["action_units"]
DECODE_TOKENS = 32
STAGES = ("face_detection_ms", "landmarks_ms", "preprocessing_ms", "vision_ms", "time_to_first_token_ms",
          "decode_tokens_per_s", "total_ms")
RUNTIME_SETTINGS = {"kv_type": "f16", "flash_attn": False}  # llama_cpp.Llama's defaults, for a fair ratio


@dataclass(frozen=True)
class Variant:
    vision_precision: str
    llm_type: str

    @property
    def name(self) -> str:
        return f"{self.vision_precision}+{self.llm_type}"


def bundle_variants(bundle: Any, names: Sequence[str] | str | None = None) -> list[Variant]:
    """Every image vision precision x GGUF type of an opened bundle, or the named ones ("fp16+q4_k_m"; a bare
    precision or type names all its combinations). Raises FaceLlavaError for a name the bundle lacks."""
    precisions = sorted({e["precision"] for e in bundle.files.values()
                         if e.get("kind") == "vision" and e.get("modality") == "image"})
    types = sorted({e["type"] for e in bundle.files.values() if e.get("kind") == "llm"})
    if not precisions or not types:
        raise FaceLlavaError(f"{bundle.path} needs an image vision graph and a GGUF to bench (it has vision "
                             f"{precisions or 'none'}, GGUF {types or 'none'})")
    every = [Variant(p, t) for p in precisions for t in types]
    if not names:
        return every
    chosen: list[Variant] = []
    for name in (names.split(",") if isinstance(names, str) else names):
        name = name.strip().lower()
        matched = [v for v in every if name in (v.name, v.vision_precision, v.llm_type)]
        if not matched:
            raise FaceLlavaError(f"{bundle.path} has no variant {name!r}; it has {', '.join(v.name for v in every)}")
        chosen += [v for v in matched if v not in chosen]
    return chosen


# --- measurement helpers ------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def percentiles(values: Sequence[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90))}


@dataclass
class ImageReference:
    """PyTorch's answer to one bench image: its preprocessed input, visual tokens and greedy decode."""

    path: str
    pixel_values: np.ndarray
    landmarks: np.ndarray | None
    visual_tokens: np.ndarray  # [256, D]
    input_ids: list[int]
    tokens: list[int]
    logits: np.ndarray  # [DECODE_TOKENS, vocab]


def build_references(checkpoint: str | Path, media: Sequence[Any], question: str,
                     decode_tokens: int = DECODE_TOKENS, image_tower: str | Path | None = None,
                     video_tower: str | Path | None = None, proposal_gguf: str | Path | None = None,
                     progress: bool = False) -> list[ImageReference]:
    """The PyTorch reference on each bench image (`calibration.dataset.CalibrationSet.samples`), in the memory
    bound of `export llm`'s parity reference: the vision half alone (the image tower, projector, FRLP/FRGCA;
    `load_face_llava(llm=False)`) gives the visual tokens and is freed, then the LLM is streamed from the checkpoint
    one decoder layer at a time (`model.streaming.greedy_continuations`), never loaded whole. `proposal_gguf` (a
    GGUF of the same checkpoint, best F32/F16) proposes the continuations a streamed pass verifies; without it
    every pass fixes one token. The tokens are exactly PyTorch's greedy decode and the logits match
    `FaceLlava.generate_reference`'s to float rounding. Raises FaceLlavaError for a damaged checkpoint or one
    without an image tower."""
    import torch

    from facellava.export.llm_parity import gguf_proposer
    from facellava.model.loading import load_face_llava
    from facellava.model.streaming import LayerStream, StreamedPrompt, greedy_continuations

    model = load_face_llava(checkpoint, image_tower=image_tower, video_tower=video_tower, llm=False,
                            towers=("image",))
    if model.image_tower is None:
        raise FaceLlavaError(model.no_tower("image"))
    encoded = []
    with torch.inference_mode():
        for medium in media:
            landmarks = medium.landmarks if model.config.has_landmark_modules else None
            tokens = model.encode_image(torch.from_numpy(medium.pixel_values),
                                        None if landmarks is None else torch.from_numpy(landmarks))[0]
            encoded.append((medium, landmarks, np.ascontiguousarray(tokens.float().numpy())))
    ids = model.prompt_ids(question, "image")
    del model  # the towers go before the decoder streams
    prompts = [StreamedPrompt(ids, [tokens]) for _, _, tokens in encoded]
    propose = gguf_proposer(proposal_gguf) if proposal_gguf is not None else None
    results = greedy_continuations(LayerStream(checkpoint), prompts, decode_tokens, propose, progress=progress)
    return [ImageReference(medium.source, medium.pixel_values, landmarks, tokens, ids, result.tokens,
                           result.logits.numpy())
            for (medium, landmarks, tokens), result in zip(encoded, results, strict=True)]


def proposal_gguf(bundle: Any) -> Path | None:
    """The bundle's GGUF closest to PyTorch (F32, else F16, else Q8_0, else any), whose greedy continuations the
    streamed reference verifies (fewer passes the closer it is); None when the bundle has none."""
    types = {bundle.files[name]["type"]: name for name in bundle.find("llm")}
    for preferred in ("f32", "f16", "q8_0", *sorted(types)):
        if preferred in types:
            return bundle.path_of(types[preferred])
    return None


def llm_fidelity(llm: Any, reference: ImageReference, visual_tokens: np.ndarray) -> dict[str, float]:
    """First-token KL, mean KL and top-1 agreement (teacher-forced) and the free-running greedy match length of
    one GGUF (given the variant's visual tokens) against the PyTorch reference (`fidelity.teacher_forced`)."""
    figures = fidelity.teacher_forced(llm, reference.input_ids, [visual_tokens], reference.tokens, reference.logits)
    llm.reset()
    return {"first_token_kl": float(figures["kl"][0]), "mean_kl": float(figures["kl"].mean()),
            "top1_agreement": float(figures["top1"].mean()), "greedy_match_length": figures["greedy_match_length"]}


def llama_last_logits(llm: Any) -> np.ndarray:
    """The last evaluated position's logits of a plain `llama_cpp.Llama` (its `scores` are only written when it
    keeps every position's logits, which costs lm_head rows; without that they stay zero)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_cpp_prompt(llm: Any, positions: int) -> list[int]:
    """A text prompt of `positions` ids for a plain `llama_cpp.Llama`: BOS, then ids spread over the vocabulary
    (prefill and decode speed depend on the length only)."""
    vocab = llm.n_vocab()
    return [llm.token_bos()] + [3 + (i * 7919) % (vocab - 3) for i in range(positions - 1)]


def llama_cpp_greedy(llm: Any, prompt: Sequence[int] | None, token: int | None, tokens: int
                     ) -> tuple[int, float, float]:
    """The bare llama-cpp-python loop the runtime is measured against: one `eval` of `prompt` (None: decode on
    from the context as it is, starting with `token`) and its argmax, then `tokens` - 1 greedy steps (`eval` of
    one token + argmax of the last logits), EOS ignored. Returns (the first token, its milliseconds, decode
    tokens/s)."""
    start = time.perf_counter()
    if prompt is not None:
        llm.eval(list(prompt))
        token = int(np.argmax(llama_last_logits(llm)))
    first = time.perf_counter()
    step = token
    for _ in range(tokens - 1):
        llm.eval([step])
        step = int(np.argmax(llama_last_logits(llm)))
    end = time.perf_counter()
    return int(token), (first - start) * 1e3, (tokens - 1) / (end - first) if tokens > 1 else 0.0


def raw_llama_decode_rate(gguf_path: Path, prompt_positions: int, tokens: int, n_threads: int | None,
                          runs: int = 3) -> float:
    """Greedy decode tokens/s of plain `llama_cpp.Llama` on the GGUF after a text prompt of `prompt_positions`
    tokens (`llama_cpp_prompt`): `tokens` steps (`llama_cpp_greedy`), the median of `runs` decodes from the same
    prompt."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=prompt_positions + tokens + 8, n_batch=512, verbose=False,
                          n_threads=n_threads, flash_attn=False)
    try:
        prompt = llama_cpp_prompt(llm, prompt_positions)
        first, _, _ = llama_cpp_greedy(llm, prompt, None, 1)
        rates = []
        for _ in range(runs):
            llm.n_tokens = len(prompt)  # Llama.eval drops the cache beyond n_tokens: decode again from the prompt
            rates.append(llama_cpp_greedy(llm, None, first, tokens)[2])
        return float(np.median(rates))
    finally:
        llm.close()


# --- one variant --------------------------------------------------------------------------------------------


def bench_variant(bundle: Any, variant: Variant, image_paths: Sequence[Path], references: Sequence[ImageReference],
                  question: str, repeats: int, decode_tokens: int, n_threads: int | None = None) -> dict[str, Any]:
    """Measure one variant; see the module docstring. Returns its record (JSON-ready)."""
    from facellava.runtime.pipeline import Pipeline

    gc_before = _rss_kib("VmRSS")
    peak_resettable = reset_peak_rss()
    llm_file = bundle.find("llm", type=variant.llm_type)[0]
    pipeline = Pipeline.open(bundle.path, vision="onnxruntime", llm=variant.llm_type,
                             vision_precision=variant.vision_precision, **RUNTIME_SETTINGS)
    try:
        # fidelity, on the reference's own preprocessed input
        cosines, llm_figures = [], []
        for reference in references:
            tokens = pipeline.vision.encode("image", reference.pixel_values, reference.landmarks)[0]
            cosines.append(fidelity.token_cosines(tokens, reference.visual_tokens))
            llm_figures.append(llm_fidelity(pipeline.session.llm, reference, tokens))
        pipeline.session._prefix_cached = False  # the fidelity runs reset the cache the session relies on
        # latency: one warm-up answer, then every image `repeats` times
        pipeline.ask(question, image=image_paths[0], max_tokens=decode_tokens)
        samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
        positions, generated = 0, []
        for _ in range(repeats):
            for path in image_paths:
                pipeline.session.forget_medium()  # every stage measured: no visual block reused from the cache
                answer = pipeline.ask(question, image=path, max_tokens=decode_tokens)
                for stage in STAGES:
                    samples[stage].append(getattr(answer.timings, stage))
                positions = answer.prompt_positions
                generated.append(len(answer.tokens))
        runtime_rate = float(np.median([s for s in samples["decode_tokens_per_s"] if s > 0] or [0.0]))
    finally:
        pipeline.close()
    steps = max(2, min(decode_tokens, int(np.median(generated))))
    raw_rate = raw_llama_decode_rate(bundle.path_of(llm_file), positions, steps, n_threads)
    vision_file = bundle.find("vision", modality="image", precision=variant.vision_precision,
                              landmarks=references[0].landmarks is not None)[0]
    peak = _rss_kib("VmHWM")
    return {
        "variant": variant.name, "vision_precision": variant.vision_precision, "llm_type": variant.llm_type,
        "vision_file": vision_file, "llm_file": llm_file,
        "vision_mb": bundle.files[vision_file]["bytes"] / 1e6, "llm_mb": bundle.files[llm_file]["bytes"] / 1e6,
        "latency": {stage: percentiles(values) for stage, values in samples.items()},
        "answers": len(samples["total_ms"]), "prompt_positions": positions,
        "peak_rss_mb": peak / 1024 if peak_resettable else None, "rss_before_mb": gc_before / 1024,
        "visual_token_cosine_mean": float(np.mean([c.mean() for c in cosines])),
        "visual_token_cosine_min": float(np.min([c.min() for c in cosines])),
        **{key: float(np.mean([f[key] for f in llm_figures])) for key in llm_figures[0]},
        "runtime_decode_tokens_per_s": runtime_rate, "raw_llama_decode_tokens_per_s": raw_rate,
        "decode_ratio_runtime_over_raw": runtime_rate / raw_rate if raw_rate else None,
        "raw_decode_steps": steps,
    }


# --- the whole bench ----------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """JSON has no NaN: an undefined figure (e.g. an MAE with no parsed age) is written as null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _atomic_json(path: Path, data: Any) -> None:
    write_text_atomically(path, json.dumps(_finite(data), indent=2) + "\n")


def run_bench(bundle: str | Path, out_dir: str | Path, images: str | Path | None = None, repeats: int = 3,
              variants: Sequence[str] | str | None = None, question: str = DEFAULT_QUESTION,
              decode_tokens: int = DECODE_TOKENS, n_threads: int | None = None, progress: bool = True, *,
              checkpoint: str | Path | None = None, image_tower: str | Path | None = None,
              video_tower: str | Path | None = None) -> list[dict[str, Any]]:
    """Bench every (or each named) variant of a bundle on the images of `images` (a folder or one file; default:
    the shipped photograph) and write `bench.{json,csv,md,png}` into `out_dir`. Fidelity is measured against
    `checkpoint`, the PyTorch checkpoint the bundle was exported from (checked by its fingerprint; the path the
    manifest records is never followed), with its towers found by `find_tower` (or given). Variants already
    stored in `out_dir/variants/` with the same settings are not measured again (and need no checkpoint).
    Returns the variants' records. Raises FaceLlavaError for a bad bundle, variant, image folder, a repeat count
    below 1, or a missing or different checkpoint."""
    from facellava.bundle import Bundle
    from facellava.calibration.dataset import build_calibration_set
    from facellava.model.loading import bundle_source_checkpoint

    if repeats < 1:
        raise FaceLlavaError("--repeats must be at least 1")
    opened = Bundle.open(bundle)
    chosen = bundle_variants(opened, variants)
    if images is None:
        images = face_photo()
    calibration = build_calibration_set(images, modalities=("image",), progress=False)
    media = calibration.samples()
    paths = [Path(images) / m.source if Path(images).is_dir() else Path(images) for m in media]
    out = Path(out_dir)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    settings = {"images": [str(p) for p in paths], "repeats": repeats, "question": question,
                "decode_tokens": decode_tokens, "checkpoint_sha256": opened.manifest.source.get("checkpoint_sha256")}
    records: dict[str, dict[str, Any]] = {}
    for variant in chosen:
        stored = out / "variants" / f"{variant.name}.json"
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(stored.read_text())
            if record.get("settings") == settings and record.get("sha256") == _variant_hashes(opened, record):
                records[variant.name] = record
    todo = [v for v in chosen if v.name not in records]
    if todo:
        source = bundle_source_checkpoint(opened, checkpoint)  # bench measures fidelity against it
        references = build_references(source, media, question, decode_tokens, image_tower, video_tower,
                                      proposal_gguf(opened), progress)
        for variant in tqdm(todo, desc="bench", unit="variant", disable=not progress):
            record = bench_variant(opened, variant, paths, references, question, repeats,
                                   decode_tokens, n_threads)
            record["settings"] = settings
            record["sha256"] = _variant_hashes(opened, record)
            _atomic_json(out / "variants" / f"{variant.name}.json", record)
            records[variant.name] = record
    results = [records[v.name] for v in chosen]
    write_reports(results, out)
    return results


def _variant_hashes(bundle: Any, record: dict[str, Any]) -> list[str | None]:
    return [bundle.files.get(record.get(k), {}).get("sha256") for k in ("vision_file", "llm_file")]


# --- reports ------------------------------------------------------------------------------------------------

COLUMNS = ("variant", "vision_mb", "llm_mb", "latency.face_detection_ms.p50", "latency.landmarks_ms.p50",
           "latency.preprocessing_ms.p50", "latency.vision_ms.p50", "latency.vision_ms.p90",
           "latency.time_to_first_token_ms.p50", "latency.time_to_first_token_ms.p90",
           "latency.decode_tokens_per_s.p50", "latency.total_ms.p50", "latency.total_ms.p90", "peak_rss_mb",
           "visual_token_cosine_mean", "first_token_kl", "mean_kl", "top1_agreement", "greedy_match_length",
           "decode_ratio_runtime_over_raw")


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, list):
            flat[prefix + key] = value
    return flat


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (lower is better in both)."""
    return [i for i, (x, y) in enumerate(points)
            if not any((a <= x and b <= y) and (a < x or b < y) for a, b in points)]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_reports(results: Sequence[dict[str, Any]], out: Path, columns: Sequence[str] = COLUMNS,
                  stem: str = "bench", plot: bool = True) -> dict[str, Path]:
    """`{stem}.json` (every record), `{stem}.csv` (every flattened field), `{stem}.md` (`columns`) and, with
    `plot`, `{stem}.png` (total latency p50 against first-token KL, Pareto front marked); each written atomically.
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{stem}.{kind}" for kind in ("json", "csv", "md", "png")}
    _atomic_json(paths["json"], list(results))
    flat = [flatten(r) for r in results]
    fields = list(dict.fromkeys(k for row in flat for k in row))
    with atomic_file(paths["csv"]) as temp, temp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    lines = ["| " + " | ".join(c.removeprefix("latency.") for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in flat]
    write_text_atomically(paths["md"], "\n".join(lines) + "\n")
    if plot:
        _plot(results, paths["png"])
    else:
        del paths["png"]
    return paths


def _plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["latency"]["total_ms"]["p50"], r["first_token_kl"]) for r in results]
    front = sorted(pareto_front(points), key=lambda i: points[i])
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    axes.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", label="variant")
    axes.plot([points[i][0] for i in front], [points[i][1] for i in front], "o-", color="tab:red",
              label="Pareto front", markerfacecolor="none", markersize=12)
    for r, (x, y) in zip(results, points, strict=True):
        axes.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("answer latency p50 (ms, whole pipeline)")
    axes.set_ylabel("first-token KL vs PyTorch (nats)")
    axes.set_title("latency against fidelity")
    axes.legend()
    figure.tight_layout()
    with atomic_file(path) as temp:
        figure.savefig(temp, dpi=100, format="png")
    plt.close(figure)


# --- CLI ----------------------------------------------------------------------------------------------------


def bench_arguments(parser: argparse.ArgumentParser) -> None:
    from facellava.model.cli import tower_arguments

    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--checkpoint", type=Path, help="the PyTorch checkpoint the bundle was exported from (the "
                                                        "fidelity reference; needed unless every variant is stored)")
    tower_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (finished variants are kept there and skipped)")
    parser.add_argument("--images", help="folder of face images (default: the shipped photograph)")
    parser.add_argument("--repeats", type=int, default=3, help="answers per image per variant")
    parser.add_argument("--variants", help="comma-separated, e.g. fp16+q4_k_m,fp32 (default: all)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-tokens", type=int, default=DECODE_TOKENS)
    parser.add_argument("--threads", type=int, default=None)


def bench(args: argparse.Namespace) -> int:
    results = run_bench(args.bundle, args.out, args.images, args.repeats, args.variants, args.question,
                        args.max_tokens, args.threads, checkpoint=args.checkpoint, image_tower=args.image_tower,
                        video_tower=args.video_tower)
    print(Path(args.out, "bench.md").read_text(), end="")
    print(f"wrote {', '.join(f'bench.{k}' for k in ('json', 'csv', 'md', 'png'))} for {len(results)} variants "
          f"into {args.out}")
    return 0

