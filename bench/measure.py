"""
How the benchmarks measure on CPU: step times of several variants interleaved in one process, and peak resident
memory (CPU has no per-tensor allocator statistics, so the process's resident set size is sampled every millisecond
by a thread).

    release_frees_to_os()          # first thing in a bench script, before torch is imported (re-execs once)
    with PeakRSS() as p:
        step(batch)
    print(p.peak - rss_bytes())

glibc keeps freed memory below its mmap threshold for reuse, which hides what a variant gives back; with
MALLOC_MMAP_THRESHOLD_=65536 every tensor over 64 KiB is its own mapping and goes back to the OS when freed, so the
RSS peak of a variant measured alone in a fresh process is its own.
"""
import gc
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


def interleaved_times(steps: dict, batch, warmup: int, n: int):
    """steps: {name: step(batch) -> loss}, all built in this process. After `warmup` rounds their steps run
    interleaved (order alternating), so any drift of a noisy machine hits them alike. Returns
    ({name: [seconds per step]}, {name: last loss})."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name](batch)
    times, losses = {name: [] for name in names}, {}
    for i in range(n):
        for name in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            losses[name] = steps[name](batch)
            times[name].append(time.perf_counter() - t0)
    return times, losses


def step_memory(build, batch):
    """(total, step) peak RSS of one variant; call it alone in a fresh child process. build() -> (step, state to
    keep alive). total = over build + 2 steps above the RSS before the build (weights, LoRA, optimizer state,
    activations, one-time buffers); step = over a third step above the RSS just before it (what one step adds on top
    of the steady state: activations and their gradients)."""
    gc.collect()
    base = rss_bytes()
    with PeakRSS() as total:
        step, keep = build()
        step(batch)
        step(batch)
    gc.collect()
    before = rss_bytes()
    with PeakRSS() as one:
        step(batch)
    return total.peak - base, one.peak - before
