"""
Weight-only quantized linear layers for a frozen base model (LoRA trains on top of them).

    q = QuantLinear.from_linear(linear, "int8")          # or "fp8"; group_size=64 for scales along K too
    y = q(x)                                             # = F.linear(x, q.dequantize(x.dtype), q.bias)
    b = QuantLinear.from_linear(linear, "nf4-bnb")       # bitsandbytes Linear4bit / Linear8bitLt ("int8-bnb")

Formats (shared/specs/kernels.md §9), weight stored as a buffer `weight_q` [out, in], fp32 scales `weight_scale`:
  - "int8": symmetric, s = amax / 127 per output row (per row and K-group with group_size), q = round(w / s) in
    [-127, 127] (-128 unused, so the range stays symmetric). LongCat's own --use_int8, torchao int8wo, quanto qint8.
  - "fp8":  float8_e4m3fn, s = amax / 448, q = e4m3(w / s) (torch's cast rounds to nearest even and saturates at 448).
  - "int8-bnb" / "nf4-bnb": the bitsandbytes modules themselves (LLM.int8 with outlier threshold; QLoRA NF4), which
    run forward and backward on CPU in bitsandbytes 0.50.2 (kernels.md §6).

Why dequantize + F.linear (the reference path, quanto's / LongCat's / musubi's): weight-only quantization saves
memory, not FLOPs. torch on CPU has no int8 x bf16 or fp8 x bf16 GEMM (torch._int_mm wants int8 activations,
torch._scaled_mm fp8 ones, i.e. W8A8 with its activation-outlier risk), so the exact and portable path is to rebuild
the weight in the activation dtype and call F.linear. The fused Triton kernels (kernels/quant_matmul.py) replace this
path when the input is on CUDA (QuantLinear.forward picks them) and are tested against it. The backward is written by hand (_DequantLinear) so autograd saves the 1-byte weight, not a
dequantized copy per layer, and recomputes the dequantization for dX = dY @ W; the weight gets no gradient.

Why not torchao / optimum-quanto: both work by tensor subclasses that other code (LoRA, FSDP, state_dict,
safetensors) has to know about, and torchao's int8 path is only fast under torch.compile (it dequantizes in eager,
kernels.md §2). A plain module with plain buffers is swapped in from outside (gpt-fast's WeightOnlyInt8Linear) and
saves as ordinary int8 / float8 safetensors.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FORMATS = ("int8", "fp8")  # ours
BNB_FORMATS = ("int8-bnb", "nf4-bnb")
QMAX = {"int8": 127.0, "fp8": 448.0}
QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


# -----------------------------------------------------------------------------
# quantize / dequantize (pure functions)

def _grouped(w: torch.Tensor, group_size) -> torch.Tensor:
    """[N, K] -> [N, G, g] (G = K / g), or [N, 1, K] per channel."""
    N, K = w.shape
    if group_size is None:
        return w.reshape(N, 1, K)
    if group_size <= 0 or K % group_size:
        raise ValueError(f"group_size {group_size} must divide in_features {K}")
    return w.reshape(N, K // group_size, group_size)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, fmt: str, group_size=None):
    """w [N, K] (any float dtype) -> (q [N, K] int8 or float8_e4m3fn, scale fp32 [N, 1] or [N, K / group_size])."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}: use one of {FORMATS}")
    wg = _grouped(w.float(), group_size)
    scale = wg.abs().amax(dim=-1, keepdim=True) / QMAX[fmt]  # [N, G, 1]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: q = 0 whatever the scale
    x = wg / scale
    if fmt == "int8":
        q = x.round().clamp_(-127, 127).to(torch.int8)
    else:
        q = x.clamp_(-448, 448).to(torch.float8_e4m3fn)  # clamp too, so a rounding step past 448 cannot matter
    return q.reshape(w.shape), scale.squeeze(-1)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The product q * s in fp32, cast once to `dtype`. scale [N, G] with G = 1 (per channel) or K / group_size."""
    N, K = q.shape
    w = q.float().reshape(N, scale.shape[1], K // scale.shape[1]) * scale.float()[..., None]
    return w.reshape(N, K).to(dtype)


class _DequantLinear(torch.autograd.Function):
    """y = x @ (q*s)^T + b, saving q and s (not the dequantized weight) for dX = dY @ (q*s)."""

    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)
        ctx.x_dtype = x.dtype
        return F.linear(x, dequantize_weight(q, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        q, scale = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ dequantize_weight(q, scale, gy.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, None, None, gb


_TRITON = []  # [QuantMatmulTriton or None], filled on the first CUDA forward


def _triton_function():
    """kernels.quant_matmul.QuantMatmulTriton, or None when Triton cannot be imported (imported lazily: CPU runs
    never pay for it, and kernels/quant_matmul.py imports this module)."""
    if not _TRITON:
        try:
            from kernels.quant_matmul import QuantMatmulTriton
        except ImportError:
            QuantMatmulTriton = None
        _TRITON.append(QuantMatmulTriton)
    return _TRITON[0]


# -----------------------------------------------------------------------------
# the module

class QuantLinear(nn.Module):
    """A frozen nn.Linear stored as int8 / fp8 with fp32 scales; computes in the dtype of its input."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "int8", group_size=None,
                 device=None, dtype=torch.bfloat16):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown QuantLinear format {fmt!r}: use one of {FORMATS} "
                             f"(or {BNB_FORMATS} via from_linear)")
        if group_size is not None and (group_size <= 0 or in_features % group_size):
            raise ValueError(f"group_size {group_size} must divide in_features {in_features}")
        groups = 1 if group_size is None else in_features // group_size
        self.in_features, self.out_features, self.fmt, self.group_size = in_features, out_features, fmt, group_size
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=QDTYPE[fmt], device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        # bias: a frozen parameter in the compute dtype (follows model.to(dtype) like any other parameter)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "int8", group_size=None, threshold: float = 6.0):
        """Quantize `linear` (on its own device). For "int8-bnb" / "nf4-bnb" returns a bitsandbytes module instead."""
        if fmt in BNB_FORMATS:
            return bnb_linear(linear, fmt, threshold=threshold)
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, group_size, device=w.device,
                dtype=w.dtype)
        q, s = quantize_weight(w.detach(), fmt, group_size)
        m.weight_q.copy_(q)
        m.weight_scale.copy_(s)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The weight [out, in] as q * s, in `dtype` (default: the bias dtype, else fp32)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return dequantize_weight(self.weight_q, self.weight_scale, dtype)

    def forward(self, x):
        if x.is_cuda and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            fn = _triton_function()
            if fn is not None:  # fused kernels: the 1-byte weight is dequantized in registers, tile by tile
                return fn.apply(x, self.weight_q, self.weight_scale, self.bias)
        return _DequantLinear.apply(x, self.weight_q, self.weight_scale, self.bias)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would cast every floating buffer, the float8 weight and fp32 scales included:
        # let the bias follow dtype changes, but give the quantized tensors device moves only.
        q, s = self.weight_q, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_q.dtype != q.dtype:
            self.weight_q = q.to(self.weight_q.device)
        if self.weight_scale.dtype != s.dtype:
            self.weight_scale = s.to(self.weight_scale.device)
        return self

    def extra_repr(self):
        g = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fmt={self.fmt}, {g}")


