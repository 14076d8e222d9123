"""Checkpoint -> bundle: the LLM as GGUF files (F32/F16 and llama.cpp quantizations), each measured against the
PyTorch model in llama.cpp and recorded in the bundle's manifest.

The order of work keeps the bundle whole whatever happens: every user error that can be found early (a type
name, the checkpoint's shape, the tokenizer, an importance matrix, a damaged shard) is found before the bundle is
touched; the GGUF files are written under temporary names, measured, and renamed together only when every one of
them passed (or the user allowed drift); the manifest is rewritten last.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from facellava.bundle import BundleWriter
from facellava.errors import FaceLlavaError
from facellava.export.quantize import (
    QUANT_TYPES,
    check_imatrix_fits,
    check_quant_type,
    load_imatrix,
    quantize_gguf,
)

if TYPE_CHECKING:
    from facellava.export import llm_parity

DEFAULT_TYPES = ("f16", "q8_0", "q4_k_m")
QUANTIZATION_SOURCE = "f16"  # what llama.cpp quantizes from, as its own workflow does


def gguf_name(gguf_type: str) -> str:
    """The bundle file name of one LLM type: `llm-<type>.gguf`."""
    return f"llm-{gguf_type}.gguf"


def parse_types(types: str | Iterable[str], have_imatrix: bool) -> list[str]:
    """Check and normalize the requested GGUF types ("f16,q8_0" or a list): lower case, no repeats, F32/F16 first.
    Raises FaceLlavaError for an unknown name (listing the valid ones), an importance-matrix type without
    an importance matrix, or an empty list."""
    from facellava.export.gguf import OUTPUT_TYPES

    names = types.split(",") if isinstance(types, str) else list(types)
    chosen: list[str] = []
    for name in (n.strip().lower() for n in names):
        if not name:
            continue
        if name not in OUTPUT_TYPES:
            if name not in QUANT_TYPES:
                raise FaceLlavaError(f"unknown GGUF type {name!r}; valid: {', '.join([*OUTPUT_TYPES, *QUANT_TYPES])}")
            check_quant_type(name, have_imatrix)
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise FaceLlavaError("no GGUF type given; for example --types f16,q8_0,q4_k_m")
    return sorted(chosen, key=lambda t: (t not in OUTPUT_TYPES, chosen.index(t)))


def export_llm_bundle(checkpoint_dir: str | Path, bundle_dir: str | Path, types: str | Iterable[str] = DEFAULT_TYPES,
                      imatrix: str | Path | None = None, allow_drift: bool = False,
                      image_tower: str | Path | None = None, video_tower: str | Path | None = None,
                      threads: int = 0, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Export the LLM of a Face-LLaVA checkpoint into a bundle as `llm-<type>.gguf` files.

    Takes the checkpoint directory, the bundle directory (created, or updated in place), the GGUF types (f32,
    f16 and the names of `QUANT_TYPES`), an importance matrix file for the quantizer (llama.cpp's GGUF or legacy
    `.dat` format; required by the low-bit types), whether a file that misses its parity limits may still be
    kept, LanguageBind tower directories when `config.json` does not name local ones (the parity prompts need
    the visual tokens), the quantizer's threads (0: all cores) and whether to show progress. The quantized types
    are made from an F16 conversion, which stays in the bundle only when f16 is among the types.

    Returns {file name: parity figures}. Raises FaceLlavaError for a bad type, checkpoint, tokenizer or
    importance matrix, and, unless `allow_drift`, when a file misses its limits (with the numbers); the bundle
    is then left as it was.
    """
    from facellava.export import llm_parity
    from facellava.export.gguf import inspect_checkpoint
    from facellava.model.loading import load_face_llava

    chosen = parse_types(types, imatrix is not None)
    checkpoint_dir = Path(checkpoint_dir)
    config, plan, _stripped = inspect_checkpoint(checkpoint_dir)
    imatrix_data = None
    if imatrix is not None:
        imatrix_data = load_imatrix(imatrix)
        check_imatrix_fits(imatrix_data, {t.name: t.shape[-1] for t in plan.values() if len(t.shape) == 2})

    # The parity prompts' visual tokens come from the vision half alone (the LLM is never loaded whole); the
    # PyTorch decode runs later, streamed layer by layer, with the converted GGUF proposing continuations.
    vision = load_face_llava(checkpoint_dir, image_tower=image_tower, video_tower=video_tower, llm=False)
    prompts = [(q, m) for q, m in llm_parity.PARITY_PROMPTS if getattr(vision, f"{m}_tower") is not None]
    if not prompts:
        raise FaceLlavaError(f"the parity prompts need a vision tower: {vision.no_tower('image')}")
    reference = llm_parity.reference_inputs(vision, prompts, progress=progress)
    del vision

    with BundleWriter.transaction(bundle_dir) as bundle:
        bundle.set_source(checkpoint_dir, llm={
            "architecture": "llama", "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
            "context_length": config.max_position_embeddings})
        fingerprint = bundle.manifest.source["checkpoint_sha256"]
        results = _write_checked_files(bundle, checkpoint_dir, chosen, fingerprint, imatrix, imatrix_data,
                                       reference, allow_drift, threads, progress)
        for gguf_type, (summary, figures) in results.items():
            details: dict[str, Any] = {"type": gguf_type, "tensors": summary["tensors"],
                                       "parameters": summary["parameters"]}
            if gguf_type in QUANT_TYPES:
                details["quantized_from"] = QUANTIZATION_SOURCE
                details["imatrix"] = Path(imatrix).name if imatrix else None
            bundle.add(gguf_name(gguf_type), "llm", parity=figures, **details)
    return {gguf_name(t): figures for t, (_, figures) in results.items()}


