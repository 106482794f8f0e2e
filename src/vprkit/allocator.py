"""Keep the memory a batch frees for the next batch, instead of handing it back to the OS.

A ViT batch allocates large tensors (at 322x322, batch 16, each MLP hidden activation of
ViT-B/14 is 104 MiB). glibc's malloc serves blocks over 32 MiB with their own `mmap` and
returns them with `munmap` when freed, and trims other freed memory at the top of its heap;
the next batch's tensors then fault their pages in afresh, and the kernel zeroes every page.
On 2 threads that made the element-wise work between the matrix products (GELU, the bias
additions) about 4x slower than on memory already mapped (an exact GELU over 16x530x3072
floats: 44 ms into fresh memory, 10 ms into reused). `keep_freed_memory()` tells
glibc to serve every block from its heap (`M_MMAP_MAX=0`) and to keep up to 2 GiB free at the
heap's top (`M_TRIM_THRESHOLD`), so a process's memory stays mapped at its high-water mark and
each batch reuses the last one's pages. `benchmarks/bench_allocator.py` measures what it
gives.

The `vprkit` command calls it for every verb (and Ray's extraction workers for themselves);
Python users call it once in their own process. `VPRKIT_KEEP_FREED_MEMORY=0` turns it off. It
does nothing where the C library is not glibc (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt takes an int: the largest threshold it accepts is just under 2 GiB.
KEPT_FREE_BYTES = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory mapped for reuse in this process (see the module doc).
    Returns whether it is in effect: False where turned off by `VPRKIT_KEEP_FREED_MEMORY=0`
    or where the C library is not glibc. Once on, it stays on for the process."""
    if os.environ.get("VPRKIT_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        done = libc.mallopt(_M_MMAP_MAX, 0) == 1
        done = done and libc.mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES) == 1
    except (OSError, AttributeError) as err:
        log.debug("mallopt is not available (%s): freed memory goes back to the OS", err)
        return False
    return done
