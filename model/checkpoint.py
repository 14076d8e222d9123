"""The official checkpoint layout, read and written: file names, which tensor goes where (`CHECKPOINT_PREFIXES`
and its inverse), the weights read lazily shard by shard (`CheckpointWeights`), and written as the official
trainer writes them (`write_weights`, in the format and sharding `weight_layout` reads off a checkpoint).

The loader (`model.loading`), the streamed decoder (`model.streaming`), the GGUF converter, tiny checkpoints and
training all go through this table; nothing else knows the official key names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from facellava.errors import FaceLlavaError

if TYPE_CHECKING:
    from facellava.model.modeling import FaceLlava

WeightFormat = Literal["bin", "safetensors"]

CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.model"
# (index file, single file), in order of preference
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)

# Official checkpoint prefix -> our module prefix; the first match wins. Towers (None) are loaded on their own.
CHECKPOINT_PREFIXES: tuple[tuple[str, str | None], ...] = (
    ("model.mm_projector.", "mm_projector."),
    ("model.landmarks_projector.", "landmarks_projector."),
    ("model.global_landmarks_projector.", "global_landmarks_projector."),
    ("model.landmarks_cross_attn.", "landmarks_cross_attn."),
    ("model.image_tower.", None),
    ("model.video_tower.", None),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
)
TOWER_PREFIXES = {"image": "model.image_tower.", "video": "model.video_tower."}
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")  # saved by old transformers; recomputed


# --- the key table ----------------------------------------------------------------------------------------------


def module_key(checkpoint_key: str) -> str | None:
    """Our module's name for an official checkpoint key; None for tower keys and keys we do not know."""
    for prefix, target in CHECKPOINT_PREFIXES:
        if checkpoint_key.startswith(prefix):
            return None if target is None else target + checkpoint_key[len(prefix):]
    return None


def official_key(name: str) -> str | None:
    """The official checkpoint key of one of our module's tensors (the inverse of `module_key`); None for the
    towers' tensors, which the official checkpoint keeps in LanguageBind directories or under their own prefix."""
    for official, ours in CHECKPOINT_PREFIXES:
        if ours is not None and name.startswith(ours):
            return official + name[len(ours):]
    return None


def is_llm_key(checkpoint_key: str) -> bool:
    """True for the LLaMA decoder's tensors (what the GGUF keeps), False for towers, projectors, FRLP, FRGCA."""
    name = module_key(checkpoint_key)
    return name is not None and name.startswith("llm.")


