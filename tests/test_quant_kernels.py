"""kernels/quant_matmul.py: the Triton int8 / fp8 weight-only forward and input-gradient kernels (interpreter on CPU).

Reference: the dequantized weight in fp32 (quant.linear.dequantize_weight) and a plain matmul. Tolerances from
shared/specs/kernels.md §10: rel <= 1e-5 for fp32, <= 1e-2 for bf16 (bf16 tl.dot is usable under the interpreter
thanks to the fix in conftest.py).
"""
import pytest
import torch
import torch.nn as nn

from kernels.quant_matmul import QuantMatmulTriton, default_blocks, qmm_dgrad, qmm_forward, quant_linear
from quant.linear import QuantLinear, _DequantLinear, dequantize_weight, quantize_weight

BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)  # small tiles: several programs and K / N iterations per case
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make(N, K, fmt, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_weight(torch.randn(N, K, generator=g), fmt, group_size)
    return q, s, dequantize_weight(q, s, torch.float32)


def poisoned(M, K, dtype, seed=1):
    """x [M, K] as a strided view into a NaN-filled buffer: any read past the masks turns the output into NaN."""
    buf = torch.full((M + 3, K + 5), float("nan"), dtype=dtype)
    x = buf[:M, :K]
    x.copy_(torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(dtype))
    return x


CASES = [  # (M, N, K, group_size): ragged M / N / K against the 16-wide tiles, group sizes 16 and 8 (< BLOCK_K)
    (1, 16, 32, None), (17, 40, 48, None), (64, 40, 80, None),
    (17, 40, 48, 16), (64, 16, 80, 16), (17, 16, 32, 8),
]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("M,N,K,group_size", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_dgrad_vs_dequantized_reference(fmt, M, N, K, group_size, dtype):
    q, s, w = make(N, K, fmt, group_size)
    x = poisoned(M, K, dtype)
    bias = torch.randn(N).to(dtype) if (M + N) % 2 else None  # half the cases with a bias
    y = qmm_forward(x, q, s, bias, **BLOCKS)
    ref = x.float() @ w.T + (0 if bias is None else bias.float())
    assert y.dtype == dtype and y.shape == (M, N) and torch.isfinite(y).all()
    assert rel(y, ref) <= TOL[dtype]
    dy = poisoned(M, N, dtype, seed=2)
    dx = qmm_dgrad(dy, q, s, **BLOCKS)
    assert dx.dtype == dtype and dx.shape == (M, K) and torch.isfinite(dx).all()
    assert rel(dx, dy.float() @ w) <= TOL[dtype]


@pytest.mark.parametrize("bias", [True, False])
def test_forward_with_default_blocks_and_fp16(bias):
    q, s, w = make(40, 80, "int8", None)
    x = torch.randn(17, 80, dtype=torch.float16)
    b = torch.randn(40, dtype=torch.float16) if bias else None
    y = qmm_forward(x, q, s, b, **default_blocks(17, 40, 80))
    ref = x.float() @ w.T + (0 if b is None else b.float())
    assert y.dtype == torch.float16 and rel(y, ref) <= 2e-3


@pytest.mark.parametrize("fmt,group_size", [("int8", None), ("fp8", 16)])
def test_autograd_function_matches_dequant_linear(fmt, group_size):
    q, s, _ = make(40, 48, fmt, group_size)
    bias = torch.randn(40, requires_grad=True)
    x = torch.randn(2, 9, 48, requires_grad=True)  # leading dims are flattened and restored
    gy = torch.randn(2, 9, 40)
    out = {}
    for name, fn in (("triton", QuantMatmulTriton.apply), ("torch", _DequantLinear.apply)):
        x.grad = bias.grad = None
        y = fn(x, q, s, bias)
        y.backward(gy)
        out[name] = (y.detach(), x.grad.clone(), bias.grad.clone())
    for a, b in zip(out["triton"], out["torch"]):
        assert rel(a, b) <= 1e-5
    assert rel(quant_linear(x, q, s, bias, group_size, backend="triton"), out["torch"][0]) <= 1e-5
    assert torch.equal(quant_linear(x, q, s, bias, group_size), out["torch"][0])  # CPU "auto" = the torch path


def test_lora_on_a_quantized_base_through_the_kernels():
    # y = base(x) + B A x * scaling with the base through the Triton function vs through _DequantLinear:
    # the LoRA gradients (and dx) must agree; the quantized weight gets none.
    torch.manual_seed(0)
    base = QuantLinear.from_linear(nn.Linear(48, 40), "int8")
    A, B = torch.randn(4, 48) * 0.1, torch.randn(40, 4) * 0.1
    x0 = torch.randn(17, 48)
    grads = {}
    for backend in ("triton", "torch"):
        a, b, x = (t.clone().requires_grad_() for t in (A, B, x0))
        y = quant_linear(x, base.weight_q, base.weight_scale, base.bias, backend=backend) + (x @ a.T) @ b.T * 0.5
        y.pow(2).sum().backward()
        grads[backend] = (a.grad, b.grad, x.grad)
    for ga, gb in zip(grads["triton"], grads["torch"]):
        assert rel(ga, gb) <= 1e-5
    assert base.weight_q.grad is None and not base.bias.requires_grad


def test_quant_linear_module_uses_the_kernels_on_cuda_only(monkeypatch):
    # on CPU the module keeps the reference path; with a CUDA-looking input it would call QuantMatmulTriton
    m = QuantLinear.from_linear(nn.Linear(32, 16), "fp8")
    x = torch.randn(3, 32)
    calls = []
    monkeypatch.setattr(QuantMatmulTriton, "apply", lambda *a: calls.append(a) or _DequantLinear.apply(*a))
    y = m(x)
    assert not calls and rel(y, x @ m.dequantize(torch.float32).T + m.bias) <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,group_size", [("int8", None), ("fp8", None), ("int8", 64)])
def test_module_on_cuda_bf16(fmt, group_size):
    torch.manual_seed(0)
    lin = nn.Linear(256, 192).cuda().bfloat16()
    m = QuantLinear.from_linear(lin, fmt, group_size)
    x = torch.randn(4, 77, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    w = m.dequantize(torch.float32)
    assert rel(y, x.float() @ w.T + m.bias.float()) <= 1e-2
    gy = torch.randn_like(y)
    y.backward(gy)
    assert rel(x.grad, gy.float() @ w) <= 1e-2
