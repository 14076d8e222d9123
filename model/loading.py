"""Reading Face-LLaVA checkpoints in the official layout: lazily, strictly, without doubling memory.

A checkpoint directory holds `config.json`, the weights (sharded `.bin` with `pytorch_model.bin.index.json`, a
single `pytorch_model.bin`, or safetensors, single or sharded) and `tokenizer.model`. The vision towers come
from LanguageBind directories (given, or named by `mm_image_tower` / `mm_video_tower`), or from tower weights
stored inside the checkpoint. Which checkpoint tensor goes where is `model.checkpoint`'s table.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from facellava.errors import FaceLlavaError
from facellava.model.checkpoint import (
    CONFIG_NAME,
    IGNORED_KEYS,
    TOKENIZER_NAME,
    TOWER_PREFIXES,
    CheckpointWeights,
    checkpoint_directory,
    is_llm_key,
    module_key,
    read_json,
)
from facellava.model.modeling import FaceLlava, FaceLlavaConfig, TowerConfig

# Tower keys (after `vision_model.`) that the features never use.
UNUSED_TOWER_KEYS = re.compile(r"^(post_layernorm\..*|embeddings\.position_ids)$")
TOWER_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.")

REQUIRED_LLAMA_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                         "vocab_size")


# --- config -------------------------------------------------------------------------------------------------


def read_config(checkpoint_dir: str | Path) -> FaceLlavaConfig:
    """Read and check a Face-LLaVA `config.json`. Raises FaceLlavaError for anything that is not Face-LLaVA."""
    directory = checkpoint_directory(checkpoint_dir)
    path = directory / CONFIG_NAME
    return read_config_dict(read_json(path, "a Face-LLaVA checkpoint"), where=str(path))


def read_config_dict(raw: dict[str, Any], where: str = CONFIG_NAME) -> FaceLlavaConfig:
    """Check the fields of a Face-LLaVA config (`where` names it in errors) and return them as a config."""
    if raw.get("model_type") != "llava":
        raise FaceLlavaError(f"{where} has model_type {raw.get('model_type')!r}, not 'llava': "
                             "not a Face-LLaVA checkpoint")
    missing = [name for name in (*REQUIRED_LLAMA_FIELDS, "mm_projector_type", "mm_hidden_size") if name not in raw]
    if missing:
        raise FaceLlavaError(f"{where} lacks {', '.join(missing)}: not a Face-LLaVA checkpoint")
    _check_sizes(raw, where)
    if raw.get("rope_scaling"):
        raise FaceLlavaError(f"rope_scaling {raw['rope_scaling']!r} is not supported (Vicuna-7B v1.5 has none)")
    if raw.get("use_landmark_tokens"):
        raise FaceLlavaError("use_landmark_tokens true is not supported (the released model sets it false)")
    landmarks_type = raw.get("landmarks_projector_type")
    if landmarks_type not in (None, "landmarks_region_projector"):
        raise FaceLlavaError(f"landmarks_projector_type {landmarks_type!r} is not supported; "
                             "expected 'landmarks_region_projector'")
    if landmarks_type and raw.get("global_landmarks_projector_type", "linear") != "linear":
        raise FaceLlavaError(f"global_landmarks_projector_type {raw['global_landmarks_projector_type']!r} "
                             "is not supported; expected 'linear'")
    cross_attn_type = raw.get("cross_attn_type", "simple") if landmarks_type else None
    if cross_attn_type not in (None, "simple", "masked"):
        raise FaceLlavaError(f"cross_attn_type {cross_attn_type!r} is not supported; expected 'simple' or 'masked'")
    return FaceLlavaConfig(
        hidden_size=raw["hidden_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"],
        vocab_size=raw["vocab_size"],
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_theta=raw.get("rope_theta", 10000.0),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_id=raw.get("eos_token_id", 2),
        mm_projector_type=raw["mm_projector_type"],
        mm_hidden_size=raw["mm_hidden_size"],
        mm_vision_select_layer=raw.get("mm_vision_select_layer", -2),
        mm_image_tower=raw.get("mm_image_tower"),
        mm_video_tower=raw.get("mm_video_tower"),
        landmarks_projector_type=landmarks_type,
        global_landmarks_projector_type="linear" if landmarks_type else None,
        cross_attn_type=cross_attn_type,
        branch_scale=raw.get("branch_scale", 0.1),
        raw=raw,
    )


def _check_sizes(raw: dict[str, Any], where: str) -> None:
    """Refuse sizes that cannot describe a model (a mistyped or hand-edited config.json) with one line, before
    they fail deep inside torch, SentencePiece or llama.cpp."""
    sizes = (*REQUIRED_LLAMA_FIELDS, "mm_hidden_size", "num_key_value_heads", "max_position_embeddings")
    for name in sizes:
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise FaceLlavaError(f"{where}: {name} is {value!r}; expected a positive integer")
    heads, kv_heads = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    if raw["hidden_size"] % heads:
        raise FaceLlavaError(f"{where}: hidden_size {raw['hidden_size']} does not split into {heads} attention heads")
    if heads % kv_heads:
        raise FaceLlavaError(f"{where}: {heads} attention heads do not group over {kv_heads} key/value heads")
    for name, default in (("bos_token_id", 1), ("eos_token_id", 2)):
        value = raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < raw["vocab_size"]:
            raise FaceLlavaError(f"{where}: {name} {value!r} is not a token id of the {raw['vocab_size']}-token "
                                 "vocabulary")
    select = raw.get("mm_vision_select_layer", -2)
    if isinstance(select, bool) or not isinstance(select, int):
        raise FaceLlavaError(f"{where}: mm_vision_select_layer is {select!r}; expected an integer such as -2")
    for name in ("rms_norm_eps", "rope_theta"):
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
            raise FaceLlavaError(f"{where}: {name} is {value!r}; expected a positive number")


# --- weights ------------------------------------------------------------------------------------------------


# --- towers -------------------------------------------------------------------------------------------------


def _used_layers(num_layers: int, select_layer: int) -> int:
    # hidden_states has num_layers + 1 entries (the embeddings first); index select_layer of it
    used = num_layers + 1 + select_layer if select_layer < 0 else select_layer
    if not 1 <= used <= num_layers:
        raise FaceLlavaError(f"mm_vision_select_layer {select_layer} does not fit a {num_layers}-layer tower")
    return used


def tower_config_from_languagebind(directory: Path, select_layer: int) -> TowerConfig:
    """The TowerConfig of a LanguageBind directory's `config.json` (its `vision_config`)."""
    raw = read_json(directory / CONFIG_NAME, "a LanguageBind tower directory")
    vision = raw.get("vision_config")
    if not isinstance(vision, dict):
        raise FaceLlavaError(f"{directory / CONFIG_NAME} has no vision_config: not a LanguageBind tower")
    try:
        layers = vision["num_hidden_layers"]
        return TowerConfig(
            hidden_size=vision["hidden_size"],
            intermediate_size=vision["intermediate_size"],
            num_attention_heads=vision["num_attention_heads"],
            num_hidden_layers=layers,
            num_used_layers=_used_layers(layers, select_layer),
            patch_size=vision.get("patch_size", 14),
            image_size=vision.get("image_size", 224),
            layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
            hidden_act=vision.get("hidden_act", "quick_gelu"),
            num_frames=vision.get("num_frames", 1),
            add_time_attn=bool(vision.get("add_time_attn", False)),
        )
    except KeyError as error:
        raise FaceLlavaError(f"{directory / CONFIG_NAME} vision_config lacks {error.args[0]}") from None


