"""
Weight-only int8 / fp8 linear layers for a frozen base: y = x @ (s * Wq)^T + b and dx = dy @ (s * Wq), in Triton.

Formats (quant/linear.py, ../shared/specs/kernels.md §9): Wq [N, K] int8 (symmetric, [-127, 127]) or float8_e4m3fn,
fp32 scales [N, 1] (per output channel) or [N, K / G] (group-wise along K, G = group size). The weight is never
dequantized in memory: each program loads a 1-byte weight tile and converts it in registers.

Algorithm:
  1. Forward `_qmm_fwd_kernel`, one program per (BLOCK_M x BLOCK_N) tile of y [M, N]:
       for each BLOCK_K slice of K: load x [BLOCK_M, BLOCK_K] and Wq [BLOCK_N, BLOCK_K] (masked, ragged M/N/K),
         per channel: w = Wq -> x's dtype (exact: |int8| <= 127 and every e4m3 value fit in bf16 / fp16),
         group-wise:  w = (Wq * s[n, k // G]) in fp32 -> x's dtype (the scale changes along K, so it goes in here),
         acc += x @ w^T (tl.dot, fp32 accumulator; ieee fp32 for fp32 inputs, not TF32);
       epilogue: per channel acc *= s[n] (it factors out of the K sum), acc += bias (fp32), store in x's dtype.
  2. Input gradient `_qmm_dgrad_kernel`, one program per (BLOCK_M x BLOCK_K) tile of dx [M, K], reduction over N:
       for each BLOCK_N slice of N: load dy [BLOCK_M, BLOCK_N] and Wq [BLOCK_N, BLOCK_K],
         w = (Wq * s) in fp32 -> dy's dtype (s per row n, or per (n, K-group)), acc += dy @ w;
       store in dy's dtype. The scale cannot go in the epilogue here (it varies along the reduction axis N).
       There is no weight-gradient kernel: the base is frozen (LoRA adapters are separate nn.Linear layers).
  3. `QuantMatmulTriton` (torch.autograd.Function): kernel 1 forward, kernel 2 backward, bias grad = dy summed; it
     saves the 1-byte weight and the scales, as quant.linear._DequantLinear does.
  4. `quant_linear(x, q, scale, bias)`: the Triton path on CUDA tensors, the PyTorch reference (dequantize +
     F.linear, `_DequantLinear`) elsewhere.

The bf16 rounding matches the reference: it rounds q * s to bf16 once, like `dequantize_weight(q, s, bf16)`; in the
per-channel forward the kernel multiplies the fp32 accumulator by s instead (more exact, not bit-identical).

Under TRITON_INTERPRET=1 the kernels run on CPU tensors (the tests call the launchers directly); bf16 tl.dot and
fp32 -> fp8 casts need the interpreter fix in tests/conftest.py (kernels.md §5.6); no cast to fp8 happens here.
Plain pointer arithmetic with masks (no block pointers, removed in triton 3.9); masked fp8 loads use other=0.0.

Not here yet: W8A8 (fp8 activations via torch._scaled_mm or tl.dot on fp8 operands), autotuning, fusing the LoRA
matmuls into the epilogue. On GPUs below sm89 the fp8 -> fp32 conversion of e4m3 may not compile in Triton.
References: the Triton matmul tutorial (python/tutorials/03-matrix-multiplication.py) for the tile loop; gpt-fast's
WeightOnlyInt8Linear and optimum-quanto's qbytes_mm / QuantizedLinearFunction for the weight-only formulation.
"""
import torch
import triton
import triton.language as tl

from quant.linear import _DequantLinear

_TL_OUT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# -----------------------------------------------------------------------------
# kernels


