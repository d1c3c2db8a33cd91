"""Exporters that turn a merged Hugging Face folder into deployable formats (ONNX, ...)."""
