"""Checkpoint -> GGUF: the LLaMA decoder of a Face-LLaVA checkpoint, streamed tensor by tensor into one file.

What goes into the file, all written with gguf-py:

- the LLaMA hyperparameters (context, embedding and feed-forward lengths, blocks, heads, RoPE, RMS eps, vocab);
- the SentencePiece vocabulary with its scores and token types, the special ids and the `llava_v1` chat template;
- `general.*` metadata: a name and the fingerprint of the source checkpoint;
- the decoder's tensors, renamed by gguf-py's own table (`TensorNameMap` for `MODEL_ARCH.LLAMA`), with the
  Q and K rows permuted from Hugging Face's rotate-half RoPE layout to the interleaved-pair layout that
  llama.cpp's LLaMA graph expects (the same permutation llama.cpp's own converter applies).

Everything that is not the decoder (towers, mm projector, FRLP, FRGCA) is left out. Tensors are read one at a
time from the shards (`.bin` through mmap, safetensors lazily) and written one at a time after the header, so
the model is never held whole: peak memory is about one tensor, whatever the checkpoint's size.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from facellava import contract
from facellava.atomic import atomic_file
from facellava.bundle import checkpoint_fingerprint
from facellava.errors import FaceLlavaError
from facellava.model.checkpoint import IGNORED_KEYS, TOKENIZER_NAME, CheckpointWeights, is_llm_key
from facellava.model.loading import check_vocabulary_size, read_config
from facellava.model.modeling import FaceLlavaConfig

ARCH = gguf.MODEL_ARCH.LLAMA
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]



@dataclass(frozen=True)
class OutputType:
    """How the 2-D weights are stored. 1-D tensors (the RMSNorm weights) stay F32, as in llama.cpp's converter."""

    torch_dtype: torch.dtype
    numpy_dtype: type
    file_type: gguf.LlamaFileType


OUTPUT_TYPES: dict[str, OutputType] = {
    "f32": OutputType(torch.float32, np.float32, gguf.LlamaFileType.ALL_F32),
    "f16": OutputType(torch.float16, np.float16, gguf.LlamaFileType.MOSTLY_F16),
}

Shape = Callable[[FaceLlavaConfig], tuple[int, ...]]


def _head_dim(c: FaceLlavaConfig) -> int:
    return c.hidden_size // c.num_attention_heads


# The LLaMA decoder, as Hugging Face names it: tensor -> its shape (rows, columns) from the config. The GGUF
# names come from gguf-py's table, not from here.
GLOBAL_TENSORS: dict[str, Shape] = {
    "model.embed_tokens.weight": lambda c: (c.vocab_size, c.hidden_size),
    "model.norm.weight": lambda c: (c.hidden_size,),
    "lm_head.weight": lambda c: (c.vocab_size, c.hidden_size),
}
LAYER_TENSORS: dict[str, Shape] = {
    "input_layernorm.weight": lambda c: (c.hidden_size,),
    "self_attn.q_proj.weight": lambda c: (c.num_attention_heads * _head_dim(c), c.hidden_size),
    "self_attn.k_proj.weight": lambda c: (c.num_key_value_heads * _head_dim(c), c.hidden_size),
    "self_attn.v_proj.weight": lambda c: (c.num_key_value_heads * _head_dim(c), c.hidden_size),
    "self_attn.o_proj.weight": lambda c: (c.hidden_size, c.num_attention_heads * _head_dim(c)),
    "post_attention_layernorm.weight": lambda c: (c.hidden_size,),
    "mlp.gate_proj.weight": lambda c: (c.intermediate_size, c.hidden_size),
    "mlp.up_proj.weight": lambda c: (c.intermediate_size, c.hidden_size),
    "mlp.down_proj.weight": lambda c: (c.hidden_size, c.intermediate_size),
}
# Tensors whose rows are permuted for llama.cpp's RoPE, and the head count that splits their rows.
ROPE_PERMUTED: dict[str, Callable[[FaceLlavaConfig], int]] = {
    "self_attn.q_proj.weight": lambda c: c.num_attention_heads,
    "self_attn.k_proj.weight": lambda c: c.num_key_value_heads,
}
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# SentencePiece piece type -> GGUF token type (both enums are spelled out so that a change in either shows).
SENTENCEPIECE_TOKEN_TYPES = {
    "NORMAL": gguf.TokenType.NORMAL,
    "UNKNOWN": gguf.TokenType.UNKNOWN,
    "CONTROL": gguf.TokenType.CONTROL,
    "USER_DEFINED": gguf.TokenType.USER_DEFINED,
    "UNUSED": gguf.TokenType.UNUSED,
    "BYTE": gguf.TokenType.BYTE,
}

