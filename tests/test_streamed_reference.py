"""The streamed PyTorch reference (one decoder layer at a time, greedy decoding verified against a GGUF's
proposals) against the whole-model reference on the tiny checkpoint: same tokens, same logits to float rounding,
same parity figures; and the streamed importance matrix against `compute_imatrix`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from facellava.calibration.imatrix import CalibrationPrompt, compute_imatrix, stream_imatrix
from facellava.export import fidelity, llm_parity
from facellava.model.loading import load_face_llava
from facellava.model.streaming import LayerStream, StreamedPrompt, greedy_continuations, position_groups

LOGIT_ATOL = 1e-4  # measured ~1.5e-5 on logits of magnitude ~15: full-sequence vs KV-cache float rounding


@pytest.fixture(scope="module")
def f32_gguf(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from facellava.export.gguf import convert_to_gguf

    path = tmp_path_factory.mktemp("streamed") / "llm-f32.gguf"
    convert_to_gguf(tiny_checkpoint, path, "f32", progress=False)
    return path


@pytest.fixture(scope="module")
def vision_model(tiny_checkpoint: Path):
    """The tiny checkpoint with only its vision half loaded (the LLM stays on the meta device)."""
    model = load_face_llava(tiny_checkpoint, llm=False)
    assert all(p.is_meta for p in model.llm.parameters())
    return model


@pytest.fixture(scope="module")
def whole_reference(tiny_model) -> llm_parity.Reference:
    return llm_parity.build_reference(tiny_model, progress=False)


@pytest.fixture(scope="module")
def streamed_reference(vision_model, tiny_checkpoint: Path, f32_gguf: Path) -> llm_parity.Reference:
    reference = llm_parity.reference_inputs(vision_model, progress=False)
    return llm_parity.stream_reference(reference, tiny_checkpoint, f32_gguf, progress=False)


def _assert_same_reference(streamed: llm_parity.Reference, whole: llm_parity.Reference) -> None:
    assert len(streamed.prompts) == len(whole.prompts) == len(llm_parity.PARITY_PROMPTS)
    for s, w in zip(streamed.prompts, whole.prompts, strict=True):
        assert (s.question, s.modality, s.input_ids) == (w.question, w.modality, w.input_ids)
        assert len(s.visual_blocks) == len(w.visual_blocks) == (1 if s.modality == "image" else 8)
        for a, b in zip(s.visual_blocks, w.visual_blocks, strict=True):
            np.testing.assert_array_equal(a, b)  # the vision half alone computes the same visual tokens
        assert s.tokens == w.tokens and len(s.tokens) == llm_parity.DECODE_TOKENS
        assert s.logits.shape == w.logits.shape == (llm_parity.DECODE_TOKENS, 512)
        assert s.logits.dtype == np.float32
        np.testing.assert_allclose(s.logits, w.logits, rtol=0, atol=LOGIT_ATOL)


def test_streamed_reference_equals_whole_model(streamed_reference, whole_reference) -> None:
    _assert_same_reference(streamed_reference, whole_reference)
    # the F32 GGUF's greedy continuations were PyTorch's everywhere: one streamed pass verified them all
    assert streamed_reference.passes == 1


def test_parity_figures_are_the_same(streamed_reference, whole_reference, f32_gguf: Path) -> None:
    streamed = llm_parity.measure_gguf(f32_gguf, streamed_reference)
    whole = llm_parity.measure_gguf(f32_gguf, whole_reference)
    for key in ("prompts", "greedy_identical", "top1_agreement", "tokenization_mismatches"):
        assert streamed[key] == whole[key], key
    assert streamed["greedy_identical"] == 5 and streamed["top1_agreement"] == 1.0
    assert streamed["first_token_rel_error"] < 1e-5 and whole["first_token_rel_error"] < 1e-5
    assert abs(streamed["first_token_max_abs"] - whole["first_token_max_abs"]) < LOGIT_ATOL
    assert abs(streamed["mean_kl"] - whole["mean_kl"]) < 1e-7
    assert fidelity.judge(streamed, llm_parity.limits("f32", streamed["prompts"])) == []


def test_parity_context_is_what_the_prompts_need(streamed_reference, f32_gguf: Path) -> None:
    """llama.cpp's context for the parity measurement holds the longest prompt and its continuation, not 4096
    positions (at 7B an F32 KV cache costs 1 MiB per position)."""
    need = max(llm_parity.prompt_positions(p) + len(p.tokens) for p in streamed_reference.prompts)
    video = next(p for p in streamed_reference.prompts if p.modality == "video")
    assert llm_parity.prompt_positions(video) == len(video.input_ids) - 8 + 8 * 257
    assert 8 * 257 + llm_parity.DECODE_TOKENS < need < 2500
    figures = llm_parity.measure_gguf(f32_gguf, streamed_reference)
    # what was asked for, as llama.cpp pads it (to a multiple of 256)
    assert need <= figures["llama_settings"]["n_ctx"] == -(-(need + llm_parity.CONTEXT_MARGIN) // 256) * 256 < 4096
    assert figures["greedy_identical"] == 5  # the prompts and their continuations fit


def test_a_wrong_proposal_is_corrected(vision_model, tiny_checkpoint: Path, f32_gguf: Path, whole_reference) -> None:
    """A proposer that is wrong at step 5 of every prompt on its first round: the streamed pass finds PyTorch's
    own token there, the proposer continues from the corrected prefix, and a second pass verifies the rest."""
    reference = llm_parity.reference_inputs(vision_model, progress=False)
    prompts = [StreamedPrompt(p.input_ids, p.visual_blocks) for p in reference.prompts]
    honest = llm_parity.gguf_proposer(f32_gguf)
    rounds: list[list[list[int]]] = []

    def wrong_once(batch: Sequence[StreamedPrompt], prefixes: Sequence[list[int]], steps: int) -> list[list[int]]:
        proposals = honest(batch, prefixes, steps)
        if not rounds:
            for proposal in proposals:
                proposal[5] = (proposal[5] + 1) % 512
        rounds.append([list(p) for p in prefixes])
        return proposals

    results = greedy_continuations(LayerStream(tiny_checkpoint), prompts, llm_parity.DECODE_TOKENS, wrong_once,
                                   progress=False)
    assert len(rounds) == 2 and all(r.passes == 2 for r in results)
    # the second round started from PyTorch's six first tokens (five verified, the sixth read off the pass)
    assert [len(p) for p in rounds[1]] == [6] * len(prompts)
    for result, whole in zip(results, whole_reference.prompts, strict=True):
        assert result.tokens == whole.tokens
        np.testing.assert_allclose(result.logits.numpy(), whole.logits, rtol=0, atol=LOGIT_ATOL)


def test_prompt_groups_bound_the_positions() -> None:
    prompts = [StreamedPrompt([1, 2, 3]), StreamedPrompt([1, -200], [np.zeros((256, 4))]),
               StreamedPrompt([1, 2])]
    assert [p.positions for p in prompts] == [3, 257, 2]
    assert position_groups(prompts, extra=16, max_positions=300) == [[0, 1], [2]]
    assert position_groups(prompts, extra=16, max_positions=100) == [[0], [1], [2]]  # too long: a group alone


def test_streamed_imatrix_equals_whole_model(tiny_model, vision_model, tiny_checkpoint: Path,
                                             f32_gguf: Path) -> None:
    """The same prompts (an image, a video, a text-only one) through `compute_imatrix` (whole model, KV-cache
    greedy) and `stream_imatrix` (streamed, in groups of at most 3000 positions): the same entries, counts and
    sums, output.weight included."""
    image = [torch.from_numpy(b) for b in llm_parity.fixed_visual_blocks(tiny_model, "image")]
    video = [torch.from_numpy(b) for b in llm_parity.fixed_visual_blocks(tiny_model, "video", seed=1)]
    prompts = [CalibrationPrompt("How old is this person?", "image", image),
               CalibrationPrompt("What emotion is shown in the video?", "video", video),
               CalibrationPrompt("Describe the face.", None, [])]
    sums, counts, tokens = compute_imatrix(tiny_model, prompts, include_output=True, progress=False)
    streamed_sums, streamed_counts, streamed_tokens = stream_imatrix(
        vision_model, tiny_checkpoint, prompts, include_output=True, proposal_gguf=f32_gguf, progress=False,
        max_positions=3000)
    layers = tiny_model.config.num_hidden_layers
    assert len(sums) == 7 * layers + 1 and "output.weight" in sums
    assert streamed_sums.keys() == sums.keys() and streamed_counts == counts
    assert tokens == streamed_tokens == counts["blk.0.attn_q.weight"] > 8 * 257  # prompts and continuations
    for name, values in sums.items():
        assert streamed_sums[name].dtype == np.float32
        np.testing.assert_allclose(streamed_sums[name], values, rtol=1e-5, err_msg=name)
