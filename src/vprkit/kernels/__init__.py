"""vprkit's own CPU kernels, compiled on first use for the machine they run on.

R2Former's re-ranking transformer is tiny (32 channels, 4 heads of 8) and runs on many short
sequences; PyTorch's CPU kernels run those shapes far below the machine's speed. Two kernels:

- `small_head_attention(q, k, v, heads)`: exact softmax attention for head sizes 8, 16 and 32
  (`small_head_attention.cpp`), for the re-ranker's 1,001-token stage;
- `groups_first_token(x, weights, heads, eps)`: many short sequences through timm pre-norm
  blocks, one sequence per vector lane (16 lanes with AVX-512, 8 with AVX2;
  `transformer_groups.cpp`), for its 1,000 groups per pair.

Both are float32 inference only and agree with PyTorch's ops to rounding; where they do not
apply (another device or dtype, gradients, tracing, no kernel) the functions return None and the
callers take PyTorch's ops, which stay the reference. `benchmarks/bench_rerank_r2former.py`
measures them.

The sources (`*.cpp`, `lanes.h`, beside this file) are built once with the C++ compiler (`$CXX`,
else `c++`) against the installed torch, with `-march=native`, into `$VPRKIT_CACHE/kernels`
(default `~/.cache/vprkit/kernels`), named by a hash of the sources, torch's version, the
compiler and the CPU's features: a changed source, torch, compiler or machine builds anew. A
missing compiler or a failed build logs one warning with the reason and falls back;
`VPRKIT_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = sorted(HERE.glob("*.cpp"))
HEADERS = sorted(HERE.glob("*.h"))
LIBRARY = "vprkit_kernels"
_enabled = True  # see `disabled()`
HEAD_SIZES = (8, 16, 32)


def cache_dir() -> Path:
    root = os.environ.get("VPRKIT_CACHE") or Path.home() / ".cache" / "vprkit"
    return Path(root) / "kernels"


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compile_command(compiler: str, out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    torch_lib = library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler,
        *("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++20"),
        *("-shared", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"),
        *(f"-I{p}" for p in include_paths()),
        *(str(p) for p in SOURCES),
        # torch's own libgomp (already loaded by torch) is the OpenMP runtime at run time
        *(f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"),
        "-o",
        str(out),
    ]


def _build(compiler: str) -> Path:
    """The compiled library for this source, torch, compiler and CPU; built if missing."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    key = hashlib.sha256(
        "\n".join(
            [
                *(p.read_text() for p in SOURCES + HEADERS),
                torch.__version__,
                version,
                _cpu_features(),
            ]
        ).encode()
    ).hexdigest()[:16]
    folder = cache_dir()
    lib = folder / f"{LIBRARY}-{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    log.info("compiling vprkit's CPU kernels once (cached in %s)", folder)
    # Built under a temporary name and renamed: a concurrent build or a killed one never leaves
    # a half-written library under the final name.
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.partial")
    os.close(fd)
    try:
        done = subprocess.run(_compile_command(compiler, Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line]
            raise RuntimeError((errors or done.stderr.splitlines() or ["no output"])[0])
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def load():
    """`torch.ops.vprkit` with the kernels, built and loaded on the first call; None when
    turned off, on a platform without a C++ compiler, or when the build fails (warned once)."""
    if os.environ.get("VPRKIT_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        log.warning(
            "no C++ compiler (%s): R2Former's re-ranker runs on PyTorch's ops (slower); "
            "install one (Debian: apt-get install g++) for vprkit's kernel",
            compiler,
        )
        return None
    try:
        torch.ops.load_library(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("vprkit's CPU kernels are not available (%s); using PyTorch's ops", err)
        return None
    return torch.ops.vprkit


@contextlib.contextmanager
def disabled():
    """PyTorch's ops instead of the kernels inside the block (benchmarks and tests compare the
    two in one process; `VPRKIT_KERNELS=0` does it for a whole run)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def _applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may replace PyTorch's ops here: float32 CPU tensors in inference
    (no gradient needed), not while tracing, scripting, compiling or exporting."""
    grad = torch.is_grad_enabled()
    return (
        _enabled
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not (grad and any(t.requires_grad for t in tensors))
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
    )


def small_head_attention(q, k, v, heads: int):
    """softmax(q k^T / sqrt(head size)) v per head, or None where the kernel does not apply
    (see `_applies`; a head size other than 8, 16, 32; no kernel). q (B, Nq, C), k and v
    (B, N, C), channels contiguous (views into a fused qkv output are fine)."""
    head = q.shape[-1] // heads
    if head not in HEAD_SIZES or not _applies(q, k, v) or (kernel := load()) is None:
        return None
    return kernel.small_head_attention(q, k, v, heads, head**-0.5)


def groups_first_token(x, weights: list, heads: int, eps: float):
    """The first token of each of G short sequences x (G, T, C) after timm pre-norm blocks
    (the last computed for the first token only): (G, C), or None where the kernel does not
    apply. `weights`: 12 tensors per block (see transformer_groups.cpp)."""
    if not _applies(x, *weights) or (kernel := load()) is None:
        return None
    weights = [w.detach().contiguous() for w in weights]
    return kernel.groups_first_token(x.contiguous(), weights, heads, eps)
