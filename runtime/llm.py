"""The LLM half of the runtime: a GGUF in llama.cpp, fed token ids or visual-token embeddings.

A small layer over llama-cpp-python's low-level API (numpy and llama_cpp only; never torch): open a GGUF, tokenize
text chunks with the GGUF's own SentencePiece vocabulary, and decode batches of token ids or of embeddings at
consecutive positions, getting the logits back. Visual tokens enter as llama.cpp batches that carry `embd`
instead of token ids, which is how the vision graph's output is spliced into the prompt.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import llama_cpp
import numpy as np

from facellava import contract
from facellava.errors import FaceLlavaError

# --- llama.cpp's log ----------------------------------------------------------------------------------------

_GGML_LOG_LEVEL_WARN = 3
_recent_log: collections.deque[str] = collections.deque(maxlen=64)
_verbose = False
_held: list[str] | None = None  # while a file loads, what would go to stderr waits here (see `_holding_log`)


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace")
    _recent_log.append(message)
    if _verbose or (level >= _GGML_LOG_LEVEL_WARN and level != 5):  # 5: continuation of the previous line
        if _held is not None:
            _held.append(message)
        else:
            sys.stderr.write(message)


@contextlib.contextmanager
def _holding_log() -> Iterator[list[str]]:
    """Hold back llama.cpp's stderr output while it loads a file, and write it out afterwards. A caller that
    fails clears the list: its FaceLlavaError quotes the last lines (`recent_log`), so the user reads one line
    instead of llama.cpp's errors followed by the same errors again."""
    global _held
    _held = held = []
    try:
        yield held
    finally:
        _held = None
        sys.stderr.write("".join(held))


_backend_ready = False


def init_llama_backend(verbose: bool = False) -> None:
    """Initialise llama.cpp once per process and route its log: warnings and errors to stderr, everything when
    `verbose`. The last lines stay available to error messages through `recent_log`."""
    global _backend_ready, _verbose
    _verbose = verbose
    if not _backend_ready:
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


def recent_log(lines: int = 3) -> str:
    """The last `lines` non-empty lines llama.cpp logged, joined by ' / ' (for one-line error messages)."""
    text = [line.strip() for line in "".join(_recent_log).splitlines() if line.strip()]
    return " / ".join(text[-lines:]) or "no message from llama.cpp"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}

# --- llama.cpp's CPU thread pool ----------------------------------------------------------------------------

# The CPU thread policy, measured by benchmarks/decode_contention.py on a 7B-wide Q4_K_M (2 cores, each figure
# against all cores / poll 50 / nice 0 alone; "busy": beside one busy process at normal priority):
#   all cores, poll 50 (ggml's default)   decode alone 1.00, busy 0.37   prefill alone 1.00, busy 0.62
#   all cores, poll 0                      decode alone 1.16, busy 0.44   prefill alone 1.15, busy 0.62
#   one core fewer, poll 0                 decode alone 0.63, busy 0.61   prefill alone 0.47, busy 0.58
#   all cores, poll 0, nice -5             decode alone 1.06, busy 0.80   prefill alone 1.03, busy 0.79
#   all cores, poll 0, nice -10            decode alone 1.06, busy 0.97   prefill alone 1.12, busy 0.99
# So: every usable core (fewer threads lose a third alone, and still lose to the busy process), worker threads that
# sleep when idle (poll 0: no loss alone; a spinning thread holds a core another process needs), and, where the
# answer matters more than the work beside it (a kiosk), a higher CPU priority (`set_priority`): the scheduler
# then gives the model's threads the cores they wait for. llama-cpp-python 0.3.36 does not bind the thread pool
# API, so it is bound here from ggml's own libraries.
_GGML_MAX_N_THREADS = 512  # ggml.h
GGML_DEFAULT_POLL = 50  # ggml_threadpool_params_default; llama.cpp's own pool then
DEFAULT_POLL = 0
# nice values of llama.cpp's --prio levels (common.cpp); raising the priority needs root or CAP_SYS_NICE
PRIORITIES = {"normal": 0, "medium": -5, "high": -10}


def set_priority(level: str) -> None:
    """Give this process (every thread it has, and so every thread it starts) at least the CPU priority `level`
    of `PRIORITIES` (a higher one it already has stays). Raises FaceLlavaError for an unknown level or when the
    system does not allow it."""
    if level not in PRIORITIES:
        raise FaceLlavaError(f"unknown priority {level!r}; expected one of {', '.join(PRIORITIES)}")
    nice = PRIORITIES[level]
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:  # Linux keeps a nice value per thread; new threads inherit their creator's
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > nice:  # a higher priority given by the system stays
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:
            continue  # a thread that ended meanwhile
        except PermissionError:
            raise FaceLlavaError(f"priority {level} (nice {nice}) needs root or CAP_SYS_NICE (systemd: "
                                 "AmbientCapabilities=CAP_SYS_NICE, or Nice= in the unit)") from None


