"""Tiny Face-LLaVA checkpoints in exactly the official layout, for tests and the demo.

Same architecture and the same input contract as the released model (224x224 input, 14x14 patches, 256 image
tokens, 8 frames of 257 video tokens, 68 landmarks, 9 regions, 8 FRGCA heads, LLaMA decoder), only small:
LLM hidden 256 (a multiple of 256, so llama.cpp's k-quants apply), towers of hidden 128. The weights are random
but seeded, scaled so that activations and logits have a realistic spread. The tokenizer is a small
SentencePiece BPE model trained on the spot with LLaMA's settings and special ids.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Literal

import torch

from facellava import contract
from facellava.atomic import staged_directory
from facellava.errors import FaceLlavaError
from facellava.model.checkpoint import CONFIG_NAME, TOKENIZER_NAME, WeightFormat, official_state_dict, write_weights
from facellava.model.modeling import FaceLlava, FaceLlavaConfig, LanguageBindTower, TowerConfig

TowerPlacement = Literal["directories", "embedded", "none"]

IMAGE_TOWER_DIR = "LanguageBind_Image"
VIDEO_TOWER_DIR = "LanguageBind_Video_merge"

TINY_LLM = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=512, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
TINY_TOWER = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_hidden_layers=3,
                  patch_size=14, image_size=contract.IMAGE_SIZE, layer_norm_eps=1e-5, hidden_act="gelu")
TINY_VOCAB = 512

_TASK_LINES = (
    "What emotion is shown in the video?",
    "Identify the active facial action units in the provided image.",
    "Guess the age of the individual shown in the picture; justify your answer.",
    "Analyze the facial characteristics shown in the picture.",
    "Is the video authentic, or is it a fake?",
    "The person looks happy: the cheeks are raised (AU6) and the lip corners are pulled (AU12).",
    "The face shows sadness, anger, fear, surprise, disgust or a neutral expression.",
    "The individual appears to be about 35 years old, between 30 and 40.",
    "Attributes: black hair, no eyeglasses, smiling, young, wearing lipstick, arched eyebrows.",
    "The video is real; there are no blending artifacts around the mouth or the eyes.",
    "Café, naïve, Zürich, São Paulo, ½ of 100%, 日本の顔, лицо, 😀 emoji, tabs\tand\nnewlines.",
    "  leading spaces, trailing spaces  , numbers 0123456789 and 3.14159, AU1, AU2, AU4, AU25, AU26.",
)


def tokenizer_corpus() -> list[str]:
    """The deterministic text the tiny tokenizer is trained on."""
    lines = [contract.SYSTEM_PROMPT, contract.build_prompt("Describe the face.", "image")]
    for i in range(40):
        for line in _TASK_LINES:
            lines.append(line if i == 0 else f"{line} {i}")
    return lines


def train_tokenizer(vocab_size: int = TINY_VOCAB) -> bytes:
    """A small SentencePiece BPE model with LLaMA's settings: byte fallback, split digits, identity
    normalization, whitespace kept, dummy prefix, unk 0 / bos 1 / eos 2, no pad. Returns the model file's bytes."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def pad_tokenizer(model_bytes: bytes, vocab_size: int) -> bytes:
    """A SentencePiece model grown to `vocab_size` pieces with UNUSED ones (`<unused_N>`, never produced by
    encoding), so that a small trained tokenizer fits a checkpoint of LLaMA's 32000-token vocabulary. Returns the
    model file's bytes; a model that already has `vocab_size` pieces or more comes back unchanged."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_bytes)
    for i in range(len(model.pieces), vocab_size):
        model.pieces.add(piece=f"<unused_{i}>", score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED)
    return model.SerializeToString()


def tiny_config(vocab_size: int, cross_attn: str, towers: TowerPlacement) -> dict:
    """The tiny model's `config.json`, with the official keys and values but small sizes."""
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **TINY_LLM,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "mm_image_tower": IMAGE_TOWER_DIR if towers == "directories" else "LanguageBind/LanguageBind_Image",
        "mm_video_tower": VIDEO_TOWER_DIR if towers == "directories" else "LanguageBind/LanguageBind_Video_merge",
        "use_mm_proj": True,
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": TINY_TOWER["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "landmarks_projector_type": "landmarks_region_projector",
        "global_landmarks_projector_type": "linear",
        "cross_attn_type": cross_attn,
        "use_landmark_tokens": False,
        "landmarks_hidden_size": contract.LANDMARK_VALUES,
        "image_aspect_ratio": "pad",
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 3072,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
    }


