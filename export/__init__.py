"""Export stage: run dir -> ONNX and TensorRT engines with a parity gate and manifest (not built yet)."""