def tower_config_from_tensors(shapes: dict[str, torch.Size], select_layer: int) -> TowerConfig:
    """Infer a tower's config from its tensors' shapes, for towers stored inside the checkpoint.

    What shapes cannot tell is taken from CLIP ViT convention: 64-dimensional heads, exact GELU (LanguageBind),
    LayerNorm eps 1e-5. A LanguageBind directory, when available, is the exact source.
    """
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := TOWER_LAYER_KEY.match(k)))
    hidden = shapes["embeddings.class_embedding"][0]
    patch = shapes["embeddings.patch_embedding.weight"][-1]
    positions = shapes["embeddings.position_embedding.weight"][0]
    temporal = shapes.get("encoder.layers.0.temporal_embedding")
    return TowerConfig(
        hidden_size=hidden,
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        num_attention_heads=max(1, hidden // 64),
        num_hidden_layers=layers,
        num_used_layers=_used_layers(layers, select_layer),
        patch_size=patch,
        image_size=round((positions - 1) ** 0.5) * patch,
        hidden_act="gelu",
        num_frames=temporal[1] if temporal is not None else 1,
        add_time_attn=temporal is not None,
    )


# The official code names the towers by hub id and lets transformers fetch them (into `./cache_dir`); a user who
# did the same, or used huggingface_hub, has them in the hub cache layout. They are looked up there, offline.
HUB_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
OFFICIAL_CACHE_DIR = "cache_dir"  # the official code passes cache_dir='./cache_dir' to from_pretrained


def hub_cache_roots() -> list[tuple[str, Path]]:
    """The Hugging Face hub caches to look in, as (how it was found, directory): `$HF_HUB_CACHE`, `$HF_HOME/hub`,
    the default cache (`$XDG_CACHE_HOME/huggingface/hub` or `~/.cache/huggingface/hub`) and the official code's
    `./cache_dir`; each directory once."""
    candidates = []
    if os.environ.get("HF_HUB_CACHE"):
        candidates.append(("$HF_HUB_CACHE", Path(os.environ["HF_HUB_CACHE"])))
    if os.environ.get("HF_HOME"):
        candidates.append(("$HF_HOME/hub", Path(os.environ["HF_HOME"]) / "hub"))
    xdg = os.environ.get("XDG_CACHE_HOME")
    default = Path(xdg) if xdg else Path.home() / ".cache"
    candidates.append(("the default hub cache", default / "huggingface" / "hub"))
    candidates.append(("the official code's ./cache_dir", Path.cwd() / OFFICIAL_CACHE_DIR))
    roots, seen = [], set()
    for how, root in candidates:
        key = os.path.abspath(os.path.expanduser(root))
        if key not in seen:
            seen.add(key)
            roots.append((how, Path(key)))
    return roots


def hub_snapshot(cache: Path, repo_id: str) -> Path | None:
    """A repo's snapshot in a hub cache: the one `refs/main` names, else the only or the newest one; None when
    the cache does not hold the repo. Reads the disk only, never the network."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    with contextlib.suppress(OSError):
        commit = (repo / "refs" / "main").read_text().strip()
        if commit and (snapshots / commit).is_dir():
            return snapshots / commit
    try:
        found = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


@dataclass
class TowerSearch:
    """Where a tower was found (`directory`, a LanguageBind directory; None when not found in any directory) and
    every place looked in, in order, for the message when it is found nowhere."""

    kind: str
    directory: Path | None
    looked: list[str]

    def not_found(self) -> str:
        """The one-line error for a tower that is needed but was found nowhere."""
        return (f"no {self.kind} tower found (looked in: {'; '.join(self.looked)}); pass --{self.kind}-tower DIR "
                "(a LanguageBind directory) or put the tower in one of those places")


def find_tower(kind: str, config: FaceLlavaConfig, checkpoint_dir: str | Path,
               explicit: str | Path | None = None) -> TowerSearch:
    """Locate a LanguageBind tower directory, the one place every command does it. In order: `explicit` (the
    --image-tower / --video-tower flag); the config's `mm_image_tower` / `mm_video_tower` as a local directory
    (absolute, or relative to the checkpoint); that value as a hub repo id in the hub caches
    (`hub_cache_roots`), offline. A search that finds no directory lists the places it looked, plus the
    checkpoint's own tower weights (the caller's last resort). Raises FaceLlavaError for a missing explicit
    directory."""
    if explicit is not None:
        directory = Path(explicit)
        if not directory.is_dir():
            raise FaceLlavaError(f"{kind} tower directory {directory} does not exist")
        return TowerSearch(kind, directory, [str(directory)])
    key = f"mm_{kind}_tower"
    named = config.mm_image_tower if kind == "image" else config.mm_video_tower
    looked = [f"no --{kind}-tower given"]
    if not named:
        looked.append(f"config.json names no {key}")
    else:
        local = Path(named).expanduser()
        candidate = local if local.is_absolute() else Path(checkpoint_dir) / local
        if candidate.is_dir():
            return TowerSearch(kind, candidate, looked)
        looked.append(f"{key} {named!r} as a directory ({candidate})")
        if not local.is_absolute() and HUB_REPO_ID.match(str(named)):
            for how, cache in hub_cache_roots():
                snapshot = hub_snapshot(cache, str(named))
                if snapshot is not None:
                    return TowerSearch(kind, snapshot, looked)
                looked.append(f"{how} {cache / ('models--' + str(named).replace('/', '--'))}")
    looked.append(f"{TOWER_PREFIXES[kind]}* weights inside {checkpoint_dir}")
    return TowerSearch(kind, None, looked)


def tower_directory(kind: str, config: FaceLlavaConfig, checkpoint_dir: str | Path,
                    explicit: str | Path | None = None) -> Path | None:
    """The LanguageBind directory of a tower (`find_tower`), or None when there is none (the tower may then be
    stored inside the checkpoint). Raises FaceLlavaError for a missing explicit one."""
    return find_tower(kind, config, checkpoint_dir, explicit).directory


TowerSource = tuple[TowerConfig, dict[str, tuple[CheckpointWeights, str]]]


def _tower_source(kind: str, explicit: str | Path | None, config: FaceLlavaConfig, checkpoint_dir: Path,
                  weights: CheckpointWeights) -> tuple[TowerSource | None, TowerSearch]:
    """Where a tower's weights come from: (its config, {tower key: (weights, key there)}) or None, and the
    search that found (or did not find) its directory."""
    search = find_tower(kind, config, checkpoint_dir, explicit)
    directory = search.directory
    if directory is not None:
        tower_config = tower_config_from_languagebind(directory, config.mm_vision_select_layer)
        tower_weights = CheckpointWeights.open(directory)
        keys = {k[len("vision_model."):]: (tower_weights, k) for k in tower_weights.keys()
                if k.startswith("vision_model.")}  # text-tower keys are ignored
        if not keys:
            raise FaceLlavaError(f"{directory} has no vision_model.* weights: not a LanguageBind tower")
        return (_check_tower_width(kind, tower_config, config, str(directory)), keys), search
    prefix = TOWER_PREFIXES[kind]
    embedded = {k.split("vision_model.", 1)[1]: (weights, k) for k in weights.keys()
                if k.startswith(prefix) and "vision_model." in k}
    if not embedded:
        return None, search
    shapes = {key: weights.get(source_key).shape for key, (_, source_key) in embedded.items()}
    tower_config = tower_config_from_tensors(shapes, config.mm_vision_select_layer)
    return (_check_tower_width(kind, tower_config, config, f"{prefix}* in {checkpoint_dir}"), embedded), search


def _check_tower_width(kind: str, tower: TowerConfig, config: FaceLlavaConfig, where: str) -> TowerConfig:
    # the mm projector takes mm_hidden_size features: a tower of another width only fails deep inside a matmul
    if tower.hidden_size != config.mm_hidden_size:
        raise FaceLlavaError(f"the {kind} tower ({where}) is {tower.hidden_size} wide but config.json's "
                             f"mm_hidden_size is {config.mm_hidden_size}: tower and checkpoint do not belong together")
    return tower


def _tower_keys_in_use(keys: dict[str, Any], used_layers: int) -> dict[str, Any]:
    kept = {}
    for key, source in keys.items():
        layer = TOWER_LAYER_KEY.match(key)
        if UNUSED_TOWER_KEYS.match(key) or (layer and int(layer.group(1)) >= used_layers):
            continue
        kept[key] = source
    return kept


# --- a bundle's source -------------------------------------------------------------------------------------


def bundle_source_checkpoint(bundle: Any, checkpoint: str | Path | None, flag: str = "--checkpoint") -> Path:
    """The PyTorch checkpoint an opened bundle (`facellava.bundle.Bundle`) was exported from, as the user gave it.

    A bundle is a security boundary: the checkpoint path its manifest records lies outside it and is never
    followed; it is only named in the error when `checkpoint` is None. The given directory must have the
    fingerprint (`facellava.bundle.checkpoint_fingerprint`, which reads every file once) that the manifest
    records. Returns the directory. Raises FaceLlavaError when none is given, it is missing, or it differs."""
    from facellava.bundle import checkpoint_fingerprint

    recorded = bundle.manifest.source.get("checkpoint")
    hint = f" (the bundle records {recorded!r})" if recorded else ""
    if checkpoint is None:
        raise FaceLlavaError(f"this needs the PyTorch checkpoint {bundle.path} was exported from: pass {flag} "
                             f"DIR{hint}")
    directory = checkpoint_directory(checkpoint)
    expected = bundle.manifest.source.get("checkpoint_sha256")
    if not expected:
        raise FaceLlavaError(f"{bundle.path}'s manifest records no checkpoint fingerprint, so {directory} cannot be "
                             "checked against it; export the bundle again with this version")
    if checkpoint_fingerprint(directory) != expected:
        raise FaceLlavaError(f"{directory} is not the checkpoint {bundle.path} was exported from (its fingerprint "
                             f"differs from the manifest's checkpoint_sha256); pass that checkpoint{hint}")
    return directory


# --- the model ----------------------------------------------------------------------------------------------


def _name_keys(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_face_llava(checkpoint_dir: str | Path, image_tower: str | Path | None = None,
                    video_tower: str | Path | None = None, dtype: torch.dtype = torch.float32,
                    branch_scale: float | None = None, llm: bool = True, check_llm: bool = False,
                    towers: Sequence[str] = ("image", "video")) -> FaceLlava:
    """Build a FaceLlava from a checkpoint in the official layout.

    Takes the checkpoint directory, optional LanguageBind tower directories (otherwise `mm_image_tower` /
    `mm_video_tower` when they name a local directory, otherwise tower weights inside the checkpoint, otherwise
    no tower), the dtype, and an optional FRGCA branch scale (default: the config's, else 0.1). Loading is
    strict: a missing, unexpected or wrongly shaped tensor is a FaceLlavaError that names it. Tensors are read
    lazily, shard by shard, straight into the model. With llm=False the LLaMA tensors are neither read nor
    allocated (the decoder stays on the meta device): enough for `encode_image` / `encode_video` and the vision
    export, at a fraction of the memory; `check_llm` then still checks that every LLaMA tensor is there with
    the shape config.json gives, from the shards' headers (what `inspect` needs at 7B). `towers` names the towers
    to load; one left out is neither searched for nor read (the model has none: a full-size tower is 1.2-1.6 GB
    in float32, and the vision export needs one at a time). Returns the model in eval mode, with `tokenizer` set
    when the checkpoint has a `tokenizer.model`.
    """
    if unknown := set(towers) - set(TOWER_PREFIXES):
        raise ValueError(f"unknown towers {sorted(unknown)}; choose from {sorted(TOWER_PREFIXES)}")
    directory = checkpoint_directory(checkpoint_dir)
    config = read_config(directory)
    if branch_scale is not None:
        config.branch_scale = branch_scale
    tokenizer = load_tokenizer(directory, config)  # before any weight is read: a mismatch fails at once
    weights = CheckpointWeights.open(directory)
    found = {kind: _tower_source(kind, explicit, config, directory, weights)
             for kind, explicit in (("image", image_tower), ("video", video_tower)) if kind in towers}
    tower_sources = {kind: found[kind][0] if kind in found else None for kind in ("image", "video")}

    with torch.device("meta"):
        model = FaceLlava(config, *(t[0] if t else None for t in (tower_sources["image"], tower_sources["video"])))
    model.missing_towers = {kind: search.not_found() for kind, (tower, search) in found.items() if tower is None}
    model.missing_towers.update({kind: f"the {kind} tower was not loaded (load_face_llava towers={tuple(towers)})"
                                 for kind in ("image", "video") if kind not in towers})
    model.tower_sources = {kind: str(search.directory or f"{TOWER_PREFIXES[kind]}* in {directory}")
                           for kind, (tower, search) in found.items() if tower is not None}
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()
                if llm or check_llm or not name.startswith("llm.")}

    sources: dict[str, tuple[CheckpointWeights, str]] = {}
    unexpected: list[str] = []
    for key in weights.keys():
        if IGNORED_KEYS.match(key) or any(key.startswith(p) for p in TOWER_PREFIXES.values()):
            continue
        name = module_key(key)
        if not llm and not check_llm and is_llm_key(key):
            continue
        if name is None or name not in expected:
            unexpected.append(key)
        else:
            sources[name] = (weights, key)
    for kind, tower in tower_sources.items():
        if tower is not None:
            tower_config, keys = tower
            for key, source in _tower_keys_in_use(keys, tower_config.num_used_layers).items():
                name = f"{kind}_tower.{key}"
                if name in expected:
                    sources[name] = source
                else:
                    unexpected.append(f"{kind} tower vision_model.{key}")
    missing = [name for name in expected if name not in sources]
    if missing:
        raise FaceLlavaError(f"{directory}: missing tensors {_name_keys(missing)}")
    if unexpected:
        raise FaceLlavaError(f"{directory}: unexpected tensors {_name_keys(unexpected)} "
                             f"(config.json says cross_attn_type={config.cross_attn_type!r}, "
                             f"landmarks_projector_type={config.landmarks_projector_type!r})")

    state = {}
    for name, (source, key) in sources.items():
        if not llm and name.startswith("llm."):  # check_llm: the shape only, no data read
            shape = source.shape(key)
        else:
            tensor = source.get(key)
            shape = tuple(tensor.shape)
        if shape != tuple(expected[name]):
            raise FaceLlavaError(f"tensor {key} has shape {shape}, expected {tuple(expected[name])} "
                                 "from config.json")
        if llm or not name.startswith("llm."):
            state[name] = tensor.to(dtype)
    model.load_state_dict(state, strict=llm, assign=True)
    if llm:
        _rebuild_rotary_embedding(model)
    else:
        left = [name for name, t in model.state_dict().items() if t.is_meta and not name.startswith("llm.")]
        if left:
            raise RuntimeError(f"vision tensors left on the meta device after loading: {left}")
    model.eval()
    model.tokenizer = tokenizer
    return model


def load_tokenizer(checkpoint_dir: str | Path, config: FaceLlavaConfig) -> Any:
    """The checkpoint's SentencePiece tokenizer (None when it has no `tokenizer.model`). Raises FaceLlavaError
    for an unreadable file or one whose size is not the config's `vocab_size` (ids past the tokenizer cannot be
    decoded, pieces past the embedding cannot be embedded)."""
    path = Path(checkpoint_dir) / TOKENIZER_NAME
    if not path.is_file():
        return None
    import sentencepiece

    try:
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        raise FaceLlavaError(f"{path} is not a SentencePiece model ({str(error).splitlines()[0]})") from None
    check_vocabulary_size(path, tokenizer.get_piece_size(), config.vocab_size)
    return tokenizer


def check_vocabulary_size(tokenizer_path: Path, pieces: int, vocab_size: int) -> None:
    """Refuse a tokenizer whose piece count is not the config's `vocab_size`. Raises FaceLlavaError."""
    if pieces != vocab_size:
        raise FaceLlavaError(f"{tokenizer_path} has {pieces} pieces but config.json's vocab_size is {vocab_size}: "
                             "the tokenizer and the checkpoint do not belong together (use the checkpoint's own "
                             "tokenizer.model)")


def _rebuild_rotary_embedding(model: FaceLlava) -> None:
    """RoPE's inverse frequencies are not in the state dict; recompute them off the meta device."""
    rotary = model.llm.model.rotary_emb
    model.llm.model.rotary_emb = type(rotary)(config=model.llm.config)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left}")