SOURCE_HASH_KEY = "general.source.checkpoint_sha256"


@dataclass(frozen=True)
class TensorPlan:
    """One decoder tensor: where it comes from, where it goes, its shape, and the RoPE head count if permuted."""

    key: str  # the checkpoint's key
    name: str  # the GGUF name
    shape: tuple[int, ...]
    rope_heads: int | None


@dataclass(frozen=True)
class Vocabulary:
    """A SentencePiece vocabulary as GGUF stores it."""

    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool


@dataclass(frozen=True)
class GgufSummary:
    """What `convert_to_gguf` wrote."""

    path: Path
    out_type: str
    tensors: int
    parameters: int
    stripped: list[str]  # checkpoint keys left out (towers, projector, FRLP, FRGCA)


# --- what the file holds ------------------------------------------------------------------------------------


def check_llama_config(config: FaceLlavaConfig) -> None:
    """Refuse an LLM that llama.cpp's LLaMA graph cannot run exactly. Raises FaceLlavaError."""
    raw = config.raw
    problems = []
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {raw['hidden_act']!r} (LLaMA uses silu)")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        problems.append("biases in attention or MLP (LLaMA has none)")
    if raw.get("tie_word_embeddings"):
        problems.append("tied word embeddings (Vicuna has its own lm_head)")
    if config.hidden_size % config.num_attention_heads or _head_dim(config) % 2:
        problems.append(f"hidden_size {config.hidden_size} does not split into {config.num_attention_heads} "
                        "heads of even size")
    if config.num_attention_heads % config.num_key_value_heads:
        problems.append(f"{config.num_attention_heads} heads do not group over {config.num_key_value_heads} "
                        "key/value heads")
    if problems:
        raise FaceLlavaError(f"the checkpoint's LLM is not LLaMA-shaped: {'; '.join(problems)}")


def tensor_plan(config: FaceLlavaConfig) -> dict[str, TensorPlan]:
    """Every decoder tensor the GGUF holds, keyed by checkpoint key, with its GGUF name from gguf-py's table."""
    names = gguf.get_tensor_name_map(ARCH, config.num_hidden_layers)
    wanted = dict(GLOBAL_TENSORS)
    for layer in range(config.num_hidden_layers):
        wanted.update({f"model.layers.{layer}.{suffix}": shape for suffix, shape in LAYER_TENSORS.items()})
    plan = {}
    for key, shape in wanted.items():
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None:  # a gap in gguf-py's table, not a user error
            raise RuntimeError(f"gguf-py has no LLaMA name for {key}")
        layer = LAYER_KEY.match(key)
        heads = ROPE_PERMUTED.get(layer.group(2)) if layer else None
        plan[key] = TensorPlan(key, name, shape(config), heads(config) if heads else None)
    return plan


