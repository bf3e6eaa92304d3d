"""Facts about the machine a benchmark ran on: the CPU's name (serve.host's, which serving decisions use
too) and its arithmetic peaks. Torch is imported only by the peak probe that needs it."""

from __future__ import annotations

import time

from serve.host import cpu_model

__all__ = ["cpu_model", "gemm_peaks"]


def gemm_peaks(seconds: float = 0.5) -> dict[str, float]:
    """This CPU's GFLOP/s ceiling in fp32, bf16 and int8, the best of a 2048^3 matrix product and a
    1x1 convolution of the same size (oneDNN's conv kernels, the ones inference engines reach, beat
    torch.mm's BLAS on some CPUs); int8: torch's int8 GEMM. Measured with torch's threads."""
    import torch
    import torch.nn.functional as F

    n = 2048
    a = torch.randn(n, n)
    x = torch.randn(1, n, 32, 64).contiguous(memory_format=torch.channels_last)  # 2048 pixels
    w = torch.randn(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
    candidates = {
        "fp32": [(torch.mm, a, a), (F.conv2d, x, w)],
        "bf16": [(torch.mm, a.bfloat16(), a.bfloat16()), (F.conv2d, x.bfloat16(), w.bfloat16())],
        "int8": [(torch._int_mm, *(a.clamp(-1, 1).mul(127).to(torch.int8),) * 2)],
    }
    peaks = {}
    with torch.no_grad():
        for precision, ops in candidates.items():
            best = float("inf")
            for op, u, v in ops:
                op(u, v)  # warm-up
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    op(u, v)
                    best = min(best, time.perf_counter() - started)
            peaks[precision] = 2 * n**3 / best / 1e9
    return peaks
