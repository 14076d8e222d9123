"""A Face-LLaVA conversation on llama.cpp: the prompt built by the contract, visual blocks injected as
embeddings, the system-prompt prefix kept in the KV cache across questions, sampling through llama.cpp's own
samplers, and streaming that never cuts a UTF-8 character in two.
"""

from __future__ import annotations

import codecs
import ctypes
import math
import numbers
import operator
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from facellava import contract
from facellava.errors import FaceLlavaError
from facellava.runtime.llm import LlamaModel

# llama.cpp takes seeds as uint32 and reads 0xFFFFFFFF (LLAMA_DEFAULT_SEED) as "pick a random seed", so the
# largest reproducible seed is one less; top-k is an int32 there
SEED_MAX = 0xFFFFFFFE
TOP_K_MAX = 2**31 - 1


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FaceLlavaError(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise FaceLlavaError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # ints and numpy integers; 1.0 or "3" are refused
    except TypeError:
        raise FaceLlavaError(f"{name} must be an integer, got {value!r}") from None


def check_max_tokens(max_tokens: object) -> int:
    """`max_tokens` as an int. Raises FaceLlavaError unless it is an integer of at least 1."""
    value = _integer("max_tokens", max_tokens)
    if value < 1:
        raise FaceLlavaError(f"max_tokens must be at least 1, got {value}")
    return value


def check_question(question: object) -> str:
    """The question, checked to be text llama.cpp can tokenize. Raises FaceLlavaError for one that is not a str,
    is empty, or is not valid Unicode: lone surrogates, which is how Python hands over command-line bytes that
    are not UTF-8 (surrogateescape), cannot be encoded as UTF-8."""
    if not isinstance(question, str):
        raise FaceLlavaError(f"the question must be text (str), got {type(question).__name__}")
    if not question.strip():
        raise FaceLlavaError("the question is empty")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(question[error.start])
        what = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise FaceLlavaError(f"the question is not valid UTF-8 text ({what} at character {error.start}); give it "
                             "as UTF-8") from None
    return question


@dataclass
class Sampling:
    """Greedy by default; a temperature above 0 samples with top-k (0: off), top-p (1: off) and a seed.

    The values are checked when it is made, the one check for the Python API and the CLI alike: temperature
    finite and >= 0, top-p in (0, 1], top-k from 0 to 2**31 - 1, seed from 0 to SEED_MAX. Raises FaceLlavaError
    for any other value (a NaN temperature would otherwise reach llama.cpp and sample from garbage).
    `grammar` (GBNF text, root rule `root`; see `facellava.runtime.structured`) constrains every token first.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    grammar: str | None = None

    def __post_init__(self) -> None:
        self.temperature = _real("temperature", self.temperature)
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise FaceLlavaError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        self.top_p = _real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:  # also refuses NaN
            raise FaceLlavaError(f"top_p must be above 0 and at most 1 (1: off), got {self.top_p}")
        self.top_k = _integer("top_k", self.top_k)
        if not 0 <= self.top_k <= TOP_K_MAX:
            raise FaceLlavaError(f"top_k must be from 0 (off) to {TOP_K_MAX}, got {self.top_k}")
        self.seed = _integer("seed", self.seed)
        if not 0 <= self.seed <= SEED_MAX:
            raise FaceLlavaError(f"seed must be from 0 to {SEED_MAX} (llama.cpp's seeds are 32-bit), got {self.seed}")

        if self.grammar is not None and not isinstance(self.grammar, str):
            raise FaceLlavaError(f"grammar must be GBNF text, got {type(self.grammar).__name__}")

    def sampler_chain(self, vocab: llama_cpp.llama_vocab_p | None = None) -> ctypes.c_void_p:
        """The llama.cpp sampler chain (the one place it is built): the grammar first when there is one (it needs
        the model's `vocab`), then greedy, or top-k, top-p, temperature and the seeded draw. The caller frees it
        (`llama_sampler_free`). Raises FaceLlavaError when llama.cpp cannot parse the grammar."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if self.grammar is not None:
            if vocab is None:
                raise ValueError("a grammar needs the model's vocab")
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, self.grammar.encode("utf-8"), b"root")
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise FaceLlavaError("llama.cpp cannot parse the grammar (see its log); check the JSON schema")
            llama_cpp.llama_sampler_chain_add(chain, grammar)
        if self.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if self.top_k > 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(self.top_k))
        if self.top_p < 1:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(self.top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(self.temperature))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(self.seed))
        return chain