def _write_checked_files(bundle: BundleWriter, checkpoint_dir: Path, chosen: list[str], fingerprint: str,
                         imatrix: str | Path | None, imatrix_data: Any, reference: llm_parity.Reference,
                         allow_drift: bool, threads: int, progress: bool
                         ) -> dict[str, tuple[dict[str, int], dict[str, Any]]]:
    """Write every file in the transaction's staging, complete the PyTorch reference (streamed, the most exact
    conversion proposing its continuations), quantize, and measure; raise (nothing is committed) unless all are
    accepted."""
    from facellava.export import fidelity, llm_parity
    from facellava.export.gguf import OUTPUT_TYPES, convert_to_gguf

    quantized = [t for t in chosen if t in QUANT_TYPES]
    steps = tqdm(total=len(chosen) * 2 + (QUANTIZATION_SOURCE not in chosen and bool(quantized)) + 1,
                 desc="export llm", unit="step", disable=not progress)
    results: dict[str, tuple[dict[str, int], dict[str, Any]]] = {}
    paths = {t: bundle.stage(gguf_name(t)) for t in chosen}
    summaries: dict[str, dict[str, int]] = {}
    conversions = [t for t in OUTPUT_TYPES if t in chosen]
    if quantized and QUANTIZATION_SOURCE not in chosen:
        conversions.append(QUANTIZATION_SOURCE)  # staged, never added: discarded with the staging
    for gguf_type in conversions:
        steps.set_postfix_str(f"convert {gguf_type}")
        target = paths.get(gguf_type) or bundle.stage(gguf_name(gguf_type))
        summary = convert_to_gguf(checkpoint_dir, target, gguf_type, source_sha256=fingerprint, progress=progress)
        summaries[gguf_type] = {"tensors": summary.tensors, "parameters": summary.parameters}
        steps.update()
    steps.set_postfix_str("PyTorch reference")
    llm_parity.stream_reference(reference, checkpoint_dir, bundle.stage(gguf_name(conversions[0])),
                                progress=progress)
    steps.update()
    source = bundle.stage(gguf_name(QUANTIZATION_SOURCE))
    for gguf_type in quantized:
        steps.set_postfix_str(f"quantize {gguf_type}")
        quantize_gguf(source, paths[gguf_type], gguf_type, imatrix=imatrix_data,
                      imatrix_source=Path(imatrix).name if imatrix else "", threads=threads)
        summaries[gguf_type] = summaries[QUANTIZATION_SOURCE]
        steps.update()
    misses = []
    for gguf_type in chosen:
        steps.set_postfix_str(f"parity {gguf_type}")
        figures = llm_parity.measure_gguf(paths[gguf_type], reference)
        limits = llm_parity.limits(gguf_type, figures["prompts"])
        misses += [f"{gguf_type}: {miss}" for miss in fidelity.judge(figures, limits)]
        results[gguf_type] = (summaries[gguf_type], figures)
        steps.update()
    steps.close()
    if misses and not allow_drift:
        raise FaceLlavaError(f"parity with PyTorch missed: {'; '.join(misses)}; nothing was written "
                             "(pass --allow-drift to keep such files)")
    return results
