"""Parity of an exported GGUF with the PyTorch LLM it came from, measured in llama.cpp itself.

The reference is `FaceLlava` in PyTorch (float32) on a fixed set of prompts: several questions, each with the
visual tokens of a fixed image input or of a fixed 8-frame video input (`encode_image` / `encode_video` on
seeded pixels and landmarks). llama.cpp gets the same prompt the way the runtime feeds it: the text as token
ids, each visual block as a batch of embeddings at consecutive positions.

The export never loads the LLM whole: `reference_inputs` takes the visual tokens from the vision half alone,
and `stream_reference` runs the decoder one layer at a time from the checkpoint (`model.streaming`), verifying
the greedy continuation that the export's F32/F16 GGUF proposes (exactly PyTorch's greedy decode, see there).
`build_reference` is the whole-model equivalent (KV-cache decoding), the yardstick in the tests.

Per GGUF, the figures are:

- `first_token_rel_error`: ||logits_gguf - logits_torch|| / ||logits_torch|| for the first generated token,
  the worst over the prompts; and `first_token_max_abs`;
- `greedy_identical`: how many prompts give the same 32 greedy tokens in llama.cpp as in PyTorch (llama.cpp
  decoding its own choices, not teacher-forced);
- `top1_agreement` and `mean_kl` (KL(torch || gguf), nats) over every step of the reference's greedy
  continuation, teacher-forced, over all prompts;
- `tokenization_mismatches`: strings of a fixed tricky suite that llama.cpp tokenizes (chunked, as the
  runtime does) differently from `contract.tokenize_prompt` with SentencePiece.

Each prompt is measured by `fidelity.teacher_forced`. llama.cpp runs with exact attention and an F32 KV cache
(`LLAMA_SETTINGS`), so the figures are the file's. `limits` gives what `fidelity.judge` holds them to: F32 and
F16 must reproduce PyTorch (first-token error <= 1e-2, every greedy decode identical); a quantized type must
keep its top-1 agreement and KL within the limits of `QUANT_LIMITS`. Tokenization must be identical for every
file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from facellava import contract
from facellava.export import fidelity
from facellava.model.modeling import FaceLlava
from facellava.model.streaming import Proposer, StreamedPrompt
from facellava.runtime.llm import LlamaModel

DECODE_TOKENS = 32
# llama.cpp settings of the measurement: exact attention and cache, so that the figures describe the file
# (llama.cpp's CPU flash-attention kernel and an F16 KV cache add their own error; see LlamaModel.open).
LLAMA_SETTINGS = {"kv_type": "f32", "flash_attn": False}
CONTEXT_MARGIN = 8  # positions beyond the longest prompt and its continuation
MAX_FIRST_TOKEN_REL_ERROR = 1e-2
REFERENCE_TYPES = ("f32", "f16")  # held to PyTorch itself

# Quantized type -> (least top-1 agreement, largest mean KL in nats) against PyTorch float32. The limits catch a
# broken or badly degraded quantization, tiered by bits per weight. They were set with margin below what the
# tiny checkpoint measures, which is harsher than LLaMA-7B: with random weights at hidden size 256, rounding the
# weights to 8 bits alone (simulated in PyTorch) already flips 5% of greedy choices. IQ2/IQ1 types only have to
# work at all. The manifest keeps the measured figures next to the limits.
QUANT_LIMITS: dict[str, tuple[float, float]] = {
    "q8_0": (0.90, 0.01),
    "q6_k": (0.85, 0.05),
    "q5_k_m": (0.85, 0.08),
    "q5_k_s": (0.85, 0.08),
    "q5_0": (0.80, 0.10),
    "q4_k_m": (0.70, 0.30),
    "q4_k_s": (0.70, 0.30),
    "iq4_xs": (0.60, 0.30),
    "iq4_nl": (0.60, 0.30),
    "q4_0": (0.50, 0.40),
    "q3_k_l": (0.60, 0.50),
    "q3_k_m": (0.60, 0.50),
    "q3_k_s": (0.40, 1.20),  # measured 0.419 (KL 0.655) with transformers 5.24 and llama-cpp-python 0.3.36 here
    "iq3_m": (0.40, 1.20),
    "iq3_s": (0.40, 1.20),
    "iq3_xxs": (0.40, 1.20),
    "q2_k": (0.25, 2.00),
    "q2_k_s": (0.25, 2.00),
}
LOW_BIT_LIMITS = (0.05, 4.0)  # IQ2 types: proof of life only

PARITY_PROMPTS: tuple[tuple[str, contract.Modality], ...] = (
    ("What emotion does the person show?", "image"),
    ("Identify the active facial action units in the provided image.", "image"),
    ("Guess the age of the individual shown in the picture; justify your answer.", "image"),
    ("What emotion is shown in the video?", "video"),
    ("Is the video authentic, or is it a fake?", "video"),
)

# Strings where a tokenizer port usually slips: the dummy-prefix space per chunk, runs of spaces, newlines and
# tabs, digits (split one by one), byte fallback for characters outside the vocabulary, `<image>` at the start,
# middle and end and eight of them for a video, and text that looks like special tokens but is text.
TOKENIZER_SUITE: tuple[str, ...] = (
    "Hello world",
    " leading space",
    "   three leading spaces and trailing  ",
    "double  spaces,  twice",
    "line one\nline two\n\nline four\n",
    "tabs\tand\r\nCRLF",
    "digits 0123456789, 3.14159 and 2024-05-01",
    "Café, naïve, Zürich, São Paulo, ½",
    "日本語の顔 лицо 😀🙂 emoji",
    "<image>\nWhat emotion is shown?",
    "Describe <image> this face.",
    "The face is here: <image>",
    "<image><image> adjacent",
    "Text that looks special: </s> <s> <unk> [INST] <<SYS>>",
    "AU6+AU12 → happy; AU1/AU2 ↑",
    "",
    contract.build_prompt("What emotion is shown in the video?", "video"),
    contract.build_prompt("Estimate the age of the person.", "image"),
)


@dataclass
class ReferencePrompt:
    """One parity prompt and what PyTorch made of it."""

    question: str
    modality: contract.Modality
    input_ids: list[int]  # with IMAGE_TOKEN_INDEX markers
    visual_blocks: list[np.ndarray]  # each [N, D] float32
    tokens: list[int]  # greedy, DECODE_TOKENS long
    logits: np.ndarray  # [DECODE_TOKENS, vocab] float32; row i chose tokens[i]


@dataclass
class Reference:
    prompts: list[ReferencePrompt]
    sentencepiece: Any  # the checkpoint's SentencePieceProcessor
    bos_id: int
    passes: int = 1  # streamed PyTorch passes the greedy decode took (`stream_reference`); 1 for the whole model


def fixed_visual_blocks(model: FaceLlava, modality: contract.Modality, seed: int = 0) -> list[np.ndarray]:
    """The visual tokens of a fixed, seeded input: pixels uniform in [0, 1] CLIP-normalized, landmarks inside the
    crop. One [256, D] block for an image, eight [257, D] blocks for a video."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor(contract.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(contract.CLIP_STD).view(3, 1, 1)
    size = contract.IMAGE_SIZE
    if modality == "image":
        pixels = (torch.rand(1, 3, size, size, generator=generator) - mean) / std
        landmarks = 0.25 + 0.5 * torch.rand(1, contract.NUM_LANDMARKS, 2, generator=generator)
    else:
        frames = (torch.rand(1, contract.NUM_FRAMES, 3, size, size, generator=generator) - mean) / std
        pixels = frames.permute(0, 2, 1, 3, 4)  # [B, C, T, H, W]
        landmarks = 0.25 + 0.5 * torch.rand(1, contract.NUM_FRAMES, contract.NUM_LANDMARKS, 2, generator=generator)
    with torch.no_grad():
        blocks = model.visual_blocks(pixels, landmarks if model.config.has_landmark_modules else None)
    return [np.ascontiguousarray(b.float().numpy()) for b in blocks]


