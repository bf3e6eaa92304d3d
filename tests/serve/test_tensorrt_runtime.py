"""serve.tensorrt's own logic against stand-ins for tensorrt and pycuda (neither installs here): CUDA errors
become one readable RuntimeError, and the context's memory follows the shape being run."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest


class CudaError(Exception):
    """pycuda.driver.Error: not a RuntimeError."""


class Allocation:
    def __init__(self, address: int) -> None:
        self.address = address

    def __int__(self) -> int:
        return self.address


class Context:
    def __init__(self, strategy) -> None:
        self.strategy, self.shape, self.memory = strategy, None, []

    def set_input_shape(self, name, shape):
        self.shape = shape

    def update_device_memory_size_for_shapes(self) -> int:
        return int(np.prod(self.shape)) * 100  # what this shape needs, not the profile's maximum

    def get_tensor_shape(self, name):
        return self.shape[:3]

    def set_tensor_address(self, name, address):
        pass

    def set_device_memory(self, address, size):
        self.memory.append(size)

    def execute_async_v3(self, stream) -> bool:
        return True


class Engine:
    num_io_tensors = 2

    def get_tensor_name(self, i):
        return ["image", "labels"][i]

    def get_tensor_mode(self, name):
        return "in" if name == "image" else "out"

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 8, 8, 3), (1, 16, 16, 3), (4, 32, 32, 3)]

    def get_tensor_dtype(self, name):
        return np.uint8

    def create_execution_context(self, strategy=None):
        self.context = Context(strategy)
        return self.context


@pytest.fixture
def stand_ins(monkeypatch):
    """pycuda.driver and tensorrt modules with the calls serve.tensorrt makes; `log` records allocations."""
    log = SimpleNamespace(allocations=[], fail_alloc=None, fail_init=None, engine=Engine())
    driver = types.ModuleType("pycuda.driver")
    driver.Error = CudaError

    def init():
        if log.fail_init:
            raise log.fail_init

    def mem_alloc(size):
        if log.fail_alloc:
            raise log.fail_alloc
        log.allocations.append(size)
        return Allocation(len(log.allocations))

    driver.init, driver.mem_alloc = init, mem_alloc
    driver.Device = lambda gpu: SimpleNamespace(retain_primary_context=lambda: SimpleNamespace(push=int, pop=int))
    driver.pagelocked_empty = lambda dims, dtype: np.zeros(dims, dtype)
    driver.memcpy_htod_async = driver.memcpy_dtoh_async = lambda *args: None
    driver.Stream = lambda: SimpleNamespace(handle=0, synchronize=int)
    driver.mem_get_info = lambda: (1 << 30, 16 << 30)
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.16.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: log.engine)
    trt.TensorIOMode = SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED="user-managed")
    trt.nptype = lambda dtype: dtype
    for name, module in (("pycuda", pycuda), ("pycuda.driver", driver), ("tensorrt", trt)):
        monkeypatch.setitem(sys.modules, name, module)
    return log


def test_the_contexts_memory_is_sized_for_the_shape_run_not_the_profiles_maximum(stand_ins, tmp_path):
    from serve.tensorrt import TensorRTEngine

    (tmp_path / "model.plan").write_bytes(b"plan")
    engine = TensorRTEngine(tmp_path / "model.plan")
    context = stand_ins.engine.context
    assert context.strategy == "user-managed"
    engine.run(np.zeros((1, 8, 8, 3), np.uint8))
    assert context.memory == [1 * 8 * 8 * 3 * 100]  # the profile's max would be 4 * 32 * 32 * 3 * 100
    engine.run(np.zeros((2, 16, 16, 3), np.uint8))
    engine.run(np.zeros((1, 8, 8, 3), np.uint8))  # smaller again: the larger block is reused, not reallocated
    grown = 2 * 16 * 16 * 3 * 100
    assert context.memory[1:] == [grown, grown] and grown in stand_ins.allocations
    assert stand_ins.allocations.count(grown) == 1


def test_cuda_errors_are_one_runtime_error_naming_the_plan_and_the_fix(stand_ins, tmp_path):
    from serve.tensorrt import TensorRTEngine, cuda_errors

    assert cuda_errors() == (CudaError,)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan")
    stand_ins.fail_init = CudaError("cuInit failed: no CUDA-capable device is detected")
    with pytest.raises(RuntimeError, match=r"model.plan: CUDA error opening it on GPU 0: cuInit failed.*nvidia-smi"):
        TensorRTEngine(plan)
    stand_ins.fail_init = None
    engine = TensorRTEngine(plan)
    stand_ins.fail_alloc = CudaError("cuMemAlloc failed: out of memory")
    with pytest.raises(RuntimeError, match=r"model.plan: CUDA error running shape \(4, 32, 32, 3\): .*free the GPU"):
        engine.run(np.zeros((4, 32, 32, 3), np.uint8))
