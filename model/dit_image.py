"""
The LongCat-Image MM-DiT (text-to-image and instruction editing), in plain PyTorch.

A FLUX-shaped transformer: `num_layers` double-stream blocks (separate weights for image and text tokens, joint
attention) followed by `num_single_layers` single-stream blocks (one weight set over [text; image]). The real
checkpoint has 10 + 20 blocks, D = 24 heads x 128 = 3072, and 6,270,668,864 parameters; every size is read from
`transformer/config.json`.

Differences from FLUX.1 that matter (see ../shared/specs/longcat_image.md §2-§3, §9):
  - no guidance embedding and no pooled-text projection (`pooled_projection_dim` is a config field with no weights);
  - the timestep embedder is `time_embed.timestep_embedder` and sees sigma * 1000 AFTER a cast to the model dtype,
    so with bf16 weights the network sees bf16-rounded timesteps, exactly like the released pipeline;
  - the RoPE position id has three axes (modality, row, col): text is modality 0 on the diagonal (j, j), the target
    image is modality 1 and an Edit reference image is modality 2, both offset by the text length on both axes;
  - no attention mask anywhere: padding text tokens take part in attention;
  - the final AdaLN chunks are (scale, shift), not (shift, scale).

Module names follow the official diffusers-format checkpoint keys, so `load_state_dict(strict=True)` works on the
released `transformer/diffusion_pytorch_model*.safetensors`. Numerics follow diffusers' LongCatImageTransformer2DModel
operation for operation (forward bit-identical in fp32 and bf16 on CPU, see tests/test_dit_image.py); the backward of
RoPE and of the q/k RMSNorm is hand-written (fewer temporaries), equal to autograd's up to rounding.
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts


@dataclass
class ImageDiTConfig:
    # field names = keys of the released transformer/config.json; defaults = the real LongCat-Image values
    patch_size: int = 1
    in_channels: int = 64  # 16 VAE channels x 2x2 packing
    num_layers: int = 10  # double-stream blocks
    num_single_layers: int = 20
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    pooled_projection_dim: int = 3584  # present in config.json, no weights
    axes_dims_rope: list = field(default_factory=lambda: [16, 56, 56])
    rope_theta: float = 10000.0  # hard-coded in the reference, not a config.json key

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "ImageDiTConfig":
        """Build from a diffusers `transformer/config.json` dict; unknown keys are an error, `_*` keys are ignored."""
        known = {f.name for f in fields(cls)} - {"rope_theta"}
        kwargs = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"transformer config: unknown key(s) {unknown}; expected a subset of {sorted(known)}")
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        """The diffusers `transformer/config.json` for this config."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rope_theta"}
        return {"_class_name": "LongCatImageTransformer2DModel", **d, "axes_dims_rope": list(self.axes_dims_rope)}

    def validate(self):
        if self.patch_size != 1:
            raise ValueError(f"transformer config: patch_size={self.patch_size}, LongCat-Image uses 1 (packing is 2x2 outside)")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"transformer config: axes_dims_rope {self.axes_dims_rope} must be even and sum to "
                             f"attention_head_dim={self.attention_head_dim}")
        if len(self.axes_dims_rope) != 3:
            raise ValueError("transformer config: axes_dims_rope must have 3 entries (modality, row, col)")


# -----------------------------------------------------------------------------
# position ids and rotary embedding

def text_position_ids(num_tokens: int, device=None) -> torch.Tensor:
    """Text token j gets (modality 0, j, j): text sits on the diagonal."""
    ids = torch.zeros(num_tokens, 3, device=device)
    ids[:, 1] = torch.arange(num_tokens, device=device)
    ids[:, 2] = torch.arange(num_tokens, device=device)
    return ids  # (L, 3)


def image_position_ids(grid_h: int, grid_w: int, offset: int, modality: int = 1, device=None) -> torch.Tensor:
    """Packed-grid token (r, c) gets (modality, offset + r, offset + c), raster order. Target = 1, Edit reference = 2."""
    ids = torch.zeros(grid_h, grid_w, 3, device=device)
    ids[..., 0] = modality
    ids[..., 1] = torch.arange(grid_h, device=device)[:, None] + offset
    ids[..., 2] = torch.arange(grid_w, device=device)[None, :] + offset
    return ids.reshape(grid_h * grid_w, 3)  # (h*w, 3)


def rope_tables(ids: torch.Tensor, axes_dims, theta: float = 10000.0):
    """cos/sin tables [S, head_dim] for 3-axis position ids; each angle repeated twice (interleaved pairs)."""
    pos = ids.float()
    cos, sin = [], []
    fdtype = torch.float32 if ids.device.type == "mps" else torch.float64  # float64 where the device has it
    for axis, dim in enumerate(axes_dims):
        omega = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=fdtype, device=ids.device) / dim))  # (dim/2,)
        angles = torch.outer(pos[:, axis], omega)  # (S, dim/2), float64
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x_2k, x_2k+1) of x [B, S, heads, head_dim] in fp32, cast back to x's dtype:
    x * cos + (-x_2k+1, x_2k) * sin, the reference's operations (bit-identical), with fewer temporaries."""
    return _Rope.apply(x, cos[None, :, None, :], sin[None, :, None, :])