def build_reference(model: FaceLlava, prompts: Sequence[tuple[str, contract.Modality]] = PARITY_PROMPTS,
                    progress: bool = True) -> Reference:
    """Run PyTorch greedy decoding (KV cache) on the parity prompts with a whole model loaded. The export uses
    the streamed equivalent (`reference_inputs` + `stream_reference`), which needs a fraction of the memory;
    this one stays as the yardstick it is tested against and for callers that hold a model anyway."""
    blocks = {modality: fixed_visual_blocks(model, modality) for modality in {m for _, m in prompts}}
    results = []
    for question, modality in tqdm(prompts, desc="PyTorch reference", unit="prompt", disable=not progress):
        ids = model.prompt_ids(question, modality)
        output = model.generate_reference(ids, [torch.from_numpy(b) for b in blocks[modality]],
                                          max_new_tokens=DECODE_TOKENS, stop_at_eos=False)
        results.append(ReferencePrompt(question, modality, ids, blocks[modality], output.tokens,
                                       output.logits.float().numpy()))
    return Reference(results, model.tokenizer, model.config.bos_token_id)


def reference_inputs(model: FaceLlava, prompts: Sequence[tuple[str, contract.Modality]] = PARITY_PROMPTS,
                     progress: bool = True) -> Reference:
    """The parity prompts' ids and visual blocks, from a model whose vision half is loaded (the LLM may stay on
    the meta device: `export.vision.load_vision_model`). Returns a Reference not yet decoded (no tokens, empty
    logits): `stream_reference` completes it."""
    blocks = {modality: fixed_visual_blocks(model, modality)
              for modality in tqdm(sorted({m for _, m in prompts}), desc="visual tokens", unit="input",
                                   disable=not progress)}
    empty = np.empty((0, model.config.vocab_size), dtype=np.float32)
    results = [ReferencePrompt(question, modality, model.prompt_ids(question, modality), blocks[modality], [], empty)
               for question, modality in prompts]
    return Reference(results, model.tokenizer, model.config.bos_token_id)