@triton.jit
def _qmm_fwd_kernel(
    X, W, S, B, Y,  #
    M, N, K, GS,  #
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_ym, stride_yn,  #
    GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  #
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < M
    n_valid = offs_n < N
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        wq = tl.load(w_ptrs, mask=n_valid[:, None] & k_valid[None, :], other=0.0)  # int8 / fp8 [BLOCK_N, BLOCK_K]
        w = wq.to(tl.float32)
        if GROUPED:  # -- group-wise scale: s[n, k // GS] varies along K, so dequantize the tile here
            s_ptrs = S + offs_n[:, None] * stride_sn + ((k0 + offs_k[None, :]) // GS) * stride_sg
            s = tl.load(s_ptrs, mask=n_valid[:, None] & k_valid[None, :], other=0.0)
            w = w * s
        w = w.to(x.dtype)  # per channel: exact (int8 and e4m3 values are representable in bf16 / fp16)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    # -- epilogue: per-channel scale (factors out of the K sum), bias, cast
    if not GROUPED:
        s = tl.load(S + offs_n * stride_sn, mask=n_valid, other=0.0)
        acc = acc * s[None, :]
    if HAS_BIAS:
        b = tl.load(B + offs_n, mask=n_valid, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


@triton.jit
def _qmm_dgrad_kernel(
    DY, W, S, DX,  #
    M, N, K, GS,  #
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_sn, stride_sg, stride_dxm, stride_dxk,  #
    GROUPED: tl.constexpr, IEEE: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  #
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_valid = offs_m < M
    k_valid = offs_k < K
    if GROUPED:
        s_col = (offs_k // GS) * stride_sg  # K-group of each column, fixed for this program
    else:
        s_col = offs_k * 0
    dy_ptrs = DY + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :] * stride_dyn
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_valid = (n0 + offs_n) < N
        dy = tl.load(dy_ptrs, mask=m_valid[:, None] & n_valid[None, :], other=0.0)
        wq = tl.load(w_ptrs, mask=n_valid[:, None] & k_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        # -- dequantize in registers: the scale varies along the reduction axis N, so it cannot wait for the epilogue
        s = tl.load(S + (n0 + offs_n[:, None]) * stride_sn + s_col[None, :],
                    mask=n_valid[:, None] & k_valid[None, :], other=0.0)
        w = (wq.to(tl.float32) * s).to(dy.dtype)
        if IEEE:
            acc += tl.dot(dy, w, input_precision="ieee")
        else:
            acc += tl.dot(dy, w)
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn
    dx_ptrs = DX + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=m_valid[:, None] & k_valid[None, :])


# -----------------------------------------------------------------------------
# launchers (explicit block sizes; 2D inputs)


def _check(q, scale, K):
    N = q.shape[0]
    assert q.dim() == 2 and q.shape[1] == K, f"weight {tuple(q.shape)} does not match in_features {K}"
    assert q.dtype in (torch.int8, torch.float8_e4m3fn), f"weight dtype {q.dtype}: int8 or float8_e4m3fn expected"
    assert scale.dim() == 2 and scale.shape[0] == N and K % scale.shape[1] == 0, (
        f"scale {tuple(scale.shape)} must be [N, 1] or [N, K / group_size] for weight {tuple(q.shape)}")
    assert scale.dtype == torch.float32, "scales are fp32"
    return N, scale.shape[1] > 1, K // scale.shape[1]


def qmm_forward(x, q, scale, bias=None, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3):
    """x [M, K] fp32 / bf16 / fp16, q [N, K] int8 / fp8, scale fp32 [N, 1] or [N, K/G], bias [N] -> y [M, N] in x's
    dtype. Block sizes are powers of two >= 16 (tl.dot's minimum tile)."""
    assert x.dim() == 2 and x.dtype in _TL_OUT, f"x must be 2D fp32 / bf16 / fp16, got {tuple(x.shape)} {x.dtype}"
    M, K = x.shape
    N, grouped, gs = _check(q, scale, K)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if bias is not None:
        bias = bias.contiguous()
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _qmm_fwd_kernel[grid](
        x, q, scale, bias if bias is not None else y, y,  #
        M, N, K, gs,  #
        *x.stride(), *q.stride(), *scale.stride(), *y.stride(),  #
        GROUPED=grouped, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,  #
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=num_warps, num_stages=num_stages,
    )
    return y


def qmm_dgrad(dy, q, scale, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3):
    """dy [M, N] -> dx = dy @ (q * s) [M, K] in dy's dtype (the input gradient of y = x @ (q * s)^T + b)."""
    assert dy.dim() == 2 and dy.dtype in _TL_OUT, f"dy must be 2D fp32 / bf16 / fp16, got {dy.dtype}"
    M, N = dy.shape
    K = q.shape[1]
    assert q.shape[0] == N, f"dy {tuple(dy.shape)} does not match weight {tuple(q.shape)}"
    _, grouped, gs = _check(q, scale, K)
    dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_K))
    _qmm_dgrad_kernel[grid](
        dy, q, scale, dx,  #
        M, N, K, gs,  #
        *dy.stride(), *q.stride(), *scale.stride(), *dx.stride(),  #
        GROUPED=grouped, IEEE=dy.dtype == torch.float32,  #
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=num_warps, num_stages=num_stages,
    )
    return dx


def default_blocks(M, N, K):
    """Tiles for a shape: 64 x 64 x 64 (tensor-core friendly on GPU, and the cheapest tile under the interpreter),
    shrunk to the next power of two >= 16 for small dimensions."""
    def fit(d, cap):
        return max(16, min(cap, triton.next_power_of_2(d)))
    return dict(BLOCK_M=fit(M, 64), BLOCK_N=fit(N, 64), BLOCK_K=fit(K, 64))


# -----------------------------------------------------------------------------
# autograd and dispatch


class QuantMatmulTriton(torch.autograd.Function):
    """y = x @ (q * s)^T + b through the Triton kernels; saves q and s (1 byte / weight), no weight gradient."""

    @staticmethod
    def forward(ctx, x, q, scale, bias):
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        N = q.shape[0]
        b = None if bias is None else bias.to(x.dtype)
        y = qmm_forward(x2, q, scale, b, **default_blocks(x2.shape[0], N, K))
        ctx.save_for_backward(q, scale)
        return y.reshape(*lead, N)

    @staticmethod
    def backward(ctx, gy):
        q, scale = ctx.saved_tensors
        N, K = q.shape
        gy2 = gy.reshape(-1, N)
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = qmm_dgrad(gy2.contiguous(), q, scale, **default_blocks(gy2.shape[0], N, K)).reshape(*gy.shape[:-1], K)
        if ctx.needs_input_grad[3]:
            gb = gy2.sum(0)
        return gx, None, None, gb


def quant_linear(x, q, scale, bias=None, group_size=None, backend="auto"):
    """
    y = x @ (q * s)^T + b for x [..., K], q [N, K] int8 / float8_e4m3fn, scale fp32 [N, 1] or [N, K / group_size],
    differentiable in x (and bias). backend: "auto" (Triton on CUDA tensors, the PyTorch reference elsewhere),
    "triton" (also on CPU under TRITON_INTERPRET=1) or "torch" (dequantize + F.linear, quant.linear._DequantLinear).
    """
    K = x.shape[-1]
    if group_size is not None:
        assert scale.shape[-1] == K // group_size, f"scale {tuple(scale.shape)} is not for group_size {group_size}"
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend == "triton":
        return QuantMatmulTriton.apply(x, q, scale, bias)
    if backend == "torch":
        return _DequantLinear.apply(x, q, scale, bias)
    raise ValueError(f"unknown backend {backend!r}: auto, triton or torch")
