"""Whether this CPU does bf16/fp16 arithmetic natively, and one warning when it does not.

On an x86 CPU without AVX512-BF16 or AMX, PyTorch emulates bf16 matrix products: measured on
an AVX2-only EPYC with 2 threads, a 512^3 bf16 product ran at 1.3 GFLOP/s against 80 fp32
(about 60x slower), and fp16 the same without AVX512-FP16 or AMX-FP16. A user who asks for
`--precision bf16` there to go faster would wait far longer, so vprkit says so once, with
what to use instead.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# What makes each precision native on x86: torch's own CPU feature checks, and for fp16 also
# AVX512-FP16 (Sapphire Rapids has it without AMX-FP16), which torch has no check for.
_NATIVE_X86 = {
    "bf16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
    "fp16": ("_is_amx_fp16_supported",),
}
_CPUINFO_FLAGS = {"bf16": (), "fp16": ("avx512_fp16",)}
_FEATURE_NAMES = {"bf16": "AVX512-BF16 or AMX", "fp16": "AVX512-FP16 or AMX-FP16"}


@functools.cache
def _cpuinfo_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), None where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def native_on_cpu(precision: str) -> bool | None:
    """True/False whether this x86 CPU computes `precision` ("bf16"/"fp16") natively; None
    where it cannot be told (other architectures, or a torch without the checks). "fp32" is
    always native."""
    if precision == "fp32":
        return True
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    checks = [getattr(torch.cpu, name, None) for name in _NATIVE_X86[precision]]
    if any(check is None for check in checks):
        return None
    if any(check() for check in checks):
        return True
    if _CPUINFO_FLAGS[precision]:
        flags = _cpuinfo_flags()
        if flags is None:
            return None
        return any(flag in flags for flag in _CPUINFO_FLAGS[precision])
    return False


@functools.cache
def _warn_once(precision: str) -> None:
    log.warning(
        "precision %s: this CPU has no native %s arithmetic (%s), so PyTorch emulates it and "
        "it runs many times slower than fp32 (about 60x measured on an AVX2 CPU); leave the "
        "precision at fp32 on this machine",
        precision,
        precision,
        _FEATURE_NAMES[precision],
    )


def warn_if_emulated(device: str | torch.device, precision: str) -> None:
    """One warning per precision when `precision` would run emulated on this CPU."""
    on_cpu = torch.device(device).type == "cpu"
    if precision != "fp32" and on_cpu and native_on_cpu(precision) is False:
        _warn_once(precision)
