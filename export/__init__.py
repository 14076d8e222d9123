"""Exporters: the vision graph to ONNX/TensorRT, the LLM to GGUF, each checked against the PyTorch reference."""