# -----------------------------------------------------------------------------
# bitsandbytes route (imported lazily: `import bitsandbytes` costs ~4 s and ~430 MB)

def bnb_linear(linear: nn.Linear, fmt: str, threshold: float = 6.0) -> nn.Module:
    """
    "int8-bnb": bnb.nn.Linear8bitLt(has_fp16_weights=False, threshold) (LLM.int8: activation columns above
    `threshold` go through a 16-bit matmul; 0 turns that off). "nf4-bnb": bnb.nn.Linear4bit NF4 (QLoRA), computing in
    the weight's dtype. The weight is quantized when the module is moved to the weight's device (bnb's own trigger).
    """
    import bitsandbytes as bnb

    w, b = linear.weight.detach(), linear.bias
    dev = w.device
    if fmt == "int8-bnb":
        m = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=b is not None,
                                has_fp16_weights=False, threshold=threshold, device="meta")
        m.weight = bnb.nn.Int8Params(w.to("cpu").clone(), requires_grad=False, has_fp16_weights=False)
    elif fmt == "nf4-bnb":
        m = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=b is not None, compute_dtype=w.dtype,
                              quant_type="nf4", device="meta")
        m.weight = bnb.nn.Params4bit(w.to("cpu").clone(), requires_grad=False, quant_type="nf4")
    else:
        raise ValueError(f"unknown bitsandbytes format {fmt!r}: use one of {BNB_FORMATS}")
    if b is not None:
        m.bias = nn.Parameter(b.detach().to("cpu").clone(), requires_grad=False)
    return m.to(dev)
