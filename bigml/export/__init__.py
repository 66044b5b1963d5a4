"""bigml export: a model directory to the formats other runtimes read (ONNX, GGUF)."""