def _name_keys(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def match_checkpoint(weights: CheckpointWeights, plan: dict[str, TensorPlan]) -> list[str]:
    """Check that the checkpoint's LLM tensors are exactly the plan's; return the keys that are stripped.

    Raises FaceLlavaError naming missing or unexpected decoder tensors (a checkpoint that is not LLaMA-shaped).
    """
    llm_keys = {k for k in weights.keys() if is_llm_key(k) and not IGNORED_KEYS.match(k)}
    missing = [k for k in plan if k not in llm_keys]
    unexpected = [k for k in llm_keys if k not in plan]
    if missing:
        raise FaceLlavaError(f"the checkpoint's LLM is not LLaMA-shaped: missing {_name_keys(missing)}")
    if unexpected:
        raise FaceLlavaError(f"the checkpoint's LLM is not LLaMA-shaped: unexpected {_name_keys(unexpected)}")
    return sorted(k for k in weights.keys() if k not in plan)


def read_vocabulary(tokenizer_path: Path, vocab_size: int) -> Vocabulary:
    """The SentencePiece model's pieces, scores and types.

    Raises FaceLlavaError when the file is missing or unreadable, when its piece count is not `vocab_size` (the
    embedding's rows), or when it is not a model that llama.cpp's LLaMA tokenizer reproduces exactly (BPE, no text
    normalization, whitespace kept).
    """
    from sentencepiece import sentencepiece_model_pb2

    if not tokenizer_path.is_file():
        raise FaceLlavaError(f"{tokenizer_path.parent} has no {tokenizer_path.name}: copy the LLaMA tokenizer "
                             "the checkpoint was trained with into it")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(tokenizer_path.read_bytes())
    except Exception as error:  # protobuf raises DecodeError and others for a damaged file
        raise FaceLlavaError(f"{tokenizer_path} is not a SentencePiece model ({error})") from None
    if not proto.pieces:
        raise FaceLlavaError(f"{tokenizer_path} is not a SentencePiece model (it has no pieces)")
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    bpe = sentencepiece_model_pb2.TrainerSpec.ModelType.Value("BPE")
    if trainer.model_type != bpe:
        raise FaceLlavaError(f"{tokenizer_path} is a {trainer.ModelType.Name(trainer.model_type)} SentencePiece "
                             "model; llama.cpp's LLaMA tokenizer reproduces BPE models only")
    if normalizer.name not in ("identity", "") or normalizer.remove_extra_whitespaces:
        raise FaceLlavaError(f"{tokenizer_path} normalizes text ({normalizer.name}, remove_extra_whitespaces="
                             f"{normalizer.remove_extra_whitespaces}); llama.cpp's LLaMA tokenizer does not")
    check_vocabulary_size(tokenizer_path, len(proto.pieces), vocab_size)
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece.Type
    tokens, scores, types = [], [], []
    for piece in proto.pieces:
        tokens.append(piece.piece.encode("utf-8"))
        scores.append(piece.score)
        types.append(int(SENTENCEPIECE_TOKEN_TYPES[piece_type.Name(piece.type)]))
    return Vocabulary(tokens, scores, types, add_space_prefix=normalizer.add_dummy_prefix)


def llava_v1_chat_template() -> str:
    """The `llava_v1` conversation as a Jinja chat template (what `contract.build_prompt` writes).

    `SYSTEM USER: {question} ASSISTANT: {answer}</s>USER: ... ASSISTANT:`: turns separated by a space after
    the user and by `</s>` after the assistant, BOS first, the contract's system prompt unless a system message
    replaces it.
    """
    system = contract.SYSTEM_PROMPT.replace("'", "\\'")
    return (
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        f"{{% else %}}{{% set system = '{system}' %}}{{% set turns = messages %}}{{% endif %}}"
        "{{ system }}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
    )


def _write_metadata(writer: gguf.GGUFWriter, config: FaceLlavaConfig, vocab: Vocabulary, name: str,
                    file_type: gguf.LlamaFileType, source_sha256: str) -> None:
    writer.add_name(name)
    writer.add_string(SOURCE_HASH_KEY, source_sha256)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_chat_template(llava_v1_chat_template())


# --- tensors ------------------------------------------------------------------------------------------------


def rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of a Q or K projection from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i+1)
    within each head, the layout llama.cpp's LLaMA RoPE expects. A pure reordering: exact in any dtype."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gguf_array(tensor: torch.Tensor, plan: TensorPlan, out: OutputType) -> np.ndarray:
    """The tensor as the numpy array GGUF stores: cast (1-D tensors stay F32), then permuted if Q or K."""
    tensor = tensor.to(torch.float32 if tensor.dim() == 1 else out.torch_dtype)
    if plan.rope_heads:
        tensor = rope_permute(tensor, plan.rope_heads)
    return tensor.contiguous().numpy()


