"""Export stage: run dir -> ONNX and TensorRT engines, each through a parity gate, with a manifest and a card."""