class _Rope(torch.autograd.Function):
    """The reference builds (-x_odd, x_even) with neg + stack and autograd unpicks that in backward (zero-filled
    selects, a stack of their gradients): four to five full-size temporaries each way. Here: two products written
    into two buffers (the second straight into its interleaved slots) and one in-place sum; backward likewise."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        xf = x.float()  # x itself when x is fp32
        out = xf * cos
        rot = torch.empty_like(out)
        torch.mul(xf[..., 1::2], sin[..., 0::2], out=rot[..., 0::2]).neg_()  # (-x_odd) * sin = -(x_odd * sin) exactly
        torch.mul(xf[..., 0::2], sin[..., 1::2], out=rot[..., 1::2])
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return out.add_(rot).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        # out_e = x_e c_e - x_o s_e, out_o = x_o c_o + x_e s_o  =>  dx_e = g_e c_e + g_o s_o, dx_o = g_o c_o - g_e s_e
        cos, sin = ctx.saved_tensors
        gf = g.float()
        gx = gf * cos
        rot = torch.empty_like(gx)
        torch.mul(gf[..., 1::2], sin[..., 1::2], out=rot[..., 0::2])
        torch.mul(gf[..., 0::2], sin[..., 0::2], out=rot[..., 1::2]).neg_()
        return gx.add_(rot).to(ctx.dtype), None, None


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """norm(x) for the per-head q/k RMSNorm: nn.RMSNorm's forward (same kernel, same values) with a hand-written
    backward; any other module is just called."""
    if type(norm) is not nn.RMSNorm or norm.eps is None or len(norm.normalized_shape) != 1:
        return norm(x)
    return _RMSNorm.apply(x, norm.weight, norm.eps)


class _RMSNorm(torch.autograd.Function):
    """y = x * r * w, r = 1 / sqrt(mean(x^2) + eps) over the last dim. Autograd through the decomposed op keeps
    x^2, x * r and x * r * w and spends some seven full-size temporaries in backward; this saves x only and uses two:
    dx = r * (g w - x * mean(g w x) * r^2)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        ct = torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16 / fp16, else x's own dtype
        xf, gf = x.to(ct), g.to(ct)
        n = x.shape[-1]
        r = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(n).add_(ctx.eps).rsqrt_()
        gw = gf * w if w is not None else gf.clone()
        coeff = (gw * xf).sum(-1, keepdim=True).mul_(r.pow(3)).div_(n)
        gx = gw.mul_(r).addcmul_(xf, coeff, value=-1).to(x.dtype)
        gwt = None
        if w is not None and ctx.needs_input_grad[1]:
            gwt = (gf * xf * r).sum(tuple(range(x.dim() - 1))).to(w.dtype)
        return gx, gwt, None


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)] with f_k = exp(-ln(max_period) k / (dim/2)), computed in fp32; cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v without a mask; q, k, v are [B, S, heads, head_dim], output [B, S, heads*head_dim]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, S, hd)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)  # no affine parameters anywhere in this model


def modulate(x, shift, scale):
    # LN(x) * (1 + scale) + shift, in place on the fresh LN output (layer_norm's backward needs x, not its output)
    return layer_norm(x).mul_(1 + scale[:, None]).add_(shift[:, None])


def gated_residual(x, y, gate):
    """x + gate * y for a linear layer's output y. When y is not a view (a LoRA layer's output is not; nn.Linear's
    on 3-D input is), in place in y: no node saves y, so this drops two full-size temporaries with the same two
    roundings. In place on a view would make autograd copy the whole gradient in backward (CopySlices)."""
    if y._base is None:
        return y.mul_(gate[:, None]).add_(x)
    return x + gate[:, None] * y


# -----------------------------------------------------------------------------
# modules (names = checkpoint keys)