class _ThreadpoolParams(ctypes.Structure):
    _fields_ = [("cpumask", ctypes.c_bool * _GGML_MAX_N_THREADS), ("n_threads", ctypes.c_int),
                ("prio", ctypes.c_int), ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool),
                ("paused", ctypes.c_bool)]


def _ggml_threadpool_api() -> tuple[ctypes.CDLL, ctypes.CDLL, ctypes.CDLL]:
    """(libggml-base, libggml-cpu, libllama) from llama-cpp-python's lib folder (the copies it already loaded),
    with the thread pool functions typed."""
    folder = Path(llama_cpp.__file__).parent / "lib"
    base, cpu, llama = (ctypes.CDLL(str(folder / name)) for name in
                        ("libggml-base.so", "libggml-cpu.so", "libllama.so"))
    base.ggml_threadpool_params_default.restype = _ThreadpoolParams
    base.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
    cpu.ggml_threadpool_new.restype = ctypes.c_void_p
    cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_ThreadpoolParams)]
    cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return base, cpu, llama


class ThreadPolicy(NamedTuple):
    """llama.cpp's CPU threads: `threads` decode one token at a time, `threads_batch` prefill prompts and
    visual blocks; `poll` (0-100) is how hard idle worker threads busy-wait."""
    threads: int
    threads_batch: int
    poll: int


def thread_policy(n_threads: int | None = None, n_threads_batch: int | None = None,
                  poll: int | None = None) -> ThreadPolicy:
    """The policy with the defaults filled in (every usable core for decode and prefill, `DEFAULT_POLL`). Raises
    FaceLlavaError for a thread count below 1 or a polling level outside 0-100."""
    for name, value in (("threads", n_threads), ("threads_batch", n_threads_batch)):
        if value is not None and value < 1:
            raise FaceLlavaError(f"{name} must be at least 1, got {value}")
    poll = DEFAULT_POLL if poll is None else poll
    if not 0 <= poll <= 100:
        raise FaceLlavaError(f"poll must be from 0 to 100, got {poll}")
    cores = usable_cores()
    return ThreadPolicy(n_threads or cores, n_threads_batch or cores, poll)


def _attach_threadpools(context: llama_cpp.llama_context_p, policy: ThreadPolicy) -> tuple[ctypes.c_void_p, ...]:
    """Thread pools with the policy's polling level attached to `context`, one for decode and one for batch work
    (one shared when the counts are equal); free them with `_free_threadpool` after the context. Raises
    FaceLlavaError when ggml cannot make them."""
    base, cpu, llama = _ggml_threadpool_api()
    pools: dict[int, int] = {}
    for count in dict.fromkeys((policy.threads, policy.threads_batch)):
        params = base.ggml_threadpool_params_default(count)
        params.poll = policy.poll
        pool = cpu.ggml_threadpool_new(ctypes.byref(params))
        if not pool:
            for made in pools.values():
                cpu.ggml_threadpool_free(made)
            raise FaceLlavaError(f"llama.cpp cannot start {count} threads")
        pools[count] = pool
    llama.llama_attach_threadpool(context, pools[policy.threads], pools[policy.threads_batch])
    return tuple(ctypes.c_void_p(pool) for pool in pools.values())


def _free_threadpool(pool: ctypes.c_void_p) -> None:
    _ggml_threadpool_api()[1].ggml_threadpool_free(pool)

# --- the model ----------------------------------------------------------------------------------------------


