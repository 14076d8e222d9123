"""The whole answer: photo or video -> face crop + landmarks -> preprocessing -> vision -> LLM, timed per stage.

```python
pipeline = Pipeline.open("bundle", vision="auto", llm="q4_k_m", n_gpu_layers=-1)
answer = pipeline.ask("What emotion is shown in the video?", video="clip.mp4")
print(answer.text, answer.timings)
for piece in pipeline.ask("How old is this person?", image="face.jpg", stream=True):
    print(piece, end="", flush=True)
```
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from facellava import contract
from facellava.bundle import Bundle
from facellava.errors import FaceLlavaError
from facellava.runtime import face
from facellava.runtime.medium import prepare_medium
from facellava.runtime.ort_providers import DEVICES
from facellava.runtime.session import ChatSession, Generation, Sampling, check_max_tokens, check_question
from facellava.runtime.vision import VisionBackend, open_vision

# the most precise type present is the default: the one whose answers match the reference best
LLM_PREFERENCE = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0", "iq4_xs", "q3_k_s",
                  "q2_k")


@dataclass
class Timings:
    """Milliseconds per stage of one answer, and the LLM's speed."""

    face_detection_ms: float = 0.0
    landmarks_ms: float = 0.0
    preprocessing_ms: float = 0.0
    vision_ms: float = 0.0
    time_to_first_token_ms: float = 0.0  # prefill: the prompt (text and visual tokens) to the first token
    decode_tokens_per_s: float = 0.0
    total_ms: float = 0.0

    def line(self) -> str:
        return (f"face {self.face_detection_ms:.1f} ms | landmarks {self.landmarks_ms:.1f} ms | preprocessing "
                f"{self.preprocessing_ms:.1f} ms | vision {self.vision_ms:.1f} ms | time to first token "
                f"{self.time_to_first_token_ms:.1f} ms | decode {self.decode_tokens_per_s:.1f} tokens/s | "
                f"total {self.total_ms:.1f} ms")


@dataclass
class Answer:
    text: str
    tokens: list[int]
    finish_reason: str
    modality: str
    landmarks: str  # where the landmarks came from: "face mesh", "file", "none", "none (face mesh found none)"
    prompt_positions: int
    reused_prefix_positions: int  # of the prompt's positions, those already in the KV cache (system prompt, medium)
    timings: Timings = field(default_factory=Timings)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class AnswerStream:
    """Iterate for the answer's text pieces as they are generated; `answer` is complete once exhausted."""

    def __init__(self, pieces: Iterator[str], finish: Any):
        self._pieces = pieces
        self._finish = finish
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._pieces
        self.answer = self._finish()


@dataclass
class PreparedInput:
    modality: contract.Modality
    pixel_values: np.ndarray  # [1,3,224,224] or [1,3,8,224,224]
    landmarks: np.ndarray | None  # [1,68,2] or [1,8,68,2]
    landmarks_source: str
    timings: Timings


def source_key(image: object, video: object, landmarks: object, options: tuple) -> str | None:
    """A sha256 of what `prepare` reads (file bytes or arrays) and its options, or None when a file is unreadable
    (`prepare` then says why)."""
    digest = hashlib.sha256(repr(options).encode())
    for value in (image, video, landmarks):
        if value is None:
            digest.update(b"none")
        elif isinstance(value, np.ndarray):
            digest.update(f"array{value.dtype}{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).data)
        else:
            try:
                path = Path(value)
                if not path.is_file():  # a device or pipe is never read here
                    return None
                digest.update(b"file" + path.read_bytes())
            except (OSError, TypeError, ValueError):
                return None
    return digest.hexdigest()


def medium_key(prepared: PreparedInput) -> str:
    """A key of what the vision graph sees: the modality, the preprocessed pixels and the landmarks (sha256)."""
    digest = hashlib.sha256(prepared.modality.encode())
    for array in (prepared.pixel_values, prepared.landmarks):
        if array is None:
            digest.update(b"none")
        else:
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.data)
    return digest.hexdigest()