def _tower_config(video: bool) -> TowerConfig:
    layers = TINY_TOWER["num_hidden_layers"]
    return TowerConfig(**TINY_TOWER, num_used_layers=layers, num_frames=contract.NUM_FRAMES if video else 1,
                       add_time_attn=video)


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded weights with unit-gain linears, so activations keep their scale through the layers."""
    for name, tensor in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias" or name.endswith("in_proj_bias"):
            values = 0.02 * torch.randn(tensor.shape, generator=generator)
        elif "norm" in name or ".ln." in name or name.startswith("ln.") or "layer_norm" in name \
                or "layrnorm" in name:
            values = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        elif tensor.dim() == 1 or "embedding" in name or "embed_tokens" in name:
            values = 0.5 * torch.randn(tensor.shape, generator=generator)
        else:
            fan_in = tensor[0].numel()
            values = torch.randn(tensor.shape, generator=generator) / fan_in ** 0.5
        with torch.no_grad():
            tensor.copy_(values)


def _tower_state(tower: LanguageBindTower, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A LanguageBind checkpoint's tensors: the vision trunk under `vision_model.`, plus the parts the features
    never use (post_layernorm, projections, a token of text tower) so that loading must skip them."""
    dim = tower.config.hidden_size
    state = {f"vision_model.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    state["vision_model.post_layernorm.weight"] = torch.ones(dim)
    state["vision_model.post_layernorm.bias"] = torch.zeros(dim)
    state["visual_projection.weight"] = torch.randn(64, dim, generator=generator)
    state["text_model.embeddings.token_embedding.weight"] = torch.randn(100, 64, generator=generator)
    state["text_projection.weight"] = torch.randn(64, 64, generator=generator)
    state["logit_scale"] = torch.tensor(4.6052)
    return state


def _languagebind_config(video: bool) -> dict:
    vision = {**TINY_TOWER, "num_frames": contract.NUM_FRAMES if video else 1, "add_time_attn": video,
              "force_patch_dropout": 0.0, "num_channels": 3, "projection_dim": 64}
    name = "LanguageBindVideo" if video else "LanguageBindImage"
    return {"architectures": [name], "model_type": name, "projection_dim": 64,
            "text_config": {"hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 100},
            "vision_config": vision}


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, cross_attn: str = "simple",
                         weight_format: WeightFormat = "bin", shards: int = 3,
                         towers: TowerPlacement = "directories") -> Path:
    """Write a tiny Face-LLaVA checkpoint in the official layout into `out_dir` and return its path.

    `out_dir` gets `config.json`, the weights (`shards` numbered files plus an index, or one file), the
    SentencePiece `tokenizer.model` and its `tokenizer_config.json`, and, with towers="directories", the
    LanguageBind tower directories `LanguageBind_Image/` and `LanguageBind_Video_merge/` that `config.json`
    names; towers="embedded" stores the tower weights inside the checkpoint instead, and "none" leaves them out.
    The directory is written under a temporary name and renamed, so it is whole or absent. Raises
    FaceLlavaError if `out_dir` exists and is not empty, or for an unknown option.
    """
    out = Path(out_dir)
    if cross_attn not in ("simple", "masked"):
        raise FaceLlavaError(f"unknown cross-attention type {cross_attn!r}; expected 'simple' or 'masked'")
    if weight_format not in ("bin", "safetensors"):
        raise FaceLlavaError(f"unknown weight format {weight_format!r}; expected 'bin' or 'safetensors'")
    if towers not in ("directories", "embedded", "none"):
        raise FaceLlavaError(f"unknown tower placement {towers!r}")
    if shards < 1:
        raise FaceLlavaError(f"shards must be at least 1, got {shards}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FaceLlavaError(f"{out} already exists and is not an empty directory")

    generator = torch.Generator().manual_seed(seed)
    tokenizer = train_tokenizer()
    import sentencepiece

    vocab_size = sentencepiece.SentencePieceProcessor(model_proto=tokenizer).get_piece_size()
    raw_config = tiny_config(vocab_size, cross_attn, towers)
    from facellava.model.loading import read_config_dict

    config: FaceLlavaConfig = read_config_dict(raw_config, where="the tiny config")
    model = FaceLlava(config, _tower_config(video=False), _tower_config(video=True))
    _randomize(model, generator)
    # Random logits need a wider spread than unit gain gives, so that greedy choices are not near-ties.
    with torch.no_grad():
        model.llm.lm_head.weight.mul_(4.0)

    with staged_directory(out) as staging:
        state = official_state_dict(model)
        for kind, tower in (("image", model.image_tower), ("video", model.video_tower)):
            assert tower is not None
            tower_state = _tower_state(tower, generator)
            if towers == "embedded":
                state.update({f"model.{kind}_tower.{kind}_tower.{k}": v for k, v in tower_state.items()
                              if k.startswith("vision_model.")})
            elif towers == "directories":
                tower_dir = staging / (IMAGE_TOWER_DIR if kind == "image" else VIDEO_TOWER_DIR)
                tower_dir.mkdir()
                (tower_dir / CONFIG_NAME).write_text(json.dumps(_languagebind_config(kind == "video"), indent=2))
                write_weights(tower_dir, tower_state, "bin", shards=1)
        write_weights(staging, state, weight_format, shards)
        (staging / CONFIG_NAME).write_text(json.dumps(raw_config, indent=2))
        (staging / TOKENIZER_NAME).write_bytes(tokenizer)
        (staging / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": True,
            "model_max_length": 2048, "padding_side": "right",
        }, indent=2))
    return out


