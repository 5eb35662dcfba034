"""Test-session setup: Triton interpreter on CPU, offline Hugging Face, markers, seeding, the torchrun launcher.

What the suite assumes of the machine: any x86-64 CPU (any SIMD width: AVX2, AVX-512, or ATen's `default` code
path), any intra-op thread count (OMP_NUM_THREADS=1, 2, 3, ...) and any load. So a test asserts exact equality only
between runs of the same ops on the same shapes with the same thread count (resume vs the straight run, a run
repeated, N processes vs 1 where the code makes them identical, data movement, file round trips). Between different
computations (our module vs a reference, a prefix vs the whole, chunked vs one shot, fp32 vs fp64, Triton
interpreter vs torch) it uses a tolerance derived from the computation (fp32 accumulation over K terms, bf16
rounding, ...), justified where it is written, never from an error measured on one machine. Multi-process tests run
through `torchrun` below: the rendezvous binds its own port (no port is picked and released first), and the time
limit grows with the machine's load. `.ci/run` runs the numerics-sensitive files again under other CPU code paths
(ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=AVX2, OMP_NUM_THREADS=1) to catch a machine-specific assumption.

The environment must be set before any project module is imported: `@triton.jit` picks
interpreter vs compiler when the decorator runs, i.e. when `kernels/*` is imported.
See shared/specs/kernels.md §5 and shared/specs/environment.md §12.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU driver: simulate kernels with numpy
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download; hub ids must already be cached
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # silences the fork warning under pytest-xdist

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton._C.libtriton import ir  # noqa: E402
from triton.runtime import interpreter as _interp  # noqa: E402

# --- interpreter numerics fix (kernels.md §5.6), triton 3.7.1 ---------------------------------
# Two bugs in triton/runtime/interpreter.py:
# 1. bf16 is stored as raw uint16 numpy arrays, and InterpreterBuilder.create_dot matmuls those
#    bit patterns (errors ~1e10). Fix: upcast bf16 operands to fp32 before the original dot.
# 2. _convert_float (used by every fp -> fp8 cast) drops the rounding carry into the exponent
#    (7.96 -> 4.0, torch and the GPU give 8.0) and never saturates (500 -> 256 for e4m3).
#    Fix: do fp32/fp16/bf16 -> fp8 in torch (round-to-nearest-even), clamped to the format max
#    first: saturating, as torch's own e4m3fn cast is (its e5m2 cast would give inf).
# Both are private names; tests/test_interpreter_fix.py fails loudly if they disappear.
_FP8 = {  # triton fp8 dtype -> (torch dtype, largest finite value)
    tl.float8e4nv: (torch.float8_e4m3fn, 448.0),
    tl.float8e5: (torch.float8_e5m2, 57344.0),
    tl.float8e4b8: (torch.float8_e4m3fnuz, 240.0),
    tl.float8e5b16: (torch.float8_e5m2fnuz, 57344.0),
}
_SRC = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}


def _fixed_convert_float(input, input_dtype, output_dtype, rounding_mode):
    # round-toward-zero (only via explicit fp_downcast_rounding="rtz") keeps the original path
    if output_dtype not in _FP8 or input_dtype not in _SRC or rounding_mode == ir.ROUNDING_MODE.RTZ:
        return _orig_convert_float(input, input_dtype, output_dtype, rounding_mode)
    torch_fp8, fmax = _FP8[output_dtype]
    bits = np.ascontiguousarray(input).view(f"int{input_dtype.primitive_bitwidth}")  # bf16 arrives as uint16
    x = torch.from_numpy(bits).view(_SRC[input_dtype]).float().clamp(-fmax, fmax)  # clamp keeps NaN
    return x.to(torch_fp8).view(torch.uint8).numpy().reshape(input.shape)  # RTNE, uint8 bit pattern


def _fixed_create_dot(self, a, b, d, *args, **kwargs):
    def as_fp32(h):  # bf16 handle (uint16 bits) -> fp32 handle, via the original exact upcast
        if h.dtype != tl.bfloat16:
            return h
        data = _orig_convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return _interp.TensorHandle(data, tl.float32)

    return _orig_create_dot(self, as_fp32(a), as_fp32(b), d, *args, **kwargs)


_orig_convert_float = getattr(_interp, "_convert_float", None)
_orig_create_dot = getattr(_interp.InterpreterBuilder, "create_dot", None)
if triton.knobs.runtime.interpret and _orig_convert_float and _orig_create_dot:
    # _convert_float is looked up as a module global at call time, so patching the module covers
    # create_fp_to_fp, cast_impl and create_dot. Missing targets: the guard test reports it.
    _fixed_convert_float.__wrapped__ = _orig_convert_float  # the guard test reaches the originals here
    _fixed_create_dot.__wrapped__ = _orig_create_dot
    _interp._convert_float = _fixed_convert_float
    _interp.InterpreterBuilder.create_dot = _fixed_create_dot


# --- multi-process tests -----------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def run_torchrun(nproc: int, script, *argv, timeout: float = 300.0) -> str:
    """`torchrun --standalone` on this machine: the rendezvous store binds port 0 and the workers reuse it, so two
    tests (or another program) can never race for a port picked in advance. Each worker runs one thread (the runs
    compared against it are written for that). `timeout` is for an idle 2-core machine; it grows with the load
    average per core, so a busy machine (pytest -n 2 plus these processes) slows a run down but does not fail it.
    Returns stdout; a failure shows the end of both streams."""
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    limit = timeout * min(8.0, max(1.0, load) * max(1.0, nproc / (os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *map(str, argv)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"torchrun ran past {limit:.0f} s (load {load:.1f} per core): {e.stdout!s:.2000}") from e
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="session")
def torchrun():
    """The launcher above, as a fixture (tests never import each other or conftest)."""
    return run_torchrun


# --- markers and seeding ---------------------------------------------------------------------
def pytest_collection_modifyitems(config, items):
    # `gpu` tests skip without CUDA; `slow` is only a label, deselect with -m "not slow"
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every test starts from the same RNG state, whatever ran before