def gguf_proposer(path: str | Path, n_threads: int | None = None) -> Proposer:
    """A proposer for `model.streaming.greedy_continuations`: llama.cpp's greedy continuation of each prompt in
    the GGUF at `path` (visual blocks injected as embeddings, `LLAMA_SETTINGS`), teacher-forced on the verified
    prefix. The file is opened for each round of proposals and closed before PyTorch runs, so the two never
    hold memory at the same time."""

    def propose(prompts: Sequence[StreamedPrompt], prefixes: Sequence[list[int]], steps: int) -> list[list[int]]:
        need = max(p.positions for p in prompts) + steps
        proposals = []
        with LlamaModel.open(path, n_ctx=need, n_threads=n_threads, **LLAMA_SETTINGS) as llm:
            for prompt, prefix in zip(prompts, prefixes, strict=True):
                llm.reset()
                blocks = [np.asarray(b, dtype=np.float32) for b in prompt.visual_blocks]
                logits = llm.eval_prompt(prompt.input_ids, blocks)
                tokens = list(prefix)
                if tokens:
                    logits = llm.eval_tokens(tokens)
                while len(tokens) < steps:
                    tokens.append(int(logits.argmax()))
                    if len(tokens) < steps:
                        logits = llm.eval_tokens(tokens[-1:])
                proposals.append(tokens)
        return proposals

    return propose


def stream_reference(reference: Reference, checkpoint_dir: str | Path, proposal_gguf: str | Path | None,
                     progress: bool = True) -> Reference:
    """Complete a Reference from `reference_inputs` with PyTorch's greedy decode of DECODE_TOKENS tokens and the
    float32 logits of each step, computed by streaming the checkpoint's decoder one layer at a time
    (`model.streaming`): memory bounded by one float32 layer plus the prompts' hidden states, whatever the
    model's depth. `proposal_gguf` (an F32/F16 GGUF of the same checkpoint) proposes the continuations that one
    streamed pass verifies; without it every pass fixes one token (DECODE_TOKENS passes). The tokens are exactly
    PyTorch's greedy choices (from full-sequence forward passes); the logits match `build_reference`'s to float
    rounding. Returns `reference`, filled in. Raises FaceLlavaError for a damaged checkpoint."""
    from facellava.model.streaming import LayerStream, greedy_continuations

    stream = LayerStream(checkpoint_dir)
    prompts = [StreamedPrompt(p.input_ids, p.visual_blocks) for p in reference.prompts]
    propose = gguf_proposer(proposal_gguf) if proposal_gguf is not None else None
    results = greedy_continuations(stream, prompts, DECODE_TOKENS, propose, progress=progress)
    for prompt, result in zip(reference.prompts, results, strict=True):
        prompt.tokens = result.tokens
        prompt.logits = result.logits.numpy()
    reference.passes = max(r.passes for r in results)
    return reference


