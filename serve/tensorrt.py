"""A TensorRT plan run natively (TensorRT 10/11 Python API, pycuda for memory and the stream).

Per call: `set_input_shape`, the execution context's device memory and pinned host and device buffers
sized for that shape (kept and reused while the shape repeats; the context's block only grows),
`set_tensor_address` for every I/O tensor, then host->device copy, `execute_async_v3`, device->host copy
on one stream. pycuda's errors (a GPU out of memory among them) become one RuntimeError naming the plan.
The engine owns a retained primary CUDA context and pushes it around each call, so any thread (Gradio's
workers) may call `run`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from serve.manifest import EngineEntry, Manifest

INSTALL_HINT = (
    "the native TensorRT backend needs `tensorrt` and `pycuda` on a CUDA host: "
    "pip install -e '.[gpu,trt]' --extra-index-url https://pypi.nvidia.com (pycuda builds against CUDA_ROOT)"
)


def cuda_errors() -> tuple[type[BaseException], ...]:
    """pycuda's error types where pycuda imports (they are not RuntimeErrors: a GPU out of memory raises
    `pycuda.driver.MemoryError`, a subclass of `pycuda.driver.Error`)."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        return ()
    return (cuda.Error,)


class TensorRTEngine:
    """A plan on one GPU. Its execution context's device memory is sized for the shape being run
    (TensorRT 10's user-managed allocation), not for the profile's largest input."""

    def __init__(self, plan: str | Path, manifest: Manifest | None = None, entry: EngineEntry | None = None, gpu=0):
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError as e:
            raise RuntimeError(f"{INSTALL_HINT} ({e})") from None
        self.cuda, self.manifest, self.entry, self.plan = cuda, manifest, entry, Path(plan)
        self.lock = threading.Lock()  # one execution context: calls take turns
        self.buffers: dict[str, tuple] = {}
        self.shape: tuple[int, ...] | None = None
        self.scratch, self.scratch_bytes = None, 0
        with self._cuda(f"opening it on GPU {gpu}"):
            cuda.init()
            self.context_cuda = cuda.Device(gpu).retain_primary_context()
            with self._active():
                self._load(trt, gpu)

    def _load(self, trt, gpu: int) -> None:
        plan = self.plan
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan}: TensorRT {trt.__version__} could not deserialize this plan")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeError(f"{plan}: expected one input and one output, got {inputs} and {outputs}")
        (self.input_name,), (self.output_name,) = inputs, outputs
        self.profile = [tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0)]
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)  # TensorRT >= 10
        self.user_memory = strategy is not None
        self.context = (
            self.engine.create_execution_context(strategy.USER_MANAGED)
            if strategy
            else self.engine.create_execution_context()
        )
        if self.context is None:  # with TensorRT's own allocation: sized for the profile's largest input
            free, total = self.cuda.mem_get_info()
            raise RuntimeError(
                f"{plan}: TensorRT could not create an execution context on GPU {gpu} ({free / 2**30:.1f} of "
                f"{total / 2**30:.1f} GiB free); its memory is sized for the profile's largest input "
                f"{self.profile[2]}: free the GPU, or re-export with a smaller --max-batch / --size and "
                "rebuild the plans"
            )
        self.stream = self.cuda.Stream()
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}

    @contextmanager
    def _cuda(self, doing: str):
        """pycuda's errors as one RuntimeError that names the plan and what to do."""
        try:
            yield
        except self.cuda.Error as e:
            hint = "free the GPU, or run smaller batches or images" if "memory" in str(e).lower() else (
                "check the driver and CUDA_VISIBLE_DEVICES (nvidia-smi)")  # fmt: skip
            raise RuntimeError(f"{self.plan}: CUDA error {doing}: {e}; {hint}") from None

    @contextmanager
    def _active(self):
        self.context_cuda.push()
        try:
            yield
        finally:
            self.context_cuda.pop()

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        low, _, high = self.profile
        if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high, strict=False)):
            raise ValueError(
                f"input shape {shape} is outside this plan's profile {low} .. {high}: serve.segmenter fits images "
                "into it; for larger inputs or batches re-export with --max-size / --max-batch and rebuild the plans"
            )

    def _bind(self, shape: tuple[int, ...]) -> None:
        """(Re)allocate and bind the buffers, and the context's memory for this shape, when the shape changes."""
        if shape == self.shape:
            return
        self.context.set_input_shape(self.input_name, shape)
        if self.user_memory:
            need = max(1, self.context.update_device_memory_size_for_shapes())
            if need > self.scratch_bytes:  # grown only: a smaller shape reuses the block
                self.scratch, self.scratch_bytes = None, 0  # freed before the larger one is taken
                self.scratch, self.scratch_bytes = self.cuda.mem_alloc(need), need
            self.context.set_device_memory(int(self.scratch), self.scratch_bytes)
        for name in (self.input_name, self.output_name):
            dims = shape if name == self.input_name else tuple(self.context.get_tensor_shape(name))
            host = self.cuda.pagelocked_empty(dims, self.dtypes[name])
            device = self.cuda.mem_alloc(max(host.nbytes, 1))
            self.context.set_tensor_address(name, int(device))
            self.buffers[name] = (host, device)
        self.shape = shape

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=self.dtypes[self.input_name])
        shape = tuple(batch.shape)
        self._check_shape(shape)
        with self.lock, self._cuda(f"running shape {shape}"), self._active():
            self._bind(shape)
            (host_in, dev_in), (host_out, dev_out) = self.buffers[self.input_name], self.buffers[self.output_name]
            np.copyto(host_in, batch)
            self.cuda.memcpy_htod_async(dev_in, host_in, self.stream)
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            self.cuda.memcpy_dtoh_async(host_out, dev_out, self.stream)
            self.stream.synchronize()
            return host_out.copy()
