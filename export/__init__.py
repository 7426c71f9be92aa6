"""Export: PyTorch reference models, checkpoint loading, ONNX export and engine building."""
