"""Guards for the interpreter numerics fix applied in tests/conftest.py (kernels.md §5.6).

The fix patches private triton names, so these tests check that (a) the patched names still exist with
the signatures the fix calls, (b) a bf16 `tl.dot` is right, (c) fp32/fp16/bf16 -> fp8 casts match torch
bit for bit, and (d) the unpatched interpreter still has the bugs: when (d) fails after a triton upgrade,
the fix may be removable. On a CUDA box (b) and (c) run the same kernels compiled, a parity check of the
references.
"""
import inspect

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

INTERPRET = triton.knobs.runtime.interpret
DEVICE = "cpu" if INTERPRET else "cuda"


@triton.jit
def _dot_kernel(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    # one program, one tile: C[M, N] = A[M, K] @ B[K, N], fp32 accumulator; all row-major contiguous
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    acc = tl.dot(a, b, tl.zeros((M, N), dtype=tl.float32))
    tl.store(C + rm[:, None] * N + rn[None, :], acc)


@triton.jit
def _cast_kernel(X, Y, n, BLOCK: tl.constexpr):
    # Y = X cast to Y's element type (default rounding: round-to-nearest-even)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0)
    tl.store(Y + offs, x.to(Y.dtype.element_ty), mask=mask)


# --- (a) the fix targets exist -------------------------------------------------------------------
def test_fix_targets_exist():
    # names and parameters the conftest wrappers rely on; a rename in a triton upgrade must fail here
    convert = getattr(interpreter, "_convert_float", None)
    dot = getattr(interpreter.InterpreterBuilder, "create_dot", None)
    assert convert is not None, "triton.runtime.interpreter._convert_float is gone: update tests/conftest.py"
    assert dot is not None, "InterpreterBuilder.create_dot is gone: update tests/conftest.py"
    convert, dot = getattr(convert, "__wrapped__", convert), getattr(dot, "__wrapped__", dot)
    assert list(inspect.signature(convert).parameters)[:4] == ["input", "input_dtype", "output_dtype",
                                                              "rounding_mode"]
    assert list(inspect.signature(dot).parameters)[:4] == ["self", "a", "b", "d"]
    assert interpreter.TensorHandle(np.zeros(1, np.float32), tl.float32).dtype == tl.float32
    assert interpreter._get_np_dtype(tl.bfloat16) == np.uint16  # bf16 still stored as raw bits
    if INTERPRET:  # and conftest actually installed the wrappers
        installed = [interpreter._convert_float.__name__, interpreter.InterpreterBuilder.create_dot.__name__]
        assert installed == ["_fixed_convert_float", "_fixed_create_dot"], "conftest did not patch triton"


@pytest.mark.skipif(not INTERPRET, reason="checks the interpreter itself")
def test_unpatched_interpreter_still_has_the_bugs():
    # pins the kernels.md §5.3 behaviour; if this fails, triton fixed it upstream and the fix may go
    convert = interpreter._convert_float.__wrapped__
    x = np.array([7.96, 500.0], dtype=np.float32)
    bits = convert(x, tl.float32, tl.float8e4nv, triton._C.libtriton.ir.ROUNDING_MODE.RTNE)
    got = torch.from_numpy(bits.astype(np.uint8)).view(torch.float8_e4m3fn).float().tolist()
    assert got == [4.0, 256.0]  # torch gives [8.0, 448.0]


# --- (b) bf16 dot --------------------------------------------------------------------------------
def test_bf16_dot():
    M, N, K = 32, 16, 64  # distinct sizes so a transposed operand cannot pass
    a = torch.randn(M, K, device=DEVICE).to(torch.bfloat16)
    b = torch.randn(K, N, device=DEVICE).to(torch.bfloat16)
    c = torch.empty(M, N, device=DEVICE)
    _dot_kernel[(1,)](a, b, c, M, N, K)
    ref = a.float() @ b.float()  # products of bf16 values are exact in fp32
    # the interpreter is exact (err 0); the tolerance allows the GPU's accumulation order. Unfixed: err ~1e10
    torch.testing.assert_close(c, ref, rtol=1e-4, atol=1e-4)


# --- (c) fp8 casts -------------------------------------------------------------------------------
FP8 = [(torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0)]


def _cast_inputs(fmax: float) -> torch.Tensor:
    # values at every scale (subnormals to overflow), plus hand-picked edges: just below a power of two
    # (the carry must bump the exponent), ties, the format max, and over-range values that must saturate
    x = torch.randn(4096) * torch.exp2(torch.randint(-12, 12, (4096,)).float())
    edges = [0.0, -0.0, 1.987, 7.84, 7.96, -7.96, 0.2998, 1.0625, 1.1875, 2.0**-9, 2.0**-10, 3 * 2.0**-10,
             fmax, 0.999 * fmax, 1.04 * fmax, 1.1 * fmax, 500.0, 1e4, -1e4, 1e6, -1e6, 3e38]
    return torch.cat([x, torch.tensor(edges), -x[:64] * fmax])


@pytest.mark.parametrize("src", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fp8,fmax", FP8)
def test_fp8_cast_matches_torch(src, fp8, fmax):
    if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 conversions need sm89+")
    x = _cast_inputs(fmax).to(src).to(DEVICE)  # fp16 turns the largest values into inf: must saturate too
    y = torch.empty(x.shape, dtype=fp8, device=DEVICE)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    # the fix saturates (kernels.md §5.6), so the reference clamps first: torch's own e4m3fn cast already
    # saturates, its e5m2 cast gives inf past 61440. On a GPU this checks the hardware agrees.
    ref = x.float().clamp(-fmax, fmax).to(fp8)
    if fp8 == torch.float8_e4m3fn:
        assert torch.equal(ref.view(torch.uint8), x.to(fp8).view(torch.uint8))
    wrong = y.view(torch.uint8) != ref.view(torch.uint8)
    bad = wrong.nonzero().flatten()[:5]
    examples = list(zip(x[bad].tolist(), y[bad].float().tolist(), ref[bad].float().tolist()))
    assert not wrong.any(), f"{int(wrong.sum())}/{x.numel()} mismatches, (input, got, want): {examples}"
