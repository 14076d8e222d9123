"""facellava-edge: Face-LLaVA from its PyTorch checkpoint to ONNX/TensorRT and GGUF, and a runtime that joins them.

Subpackages: `facellava.model` (the PyTorch reference and the checkpoint loader), `facellava.export`,
`facellava.runtime`, `facellava.calibration`. `facellava.contract` holds what they all agree on.
"""

from facellava.errors import FaceLlavaError

__all__ = ["FaceLlavaError"]
__version__ = "0.1.0"