HUB_TOWER_REPOS = {IMAGE_TOWER_DIR: "LanguageBind/LanguageBind_Image",
                   VIDEO_TOWER_DIR: "LanguageBind/LanguageBind_Video_merge"}


def move_towers_to_hub_cache(checkpoint_dir: str | Path, cache: str | Path) -> dict[str, Path]:
    """Move a checkpoint's LanguageBind tower directories into a Hugging Face hub cache, in the layout that
    `huggingface_hub` (and the official code's `cache_dir`) leaves: `models--LanguageBind--<name>/` with
    `blobs/<sha256>`, `snapshots/<commit>/<file>` links to them and `refs/main` naming the commit; then point
    `config.json` at the towers by repo id, as the released config does. Returns {repo id: snapshot directory}.
    Raises FaceLlavaError when the checkpoint has no tower directories."""
    import hashlib
    import os
    import shutil

    checkpoint, cache = Path(checkpoint_dir), Path(cache)
    config_path = checkpoint / CONFIG_NAME
    raw = json.loads(config_path.read_text())
    snapshots = {}
    for name, repo_id in HUB_TOWER_REPOS.items():
        source = checkpoint / name
        if not source.is_dir():
            raise FaceLlavaError(f"{checkpoint} has no {name} directory to move into a hub cache")
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex name, as a git commit has
        snapshot = repo / "snapshots" / commit
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        snapshot.mkdir(parents=True)
        for path in sorted(source.iterdir()):
            blob = repo / "blobs" / contract.file_sha256(path)
            shutil.move(path, blob)
            os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
        source.rmdir()
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        kind = "image" if name == IMAGE_TOWER_DIR else "video"
        raw[f"mm_{kind}_tower"] = repo_id
        snapshots[repo_id] = snapshot
    config_path.write_text(json.dumps(raw, indent=2))
    return snapshots
