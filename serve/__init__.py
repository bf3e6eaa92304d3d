"""Serve stage, torch-free: the backend table and one opener per runtime (ONNX Runtime, OpenVINO, TensorRT), the
Segmenter (fitted, batched, ensembled and sliding-window prediction), `serve.predict`, the Gradio app
(`python -m serve`) and the Triton host (`serve.triton_server`)."""