def inspect_checkpoint(checkpoint_dir: str | Path
                       ) -> tuple[FaceLlavaConfig, dict[str, TensorPlan], list[str]]:
    """Everything about a checkpoint that the conversion checks before writing: its config, that its LLM is
    LLaMA-shaped (config and tensor names), that its tokenizer is usable. Returns (config, tensor plan, stripped
    keys). Raises FaceLlavaError naming the first problem."""
    checkpoint_dir = Path(checkpoint_dir)
    config = read_config(checkpoint_dir)
    check_llama_config(config)
    read_vocabulary(checkpoint_dir / TOKENIZER_NAME, config.vocab_size)
    plan = tensor_plan(config)
    return config, plan, match_checkpoint(CheckpointWeights.open(checkpoint_dir), plan)


def convert_to_gguf(checkpoint_dir: str | Path, out_path: str | Path, out_type: str = "f16",
                    source_sha256: str | None = None, name: str | None = None,
                    progress: bool = True) -> GgufSummary:
    """Write the LLaMA decoder of a Face-LLaVA checkpoint as a GGUF file for llama.cpp.

    Takes the checkpoint directory (official layout: `config.json`, `.bin` or safetensors shards,
    `tokenizer.model`), the output path, the output type ("f32" or "f16"), the checkpoint's fingerprint for
    `general.source.checkpoint_sha256` (`facellava.bundle.checkpoint_fingerprint`; computed when not given, which
    reads every file once), a `general.name`, and whether to show a progress bar. The file is written under a
    temporary name beside `out_path` and renamed when whole. Returns a GgufSummary. Raises FaceLlavaError for
    an unknown type, a checkpoint that is not Face-LLaVA or whose LLM is not LLaMA-shaped, a missing or unusable
    `tokenizer.model`, or an unreadable shard.
    """
    if out_type not in OUTPUT_TYPES:
        raise FaceLlavaError(f"unknown GGUF output type {out_type!r}; expected one of {', '.join(OUTPUT_TYPES)}")
    out = OUTPUT_TYPES[out_type]
    checkpoint_dir = Path(checkpoint_dir)
    out_path = Path(out_path)
    config, plan, stripped = inspect_checkpoint(checkpoint_dir)
    vocab = read_vocabulary(checkpoint_dir / TOKENIZER_NAME, config.vocab_size)
    weights = CheckpointWeights.open(checkpoint_dir)
    order = [key for key in weights.keys() if key in plan]  # the checkpoint's order: shard by shard

    writer = gguf.GGUFWriter(None, ARCH_NAME)
    if source_sha256 is None:
        source_sha256 = checkpoint_fingerprint(checkpoint_dir)
    _write_metadata(writer, config, vocab, name or f"Face-LLaVA LLM ({checkpoint_dir.resolve().name})",
                    out.file_type, source_sha256)
    for key in order:
        item = plan[key]
        item_dtype = np.dtype(np.float32 if len(item.shape) == 1 else out.numpy_dtype)
        writer.add_tensor_info(item.name, item.shape, item_dtype, int(np.prod(item.shape)) * item_dtype.itemsize)

    parameters = 0
    with atomic_file(out_path) as partial:
        try:
            writer.write_header_to_file(partial)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            bar = tqdm(weights.iter_by_shard(order), total=len(order), desc=f"GGUF {out_type}", unit="tensor",
                       disable=not progress)
            for key, tensor in bar:
                item = plan[key]
                if tuple(tensor.shape) != item.shape:
                    raise FaceLlavaError(f"the checkpoint's LLM is not LLaMA-shaped: {key} has shape "
                                         f"{tuple(tensor.shape)}, config.json implies {item.shape}")
                writer.write_tensor_data(_gguf_array(tensor, item, out))
                parameters += tensor.numel()
                del tensor
                weights.release(key)  # the shard's mapped pages go with it: memory stays at about one tensor
        finally:
            writer.close()
    return GgufSummary(out_path, out_type, len(order), parameters, stripped)

