"""A multimodal importance matrix for llama.cpp's low-bit quantizers, computed from the PyTorch LLM.

llama.cpp's `llama-imatrix` only sees text, but Face-LLaVA's LLM spends most of its positions on visual tokens
(256 per image, 2056 per video), whose activations look nothing like text's. So the matrix is collected here,
in PyTorch, on prompts that include them: the official task questions about calibration images and videos,
read through the runtime's front end and preprocessing, encoded by `FaceLlava.visual_blocks`, then
the prompt and a short greedy continuation run through the LLM, streamed from the checkpoint one decoder layer
at a time (`model.streaming`: bounded memory whatever the model's size). Every decoder nn.Linear adds up its
squared input activations per input column and counts the tokens: exactly what `llama-imatrix` collects
(`<tensor>.in_sum2` and `<tensor>.counts`), keyed by the GGUF tensor names of the exporter's table, and written
in llama.cpp's GGUF imatrix format. As in `llama-imatrix`, `output.weight` is only collected on request.

```python
vision = load_face_llava(checkpoint, llm=False)        # the vision half: visual tokens, tokenizer, names
sums, counts, tokens = stream_imatrix(vision, checkpoint, calibration_prompts(vision, samples), proposal_gguf=f16)
save_imatrix("imatrix.gguf", sums, counts)
```
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from facellava import contract
from facellava.calibration.answers import TASK_MODALITIES, TASK_PROMPTS
from facellava.errors import FaceLlavaError

if TYPE_CHECKING:
    import torch

    from facellava.model.streaming import SquaredInputs

IMATRIX_NAME = "imatrix.gguf"
CONTINUATION_TOKENS = 16  # greedy tokens after each prompt: the answer's positions are calibrated too
DEFAULT_LOW_BIT_TYPES = ("iq4_xs", "q3_k_s", "q2_k")


@dataclass
class CalibrationPrompt:
    """One question and its visual blocks (each [N, D]); no blocks for a text-only prompt."""

    question: str
    modality: contract.Modality | None
    visual_blocks: list[torch.Tensor]
    source: str = ""


def questions_for(modality: contract.Modality) -> list[str]:
    """The official task prompts asked of this medium."""
    return [TASK_PROMPTS[task] for task, modalities in TASK_MODALITIES.items() if modality in modalities]


def calibration_prompts(model: Any, media: Sequence[Any], progress: bool = True) -> list[CalibrationPrompt]:
    """The visual tokens of each calibration sample (`CalibrationSet.samples`) with an official question of its
    modality, the questions taken in turn."""
    import torch

    cycles = {m: itertools.cycle(questions_for(m)) for m in ("image", "video")}
    prompts = []
    with torch.inference_mode():
        for medium in tqdm(media, desc="visual tokens", unit="file", disable=not progress):
            pixels = torch.from_numpy(medium.pixel_values)
            landmarks = None
            if medium.landmarks is not None and model.config.has_landmark_modules:
                landmarks = torch.from_numpy(medium.landmarks)
            blocks = model.visual_blocks(pixels, landmarks)
            prompts.append(CalibrationPrompt(next(cycles[medium.modality]), medium.modality, blocks,
                                             medium.source))
    return prompts


def text_prompt_ids(model: Any, question: str) -> list[int]:
    """The inference template without any visual placeholder (text-only calibration, as llama-imatrix sees)."""
    prompt = contract.build_prompt(question, "image").replace(contract.IMAGE_PLACEHOLDER + "\n", "")
    return contract.tokenize_prompt(prompt, model.tokenizer.encode, model.config.bos_token_id)


def gguf_linear_names(model: Any, include_output: bool = False) -> dict[str, str]:
    """{module name in model.llm: GGUF weight name} for every decoder nn.Linear (and lm_head on request), from the
    exporter's tensor table."""
    from torch import nn

    from facellava.export.gguf import tensor_plan

    plan = tensor_plan(model.config)
    names = {}
    for module_name, module in model.llm.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        entry = plan.get(module_name + ".weight")
        if entry is None or (module_name == "lm_head" and not include_output):
            continue
        names[module_name] = entry.name
    return names


def _prompt_ids(model: Any, prompt: CalibrationPrompt) -> list[int]:
    if prompt.modality is None:
        return text_prompt_ids(model, prompt.question)
    return model.prompt_ids(prompt.question, prompt.modality)


