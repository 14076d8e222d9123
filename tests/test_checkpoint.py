"""The official checkpoint layout in one place: the key table and its inverse agree with a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facellava.errors import FaceLlavaError
from facellava.model.checkpoint import (
    TOWER_PREFIXES,
    CheckpointWeights,
    is_llm_key,
    module_key,
    official_key,
    official_state_dict,
    weight_layout,
    write_weights,
)


def test_the_key_table_and_its_inverse(tiny_checkpoint: Path, tiny_model) -> None:
    weights = CheckpointWeights.open(tiny_checkpoint)
    keys = weights.keys()
    ours = {module_key(k): k for k in keys if module_key(k) is not None}
    assert all(official_key(name) == key for name, key in ours.items())
    # what the model holds (towers aside) is what the checkpoint holds, under the same keys
    state = official_state_dict(tiny_model)
    assert set(state) == set(ours.values()) and len(state) > 30
    for key in ("model.mm_projector.0.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert torch.equal(state[key], weights.get(key)), key
    assert module_key("model.layers.0.self_attn.q_proj.weight") == "llm.model.layers.0.self_attn.q_proj.weight"
    assert official_key("image_tower.tower.embeddings.patch_embedding.weight") is None
    assert module_key(TOWER_PREFIXES["video"] + "vision_model.x") is None
    assert is_llm_key("lm_head.weight") and not is_llm_key("model.landmarks_cross_attn.linear_proj.weight")


@pytest.mark.parametrize(("weight_format", "shards"), [("bin", 1), ("safetensors", 3)])
def test_written_weights_read_back(tmp_path: Path, weight_format: str, shards: int) -> None:
    state = {f"model.layers.{i}.mlp.up_proj.weight": torch.full((2, 3), float(i)) for i in range(6)}
    write_weights(tmp_path, state, weight_format, shards)
    assert weight_layout(tmp_path) == (weight_format, shards)
    read = CheckpointWeights.open(tmp_path)
    assert sorted(read.keys()) == sorted(state)
    assert all(torch.equal(read.get(k), v) for k, v in state.items())
    with pytest.raises(FaceLlavaError, match="holds no weights"):
        weight_layout(tmp_path / "missing")
