"""vprkit.allocator: freed memory stays mapped, so later batches' tensors fault no pages in."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="keep_freed_memory acts on glibc's malloc only",
)

MIB = 64
PAGES = MIB * 2**20 // 4096

# A "batch": one large tensor (above glibc's 32 MiB mmap threshold), written and freed; the
# page faults of 5 batches after 10 are counted. (The first few batches grow the heap: torch's
# 64-byte aligned blocks do not always fit the block freed before them. Measured: the heap
# stops growing within 10 batches, at 4x the batch's size at most.)
SCRIPT = f"""
import resource, torch
from vprkit.allocator import keep_freed_memory

kept = keep_freed_memory()

def faults_of_one_batch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty({MIB} * 2**20 // 4)
    x.fill_(1.0)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

for _ in range(10):
    faults_of_one_batch()
print(kept, sum(faults_of_one_batch() for _ in range(5)))
"""


def _later_batches_faults(env_value: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "VPRKIT_KEEP_FREED_MEMORY"}
    if env_value is not None:
        env["VPRKIT_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


def _huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


def test_a_batch_reuses_the_pages_of_the_batches_before():
    kept, faults = _later_batches_faults(None)
    assert kept
    assert faults < PAGES // 20, f"{faults} page faults in 5 batches of {PAGES} pages"


def test_turned_off_the_pages_are_faulted_in_again():
    kept, faults = _later_batches_faults("0")
    assert not kept
    # every 4 KiB page again, or every 2 MiB one where the kernel always uses huge pages
    expected = PAGES // 512 if _huge_pages_always() else PAGES * 9 // 10
    assert faults >= 5 * expected


def test_the_vprkit_command_turns_it_on():
    code = (
        "from vprkit.cli import main; from vprkit.allocator import keep_freed_memory; "
        "main(['models']); print(keep_freed_memory.cache_info().currsize)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split()[-1] == "1"
