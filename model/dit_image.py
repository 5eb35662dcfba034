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
operation for operation (bit-identical in fp32 and bf16 on CPU, see tests/test_dit_image.py).
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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
    """Rotate interleaved pairs (x_2k, x_2k+1) of x [B, S, heads, head_dim] in fp32, cast back to x's dtype."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_even, x_odd = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rot = torch.stack([-x_odd, x_even], dim=-1).flatten(3)  # (-x_2k+1, x_2k) pairs
    return (x.float() * cos + x_rot.float() * sin).to(x.dtype)


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
    return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


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
        return norm_q(q), norm_k(k), v

    def forward(self, x, rope, c=None):
        q, k, v = self.qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if c is not None:  # joint attention, text first
            qc, kc, vc = self.qkv(c, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k)
            q, k, v = torch.cat([qc, q], dim=1), torch.cat([kc, k], dim=1), torch.cat([vc, v], dim=1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v).to(q.dtype)
        if c is None:
            return out  # single blocks have no output projection here (it is fused into proj_out)
        oc, ox = out.split_with_sizes([c.shape[1], x.shape[1]], dim=1)
        return self.to_out[0](ox), self.to_add_out(oc)


def run(fn, *args, ckpt: bool):
    """fn(*args), or the same under activation checkpointing (recomputed in backward; forward values identical)."""
    return checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args)


def run_tokens(fn, seq_args, args, ckpt: bool, chunk: int):
    """fn(*seq_args, *args) for a token-wise fn. Under checkpointing, each chunk of `chunk` tokens is its own
    checkpoint, so backward holds one chunk's MLP activations (4-5x the model width) at a time, not the sequence's."""
    S = seq_args[0].shape[1]
    if not ckpt or S <= chunk:
        return run(fn, *seq_args, *args, ckpt=ckpt)
    return torch.cat([run(fn, *(t[:, i:i + chunk] for t in seq_args), *args, ckpt=True) for i in range(0, S, chunk)],
                     dim=1)


class DoubleBlock(nn.Module):
    """
    Separate weights for the image stream x and the text stream c, one joint attention over [c; x].
    Two halves (attention, then MLPs) that are checkpointed separately when training with gradient checkpointing, so
    backward holds the activations of one half at a time: the same values as one checkpoint per block, a lower peak.
    """

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLN(dim, 6)
        self.norm1_context = AdaLN(dim, 6)
        self.attn = Attention(dim, heads, head_dim, context=True)
        self.ff = FeedForward(dim, 4 * dim)
        self.ff_context = FeedForward(dim, 4 * dim)

    def attention_half(self, x, c, rope, m, mc):
        ax, ac = self.attn(modulate(x, m[0], m[1]), rope, modulate(c, mc[0], mc[1]))
        return x + m[2][:, None] * ax, c + mc[2][:, None] * ac

    def mlp_x(self, x, shift, scale, gate):
        return x + gate[:, None] * self.ff(modulate(x, shift, scale))

    def mlp_c(self, c, shift, scale, gate):
        c = c + gate[:, None] * self.ff_context(modulate(c, shift, scale))
        return c.clip(-65504, 65504) if c.dtype == torch.float16 else c

    def forward(self, x, c, temb, rope, ckpt: bool = False, chunk: int = 1024):
        # m = (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) for x, mc the same for c
        m, mc = self.norm1(temb), self.norm1_context(temb)
        x, c = run(self.attention_half, x, c, rope, m, mc, ckpt=ckpt)
        return run_tokens(self.mlp_x, [x], m[3:], ckpt, chunk), run_tokens(self.mlp_c, [c], mc[3:], ckpt, chunk)


class SingleBlock(nn.Module):
    """One weight set over h = [c; x]: parallel attention and MLP, fused output projection. Checkpointed in two
    segments like DoubleBlock (the MLP segment recomputes the cheap modulation instead of saving it)."""

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
        h = h + gate[:, None] * self.proj_out(torch.cat([a, mlp], dim=2))
        return h.clip(-65504, 65504) if h.dtype == torch.float16 else h

    def forward(self, x, c, temb, rope, ckpt: bool = False, chunk: int = 1024):
        L = c.shape[1]
        h = torch.cat([c, x], dim=1)
        shift, scale, gate = self.norm(temb)
        a = run(self.attention_segment, h, rope, shift, scale, ckpt=ckpt)
        h = run_tokens(self.mlp_segment, [h, a], (shift, scale, gate), ckpt, chunk)
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
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            x, c = block(x, c, temb, rope, ckpt=ckpt, chunk=self.checkpoint_chunk_tokens)
        scale, shift = self.norm_out(temb)  # (scale, shift): the reverse of the block AdaLNs
        return self.proj_out(modulate(x, shift, scale))
