"""Face-LLaVA in PyTorch: the model (`modeling`), the official checkpoint layout (`checkpoint`), its loader
(`loading`), tiny checkpoints (`tiny`).

The names below are imported on first use (PEP 562), not with the package: `facellava.model.cli` builds the
parsers of `make-tiny`, `inspect` and `train`, and their `--help` must work where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_EXPORTS = {
    "CheckpointWeights": "checkpoint", "load_face_llava": "loading", "read_config": "loading",
    "FaceLlava": "modeling", "FaceLlavaConfig": "modeling", "ReferenceOutput": "modeling", "TowerConfig": "modeling",
    "make_tiny_checkpoint": "tiny",
}

__all__ = ["CheckpointWeights", "FaceLlava", "FaceLlavaConfig", "ReferenceOutput", "TowerConfig",
           "load_face_llava", "make_tiny_checkpoint", "read_config"]

if TYPE_CHECKING:
    from facellava.model.checkpoint import CheckpointWeights
    from facellava.model.loading import load_face_llava, read_config
    from facellava.model.modeling import FaceLlava, FaceLlavaConfig, ReferenceOutput, TowerConfig
    from facellava.model.tiny import make_tiny_checkpoint


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
