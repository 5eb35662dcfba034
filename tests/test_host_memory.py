"""
host_memory.keep_freed_host_memory: on glibc, a freed large buffer is reused by the next allocation instead of being
unmapped and faulted in again (measured as minor page faults in a fresh child process); glibc's own MALLOC_* variables
win over it.
"""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc only")

CHILD = """
import resource, sys
import torch
from host_memory import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else False
n = 64 << 20  # bytes: far above glibc's mmap threshold (32 MiB at most)
for _ in range(2):  # the first round may grow the heap
    x = torch.empty(n, dtype=torch.uint8).fill_(1)
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.empty(n, dtype=torch.uint8).fill_(1)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, n // 4096)
"""


def _faults(mode, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=REPO, env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


def test_freed_large_buffers_are_reused_without_page_faults():
    applied, faults, pages = _faults("keep")
    assert applied
    assert faults < pages // 20, (faults, pages)  # 64 MiB = 16384 pages; reused heap memory faults (almost) none


def test_default_malloc_faults_every_page_again():
    """What the policy fixes: without it every 64 MiB allocation is a fresh mapping, one fault per page."""
    applied, faults, pages = _faults("plain")
    assert not applied
    assert faults > pages * 0.9, (faults, pages)


def test_user_malloc_variables_win():
    applied, faults, pages = _faults("keep", MALLOC_MMAP_MAX_="65536")
    assert not applied
    assert faults > pages * 0.9, (faults, pages)
    assert not _faults("keep", GLIBC_TUNABLES="glibc.malloc.mmap_max=65536")[0]
