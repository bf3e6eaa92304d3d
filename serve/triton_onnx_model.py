"""A Triton Python-backend model that runs the `model.onnx` beside it with ONNX Runtime.

`python -m export.triton --python-backend` copies this file as `<model>/1/model.py`: the repository then
loads in any Triton server with the Python backend (PyTriton's `tritonserver` has no ONNX Runtime or
TensorRT backend), and onnxruntime (or onnxruntime-gpu) must import in the Python that runs its stub.
Self-contained on purpose: it imports neither torch nor this project.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        providers = ["CPUExecutionProvider"]
        if args["model_instance_kind"] == "GPU":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        self.session = ort.InferenceSession(str(path), providers=providers)

    def execute(self, requests: list) -> list:
        """Requests of one shape (Triton's dynamic batch) run as one batch; an error answers its requests only."""
        feeds, by_shape = [], defaultdict(list)
        for i, request in enumerate(requests):
            feeds.append({n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs})
            by_shape[tuple(a.shape[1:] for a in feeds[i].values())].append(i)
        responses: list = [None] * len(requests)
        for members in by_shape.values():
            batch = {n: np.concatenate([feeds[i][n] for i in members]) for n in self.inputs}
            try:
                outputs = self.session.run(self.outputs, batch)
            except Exception as e:  # ONNX Runtime raises bare Exception subclasses
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                continue
            start = 0
            for i in members:
                end = start + len(feeds[i][self.inputs[0]])
                tensors = [pb_utils.Tensor(n, out[start:end]) for n, out in zip(self.outputs, outputs, strict=True)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start = end
        return responses
