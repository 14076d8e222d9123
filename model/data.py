"""Training data in the official format, and the official `v1` conversation template and loss masking.

A data file is a JSON list of records, LLaVA style, with paths relative to the JSON file's folder:

    {"id": "0001", "image": "images/0001.jpg", "landmarks_2d": "landmarks/0001.npy",
     "conversations": [{"from": "human", "value": "<image>\\nHow old is this person?"},
                       {"from": "gpt", "value": "About 40 years old."}]}

`image` is a face crop (the official crop_face.py makes 256x256 ones), `video` a face video; `landmarks_2d` holds
68 iBUG points in crop pixels, (68, 2) for an image, (frames, 68, 2) for a video (one row per decoded frame).
Records without either medium are text-only. Records that cannot be used (a missing file, a conversation
without an answer, landmarks of the wrong shape, ...) are skipped and counted by reason.

The text follows the official training path exactly: the `v1` template (`conv_vicuna_v1`, whose system prompt
says "user" where the inference template says "human"), `<video>` replaced by eight `<image>` without spaces, the
chunked tokenization of `tokenizer_image_token`, `</s>` read as the EOS token, and the labels of
`preprocess_v1`, quirks included (see `supervised_labels`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from facellava import contract
from facellava.errors import FaceLlavaError
from facellava.model.modeling import IGNORE_INDEX, spliced_labels
from facellava.runtime.medium import LandmarksFileError, prepare_medium

# --- the official training template (conv_vicuna_v1) ----------------------------------------------------------

TRAIN_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"human": "USER", "gpt": "ASSISTANT"}
ROUND_END = "</s>"  # conv.sep2: closes every answer, and is read as the EOS token
ANSWER_CUE = " ASSISTANT: "  # conv.sep + roles[1] + ": ", where the masking splits a round
VIDEO_PLACEHOLDER = "<video>"

MediaKind = Literal["image", "video"]
VISUAL_BLOCKS = {"image": 1, "video": contract.NUM_FRAMES, None: 0}  # per record: one per image or video frame


def conversation_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """The `v1` training prompt of (role, message) turns, roles "human"/"gpt" alternating from "human":
    `{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`; an empty message leaves `ROLE:`."""
    text = TRAIN_SYSTEM_PROMPT + " "
    for i, (role, message) in enumerate(turns):
        if message:
            text += f"{ROLES[role]}: {message}" + (" " if i % 2 == 0 else ROUND_END)
        else:
            text += f"{ROLES[role]}:"
    return text


class ConversationTokenizer:
    """SentencePiece as the official (slow, legacy) LlamaTokenizer applies it to training text.

    `</s>` in the text is the EOS token; the text on each side of it is encoded on its own, with SentencePiece's
    dummy prefix, as the legacy slow tokenizer of transformers 4.31 does. Prompts with `<image>` are chunked as
    `tokenizer_image_token` does (`contract.tokenize_prompt`).
    """

    def __init__(self, processor: Any, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0):
        self.processor = processor
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id  # the official v1 training pads with unk (id 0)

    def encode_text(self, text: str) -> list[int]:
        """Ids of text without BOS; every `</s>` becomes EOS."""
        ids: list[int] = []
        for i, piece in enumerate(text.split(ROUND_END)):
            if i:
                ids.append(self.eos_id)
            if piece:
                ids.extend(self.processor.encode(piece))
        return ids

    def tokenize(self, prompt: str) -> list[int]:
        """`tokenizer_image_token`: BOS, the chunks between `<image>`s encoded separately, IMAGE_TOKEN_INDEX between."""
        return contract.tokenize_prompt(prompt, self.encode_text, self.bos_id)


def supervised_labels(prompt: str, input_ids: Sequence[int], tokenizer: ConversationTokenizer) -> list[int]:
    """The labels `preprocess_v1` gives a tokenized `v1` prompt: the answers and their `</s>` are learned,
    everything else is IGNORE_INDEX. Returns all IGNORE_INDEX when the official check finds a mismatch.

    The official arithmetic, kept as it is: the prompt is split into rounds at `</s>`; each round's length is
    that of the round tokenized alone, whose BOS stands in for the round's `</s>`; the instruction (the round up
    to and including " ASSISTANT: ") is masked over its tokenized length minus 2 (its own BOS, and the "▁" that
    the trailing space becomes alone but that merges into the answer's first token in the whole prompt). The
    first position (BOS) is masked, as is everything after the last round. A round whose text has no, or more
    than one, " ASSISTANT: " ends the walk; if the walk's length differs from the number of non-pad ids, the
    whole sample is masked (the official "tokenization mismatch ... (ignored)").
    """
    labels = list(input_ids)
    total = sum(1 for token in input_ids if token != tokenizer.pad_id)

    def mask(start: int, stop: int) -> None:
        for i in range(max(start, 0), min(stop, len(labels))):
            labels[i] = IGNORE_INDEX

    cursor = 1
    mask(0, cursor)
    for round_text in prompt.split(ROUND_END):
        if round_text == "":
            break
        parts = round_text.split(ANSWER_CUE)
        if len(parts) != 2:
            break
        instruction = parts[0] + ANSWER_CUE
        round_length = len(tokenizer.tokenize(round_text))
        instruction_length = len(tokenizer.tokenize(instruction)) - 2
        mask(cursor, cursor + instruction_length)
        cursor += round_length
    mask(cursor, len(labels))
    if cursor != total:
        return [IGNORE_INDEX] * len(labels)
    return labels


# --- records ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One usable record, tokenized and labelled; media and landmarks are read when the record is used."""

    index: int  # position in the data file
    kind: MediaKind | None  # None: text only
    media: Path | None
    landmarks: Path | None
    input_ids: tuple[int, ...]  # with IMAGE_TOKEN_INDEX markers
    labels: tuple[int, ...]


@dataclass
class Example:
    """A record read from disk: what the model trains on."""

    record: Record
    pixel_values: torch.Tensor | None  # [3, 224, 224] or [3, 8, 224, 224]
    landmarks: torch.Tensor | None  # [68, 2] or [8, 68, 2], crop pixels / LANDMARK_SCALE


class UnusableRecord(Exception):
    """A record that cannot be used; the message is the reason it is counted under."""


def _turns(record: dict[str, Any]) -> list[tuple[str, str]]:
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise UnusableRecord("no conversations list")
    turns = []
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise UnusableRecord("a turn is not {'from': 'human'|'gpt', 'value': text}")
        turns.append((turn["from"], turn["value"]))
    if turns[0][0] != "human":  # the official code drops a leading assistant turn
        turns = turns[1:]
    if any(role != ("human", "gpt")[i % 2] for i, (role, _) in enumerate(turns)):
        raise UnusableRecord("conversation turns do not alternate human/gpt")
    if not any(role == "gpt" and value.strip() for role, value in turns):
        raise UnusableRecord("conversation without an answer")
    # a <video> is eight <image>s, written without spaces, in every turn (the official preprocess_multimodal)
    placeholder = contract.IMAGE_PLACEHOLDER
    return [(role, value.replace(VIDEO_PLACEHOLDER, placeholder * contract.NUM_FRAMES)) for role, value in turns]


def _medium(record: dict[str, Any], folder: Path) -> tuple[MediaKind | None, Path | None]:
    kinds = [kind for kind in ("image", "video") if kind in record]
    if len(kinds) == 2:
        raise UnusableRecord("both an image and a video (not supported)")
    if not kinds:
        return None, None
    kind = kinds[0]
    value = record[kind]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise UnusableRecord(f"'{kind}' is not one path")
    path = folder / value
    if not path.is_file():
        raise UnusableRecord(f"missing {kind} file")
    return kind, path


def _landmarks_path(record: dict[str, Any], folder: Path, kind: MediaKind | None) -> Path | None:
    value = record.get("landmarks_2d")
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if kind is None or not isinstance(value, str):
        raise UnusableRecord("landmarks_2d without an image or video, or not one path")
    path = folder / value
    if not path.is_file():
        raise UnusableRecord("missing landmarks file")
    try:
        shape = np.load(path, mmap_mode="r").shape  # reads the header only
    except (ValueError, OSError):
        raise UnusableRecord("landmarks file is not a .npy array") from None
    points = (contract.NUM_LANDMARKS, 2)
    good = shape in (points, (contract.LANDMARK_VALUES,)) if kind == "image" else \
        (len(shape) == 3 and shape[1:] == points and shape[0] >= 1)
    if not good:
        raise UnusableRecord("landmarks of the wrong shape")
    return path


def read_record(record: Any, index: int, folder: Path, tokenizer: ConversationTokenizer,
                max_length: int | None) -> Record:
    """Check one JSON record and tokenize it. Raises UnusableRecord with the reason it cannot be used."""
    if not isinstance(record, dict):
        raise UnusableRecord("not a JSON object")
    turns = _turns(record)
    kind, media = _medium(record, folder)
    landmarks = _landmarks_path(record, folder, kind)
    prompt = conversation_prompt(turns)
    input_ids = tokenizer.tokenize(prompt)
    blocks = VISUAL_BLOCKS[kind]
    if sum(1 for token in input_ids if token == contract.IMAGE_TOKEN_INDEX) != blocks:
        raise UnusableRecord(f"placeholder count does not match the medium ({blocks} <image>, or one <video>)")
    labels = supervised_labels(prompt, input_ids, tokenizer)
    block_tokens = contract.visual_block_tokens(kind or "image")
    spliced = spliced_labels(input_ids, labels, [block_tokens] * blocks)[:max_length]
    if all(label == IGNORE_INDEX for label in spliced[1:]):
        if any(label != IGNORE_INDEX for label in labels):
            raise UnusableRecord("no answer token within the maximum length")
        raise UnusableRecord("tokenization mismatch (the official masking ignores the sample)")
    return Record(index=index, kind=kind, media=media, landmarks=landmarks, input_ids=tuple(input_ids),
                  labels=tuple(labels))


class ConversationDataset:
    """The usable records of a data file, and the count of the others by reason."""

    def __init__(self, path: Path, records: list[Record], total: int, skipped: Counter[str]):
        self.path = path
        self.records = records
        self.total = total
        self.skipped = skipped

    @classmethod
    def load(cls, path: str | Path, tokenizer: ConversationTokenizer, max_length: int | None = None
             ) -> ConversationDataset:
        """Read, check and tokenize a data file. Raises FaceLlavaError when it cannot be read or no record is usable."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FaceLlavaError(f"data file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FaceLlavaError(f"data file {path} is not valid JSON ({error})") from None
        if not isinstance(raw, list):
            raise FaceLlavaError(f"data file {path} must hold a JSON list of records")
        records, skipped = [], Counter()
        for index, item in enumerate(raw):
            try:
                records.append(read_record(item, index, path.parent, tokenizer, max_length))
            except UnusableRecord as reason:
                skipped[str(reason)] += 1
        dataset = cls(path, records, len(raw), skipped)
        if not records:
            raise FaceLlavaError(f"no usable training record in {path}: {dataset.skipped_summary()}")
        return dataset

    def __len__(self) -> int:
        return len(self.records)

    def skipped_summary(self) -> str:
        """'skipped 3 of 30 records: 2 missing image file, 1 conversation without an answer' (or 'none skipped')."""
        if not self.skipped:
            return f"none of {self.total} records skipped"
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
        return f"skipped {sum(self.skipped.values())} of {self.total} records: {reasons}"

    def load_example(self, record: Record) -> Example:
        """Read a record's medium and landmarks through the runtime's one input path (`prepare_medium`, the
        medium taken as the face crop it is: `expand2square` for an image, as the official training does, and
        landmarks not moved, as in the official code; a video's official 8 frames and their landmark rows).
        Raises UnusableRecord when a file turns out unreadable."""
        if record.kind is None:
            return Example(record, None, None)
        try:
            medium = prepare_medium(None, **{record.kind: record.media}, landmarks=record.landmarks,
                                    no_landmarks=record.landmarks is None, name=str(record.media))
        except LandmarksFileError as error:
            # counted by reason: the message without the file's name ("holds NaN or infinite values; ...")
            reason = str(error).replace(str(record.landmarks), "").strip(" :")
            raise UnusableRecord(f"landmarks file that cannot be used ({reason})") from None
        except FaceLlavaError:
            raise UnusableRecord(f"{record.kind} file that cannot be decoded") from None
        landmarks = None if medium.landmarks is None else torch.from_numpy(medium.landmarks)
        return Example(record, torch.from_numpy(medium.pixel_values), landmarks)
