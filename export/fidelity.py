"""How an exported variant is compared with its reference, and judged: one home for the figures of export,
calibration and bench.

- Tensors (visual tokens): `compare` gives cosine, the lowest per-token cosine, max-abs and relative error;
  `worst` combines the figures of several inputs into the worst of each.
- Logits: `kl_divergence` per row; `teacher_forced` runs one prompt in llama.cpp against a reference
  continuation (teacher-forced logits, then llama.cpp's own greedy decode) and gives the per-prompt figures.
- Limits: a figure's limit is named `<figure>_min` or `<figure>_max`; `judge` lists the limits a record misses
  (a figure that is NaN, or absent, misses), records them and the verdict in it.

Numpy only (no torch, no llama.cpp import): the engine build on a device uses it where torch is absent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# figure -> (words for a miss message, value format); a figure not listed is named by its key
LABELS: dict[str, tuple[str, str]] = {
    "cosine": ("cosine", ".6f"),
    "min_token_cosine": ("lowest token cosine", ".6f"),
    "rel_err": ("relative error", ".3g"),
    "max_abs": ("max-abs error", ".3g"),
    "first_token_rel_error": ("first-token relative logit error", ".3g"),
    "first_token_max_abs": ("first-token max-abs logit error", ".3g"),
    "greedy_identical": ("greedy decodes identical to PyTorch's", "d"),
    "top1_agreement": ("top-1 agreement", ".3f"),
    "mean_kl": ("mean KL", ".4g"),
    "tokenization_mismatches": ("tokenization mismatches with SentencePiece", "d"),
}
# how `worst` combines a tensor figure over inputs
HIGHER_IS_BETTER = {"cosine": True, "min_token_cosine": True, "max_abs": False, "rel_err": False}


# --- tensors ------------------------------------------------------------------------------------------------


def token_cosines(actual: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The cosine of each token (last axis) of two arrays of the same shape, in float64, flattened."""
    a = actual.reshape(-1, actual.shape[-1]).astype(np.float64)
    b = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def compare(actual: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Figures of `actual` against `reference` (same shape), in float64: cosine of the flattened tensors, the
    lowest cosine of any single token (last axis), max-abs difference, and ||a - b|| / ||b||. Raises ValueError
    for different shapes."""
    if actual.shape != reference.shape:
        raise ValueError(f"shape {actual.shape} differs from the reference's {reference.shape}")
    a, b = actual.astype(np.float64), reference.astype(np.float64)
    diff = a - b
    return {
        "cosine": float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)),
        "min_token_cosine": float(token_cosines(a, b).min()),
        "max_abs": float(np.abs(diff).max()),
        "rel_err": float(np.linalg.norm(diff) / (np.linalg.norm(b) + 1e-30)),
    }


def worst(figures: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The worst of each `compare` figure over several inputs (lowest cosines, highest errors)."""
    return {key: (min if higher else max)(f[key] for f in figures) for key, higher in HIGHER_IS_BETTER.items()}


# --- logits -------------------------------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(other)) per row, in nats."""
    log_p, log_q = log_softmax(reference), log_softmax(other)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def teacher_forced(llm: Any, input_ids: Sequence[int], visual_blocks: Sequence[np.ndarray],
                   tokens: Sequence[int], logits: np.ndarray) -> dict[str, Any]:
    """One prompt in llama.cpp against a reference continuation: `tokens` (greedy) and the `logits` each was chosen
    from ([len(tokens), vocab], row 0 the first token's).

    `llm` is a `runtime.llm.LlamaModel` (reset here, left holding the prompt). Its logits are read teacher-forced
    (the prompt, then the reference's tokens), then llama.cpp decodes greedily on its own from the prompt for as
    many tokens. Returns `first_token_rel_error` (||l - l_ref|| / ||l_ref|| of the first token),
    `first_token_max_abs`, `kl` (per step, KL(reference || llama.cpp)), `top1` (per step, llama.cpp's argmax is
    the reference's token), `greedy` (llama.cpp's own tokens) and `greedy_match_length` (leading tokens equal to
    the reference's)."""
    llm.reset()
    first = llm.eval_prompt(list(input_ids), list(visual_blocks))
    prompt_end = llm.n_past
    rest = llm.eval_tokens(list(tokens[:-1]), all_logits=True)
    forced = np.vstack([first[None], rest])
    difference = forced[0] - logits[0]
    llm.rewind(prompt_end)
    greedy = [int(first.argmax())]
    while len(greedy) < len(tokens):
        greedy.append(int(llm.eval_tokens(greedy[-1:]).argmax()))
    match = next((i for i, (a, b) in enumerate(zip(greedy, tokens, strict=True)) if a != b), len(greedy))
    return {
        "first_token_rel_error": float(np.linalg.norm(difference) / np.linalg.norm(logits[0])),
        "first_token_max_abs": float(np.abs(difference).max()),
        "kl": kl_divergence(logits, forced),
        "top1": forced.argmax(axis=-1) == np.asarray(tokens),
        "greedy": greedy,
        "greedy_match_length": match,
    }


# --- limits -------------------------------------------------------------------------------------------------


def _limit(name: str) -> tuple[str, bool]:
    """`top1_agreement_min` -> ("top1_agreement", True); raises ValueError for a name without _min/_max."""
    figure, _, bound = name.rpartition("_")
    if bound not in ("min", "max") or not figure:
        raise ValueError(f"a limit is named <figure>_min or <figure>_max, not {name!r}")
    return figure, bound == "min"


def describe_limits(limits: Mapping[str, float]) -> str:
    """{"rel_err_max": 1e-4, "cosine_min": 0.999} -> "rel_err <= 0.0001, cosine >= 0.999"."""
    parts = []
    for name, bound in limits.items():
        figure, is_min = _limit(name)
        parts.append(f"{figure} {'>=' if is_min else '<='} {bound:g}")
    return ", ".join(parts)


def judge(figures: dict[str, Any], limits: Mapping[str, float]) -> list[str]:
    """The limits `figures` misses, each a phrase with the numbers ("top-1 agreement 0.412 < 0.6"); empty when it
    passes. A limited figure that is NaN or absent misses, and so does any other top-level number of the record
    that is not finite. Sets figures["limits"] and figures["passed"]. Raises ValueError for a badly named limit.
    """
    misses = []
    for name, bound in limits.items():
        figure, is_min = _limit(name)
        label, spec = LABELS.get(figure, (figure, "g"))
        value = figures.get(figure)
        if value is None or not math.isfinite(value):
            misses.append(f"{label} is {value} (limit {'>=' if is_min else '<='} {bound:g})")
        elif value < bound if is_min else value > bound:
            misses.append(f"{label} {value:{spec}} {'<' if is_min else '>'} {bound:g}")
    limited = {_limit(name)[0] for name in limits}
    misses += [f"{LABELS.get(key, (key,))[0]} is {value}" for key, value in figures.items()
               if key not in limited and isinstance(value, float) and not math.isfinite(value)]
    figures["limits"] = dict(limits)
    figures["passed"] = not misses
    return misses