class LlamaModel:
    """One GGUF loaded in llama.cpp with one context (one sequence), decoding from position `n_past` on.

    Use `open`, then `tokenize`, `eval_tokens`, `eval_embeddings` (each appends to the sequence and returns
    logits), `logits()` for the last ones, `reset()` to start a new sequence, and `close()` (or `with`).
    """

    def __init__(self, path: Path, model: llama_cpp.llama_model_p, context: llama_cpp.llama_context_p,
                 n_batch: int, threadpools: tuple[ctypes.c_void_p, ...], threads: ThreadPolicy):
        self.path = path
        self._model = model
        self._context = context
        self._threadpools = threadpools
        self.threads = threads
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_ctx = llama_cpp.llama_n_ctx(context)
        self.n_batch = n_batch
        self.n_embd = llama_cpp.llama_model_n_embd(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.bos_id = llama_cpp.llama_vocab_bos(self._vocab)
        self.eos_id = llama_cpp.llama_vocab_eos(self._vocab)
        self.n_past = 0
        self.resets = 0  # how many times the sequence was cleared (a session's cached prefix is gone after one)
        self._last_logits: np.ndarray | None = None
        self._token_batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._embd_batch = llama_cpp.llama_batch_init(n_batch, self.n_embd, 1)

    @classmethod
    def open(cls, path: str | Path, n_ctx: int = 4096, n_gpu_layers: int = 0, n_batch: int = 512,
             n_threads: int | None = None, kv_type: str = "f16", flash_attn: bool | None = None,
             poll: int | None = None, n_threads_batch: int | None = None, verbose: bool = False) -> LlamaModel:
        """Load a GGUF and create a context of `n_ctx` positions; `n_gpu_layers` layers go to the GPU (-1: all)
        when llama.cpp was built with one; `kv_type` is the KV cache's precision ("f16", llama.cpp's default,
        or "f32"); `flash_attn` True/False forces llama.cpp's flash attention on or off, None lets it choose
        (its CPU kernel works in half precision: about 1e-3..1e-2 relative logit error on long prompts);
        `n_threads` (decode), `n_threads_batch` (prefill) and `poll` (0-100, how hard idle threads busy-wait) are
        the CPU thread policy, defaults from `thread_policy` (see the thread pool section above; llama.cpp's own
        default of a fixed 4 threads oversubscribes a 2-core machine and made decoding 10x slower there).
        Raises FaceLlavaError when the file is missing or llama.cpp cannot load it."""
        if kv_type not in KV_TYPES:
            raise FaceLlavaError(f"unknown KV cache type {kv_type!r}; expected one of {', '.join(KV_TYPES)}")
        policy = thread_policy(n_threads, n_threads_batch, poll)
        path = Path(path)
        if not path.is_file():
            raise FaceLlavaError(f"GGUF file {path} does not exist")
        init_llama_backend(verbose)
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        with _holding_log() as held:
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
            if not model:
                if not _verbose:
                    held.clear()
                raise FaceLlavaError(f"llama.cpp cannot load {path} ({recent_log()}): the file is damaged, or needs "
                                     "a newer llama-cpp-python; export it again or upgrade")
        n_batch = max(1, min(n_batch, n_ctx))
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = n_ctx
        context_params.n_batch = n_batch
        context_params.n_ubatch = n_batch
        context_params.n_seq_max = 1
        context_params.type_k = context_params.type_v = KV_TYPES[kv_type]
        context_params.flash_attn_type = {None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                                          True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                          False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        context_params.n_threads, context_params.n_threads_batch = policy.threads, policy.threads_batch
        with _holding_log() as held:
            context = llama_cpp.llama_init_from_model(model, context_params)
            if not context:
                llama_cpp.llama_model_free(model)
                if not _verbose:
                    held.clear()
                raise FaceLlavaError(f"llama.cpp cannot create a {n_ctx}-token context for {path} ({recent_log()}); "
                                     "try a smaller context or fewer GPU layers")
        try:
            pools = () if policy.poll == GGML_DEFAULT_POLL else _attach_threadpools(context, policy)
        except FaceLlavaError:
            llama_cpp.llama_free(context)
            llama_cpp.llama_model_free(model)
            raise
        return cls(path, model, context, n_batch, pools, policy)

    @property
    def context(self) -> llama_cpp.llama_context_p:
        """The llama.cpp context, for samplers (`llama_sampler_sample`)."""
        return self._context

    @property
    def vocab(self) -> llama_cpp.llama_vocab_p:
        return self._vocab

    # -- text ------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of one text chunk with the GGUF's vocabulary, BOS first when `add_bos`. Text that looks
        like a special token ("</s>") stays text, as in SentencePiece."""
        data = text.encode("utf-8")
        capacity = len(data) + 2
        while True:
            tokens = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_bos, False)
            if count >= 0:
                return list(tokens[:count])
            capacity = -count

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """A prompt's ids under the official chunked rule (`contract.tokenize_prompt`) with this GGUF's vocabulary.
        The export's parity check proves it equal to the same rule with SentencePiece."""
        return contract.tokenize_prompt(prompt, self.tokenize, self.bos_id)

    def token_piece(self, token: int) -> bytes:
        """The bytes one token stands for (special tokens rendered as their text)."""
        buffer = ctypes.create_string_buffer(64)
        size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
        return buffer.raw[:size]

    def detokenize(self, tokens: list[int]) -> str:
        """The text of token ids (special tokens left out), as SentencePiece decodes them."""
        data = bytearray()
        for token in tokens:
            if token not in (self.bos_id, self.eos_id):
                data += self.token_piece(token)
        return data.decode("utf-8", errors="replace").removeprefix(" ")

    # -- decoding --------------------------------------------------------------------------------------------

    def _check_room(self, count: int) -> None:
        if self.n_past + count > self.n_ctx:
            raise FaceLlavaError(f"the sequence would need {self.n_past + count} positions but the context has "
                                 f"{self.n_ctx}; open the model with a larger n_ctx")

    def _decode(self, batch: llama_cpp.llama_batch, count: int, all_logits: bool) -> list[np.ndarray]:
        batch.n_tokens = count
        for i in range(count):
            batch.pos[i] = self.n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == count - 1
        status = llama_cpp.llama_decode(self._context, batch)
        if status != 0:
            raise FaceLlavaError(f"llama.cpp failed to decode {count} positions (status {status}): {recent_log()}")
        self.n_past += count
        rows = range(count) if all_logits else [count - 1]
        return [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._context, i), shape=(self.n_vocab,))
                .copy() for i in rows]

    def eval_tokens(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        """Append token ids to the sequence; return the logits after the last one [n_vocab] (or after every one,
        [len(tokens), n_vocab], with `all_logits`)."""
        self._check_room(len(tokens))
        if any(not 0 <= t < self.n_vocab for t in tokens):
            raise FaceLlavaError(f"token ids must lie in [0, {self.n_vocab})")
        rows: list[np.ndarray] = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            for i, token in enumerate(chunk):
                self._token_batch.token[i] = token
            rows += self._decode(self._token_batch, len(chunk), all_logits)
        return self._result(rows, all_logits)

    def eval_embeddings(self, embeddings: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append input embeddings [n, n_embd] (visual tokens, or any rows of the LLM's input space) at
        consecutive positions; return the logits after the last row (or after every row with `all_logits`)."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.n_embd:
            raise FaceLlavaError(f"embeddings must have shape [n, {self.n_embd}], got {list(embeddings.shape)}")
        self._check_room(len(embeddings))
        rows: list[np.ndarray] = []
        for start in range(0, len(embeddings), self.n_batch):
            chunk = embeddings[start:start + self.n_batch]
            ctypes.memmove(self._embd_batch.embd, chunk.ctypes.data, chunk.nbytes)
            rows += self._decode(self._embd_batch, len(chunk), all_logits)
        return self._result(rows, all_logits)

    def eval_prompt(self, input_ids: Sequence[int], visual_blocks: Sequence[np.ndarray] = ()) -> np.ndarray:
        """Append a spliced prompt: runs of text ids as tokens, each `IMAGE_TOKEN_INDEX` replaced by the next
        visual block [N, n_embd] as embeddings (the runs of `contract.splice_plan`, which the model's
        `embed_prompt` follows too). Returns the logits after the last position. Raises ValueError when blocks and
        markers do not pair up, FaceLlavaError for an empty prompt."""
        logits = None
        for run in contract.splice_plan(input_ids, len(visual_blocks)):
            logits = self.eval_tokens(list(run.ids)) if run.block is None else self.eval_embeddings(
                visual_blocks[run.block])
        if logits is None:
            raise FaceLlavaError("nothing to decode: the prompt is empty")
        return logits

    def _result(self, rows: list[np.ndarray], all_logits: bool) -> np.ndarray:
        if not rows:
            raise FaceLlavaError("nothing to decode: give at least one token or embedding")
        self._last_logits = rows[-1]
        return np.stack(rows) if all_logits else rows[-1]

    def logits(self) -> np.ndarray:
        """The logits after the last decoded position [n_vocab]. Raises FaceLlavaError before any decoding."""
        if self._last_logits is None:
            raise FaceLlavaError("nothing decoded yet")
        return self._last_logits

    def reset(self) -> None:
        """Forget the sequence (clear the KV cache) so the next decode starts at position 0."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._context), True)
        self.resets += 1
        self.n_past = 0
        self._last_logits = None

    def rewind(self, n_past: int) -> None:
        """Forget every position from `n_past` on, keeping the KV cache before it (to branch from a prompt)."""
        if not 0 <= n_past <= self.n_past:
            raise FaceLlavaError(f"cannot rewind to position {n_past}: the sequence has {self.n_past}")
        if not llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._context), 0, n_past, -1):
            raise FaceLlavaError(f"llama.cpp cannot drop positions {n_past}.. from its cache")
        self.n_past = n_past
        self._last_logits = None

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text, or None when the file lacks the key."""
        buffer = ctypes.create_string_buffer(4096)
        size = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buffer, len(buffer))
        return None if size < 0 else buffer.value.decode("utf-8", errors="replace")

    # -- lifetime --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context, the batches and the model (idempotent)."""
        if getattr(self, "_context", None):
            llama_cpp.llama_batch_free(self._token_batch)
            llama_cpp.llama_batch_free(self._embd_batch)
            llama_cpp.llama_free(self._context)
            llama_cpp.llama_model_free(self._model)
            for pool in self._threadpools:
                _free_threadpool(pool)
            self._context = self._model = None
            self._threadpools = ()

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit llama_cpp may already be gone
            self.close()
