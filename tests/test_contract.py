"""The torch-free contract: prompt template, chunked tokenization, frame indices, landmark regions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import sentencepiece

from facellava import contract

TRICKY_QUESTIONS = [
    "What emotion is shown in the video?",
    "  two leading spaces and  double  spaces",
    "unicode: café, Zürich, 日本の顔, лицо, 😀 and 🧑🏽‍🚀",
    "newlines\n\nand a tab\there",
    "digits 0123456789 and 3.14 and AU12",
    "looks special: </s> <s> <unk> <0x41>",
    "",
]


def official_tokenizer_image_token(prompt: str, sp: sentencepiece.SentencePieceProcessor) -> list[int]:
    """A literal transcription of the official `tokenizer_image_token` (mm_utils.py), with the LLaMA tokenizer
    of transformers 4.31 (legacy mode: `tokenizer(chunk).input_ids` is BOS + SentencePiece's encode)."""
    prompt_chunks = [[1] + sp.encode(chunk) for chunk in prompt.split("<image>")]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x), strict=True) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == 1:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [contract.IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


@pytest.fixture(scope="module")
def sp(tiny_checkpoint) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))


@pytest.mark.parametrize("question", TRICKY_QUESTIONS)
@pytest.mark.parametrize("modality", ["image", "video"])
def test_chunked_tokenization_matches_the_official_rule(sp, question, modality):
    prompt = contract.build_prompt(question, modality)
    ids = contract.tokenize_prompt(prompt, sp.encode, bos_id=1)
    assert ids == official_tokenizer_image_token(prompt, sp)
    expected_blocks = 1 if modality == "image" else contract.NUM_FRAMES
    assert ids.count(contract.IMAGE_TOKEN_INDEX) == expected_blocks
    assert ids[0] == 1 and ids.count(1) == 1


@pytest.mark.parametrize("prompt", [
    "<image>\nDescribe the face.",  # at the start: the first chunk is empty, BOS stays
    "Look at <image> and tell me.",  # in the middle
    "Describe this: <image>",  # at the end: the last chunk is empty
    "<image><image>",  # adjacent placeholders
    "no placeholder at all, café 😀",
    " ".join(["<image>"] * 8) + "\nWhat emotion?",
])
def test_placeholder_positions(sp, prompt):
    ids = contract.tokenize_prompt(prompt, sp.encode, bos_id=1)
    assert ids == official_tokenizer_image_token(prompt, sp)
    if "<image>" not in prompt:
        assert ids == sp.encode(prompt, add_bos=True)  # no placeholder: plain SentencePiece
    # each text chunk round-trips through SentencePiece
    chunks, current = [], []
    for token in ids[1:]:
        if token == contract.IMAGE_TOKEN_INDEX:
            chunks.append(current)
            current = []
        else:
            current.append(token)
    chunks.append(current)
    assert [sp.decode(c) for c in chunks] == prompt.split("<image>")


def test_prompt_template_is_llava_v1():
    assert contract.build_prompt("Q?", "image") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nQ? ASSISTANT:")
    video = contract.build_prompt("Q?", "video")
    assert " USER: <image> <image> <image> <image> <image> <image> <image> <image>\nQ? ASSISTANT:" in video
    with pytest.raises(ValueError):
        contract.build_prompt("Q?", "audio")


def test_video_frame_indices_match_numpy_linspace():
    for n in range(1, 400):
        assert contract.video_frame_indices(n) == np.linspace(0, n - 1, 8, dtype=int).tolist(), n
    with pytest.raises(ValueError):
        contract.video_frame_indices(0)


def test_landmark_regions_cover_the_68_points_once():
    covered = [i for _, start, stop in contract.LANDMARK_REGIONS for i in range(start, stop)]
    assert covered == list(range(68))
    assert [name for name, _, _ in contract.LANDMARK_REGIONS] == [
        "face", "eyebrow1", "eyebrow2", "nose", "nostril", "eye1", "eye2", "lips", "teeth"]
    assert contract.IMAGE_TOKENS == 256 and contract.VIDEO_FRAME_TOKENS == 257 and contract.NUM_FRAMES == 8


def test_contract_module_is_torch_free():
    code = ("import sys, facellava.contract, facellava.cli; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("prompt", [
    "<image>\nDescribe the face.",
    "Describe this: <image>",
    "<image><image>",
    "no placeholder at all",
    " ".join(["<image>"] * 8) + "\nWhat emotion?",
])
def test_the_splice_plan_puts_block_i_at_the_i_th_marker(sp, prompt):
    ids = contract.tokenize_prompt(prompt, sp.encode, bos_id=1)
    blocks = ids.count(contract.IMAGE_TOKEN_INDEX)
    runs = contract.splice_plan(ids, blocks)
    # the runs, expanded again (each block as its marker), are the ids; blocks come 0, 1, 2, ... in order
    expanded = [t for run in runs for t in (run.ids if run.block is None else [contract.IMAGE_TOKEN_INDEX])]
    assert expanded == ids
    assert [run.block for run in runs if run.block is not None] == list(range(blocks))
    assert all(run.ids and contract.IMAGE_TOKEN_INDEX not in run.ids for run in runs if run.block is None)
    # no two text runs in a row: each is as long as the text between markers
    assert not any(a.block is None and b.block is None for a, b in zip(runs, runs[1:], strict=False))
    lengths = [256 + i for i in range(blocks)]
    assert contract.spliced_length(ids, lengths) == len(ids) - blocks + sum(lengths)
    with pytest.raises(ValueError, match=f"the prompt has {blocks} visual positions but {blocks + 1} visual blocks"):
        contract.splice_plan(ids, blocks + 1)
