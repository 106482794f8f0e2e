"""What the machine can do, measured in the same run as a benchmark's figures: a large matrix
product's GFLOP/s in fp32 and bf16 (2048^3 on the benchmark's threads), so that a model's
achieved GFLOP/s can be given as a fraction of it; and the FLOPs a call performs, counted by
torch's FlopCounterMode (matrix products and attention; element-wise work is not counted).
bf16 is measured only where the CPU computes it natively: emulated, a 2048^3 bf16 product takes
minutes, and a share of it would mean nothing."""

from __future__ import annotations

import time

import torch

from vprkit.cpu_precision import native_on_cpu

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


def machine_limits() -> dict[str, float | None]:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s or None} of a 2048^3 matrix product on torch's
    threads; bf16 is None on a CPU that emulates it (not measured)."""
    bf16 = None if native_on_cpu("bf16") is False else matmul_gflops(torch.bfloat16)
    return {"fp32": matmul_gflops(torch.float32), "bf16": bf16}


def share(gflops: float, limits: dict[str, float | None], precision: str) -> str:
    """`gflops` as a percentage of the limit for `precision`, or "emulated" without one."""
    limit = limits["fp32" if precision == "fp32" else "bf16"]
    return "emulated" if limit is None else f"{gflops / limit:.0%}"


def describe_limits(limits: dict[str, float | None]) -> str:
    bf16 = (
        "bf16 emulated on this CPU (no AVX512-BF16/AMX; not measured)"
        if limits["bf16"] is None
        else f"{limits['bf16']:.0f} GFLOP/s bf16"
    )
    return (
        f"machine limit (2048^3 matmul, {torch.get_num_threads()} threads): "
        f"{limits['fp32']:.0f} GFLOP/s fp32, {bf16}"
    )


def count_flops(fn) -> int:
    """FLOPs of one call of `fn()` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
