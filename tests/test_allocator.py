"""lilt_ds.allocator: freed host memory is reused instead of page-faulted in again (glibc)."""

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# each line: the minor page faults of touching a fresh 256 MiB tensor ten times, before and after
PROBE = """
import resource, sys, torch
from lilt_ds.allocator import retain_freed_memory

def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(64 * 2**20)  # 256 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
took = retain_freed_memory()
faults()  # the first allocation after the switch comes from the heap once
print(took, before, faults())
"""


def probe(env=None):
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **(env or {})),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    took, before, after = result.stdout.split()
    return took == "True", int(before), int(after)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_large_blocks_are_reused_without_page_faults():
    took, before, after = probe()
    assert took
    pages = 10 * 256 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert before > pages // 2  # every fresh mmap'd block faults its pages in (huge pages make it fewer)
    assert after < before // 20


def test_system_keeps_the_c_library_settings():
    took, before, after = probe({"LILT_DS_MALLOC": "system"})
    assert not took