@dataclass
class Generation:
    """What one answer produced: its text and tokens, why it stopped, and how long the LLM took."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "eos", "stop" (a stop string) or "length" (max_tokens)
    prompt_positions: int = 0  # positions the prompt took (text tokens + visual tokens)
    reused_prefix: int = 0  # of which were already in the KV cache
    prefill_ms: float = 0.0  # from the first prompt position to the first sampled token: time to first token
    decode_ms: float = 0.0  # the rest of the tokens

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1  # the first token comes out of the prefill
        return steps / (self.decode_ms / 1000) if steps > 0 and self.decode_ms > 0 else 0.0


class ChatSession:
    """The `llava_v1` conversation on one LlamaModel. Each `ask` is one USER turn about one image or video;
    the system prompt's tokens are decoded once and reused from the KV cache by every later question, and so is
    the prompt up to the end of the last visual block while the questions are about the same medium (a `medium`
    key given to `stream`): only the new question is then prefilled."""

    def __init__(self, llm: LlamaModel, stop: Sequence[str] = (contract.STOP_STRING,)):
        self.llm = llm
        self.stop = tuple(s for s in stop if s)
        # the text before the first visual block is the same for every question
        self.prefix_ids = contract.tokenize_chunks(contract.prompt_chunks("", "image")[:1], llm.tokenize, llm.bos_id)
        self._prefix_cached = False
        self._prefix_resets = 0  # llm.resets when the prefix was decoded: a later reset() of the LLM drops it
        # (medium key, modality, KV positions up to the end of its last visual block, llm.resets) while cached
        self._medium: tuple[str, str, int, int] | None = None

    def has_medium(self, medium: str | None, modality: contract.Modality) -> bool:
        """Whether the KV cache holds the prompt up to the visual block of `medium` (so `stream` needs no blocks).
        The session owns the cache: code decoding on `llm` directly must call `forget_medium()` (a `reset()` of the
        LLM is noticed)."""
        return (medium is not None and self._medium is not None and self._medium[:2] == (medium, modality)
                and self._medium[3] == self.llm.resets and self.llm.n_past >= self._medium[2])

    def forget_medium(self) -> None:
        """Drop the cached visual block: the next question prefills its medium again (the system prompt stays)."""
        self._medium = None

    def prompt_ids(self, question: str, modality: contract.Modality) -> list[int]:
        """The prompt's ids under the official chunked rule, visual blocks marked by IMAGE_TOKEN_INDEX; the
        question is text (an `<image>` in it is no visual slot)."""
        return contract.tokenize_chunks(contract.prompt_chunks(question, modality), self.llm.tokenize,
                                        self.llm.bos_id)

    def stream(self, question: str, modality: contract.Modality, visual_blocks: Sequence[np.ndarray] | None,
               max_tokens: int = 256, sampling: Sampling | None = None, result: Generation | None = None,
               medium: str | None = None) -> Iterator[str]:
        """Yield the answer's text piece by piece; `result` (when given) is filled in as it goes.

        `medium` is a key of the image or video (the same key for the same pixels and landmarks, e.g.
        `pipeline.medium_key`): the KV cache of the prompt up to its last visual block is kept, and the next
        question with the same key and modality prefills only its own text; `visual_blocks` may then be None.
        A different key replaces it. Reuse gives the same tokens as a fresh prefill.
        Raises FaceLlavaError for a question that is empty or not valid text, `max_tokens` below 1, or a prompt
        that does not fit the context.
        """
        check_question(question)
        max_tokens = check_max_tokens(max_tokens)
        result = result if result is not None else Generation()
        ids = self.prompt_ids(question, modality)
        if ids[:len(self.prefix_ids)] != self.prefix_ids:
            raise RuntimeError("the prompt does not start with the cached system prefix")
        # everything up to the end of the last visual block is the same for every question about one medium
        split = len(ids) - ids[::-1].index(contract.IMAGE_TOKEN_INDEX)
        head, tail = ids[len(self.prefix_ids):split], ids[split:]
        reuse = self.has_medium(medium, modality)
        if reuse:
            assert self._medium is not None
            result.prompt_positions = self._medium[2] + len(tail)
        else:
            if visual_blocks is None:
                raise ValueError("visual_blocks are needed: the KV cache does not hold this medium")
            result.prompt_positions = contract.spliced_length(ids, [len(block) for block in visual_blocks])
        if result.prompt_positions + 1 > self.llm.n_ctx:
            raise FaceLlavaError(f"the prompt takes {result.prompt_positions} positions and the context holds "
                                 f"{self.llm.n_ctx}; shorten the question or open the LLM with a larger context")

        start = time.perf_counter()
        if reuse:
            assert self._medium is not None
            self.llm.rewind(self._medium[2])
            result.reused_prefix = self._medium[2]
        else:
            self._medium = None  # until the new block is fully in the cache
            if self._prefix_cached and self._prefix_resets == self.llm.resets:
                self.llm.rewind(len(self.prefix_ids))
                result.reused_prefix = len(self.prefix_ids)
            else:
                self.llm.reset()
                self.llm.eval_tokens(self.prefix_ids)
                self._prefix_cached, self._prefix_resets = True, self.llm.resets
            self.llm.eval_prompt(head, visual_blocks)
            if medium is not None:
                self._medium = (medium, modality, self.llm.n_past, self.llm.resets)
        self.llm.eval_tokens(tail)
        yield from self._decode(result, max_tokens, sampling or Sampling(), start)

    def _decode(self, result: Generation, max_tokens: int, sampling: Sampling, start: float) -> Iterator[str]:
        chain = sampling.sampler_chain(self.llm.vocab)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""  # decoded text held back while it could be the start of a stop string
        first = True
        leading = True  # the answer's first character may be SentencePiece's dummy-prefix space
        try:
            while True:
                token = llama_cpp.llama_sampler_sample(chain, self.llm.context, -1)
                now = time.perf_counter()
                if first:
                    result.prefill_ms = (now - start) * 1000
                    decode_start = now
                if llama_cpp.llama_vocab_is_eog(self.llm.vocab, token):
                    result.finish_reason = "eos"
                    break
                result.tokens.append(token)
                piece = decoder.decode(self.llm.token_piece(token))
                first = False
                if leading and piece:
                    piece, leading = piece.removeprefix(" "), False
                pending += piece
                emitted, pending, stopped = self._split_stop(pending)
                if emitted:
                    result.text += emitted
                    yield emitted
                if stopped:
                    result.finish_reason = "stop"
                    break
                if len(result.tokens) >= max_tokens:
                    result.finish_reason = "length"
                    break
                if self.llm.n_past + 1 > self.llm.n_ctx:
                    result.finish_reason = "length"
                    break
                self.llm.eval_tokens([token])
            if result.finish_reason != "stop":
                tail = pending + decoder.decode(b"", final=True)
                if tail:
                    result.text += tail
                    yield tail
        finally:
            llama_cpp.llama_sampler_free(chain)
            if not first:
                result.decode_ms = (time.perf_counter() - decode_start) * 1000

    def _split_stop(self, pending: str) -> tuple[str, str, bool]:
        """(text safe to emit, text to hold back, whether a stop string was reached)."""
        for stop in self.stop:
            index = pending.find(stop)
            if index >= 0:
                return pending[:index], "", True
        hold = 0
        for stop in self.stop:  # the longest tail of pending that begins a stop string
            for size in range(min(len(stop) - 1, len(pending)), 0, -1):
                if stop.startswith(pending[-size:]):
                    hold = max(hold, size)
                    break
        return pending[:len(pending) - hold], pending[len(pending) - hold:], False