def _by_gguf_name(statistics: SquaredInputs, names: dict[str, str]
                  ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Statistics keyed by checkpoint module name -> ({GGUF name: float32 sums}, {GGUF name: tokens}), only for
    the matrices of `names` (`gguf_linear_names`)."""
    sums = {names[key]: values.float().numpy() for key, values in statistics.sums.items() if key in names}
    counts = {names[key]: float(count) for key, count in statistics.counts.items() if key in names}
    return sums, counts


def compute_imatrix(model: Any, prompts: Sequence[CalibrationPrompt], continuation_tokens: int = CONTINUATION_TOKENS,
                    include_output: bool = False, progress: bool = True
                    ) -> tuple[dict[str, np.ndarray], dict[str, float], int]:
    """`stream_imatrix`'s statistics from a whole model in memory (KV-cache greedy decoding): the yardstick the
    streamed path is tested against, for callers that hold a whole model anyway. `calibrate llm` streams.

    Runs each prompt (visual blocks spliced in, then `continuation_tokens` greedy tokens) through `model.llm`.
    Returns ({GGUF name: sum of squared inputs per column}, {GGUF name: tokens}, tokens seen). Raises
    FaceLlavaError when there is no prompt."""
    from facellava.model.streaming import SquaredInputs, collect_inputs

    if not prompts:
        raise FaceLlavaError("no calibration prompt: give images or videos with a detectable face")
    statistics = SquaredInputs()
    handles = collect_inputs(model.llm, "", statistics)  # module names in model.llm are the checkpoint's
    try:
        for prompt in tqdm(prompts, desc="importance matrix", unit="prompt", disable=not progress):
            # every generated token is fed back, so this runs the prompt and `continuation_tokens` more
            model.generate_reference(_prompt_ids(model, prompt), prompt.visual_blocks,
                                     max_new_tokens=continuation_tokens, stop_at_eos=False)
    finally:
        for handle in handles:
            handle.remove()
    sums, counts = _by_gguf_name(statistics, gguf_linear_names(model, include_output))
    return sums, counts, next(iter(statistics.counts.values()))


def stream_imatrix(model: Any, checkpoint: str | Path, prompts: Sequence[CalibrationPrompt],
                   continuation_tokens: int = CONTINUATION_TOKENS, include_output: bool = False,
                   proposal_gguf: str | Path | None = None, progress: bool = True,
                   max_positions: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, float], int]:
    """The importance statistics in bounded memory: the LLM streamed from `checkpoint` one decoder layer at a
    time (`model.streaming`), never loaded whole.

    Takes a model for the tokenizer, config and module names only (its LLM may stay on the meta device, as
    `load_face_llava(..., llm=False)` leaves it), the checkpoint directory it came from, the prompts, the
    greedy tokens after each, whether to collect `output.weight`, an F32/F16 GGUF of the checkpoint whose
    greedy continuations are verified against PyTorch (without it every streamed pass fixes one token), and how
    many positions to carry at once (default `model.streaming.DEFAULT_MAX_POSITIONS`). The continuation is
    PyTorch's own greedy decode, so the figures agree with `compute_imatrix`'s to float rounding.
    Returns ({GGUF name: sum of squared inputs per column}, {GGUF name: tokens}, tokens seen). Raises
    FaceLlavaError when there is no prompt or the checkpoint is damaged."""
    from facellava.model.streaming import (
        DEFAULT_MAX_POSITIONS,
        LayerStream,
        SquaredInputs,
        StreamedPrompt,
        greedy_continuations,
    )

    if not prompts:
        raise FaceLlavaError("no calibration prompt: give images or videos with a detectable face")
    streamed = [StreamedPrompt(_prompt_ids(model, prompt), list(prompt.visual_blocks)) for prompt in prompts]
    propose = None
    if proposal_gguf is not None:
        from facellava.export.llm_parity import gguf_proposer

        propose = gguf_proposer(proposal_gguf)
    results = greedy_continuations(LayerStream(checkpoint), streamed, continuation_tokens, propose, collect=True,
                                   include_output=include_output, progress=progress,
                                   max_positions=max_positions or DEFAULT_MAX_POSITIONS)
    total = SquaredInputs()
    for result in results:
        assert result.statistics is not None  # collect=True
        total.merge(result.statistics)
    sums, counts = _by_gguf_name(total, gguf_linear_names(model, include_output))
    return sums, counts, sum(p.positions + continuation_tokens for p in streamed)


def calibrate_llm_bundle(bundle: str | Path, data: str | Path, types: str | Sequence[str] = DEFAULT_LOW_BIT_TYPES,
                         limit: int | None = 64, seed: int = 0, continuation_tokens: int = CONTINUATION_TOKENS,
                         include_output: bool = False, allow_drift: bool = False, threads: int = 0,
                         progress: bool = True, *, checkpoint: str | Path | None = None,
                         image_tower: str | Path | None = None, video_tower: str | Path | None = None
                         ) -> dict[str, Any]:
    """Compute the multimodal importance matrix of a bundle's source checkpoint (`checkpoint`, given by the user
    and checked against the manifest's fingerprint; the path the manifest records is never followed; its towers
    found by `find_tower`, or given) on the images and videos of
    `data` (a folder or a data JSON; a seeded selection of `limit`), store it in the bundle as `imatrix.gguf`
    (manifest kind "data"), then quantize the LLM to `types` with it (`export.llm.export_llm_bundle`, parity
    checked). The LLM is streamed (`stream_imatrix`), the bundle's F32 or F16 GGUF proposing the greedy
    continuations that PyTorch verifies (without one, each streamed pass fixes one token). Returns
    {"imatrix": details, "parity": {file: figures}}. Raises FaceLlavaError for a missing or different checkpoint,
    data without a usable face, or a type or parity problem (the bundle's GGUFs are then left as they were)."""
    from facellava.bundle import Bundle, BundleWriter
    from facellava.calibration.dataset import build_calibration_set
    from facellava.export.llm import export_llm_bundle, gguf_name, parse_types
    from facellava.export.quantize import save_imatrix
    from facellava.model.loading import bundle_source_checkpoint, load_face_llava

    parse_types(types, have_imatrix=True)  # a bad type name fails before the long work
    opened = Bundle.open(bundle)
    source = bundle_source_checkpoint(opened, checkpoint)
    calibration = build_calibration_set(data, limit=limit, seed=seed, progress=progress)
    media = calibration.samples()
    # the vision half only (the LLM stays on the meta device); the decoder is streamed from the checkpoint
    vision = load_face_llava(source, image_tower=image_tower, video_tower=video_tower, llm=False)
    prompts = calibration_prompts(vision, media, progress)
    proposer = next((opened.path_of(gguf_name(t)) for t in ("f32", "f16") if gguf_name(t) in opened.files), None)
    sums, counts, tokens = stream_imatrix(vision, source, prompts, continuation_tokens, include_output,
                                          proposal_gguf=proposer, progress=progress)
    del vision
    details = {"prompts": len(prompts), "tokens": tokens, "files_skipped": len(calibration.skipped),
               "images": sum(p.modality == "image" for p in prompts),
               "videos": sum(p.modality == "video" for p in prompts),
               "continuation_tokens": continuation_tokens, "entries": len(sums), "data": str(data)}
    with BundleWriter.transaction(opened.path, create=False) as writer:
        save_imatrix(writer.stage(IMATRIX_NAME), sums, counts, datasets=[str(data)], chunk_count=len(prompts),
                     chunk_size=max(1, tokens // len(prompts)))
        writer.add(IMATRIX_NAME, "data", content="imatrix", **details)
    parity = export_llm_bundle(source, opened.path, types, imatrix=Bundle.open(opened.path).path_of(IMATRIX_NAME),
                               allow_drift=allow_drift, image_tower=image_tower, video_tower=video_tower,
                               threads=threads, progress=progress)
    return {"imatrix": details, "parity": parity}


# --- CLI: facellava calibrate llm ----------------------------------------------------------------------------


def calibrate_llm_arguments(parser: argparse.ArgumentParser) -> None:
    from facellava.model.cli import tower_arguments

    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="the PyTorch checkpoint the bundle was exported from (checked by its fingerprint)")
    tower_arguments(parser)
    parser.add_argument("--data", required=True, help="folder of images/videos, or a Face-LLaVA data JSON")
    parser.add_argument("--limit", type=int, default=64, help="at most this many files, a seeded random choice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--types", default=",".join(DEFAULT_LOW_BIT_TYPES),
                        help="GGUF types to quantize with the matrix (e.g. iq4_xs,q3_k_s,q2_k)")
    parser.add_argument("--continuation-tokens", type=int, default=CONTINUATION_TOKENS)
    parser.add_argument("--process-output", action="store_true", help="also collect output.weight (lm_head)")
    parser.add_argument("--allow-drift", action="store_true", help="keep files that miss their parity limits")
    parser.add_argument("--threads", type=int, default=0)


def calibrate_llm(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise FaceLlavaError("--limit must be at least 1")
    result = calibrate_llm_bundle(args.bundle, args.data, args.types, args.limit, args.seed,
                                  args.continuation_tokens, args.process_output, args.allow_drift, args.threads,
                                  checkpoint=args.checkpoint, image_tower=args.image_tower,
                                  video_tower=args.video_tower)
    info = result["imatrix"]
    print(f"importance matrix: {info['entries']} weights, {info['prompts']} prompts ({info['images']} images, "
          f"{info['videos']} videos), {info['tokens']} tokens, {info['files_skipped']} files skipped")
    for name, figures in result["parity"].items():
        print(f"{name}: top-1 {figures['top1_agreement']:.3f}, mean KL {figures['mean_kl']:.4g}")
    return 0