class AdaLN(nn.Module):
    """`Linear(SiLU(temb))` split into n chunks; the key is `<norm>.linear`."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, n * dim)
        self.n = n

    def forward(self, temb):
        return self.linear(F.silu(temb)).chunk(self.n, dim=1)


class FeedForward(nn.Module):
    """net.0.proj -> GELU(tanh) -> net.2; net.1 is a parameter-less dropout slot kept so indices match the keys."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, hidden)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(hidden, dim)])

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class Attention(nn.Module):
    """q/k/v projections with per-head RMSNorm; `context_dim` adds the text-stream projections of a double block."""

    def __init__(self, dim: int, heads: int, head_dim: int, context: bool):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        if context:
            self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            self.norm_added_q = nn.RMSNorm(head_dim, eps=1e-6)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6)
            self.to_add_out = nn.Linear(dim, dim)

    def qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = (f(x).unflatten(-1, (self.heads, -1)) for f in (to_q, to_k, to_v))  # (B, S, heads, hd)
        return rms_norm(q, norm_q), rms_norm(k, norm_k), v

    def core(self, x, rope, c=None):
        """Projections, q/k norms, RoPE and SDPA over [c; x] (text first): [B, L + N, D], before any output
        projection."""
        q, k, v = self.qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if c is not None:  # joint attention, text first
            qc, kc, vc = self.qkv(c, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k)
            q, k, v = torch.cat([qc, q], dim=1), torch.cat([kc, k], dim=1), torch.cat([vc, v], dim=1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return attention(q, k, v).to(q.dtype)

    def forward(self, x, rope, c=None):
        out = self.core(x, rope, c)
        if c is None:
            return out  # single blocks have no output projection here (it is fused into proj_out)
        oc, ox = out.split_with_sizes([c.shape[1], x.shape[1]], dim=1)
        return self.to_out[0](ox), self.to_add_out(oc)


# the fused SDPA kernels (output, logsumexp, ...): kept from the forward pass by the attention checkpoints, so backward
# recomputes the cheap projections / norms / RoPE around them but not the attention itself
_SDPA_OPS = [getattr(torch.ops.aten, n).default for n in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(torch.ops.aten, n)]


def _save_sdpa_context():
    return create_selective_checkpoint_contexts(_SDPA_OPS)


def run(fn, *args, ckpt: bool, save_sdpa: bool = False):
    """fn(*args), or the same under activation checkpointing (recomputed in backward; forward values identical).
    save_sdpa: the attention kernels' outputs are kept instead of recomputed (selective checkpointing)."""
    if not ckpt:
        return fn(*args)
    if save_sdpa:
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_save_sdpa_context)
    return checkpoint(fn, *args, use_reentrant=False)


def run_tokens(fn, seq_args, args, ckpt: bool, chunk: int):
    """fn(*seq_args, *args) for a token-wise fn. Under checkpointing, each chunk of `chunk` tokens is its own
    checkpoint, so backward holds one chunk's MLP activations (4-5x the model width) at a time, not the sequence's.
    The chunks are one torch.split (one gradient concatenation in backward, not a zero-filled full-size gradient
    per slice)."""
    S = seq_args[0].shape[1]
    if not ckpt or S <= chunk:
        return run(fn, *seq_args, *args, ckpt=ckpt)
    parts = zip(*(t.split(chunk, dim=1) for t in seq_args))
    return torch.cat([run(fn, *ts, *args, ckpt=True) for ts in parts], dim=1)


class DoubleBlock(nn.Module):
    """
    Separate weights for the image stream x and the text stream c, one joint attention over [c; x].
    Under gradient checkpointing, two segments: (modulation, q/k/v, RoPE, SDPA) and, per stream, (output projection,
    gated residual, MLP), the second one token-wise and recomputed per chunk of tokens. The boundary between them is
    the SDPA output, which is what the attention kernel's backward needs anyway: the attention segment saves it
    (selective checkpointing) instead of recomputing the attention, at no extra memory. Backward holds one segment's
    activations at a time; the forward values are those of one checkpoint per block.
    """

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLN(dim, 6)
        self.norm1_context = AdaLN(dim, 6)
        self.attn = Attention(dim, heads, head_dim, context=True)
        self.ff = FeedForward(dim, 4 * dim)
        self.ff_context = FeedForward(dim, 4 * dim)

    def attention_segment(self, x, c, rope, m, mc):
        return self.attn.core(modulate(x, m[0], m[1]), rope, modulate(c, mc[0], mc[1]))

    def out_mlp_x(self, x, ox, gate_msa, shift, scale, gate):
        x = gated_residual(x, self.attn.to_out[0](ox), gate_msa)
        return gated_residual(x, self.ff(modulate(x, shift, scale)), gate)

    def out_mlp_c(self, c, oc, gate_msa, shift, scale, gate):
        c = gated_residual(c, self.attn.to_add_out(oc), gate_msa)
        c = gated_residual(c, self.ff_context(modulate(c, shift, scale)), gate)
        return c.clip(-65504, 65504) if c.dtype == torch.float16 else c

    def forward(self, x, c, temb, rope, ckpt: bool = False, chunk: int = 1024):
        # m = (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) for x, mc the same for c
        m, mc = self.norm1(temb), self.norm1_context(temb)
        out = run(self.attention_segment, x, c, rope, m, mc, ckpt=ckpt, save_sdpa=True)
        oc, ox = out.split_with_sizes([c.shape[1], x.shape[1]], dim=1)
        return (run_tokens(self.out_mlp_x, [x, ox], m[2:], ckpt, chunk),
                run_tokens(self.out_mlp_c, [c, oc], mc[2:], ckpt, chunk))


