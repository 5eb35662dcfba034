"""
How a CPU run allocates host memory: keep freed large buffers for the next step instead of handing them back to the
kernel.

glibc's malloc serves every request over its mmap threshold (128 KiB at first, raised up to 32 MiB as blocks are
freed) with a fresh `mmap` and unmaps it on `free`. A training step on CPU allocates the same large buffers every
step (activations, the gathered K/V blocks of block-sparse attention and their gradients), so each step pays one
page fault per 4 KiB page touched, plus the kernel zeroing it, all over again: at LongCat-Video's attention shapes
that is about a third of a block-sparse attention step (bench/RESULTS.md, bench_bsa). CUDA has the same problem and
PyTorch solves it there with its caching allocator; on CPU the same effect is two glibc settings:

    M_MMAP_MAX = 0             large blocks come from the heap, so a freed block is reused by the next request
    M_TRIM_THRESHOLD = 2 GiB   the heap keeps up to 2 GiB of free memory at its top instead of returning it

The price is the caching allocator's: resident memory stays near its high-water mark after large buffers are freed,
and reuse can fragment the heap. Measured on CPU: the tiny 3-step image run of tests/test_memory_estimate.py peaked
at 0.647 GB against 0.556 GB (+16%); a 4.6k-token LongCat-Video LoRA step (bench_train_video's small DiT) at
2.27-2.44 GB against 2.28-2.39 GB, 8-10% faster with BSA and even without. `keep_freed_host_memory()` is called by
the training scripts (distributed.init_distributed) and validate.py when they run on CPU, and by
bench/bench_bsa.py for both sides of its comparison.
It leaves malloc alone when the user set glibc's own malloc variables (MALLOC_MMAP_MAX_=65536 restores the default
behaviour; the memory benchmarks set MALLOC_MMAP_THRESHOLD_), and it does nothing off glibc (macOS, musl).
"""
import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
USER_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_chose_malloc_settings() -> bool:
    return (any(name in os.environ for name in USER_MALLOC_VARIABLES)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def keep_freed_host_memory() -> bool:
    """Make glibc malloc reuse freed large blocks (see the module docstring). True when the settings were applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_chose_malloc_settings():
        return False
    libc = ctypes.CDLL(None)  # the process's own C library
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
