"""
Peak resident memory of a block of code on CPU, for the benchmarks (CPU has no per-tensor allocator statistics, so
the process's resident set size is sampled every millisecond by a thread).

    release_frees_to_os()          # first thing in a bench script, before torch is imported (re-execs once)
    with PeakRSS() as p:
        step(batch)
    print(p.peak - rss_bytes())

glibc keeps freed memory below its mmap threshold for reuse, which hides what a variant gives back; with
MALLOC_MMAP_THRESHOLD_=65536 every tensor over 64 KiB is its own mapping and goes back to the OS when freed, so the
RSS peak of a variant measured alone in a fresh process is its own.
"""
import os
import sys
import threading
import time


def release_frees_to_os():
    """Re-exec this script once with MALLOC_MMAP_THRESHOLD_=65536 (it must be set before the process starts)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager: `.peak` is the highest RSS seen (bytes) between enter and exit."""

    def __enter__(self):
        self.peak, self.stop = rss_bytes(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
