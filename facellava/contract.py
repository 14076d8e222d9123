"""The contracts between the model side and the runtime, in one torch-free module.

Everything both halves must agree on lives here and nowhere else: the `llava_v1` prompt template, the chunked
tokenization rule of the official `tokenizer_image_token`, the iBUG-68 landmark layout and the nine FRLP
regions, the preprocessing constants, the token counts, and the bundle manifest's schema version. The runtime
imports this module on devices that have neither torch nor transformers, so it may only use the standard
library.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Modality = Literal["image", "video"]

# --- prompt -------------------------------------------------------------------------------------------------

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_INDEX = -200  # the official code's marker for "one visual block goes here"
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
STOP_STRING = "</s>"

# --- token counts and input sizes ---------------------------------------------------------------------------

IMAGE_SIZE = 224  # tower input side
PATCH_GRID = 16  # 224 / 14
IMAGE_TOKENS = PATCH_GRID * PATCH_GRID  # 256: CLS dropped for images
VIDEO_FRAME_TOKENS = IMAGE_TOKENS + 1  # 257: CLS kept for video frames
NUM_FRAMES = 8  # the video tower's temporal embedding has exactly 8 slots

# --- preprocessing ------------------------------------------------------------------------------------------

FACE_CROP_SIZE = 256  # the official crop_face.py resizes the square face crop to 256x256
LANDMARK_SCALE = 256.0  # landmarks are crop pixels divided by this constant
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --- landmarks ----------------------------------------------------------------------------------------------

NUM_LANDMARKS = 68  # iBUG-300W / Multi-PIE order, as dlib and FAN emit it
LANDMARK_VALUES = 2 * NUM_LANDMARKS  # 136, flattened x0, y0, x1, y1, ...

# The nine FRLP regions: (state-dict name, first index, one past the last index), in the official order.
LANDMARK_REGIONS: tuple[tuple[str, int, int], ...] = (
    ("face", 0, 17),
    ("eyebrow1", 17, 22),
    ("eyebrow2", 22, 27),
    ("nose", 27, 31),
    ("nostril", 31, 36),
    ("eye1", 36, 42),
    ("eye2", 42, 48),
    ("lips", 48, 60),
    ("teeth", 60, 68),
)

# The left/right mirror of the layout: point i of a face is point IBUG68_MIRROR[i] of the horizontally flipped face
# (a detector numbers a mirrored face from the image's left again).
IBUG68_MIRROR: tuple[int, ...] = (
    *range(16, -1, -1),  # jaw
    *range(26, 16, -1),  # eyebrows
    27, 28, 29, 30, 35, 34, 33, 32, 31,  # nose
    45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,  # eyes
    54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,  # outer lips
    64, 63, 62, 61, 60, 67, 66, 65,  # inner lips
)

# --- bundle -------------------------------------------------------------------------------------------------

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
# A manifest is one JSON object:
#   schema_version  MANIFEST_SCHEMA_VERSION
#   created_by      "facellava-edge <version>"
#   source          {"checkpoint": path, "checkpoint_sha256": hex, "llm": {hidden_size, layers, vocab_size, ...}}
#   contract        contract_summary(): the constants above, so a runtime can refuse a bundle it disagrees with
#   files           {relative path: {"sha256", "bytes", "kind": "vision"|"llm"|"engine"|"data", ...details}}
#   parity          {relative path: {figure: value, ..., "passed": bool}}
#   tools           {package: version} of the export
MANIFEST_KEYS = ("schema_version", "created_by", "source", "contract", "files", "parity", "tools")


def prompt_chunks(question: str, modality: Modality = "image") -> list[str]:
    """The `llava_v1` inference prompt for one question, as the text between its visual blocks.

    Takes the user's question and the modality; returns one more chunk than the prompt has visual blocks (two
    for an image, nine for a video: the official inference joins the eight frame placeholders by spaces). The
    question sits whole in the last chunk, so text the user typed, `<image>` included, is never a visual slot.
    Raises ValueError for an unknown modality.
    """
    if modality == "image":
        blocks = 1
    elif modality == "video":
        blocks = NUM_FRAMES
    else:
        raise ValueError(f"unknown modality {modality!r}; expected 'image' or 'video'")
    return [f"{SYSTEM_PROMPT} USER: ", *[" "] * (blocks - 1), f"\n{question} ASSISTANT:"]


def build_prompt(question: str, modality: Modality = "image") -> str:
    """The `llava_v1` inference prompt as one string, an `<image>` placeholder at each visual block.

    For display and for fixed prompts: a user's question that itself contains `<image>` would be split there by
    `tokenize_prompt`, so user questions are tokenized as `tokenize_chunks(prompt_chunks(question, modality), ...)`
    instead. Raises ValueError for an unknown modality.
    """
    return IMAGE_PLACEHOLDER.join(prompt_chunks(question, modality))


def tokenize_chunks(chunks: Sequence[str], encode: Callable[[str], Sequence[int]], bos_id: int) -> list[int]:
    """The official `tokenizer_image_token` rule on a prompt already cut into its text chunks.

    Each chunk is encoded separately by `encode` (a SentencePiece encode without BOS/EOS, so the dummy-prefix
    space applies per chunk); only the first is preceded by BOS; one `IMAGE_TOKEN_INDEX` goes between
    consecutive chunks. Returns the ids, visual positions marked by `IMAGE_TOKEN_INDEX`.
    """
    ids = [bos_id]
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:  # the official code strips BOS from tokenizer(""), which leaves nothing
            ids.extend(encode(chunk))
    return ids


def tokenize_prompt(prompt: str, encode: Callable[[str], Sequence[int]], bos_id: int) -> list[int]:
    """Tokenize a prompt string the way the official `tokenizer_image_token` does: split at every `<image>`,
    then `tokenize_chunks`. For fixed prompts and training data, where `<image>` is structural; a user's question
    goes through `prompt_chunks` instead."""
    return tokenize_chunks(prompt.split(IMAGE_PLACEHOLDER), encode, bos_id)


@dataclass(frozen=True)
class SpliceRun:
    """One run of a spliced prompt: text ids to embed as tokens (`block` None), or the index of the visual block
    that takes the place of one `IMAGE_TOKEN_INDEX` (`ids` empty)."""

    ids: tuple[int, ...] = ()
    block: int | None = None


def splice_plan(input_ids: Sequence[int], num_blocks: int) -> list[SpliceRun]:
    """The splice both the model and the runtime follow: the ids cut into runs of text ids and visual blocks, in
    order, the i-th `IMAGE_TOKEN_INDEX` becoming block i (one [N, D] block per marker: one per image, eight per
    video). Consecutive text ids form one run. Raises ValueError when the markers and `num_blocks` differ (the
    caller paired a prompt with the wrong blocks: a bug, not a user's input).
    """
    markers = sum(1 for token in input_ids if token == IMAGE_TOKEN_INDEX)
    if markers != num_blocks:
        raise ValueError(f"the prompt has {markers} visual positions but {num_blocks} visual blocks were given")
    runs: list[SpliceRun] = []
    text: list[int] = []
    blocks = 0
    for token in input_ids:
        if token != IMAGE_TOKEN_INDEX:
            text.append(token)
            continue
        if text:
            runs.append(SpliceRun(ids=tuple(text)))
            text = []
        runs.append(SpliceRun(block=blocks))
        blocks += 1
    if text:
        runs.append(SpliceRun(ids=tuple(text)))
    return runs


def spliced_length(input_ids: Sequence[int], block_lengths: Sequence[int]) -> int:
    """How many LLM positions a spliced prompt fills: its text ids plus each visual block's length. Raises
    ValueError as `splice_plan` does."""
    return sum(len(run.ids) if run.block is None else block_lengths[run.block]
               for run in splice_plan(input_ids, len(block_lengths)))


# --- the vision graph ---------------------------------------------------------------------------------------

VISION_INPUTS = ("pixel_values", "landmarks")
VISION_OUTPUT = "visual_tokens"
Shape = tuple[int | None, ...]  # None: a dimension the contract leaves open


def vision_graph_io(modality: Modality, landmarks: bool) -> tuple[dict[str, Shape], dict[str, Shape]]:
    """The vision graph's contract for one modality, with or without the landmarks input.

    Returns ({input name: shape}, {output name: shape}), every tensor float32; None marks the dynamic batch and
    the LLM's hidden size D, which only the graph knows. Image: pixel_values [B,3,224,224], landmarks [B,68,2]
    -> visual_tokens [B,256,D]; video: [B,3,8,224,224], [B,8,68,2] -> [B,8,257,D]. Raises ValueError for an
    unknown modality.
    """
    if modality == "image":
        frames: tuple[int, ...] = ()
        tokens = IMAGE_TOKENS
    elif modality == "video":
        frames = (NUM_FRAMES,)
        tokens = VIDEO_FRAME_TOKENS
    else:
        raise ValueError(f"unknown modality {modality!r}; expected 'image' or 'video'")
    inputs: dict[str, Shape] = {"pixel_values": (None, 3, *frames, IMAGE_SIZE, IMAGE_SIZE)}
    if landmarks:
        inputs["landmarks"] = (None, *frames, NUM_LANDMARKS, 2)
    return inputs, {VISION_OUTPUT: (None, *frames, tokens, None)}


def visual_block_tokens(modality: Modality) -> int:
    """How many LLM positions one visual block takes: 256 for an image, 257 for one video frame."""
    return IMAGE_TOKENS if modality == "image" else VIDEO_FRAME_TOKENS


def video_frame_indices(num_video_frames: int) -> list[int]:
    """The official frame choice: `np.linspace(0, n - 1, 8, dtype=int)`, computed without numpy.

    Takes the number of decoded frames (at least 1); returns 8 indices, repeating frames of short videos the
    way the official processor does. Raises ValueError for a video without frames.
    """
    if num_video_frames < 1:
        raise ValueError("a video needs at least one frame")
    last = num_video_frames - 1
    # numpy's linspace is start + i * step with the end point set exactly; astype(int) truncates toward zero
    step = last / (NUM_FRAMES - 1)
    return [int(i * step) for i in range(NUM_FRAMES - 1)] + [last]


def region_slices() -> dict[str, slice]:
    """The nine FRLP regions as `{name: slice over the 68 points}`, in the official order."""
    return {name: slice(start, stop) for name, start, stop in LANDMARK_REGIONS}


def contract_summary() -> dict[str, Any]:
    """The contract's constants as plain data, written into every bundle manifest."""
    return {
        "template": "llava_v1",
        "system_prompt": SYSTEM_PROMPT,
        "image_token_index": IMAGE_TOKEN_INDEX,
        "image_tokens": IMAGE_TOKENS,
        "video_frame_tokens": VIDEO_FRAME_TOKENS,
        "num_frames": NUM_FRAMES,
        "image_size": IMAGE_SIZE,
        "face_crop_size": FACE_CROP_SIZE,
        "landmark_scale": LANDMARK_SCALE,
        "landmark_layout": "ibug68",
        "landmark_regions": [list(region) for region in LANDMARK_REGIONS],
        "clip_mean": list(CLIP_MEAN),
        "clip_std": list(CLIP_STD),
    }


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """The sha256 of a file, read in chunks so that multi-GB weights never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
