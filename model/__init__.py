"""Face-LLaVA in PyTorch: the model (`modeling`), the official checkpoint loader (`loading`), tiny checkpoints
(`tiny`)."""

from facellava.model.loading import CheckpointWeights, load_face_llava, read_config
from facellava.model.modeling import FaceLlava, FaceLlavaConfig, ReferenceOutput, TowerConfig
from facellava.model.tiny import make_tiny_checkpoint

__all__ = ["CheckpointWeights", "FaceLlava", "FaceLlavaConfig", "ReferenceOutput", "TowerConfig",
           "load_face_llava", "make_tiny_checkpoint", "read_config"]