class SingleBlock(nn.Module):
    """One weight set over h = [c; x]: parallel attention and MLP, fused output projection. Checkpointed in two
    segments like DoubleBlock: (modulation, q/k/v, RoPE, SDPA; the SDPA output saved, not recomputed) and the
    token-wise (modulation, MLP, output projection), recomputed per chunk of tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm = AdaLN(dim, 3)
        self.attn = Attention(dim, heads, head_dim, context=False)
        self.proj_mlp = nn.Linear(dim, 4 * dim)
        self.proj_out = nn.Linear(5 * dim, dim)  # input = attention (dim) ++ mlp (4 dim)

    def attention_segment(self, h, rope, shift, scale):
        return self.attn(modulate(h, shift, scale), rope)

    def mlp_segment(self, h, a, shift, scale, gate):
        mlp = F.gelu(self.proj_mlp(modulate(h, shift, scale)), approximate="tanh")
        h = gated_residual(h, self.proj_out(torch.cat([a, mlp], dim=2)), gate)
        return h.clip(-65504, 65504) if h.dtype == torch.float16 else h

    def joint(self, h, temb, rope, ckpt: bool = False, chunk: int = 1024):
        """The block on the joint sequence h = [c; x]: consecutive single blocks pass h on, without a split and a
        concatenation (and their backward: two zero-filled full-size gradients) between every two blocks."""
        shift, scale, gate = self.norm(temb)
        a = run(self.attention_segment, h, rope, shift, scale, ckpt=ckpt, save_sdpa=True)
        return run_tokens(self.mlp_segment, [h, a], (shift, scale, gate), ckpt, chunk)

    def forward(self, x, c, temb, rope, ckpt: bool = False, chunk: int = 1024):
        L = c.shape[1]
        h = self.joint(torch.cat([c, x], dim=1), temb, rope, ckpt, chunk)
        return h[:, L:], h[:, :L]


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb):
        return self.linear_2(F.silu(self.linear_1(emb)))


class LongCatImageDiT(nn.Module):
    def __init__(self, cfg: ImageDiTConfig):
        super().__init__()
        self.cfg = cfg
        D, H, hd = cfg.dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.x_embedder = nn.Linear(cfg.in_channels, D)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, D)
        self.time_embed = nn.Module()
        self.time_embed.timestep_embedder = TimestepEmbedder(D)
        self.transformer_blocks = nn.ModuleList([DoubleBlock(D, H, hd) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([SingleBlock(D, H, hd) for _ in range(cfg.num_single_layers)])
        self.norm_out = AdaLN(D, 2)
        self.proj_out = nn.Linear(D, cfg.patch_size ** 2 * cfg.in_channels)
        self.gradient_checkpointing = False
        self.checkpoint_chunk_tokens = 1024  # with checkpointing: MLPs recomputed per chunk of this many tokens

    @property
    def dtype(self):
        return self.x_embedder.weight.dtype

    def forward(self, x, context, timestep, img_ids, txt_ids):
        """
        x [B, N, in_channels] packed latents (Edit: target tokens then reference tokens), context [B, L, joint_dim],
        timestep [B] sigma in [0, 1], img_ids [N, 3], txt_ids [L, 3]. Returns [B, N, in_channels]: the velocity
        eps - x0 for every input image token (the caller slices the Edit target tokens).
        """
        x = self.x_embedder(x)
        t = timestep.to(x.dtype) * 1000  # cast first: with bf16 weights the model sees bf16-rounded timesteps
        temb = self.time_embed.timestep_embedder(timestep_sinusoid(t).to(x.dtype))  # (B, D)
        c = self.context_embedder(context)
        rope = rope_tables(torch.cat([txt_ids, img_ids], dim=0), self.cfg.axes_dims_rope, self.cfg.rope_theta)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        chunk = self.checkpoint_chunk_tokens
        for block in self.transformer_blocks:
            x, c = block(x, c, temb, rope, ckpt=ckpt, chunk=chunk)
        if len(self.single_transformer_blocks):
            h = torch.cat([c, x], dim=1)  # once for all single blocks, which run on the joint sequence
            for block in self.single_transformer_blocks:
                h = block.joint(h, temb, rope, ckpt=ckpt, chunk=chunk)
            x = h.split_with_sizes([c.shape[1], x.shape[1]], dim=1)[1]
        scale, shift = self.norm_out(temb)  # (scale, shift): the reverse of the block AdaLNs
        return self.proj_out(modulate(x, shift, scale))