def tokenization_mismatches(llm: LlamaModel, reference: Reference,
                            suite: Sequence[str] = TOKENIZER_SUITE) -> list[str]:
    """The suite strings that llama.cpp's chunked tokenization (`LlamaModel.tokenize_prompt`) gets different
    from `contract.tokenize_prompt` with SentencePiece."""
    return [text for text in suite
            if llm.tokenize_prompt(text) != contract.tokenize_prompt(text, reference.sentencepiece.encode,
                                                                      reference.bos_id)]


def prompt_positions(prompt: ReferencePrompt) -> int:
    """The LLM positions a parity prompt fills: its ids, each visual marker replaced by its block."""
    markers = prompt.input_ids.count(contract.IMAGE_TOKEN_INDEX)
    return len(prompt.input_ids) - markers + sum(len(b) for b in prompt.visual_blocks)


def measure_gguf(path: str | Path, reference: Reference, n_threads: int | None = None) -> dict[str, Any]:
    """Load one GGUF in llama.cpp and measure it against the PyTorch reference (`fidelity.teacher_forced` on each
    prompt). The context holds the longest prompt and its continuation, plus CONTEXT_MARGIN, and no more: at 7B
    the F32 KV cache costs 1 MiB per position (K and V, 32 layers x 4096 floats). Returns the figures."""
    need = max(prompt_positions(p) + len(p.tokens) for p in reference.prompts)
    rel_errors, max_abs, kls, agree, identical = [], [], [], [], 0
    with LlamaModel.open(path, n_ctx=need + CONTEXT_MARGIN, n_threads=n_threads, **LLAMA_SETTINGS) as llm:
        mismatches = tokenization_mismatches(llm, reference)
        for prompt in reference.prompts:
            figures = fidelity.teacher_forced(llm, prompt.input_ids, prompt.visual_blocks, prompt.tokens,
                                              prompt.logits)
            rel_errors.append(figures["first_token_rel_error"])
            max_abs.append(figures["first_token_max_abs"])
            kls.extend(figures["kl"].tolist())
            agree.extend(figures["top1"].tolist())
            identical += figures["greedy_match_length"] == len(prompt.tokens)
        n_ctx = llm.n_ctx
    return {
        "prompts": len(reference.prompts),
        "decode_tokens": DECODE_TOKENS,
        "first_token_rel_error": max(rel_errors),
        "first_token_max_abs": max(max_abs),
        "greedy_identical": identical,
        "top1_agreement": float(np.mean(agree)),
        "mean_kl": float(np.mean(kls)),
        "tokenization_strings": len(TOKENIZER_SUITE),
        "tokenization_mismatches": len(mismatches),
        "tokenization_mismatched": mismatches[:3],
        "llama_settings": {**LLAMA_SETTINGS, "n_ctx": n_ctx},
    }


def limits(gguf_type: str, prompts: int) -> dict[str, float]:
    """The `fidelity.judge` limits of a GGUF of `gguf_type` measured on `prompts` parity prompts: tokenization
    identical to SentencePiece for every type; F32/F16 reproduce PyTorch (first-token error, every greedy decode
    identical); a quantized type keeps its top-1 agreement and mean KL within `QUANT_LIMITS`."""
    if gguf_type in REFERENCE_TYPES:
        bounds = {"first_token_rel_error_max": MAX_FIRST_TOKEN_REL_ERROR, "greedy_identical_min": prompts}
    else:
        min_top1, max_kl = QUANT_LIMITS.get(gguf_type, LOW_BIT_LIMITS)
        bounds = {"top1_agreement_min": min_top1, "mean_kl_max": max_kl}
    return {"tokenization_mismatches_max": 0, **bounds}