# --- reading --------------------------------------------------------------------------------------------------


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; FaceLlavaError (naming `what` the file should be) when absent or not one."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FaceLlavaError(f"{path.parent} has no {path.name}: not {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FaceLlavaError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise FaceLlavaError(f"{path} does not hold a JSON object")
    return data


def checkpoint_directory(path: str | Path) -> Path:
    """`path` as a directory; FaceLlavaError when it does not exist or is a file."""
    directory = Path(path)
    if not directory.exists():
        raise FaceLlavaError(f"checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise FaceLlavaError(f"{directory} is a file; expected a checkpoint directory")
    return directory


class CheckpointWeights:
    """The tensors of a directory, found through its index and read only when asked.

    `.bin` shards are opened with `torch.load(mmap=True)` and safetensors shards with `safe_open`, so a tensor
    costs memory only when it is used, and a 7B checkpoint never sits in memory twice.
    """

    def __init__(self, directory: Path, weight_map: dict[str, Path]):
        self.directory = directory
        self.weight_map = weight_map
        self._shards: dict[Path, Any] = {}

    @classmethod
    def open(cls, directory: str | Path) -> CheckpointWeights:
        """Find the weights of `directory`. Raises FaceLlavaError when there are none or a shard is missing."""
        directory = checkpoint_directory(directory)
        for index_name, single_name in WEIGHT_LAYOUTS:
            index_path = directory / index_name
            if index_path.exists():
                weight_map = read_json(index_path, "a weight index").get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise FaceLlavaError(f"{index_path} has no weight_map")
                shards = {name: directory / name for name in set(weight_map.values())}
                for name, path in sorted(shards.items()):
                    if not path.is_file():
                        raise FaceLlavaError(f"shard {name} listed in {index_name} is missing from {directory}")
                return cls(directory, {key: shards[name] for key, name in weight_map.items()})
            single = directory / single_name
            if single.is_file():
                weights = cls(directory, {})
                weights.weight_map = {key: single for key in weights._shard(single).keys()}
                return weights
        expected = " or ".join(f"{single}[.index.json]" for _, single in WEIGHT_LAYOUTS)
        raise FaceLlavaError(f"{directory} holds no weights (expected {expected})")

    def _shard(self, path: Path) -> Any:
        if path not in self._shards:
            try:
                if path.suffix == ".safetensors":
                    from safetensors import safe_open

                    self._shards[path] = safe_open(str(path), framework="pt")
                else:
                    self._shards[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as error:  # torch and safetensors raise many types for a damaged file
                raise FaceLlavaError(f"cannot read shard {path}: {str(error).splitlines()[0]}") from None
        return self._shards[path]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard. Raises FaceLlavaError if the shard lacks it or cannot be read."""
        path = self.weight_map[key]
        shard = self._shard(path)
        try:
            if path.suffix == ".safetensors":
                # safetensors returns views at the file's (8-byte) offsets; a 64-byte-aligned copy makes the
                # matmul kernels take the same path, so .bin and safetensors give bit-identical outputs
                return shard.get_tensor(key).clone()
            return shard[key]
        except Exception as error:
            raise FaceLlavaError(f"cannot read tensor {key} from {path}: {str(error).splitlines()[0]}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """One tensor's shape, from its shard's header: no tensor data is read. Raises FaceLlavaError as `get`."""
        path = self.weight_map[key]
        shard = self._shard(path)
        try:
            if path.suffix == ".safetensors":
                return tuple(shard.get_slice(key).get_shape())
            return tuple(shard[key].shape)
        except Exception as error:
            raise FaceLlavaError(f"cannot read tensor {key} from {path}: {str(error).splitlines()[0]}") from None

    def release(self, key: str) -> None:
        """Close the shard that holds `key` (it reopens on the next read). A memory-mapped shard keeps every page
        read from it resident until closed; releasing after each tensor bounds memory by one tensor, however
        large the shard."""
        self._shards.pop(self.weight_map[key], None)

    def iter_by_shard(self, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor) shard by shard, releasing each shard before the next one is opened."""
        wanted = self.keys() if keys is None else keys
        for path in sorted({self.weight_map[k] for k in wanted}):
            for key in (k for k in wanted if self.weight_map[k] == path):
                yield key, self.get(key)
            self._shards.pop(path, None)


# --- writing --------------------------------------------------------------------------------------------------


def official_state_dict(model: FaceLlava) -> dict[str, torch.Tensor]:
    """A model's state under the official checkpoint keys (`official_key`), towers left out."""
    state = {}
    for name, tensor in model.state_dict().items():
        key = official_key(name)
        if key is not None:
            state[key] = tensor.contiguous()
    return state


def write_weights(directory: Path, state: dict[str, torch.Tensor], weight_format: WeightFormat,
                   shards: int) -> None:
    """Write `state` as the official trainer does: one file, or numbered shards plus an index."""
    from safetensors.torch import save_file

    def save(part: dict[str, torch.Tensor], path: Path) -> None:
        if weight_format == "safetensors":
            save_file(part, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, path)

    base, ext = ("model", "safetensors") if weight_format == "safetensors" else ("pytorch_model", "bin")
    keys = list(state)
    if shards <= 1:
        save(state, directory / f"{base}.{ext}")
        return
    per_shard = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"{base}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in keys[i * per_shard:(i + 1) * per_shard]}
        save(part, directory / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{base}.{ext}.index.json").write_text(json.dumps(index, indent=2))


def weight_layout(checkpoint: Path) -> tuple[str, int]:
    """A checkpoint's weight format ("bin" / "safetensors") and number of shards, to write another alike. Raises
    FaceLlavaError when it holds no weights."""
    for index_name, single_name in WEIGHT_LAYOUTS:
        weight_format = "safetensors" if single_name.endswith("safetensors") else "bin"
        if (checkpoint / index_name).is_file():
            weight_map = json.loads((checkpoint / index_name).read_text())["weight_map"]
            return weight_format, len(set(weight_map.values()))
        if (checkpoint / single_name).is_file():
            return weight_format, 1
    raise FaceLlavaError(f"{checkpoint} holds no weights")