class Pipeline:
    """A bundle opened for answering: the vision backend, the LLM session and the face front end."""

    def __init__(self, bundle: Bundle, vision: VisionBackend, session: ChatSession,
                 min_face: int = face.MIN_FACE_SIDE, front_end: str = "auto", device: str = "auto"):
        self.bundle = bundle
        self.device = device
        self.vision = vision
        self.session = session
        self.min_face = min_face
        self.front_end_choice = front_end
        self._front_end: face.FaceFrontEnd | None = None
        # (source key, its prepared input, its medium key) of the last ask: reused while that medium is cached
        self._last_prepared: tuple[str, PreparedInput, str] | None = None

    @classmethod
    def open(cls, bundle: str | Path, vision: str = "auto", llm: str | None = None, n_gpu_layers: int = 0,
             n_ctx: int = 4096, vision_precision: str = "fp32", kv_type: str = "f16", flash_attn: bool | None = None,
             n_threads: int | None = None, n_threads_batch: int | None = None, poll: int | None = None,
             verbose: bool = False, checkpoint: str | Path | None = None, image_tower: str | Path | None = None,
             video_tower: str | Path | None = None, min_face: int = face.MIN_FACE_SIDE,
             front_end: str = "auto", device: str = "auto") -> Pipeline:
        """Open a bundle: verify its manifest and the files used, pick the vision backend (`auto`,
        `onnxruntime`, `tensorrt`, `torch`) and the GGUF type (`llm`; default: the most precise present), load the
        LLM with `n_gpu_layers` offloaded. `kv_type` "f32" and `flash_attn` False make llama.cpp's attention as
        exact as the export's parity measurement (llama.cpp's defaults, F16 cache and automatic flash attention,
        are faster). `n_threads`, `n_threads_batch` and `poll` are llama.cpp's CPU thread policy
        (`LlamaModel.open`). `checkpoint` (and optional tower directories) is the PyTorch checkpoint the bundle was
        exported from, for vision="torch" only. `min_face` is the smallest face the front end searches for, in
        pixels (searching down to 20 costs tiles of the image; a larger value is faster). `front_end` picks the
        face front end's backend (`FaceFrontEnd.from_bundle`): "auto" runs the bundle's front-end graphs on ONNX
        Runtime (the vision graph's provider choice) when it has them, else MediaPipe; "graphs" or "mediapipe"
        insist. `device` is ONNX Runtime's for the ONNX graphs, vision and front end (`execution_providers`: auto,
        cpu, cuda, tensorrt). Raises FaceLlavaError for a bundle that is missing, altered, or lacks what was asked
        for."""
        from facellava.runtime.llm import LlamaModel

        if min_face < 1:
            raise FaceLlavaError(f"min_face must be at least 1 pixel, got {min_face}")
        if front_end not in face.FRONT_ENDS:
            raise FaceLlavaError(f"unknown front end {front_end!r}; choose from {', '.join(face.FRONT_ENDS)}")
        if device not in DEVICES:
            raise FaceLlavaError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
        opened = Bundle.open(bundle)
        if front_end == "graphs" and not face.has_front_end_graphs(opened):
            raise FaceLlavaError(f"{opened.path} has no front-end graphs; add them with `facellava export "
                                 "front-end --bundle DIR`, or use --front-end mediapipe")
        types = {opened.files[name].get("type"): name for name in opened.find("llm")}
        if not types:
            raise FaceLlavaError(f"{opened.path} has no GGUF; export one with `facellava export llm`")
        if llm is None:
            llm = next((t for t in LLM_PREFERENCE if t in types), sorted(types)[0])
        if llm not in types:
            raise FaceLlavaError(f"{opened.path} has no {llm} GGUF (it has: {', '.join(sorted(types))})")
        backend = open_vision(opened, vision, vision_precision, checkpoint, image_tower, video_tower, device)
        model = LlamaModel.open(opened.path_of(types[llm]), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                                kv_type=kv_type, flash_attn=flash_attn, n_threads=n_threads,
                                n_threads_batch=n_threads_batch, poll=poll, verbose=verbose)
        return cls(opened, backend, ChatSession(model), min_face, front_end, device)

    @property
    def front_end(self) -> face.FaceFrontEnd:
        if self._front_end is None:
            # the front end follows the vision backend: its TensorRT engines (else ONNX Runtime) beside TensorRT
            # vision, ONNX Runtime's best provider beside ONNX Runtime vision, the CPU beside the torch reference
            device = {"tensorrt": "auto", "onnxruntime": "onnxruntime"}.get(self.vision.name, "cpu")
            self._front_end = face.FaceFrontEnd.from_bundle(self.bundle, self.front_end_choice, device, self.device,
                                                            min_face_side=self.min_face)
        return self._front_end

    def prepare(self, image: str | Path | np.ndarray | None = None, video: str | Path | None = None,
                landmarks: str | Path | np.ndarray | None = None, no_landmarks: bool = False,
                no_face_crop: bool = False, face_index: int | None = None) -> PreparedInput:
        """Face crop, landmarks and preprocessing of one image or video, timed (`medium.prepare_medium`)."""
        prepared = prepare_medium(self.front_end, image, video, landmarks, no_landmarks, no_face_crop, face_index)
        timings = Timings(face_detection_ms=prepared.detect_ms, landmarks_ms=prepared.landmarks_ms,
                          preprocessing_ms=prepared.preprocessing_ms)
        points = None if prepared.landmarks is None else prepared.landmarks[None]
        return PreparedInput(prepared.modality, prepared.pixel_values[None], points, prepared.landmarks_source,
                             timings)

    def ask(self, question: str, image: str | Path | np.ndarray | None = None, video: str | Path | None = None,
            landmarks: str | Path | np.ndarray | None = None, no_landmarks: bool = False,
            no_face_crop: bool = False, face_index: int | None = None, max_tokens: int = 256,
            temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
            stream: bool = False, grammar: str | None = None) -> Answer | AnswerStream:
        """Answer a question about one image (a path or an RGB array) or one video (a path).

        `landmarks` is an official-format .npy (or an array already divided by 256); `no_landmarks` runs the
        model without FRLP/FRGCA. Greedy unless `temperature` > 0. Returns the Answer, or with `stream` an
        AnswerStream yielding text pieces whose `answer` is set at the end. Raises FaceLlavaError for bad input:
        a question that is empty or not valid text, a sampling value out of range (`Sampling`), `max_tokens` < 1.
        `grammar` (GBNF, e.g. `structured.TASKS["age"].grammar`) constrains the answer. A question about the same
        pixels and landmarks as the previous one skips the vision graph and reuses the KV cache up to the visual
        block (`medium_key`); the same file (or array) with the same options also skips the face front end and
        preprocessing. `session.forget_medium()` turns both off for the next question.
        """
        # checked before the face front end and the vision graph run, so a bad value costs nothing
        check_question(question)
        max_tokens = check_max_tokens(max_tokens)
        sampling = Sampling(temperature, top_p, top_k, seed, grammar)
        start = time.perf_counter()
        source = source_key(image, video, landmarks, (no_landmarks, no_face_crop, face_index))
        cached = self._last_prepared
        if source is not None and cached is not None and cached[0] == source and self.session.has_medium(
                cached[2], cached[1].modality):
            # the same file and options as the medium in the KV cache: its crop, landmarks and pixels are known
            prepared = replace(cached[1], timings=Timings())
        else:
            prepared = self.prepare(image, video, landmarks, no_landmarks, no_face_crop, face_index)
        medium = medium_key(prepared)
        self._last_prepared = None if source is None else (source, replace(prepared, timings=Timings()), medium)
        blocks = None
        if not self.session.has_medium(medium, prepared.modality):
            tokens, prepared.timings.vision_ms = self.vision.encode_timed(prepared.modality, prepared.pixel_values,
                                                                          prepared.landmarks)
            blocks = list(tokens[0]) if prepared.modality == "video" else [tokens[0]]
            if blocks[0].shape[-1] != self.session.llm.n_embd:
                raise FaceLlavaError(f"the vision graph gives {blocks[0].shape[-1]}-wide tokens but the LLM takes "
                                     f"{self.session.llm.n_embd}: the bundle mixes two models; export it again")
        generation = Generation()
        pieces = self.session.stream(question, prepared.modality, blocks, max_tokens, sampling, generation, medium)

        def finish() -> Answer:
            timings = prepared.timings
            timings.time_to_first_token_ms = generation.prefill_ms
            timings.decode_tokens_per_s = generation.decode_tokens_per_s
            timings.total_ms = (time.perf_counter() - start) * 1000
            return Answer(generation.text, generation.tokens, generation.finish_reason, prepared.modality,
                          prepared.landmarks_source, generation.prompt_positions, generation.reused_prefix, timings)

        if stream:
            return AnswerStream(pieces, finish)
        for _ in pieces:
            pass
        return finish()

    def close(self) -> None:
        if self._front_end is not None:
            self._front_end.close()
        self.session.llm.close()
