"""What the machine can do, measured in the same run as a benchmark's figures: a large matrix
product's GFLOP/s in fp32 and bf16 (2048^3 on the benchmark's threads), so that a model's
achieved GFLOP/s can be given as a fraction of it; and the FLOPs a call performs, counted by
torch's FlopCounterMode (matrix products and attention; element-wise work is not counted)."""

from __future__ import annotations

import time

import torch

SIZE = 2048


def matmul_gflops(dtype: torch.dtype, size: int = SIZE, repeats: int = 10) -> float:
    """Best of `repeats` timed (size x size) @ (size x size) products, after 3 warm-ups (one
    reading has come out at half the idle figure on this shared machine: take the best)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(3):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def machine_limits() -> dict[str, float]:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s} of a 2048^3 matrix product on torch's threads."""
    return {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}


def describe_limits(limits: dict[str, float]) -> str:
    return (
        f"machine limit (2048^3 matmul, {torch.get_num_threads()} threads): "
        f"{limits['fp32']:.0f} GFLOP/s fp32, {limits['bf16']:.0f} GFLOP/s bf16"
    )


def count_flops(fn) -> int:
    """FLOPs of one call of `fn()` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
