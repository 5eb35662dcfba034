"""
The LongCat-Video DiT (text-to-video, image-to-video, video continuation), in plain PyTorch.

A single-stream transformer: `depth` blocks, each = AdaLN-modulated self-attention with 3D RoPE, then plain
cross-attention to the umT5 text (its own affine LayerNorm, no modulation, no gate), then an AdaLN-modulated SwiGLU
FFN. The real checkpoint has 48 blocks, D = 32 heads x 128 = 4096, and 13,581,071,424 parameters in 1022 tensors;
every size is read from `dit/config.json`. See ../shared/specs/longcat_video.md §1-§2, §5.1, §10.

What the network computes (the parts that are easy to get wrong):
  - the output is v = x0 - eps (data minus noise), [B, 16, T, H, W] in fp32; LongCat-Image has the opposite sign;
  - timesteps t = 1000 sigma are per LATENT FRAME ([B, T]; a [B] timestep is broadcast), are cast to the weight
    dtype before the sinusoid (bf16 weights -> bf16-rounded timesteps), and every block modulates the tokens of
    frame f with the AdaLN parameters of t[:, f];
  - zero-pad text mode (`text_tokens_zero_pad`, true in the release): pad tokens are zeroed AFTER the caption
    projection and all L tokens are attended (pads give bias-only keys/values); with the flag off, pads are masked;
  - cond mode (`num_cond_latents = c > 0`): the first c latent frames are clean conditioning frames; their tokens
    attend only to each other and get a zero cross-attention output, noise tokens attend to everything;
  - KV cache (continuation): `kv_cache_dict = model.cache_cond_kv(cond_latents)` stores each block's cond keys
    (after k_norm, before RoPE) and values; later calls pass only the noise latents plus the cache and
    num_cond_latents=c, and the noise frames sit at temporal RoPE positions c..c+T-1. Exact, because cond tokens
    never see noise tokens or text;
  - fp32 islands (spec §1.9): timestep MLP, every adaLN Linear, the final layer's Linear, LayerNorm math, the
    modulate/gate arithmetic, RMSNorm's normalisation and RoPE run in fp32; everything else in the weight dtype.

Deviations from the official `LongCatVideoTransformer3DModel`, none of which change the maths:
  - attention is torch SDPA (the official FA2/FA3/xformers switches are accepted config keys and ignored);
  - block-sparse self-attention (`enable_bsa`, or at run time `model.set_bsa(True, params)` / `model.bsa = {...}`)
    uses kernels/block_sparse_attention.py (spec §7): q, k after q/k-norm and RoPE, grid (T, H/2, W/2), chunk
    `chunk_3d_shape_q`. Dense when T == 1, when the grid is not divisible by the chunk, when chunk_q != chunk_k,
    and on the KV-cache path (the release runs BSA there too, with Tq = T_noise, Tk = c + T_noise); each such
    fallback prints a one-line note once per model. Cond mode follows the release: cond queries do BSA over the
    cond grid (c, Hp, Wp) alone, noise queries do BSA with Tq = T - c over keys of the whole grid (T, Hp, Wp) (own
    block selection over all key blocks, `_bsa_rect`); if c is not a multiple of the temporal chunk both are dense
    (the release asserts instead);
  - context parallel (`model.set_context_parallel(cp)`, model/context_parallel.py) takes the full latents, keeps this
    rank's H x W tile of every frame and returns that tile of the output; around self-attention the all-to-all
    reassembles the whole sequence in global raster order, so RoPE, cond mode, the KV cache and BSA run the 1-process
    code (the release splits the RoPE table and runs BSA on its rank-tile-major order); `cp_split_hw` in the config
    must be null or the tiling in use; no `offload_kv_cache`;
  - text is a dense [B, L, C] batch with a key mask instead of one packed varlen sequence (identical in zero-pad
    mode, where every sample has L keys);
  - odd latent H/W is an error (the official patch embed right-pads and never crops back);
  - the fp32 islands are explicit casts (`FP32Linear`) instead of autocast(float32), which CPU autocast lacks;
  - with gradient checkpointing each block is two checkpoints (self-attention; cross-attention + FFN), and the
    second one is recomputed in chunks of whole frames: same values, lower peak memory.
Module names follow the official checkpoint keys, so `load_state_dict(strict=True)` works on the released
`dit/diffusion_pytorch_model*.safetensors`.
"""
import math
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels.block_sparse_attention import (block_sparse_attention, block_sparse_attention_torch,
                                            block_sparse_attention_triton, bsa_fallback_reason, num_selected_blocks,
                                            reorder_from_chunks, reorder_to_chunks)


@dataclass
class VideoDiTConfig:
    # field names = keys of the released dit/config.json; defaults = the real LongCat-Video values
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 4096
    depth: int = 48
    num_heads: int = 32
    caption_channels: int = 4096  # umT5-XXL d_model
    mlp_ratio: int = 4  # SwiGLU inner dim = int(2/3 * mlp_ratio * hidden) rounded up to 256 (11008)
    adaln_tembed_dim: int = 512
    frequency_embedding_size: int = 256
    patch_size: list = field(default_factory=lambda: [1, 2, 2])  # (t, h, w)
    enable_flashattn3: bool = False  # attention backend switches: accepted, SDPA is used
    enable_flashattn2: bool = True
    enable_xformers: bool = False
    enable_bsa: bool = False  # block-sparse self-attention (spec §7); switchable at run time: model.set_bsa()
    bsa_params: Optional[dict] = field(default_factory=lambda: {
        "sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]})
    cp_split_hw: Optional[list] = None  # context-parallel (sh, sw) tiling; set at run time: set_context_parallel()
    text_tokens_zero_pad: bool = True  # the code default is False, the released config says True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        h = int(2 * int(self.hidden_size * self.mlp_ratio) / 3)
        return 256 * ((h + 255) // 256)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoDiTConfig":
        """Build from a `dit/config.json` dict; unknown keys are an error, `_*` keys are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"video DiT config: unknown key(s) {unknown}; expected a subset of {sorted(known)}")
        cfg = cls(**kwargs)
        cfg.patch_size = list(cfg.patch_size)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        """The `dit/config.json` for this config."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"_class_name": "LongCatVideoTransformer3DModel", **d, "patch_size": list(self.patch_size)}

    def validate(self):
        if len(self.patch_size) != 3 or self.patch_size[0] != 1:
            raise ValueError(f"video DiT config: patch_size={self.patch_size}, the temporal patch must be 1")
        if self.hidden_size % self.num_heads or self.head_dim % 8:
            raise ValueError(f"video DiT config: hidden_size={self.hidden_size} / num_heads={self.num_heads} must "
                             "give a head_dim divisible by 8 (3D RoPE)")
        if self.cp_split_hw is not None and (len(self.cp_split_hw) != 2 or min(self.cp_split_hw) < 1):
            raise ValueError(f"video DiT config: cp_split_hw={self.cp_split_hw}, expected null or [sh, sw] (H x W "
                             "tiles of context parallel)")


# -----------------------------------------------------------------------------
# 3D rotary embedding and timestep sinusoid (pure functions)

def rope_axes(head_dim: int):
    """Head-dim split [t | h | w]: (44, 42, 42) for 128."""
    dh = 2 * (head_dim // 6)
    return head_dim - 2 * dh, dh, dh


def rope_3d_tables(t: int, h: int, w: int, head_dim: int = 128, theta: float = 10000.0, t_offset: int = 0,
                   device=None):
    """
    cos/sin tables [t*h*w, head_dim] (fp32) for the post-patchify grid in raster order n = (ti*h + yi)*w + xi.
    Token (ti, yi, xi) gets angle (t_offset+ti)*w_j on the t dims, yi*w_j on the h dims, xi*w_j on the w dims, with
    w_j = theta^(-2j/d) per axis of width d; each angle fills an interleaved pair (2j, 2j+1). fp32 like the
    reference; the KV-cache path uses t_offset = number of cached cond frames.
    """
    cols = []
    for n, d, offset in zip((t, h, w), rope_axes(head_dim), (t_offset, 0, 0)):
        omega = 1.0 / (theta ** (torch.arange(0, d, 2, device=device).float() / d))  # (d/2,)
        pos = torch.arange(offset, offset + n, device=device).float()
        cols.append(torch.outer(pos, omega).repeat_interleave(2, dim=1))  # (n, d)
    ang_t, ang_h, ang_w = cols
    ang = torch.cat([ang_t[:, None, None].expand(t, h, w, -1), ang_h[None, :, None].expand(t, h, w, -1),
                     ang_w[None, None, :].expand(t, h, w, -1)], dim=-1).reshape(t * h * w, head_dim)
    return ang.cos(), ang.sin()


def apply_rope_3d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., N, head_dim] in fp32: out_2j = x_2j cos - x_2j+1 sin,
    out_2j+1 = x_2j+1 cos + x_2j sin (GPT-J layout, not NeoX half-split); cast back to x's dtype."""
    xf = x.float()
    x_even, x_odd = xf.unflatten(-1, (-1, 2)).unbind(-1)
    x_rot = torch.stack([-x_odd, x_even], dim=-1).flatten(-2)
    return (xf * cos + x_rot * sin).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_i), sin(t f_i)] (cos first), f_i = exp(-ln(max_period) i / (dim/2)); fp32, [len(t), dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


# -----------------------------------------------------------------------------
# small ops with the reference precision

class FP32Linear(nn.Linear):
    """nn.Linear computed in fp32 whatever the weight/input dtype (an fp32 island); output fp32. Same keys."""

    def forward(self, x):
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


class RMSNorm(nn.Module):
    """Per-head RMSNorm: normalise in fp32, cast to the input dtype, THEN multiply by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LayerNormFP32(nn.LayerNorm):
    """Affine LayerNorm (eps 1e-6) with fp32 math and fp32 params; output in the input dtype."""

    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def modulate(x, shift, scale):
    """LN(x)(1 + scale) + shift in fp32, cast back. x [B, N, C] = T frames of S tokens; shift/scale [B, T, 1, C]."""
    B, N, C = x.shape
    h = F.layer_norm(x.float().view(B, shift.shape[1], -1, C), (C,), eps=1e-6)
    return (h * (scale + 1) + shift).view(B, N, C).to(x.dtype)


def gated_add(x, gate, y):
    """x + gate * y in fp32 (gate [B, T, 1, C] per frame), cast back to x's dtype."""
    B, N, C = x.shape
    T = gate.shape[1]
    return (x.float().view(B, T, -1, C) + gate * y.float().view(B, T, -1, C)).view(B, N, C).to(x.dtype)


def run(fn, *args, ckpt: bool):
    """fn(*args), or the same under activation checkpointing (recomputed in backward; forward values identical)."""
    return checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args)


def run_frames(fn, x, per_frame, args, ckpt: bool, chunk_tokens: int):
    """fn(x, *per_frame, first_frame, *args) for a fn that is token-wise within frames. Under checkpointing, each
    chunk of whole frames (about `chunk_tokens` tokens) is its own checkpoint; `per_frame` tensors are [B, T, ...]."""
    T = per_frame[0].shape[1]
    S = x.shape[1] // T
    k = max(1, chunk_tokens // S)  # frames per chunk
    if not ckpt or T <= k:
        return run(fn, x, *per_frame, 0, *args, ckpt=ckpt)
    return torch.cat([run(fn, x[:, f * S:(f + k) * S], *(p[:, f:f + k] for p in per_frame), f, *args, ckpt=True)
                      for f in range(0, T, k)], dim=1)


def sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(head_dim)


def _bsa_rect(q, k, v, grid_q, grid_k, chunk, sparsity, backend="auto"):
    """Block-sparse attention with different query and key grids sharing (Hp, Wp): the release's noise call in cond
    mode (Tq = T_noise, Tk = T_total; spec §7.2 step 6). q [B, h, Sq, D] raster over grid_q, k/v raster over grid_k,
    both divisible by chunk. Selection as `select_blocks` (fp32 block means, unscaled dot, top
    int((1 - s) * n_k_blocks) key blocks per query block, no gradient); with grid_q == grid_k it is
    `block_sparse_attention`."""
    block = math.prod(chunk)
    qc = reorder_to_chunks(q, grid_q, chunk)
    kc, vc = reorder_to_chunks(k, grid_k, chunk), reorder_to_chunks(v, grid_k, chunk)
    with torch.no_grad():
        B, H, Sq, D = qc.shape
        q_bar = qc.float().view(B, H, Sq // block, block, D).mean(dim=3)
        k_bar = kc.float().view(B, H, kc.shape[2] // block, block, D).mean(dim=3)
        scores = q_bar @ k_bar.transpose(-1, -2)
        idx = scores.topk(num_selected_blocks(scores.shape[-1], sparsity), dim=-1).indices.sort(dim=-1).values
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    attend = {"torch": block_sparse_attention_torch, "triton": block_sparse_attention_triton}[backend]
    return reorder_from_chunks(attend(qc, kc, vc, idx, block), grid_q, chunk)


# -----------------------------------------------------------------------------
# modules (names = checkpoint keys)

class Attention(nn.Module):
    """Self-attention: fused qkv (rows [q | k | v], head-major), per-head RMSNorm on q and k, 3D RoPE, proj."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope, n_cond: int, kv_cache=None, return_kv: bool = False, bsa=None, cp=None):
        """x [B, N, C]; rope (cos, sin) over every key position ([cache; x] with a cache); the first n_cond tokens
        of x are cond tokens (attend only among themselves). bsa: None (dense) or the plan of
        `LongCatVideoDiT._bsa_plan` (never with a cache). cp: None or the context-parallel `Tiling`: x, n_cond and
        the cache are then this rank's tile, rope and bsa cover the whole grid. Returns ([B, N, C], (k, v) before
        RoPE or None)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        kv = (k.contiguous(), v.contiguous()) if return_kv else None
        if kv_cache is not None:  # noise tokens only; cached cond keys (already k_normed) come first
            k_c, v_c = (t.to(device=x.device, dtype=k.dtype).expand(B, -1, -1, -1) for t in kv_cache)
            k, v = torch.cat([k_c, k], dim=2), torch.cat([v_c, v], dim=2)
        if cp is not None:  # this tile with all heads -> every token (global raster order) with heads / cp heads
            q, k, v = (cp.seq_to_heads(t) for t in (q, k, v))
            n_cond *= cp.size
        cos, sin = rope
        Nq = q.shape[2]
        if kv_cache is not None:
            out = sdpa(apply_rope_3d(q, cos[-Nq:], sin[-Nq:]), apply_rope_3d(k, cos, sin), v)
        else:
            q, k = apply_rope_3d(q, cos, sin), apply_rope_3d(k, cos, sin)
            if 0 < n_cond < Nq:  # cond queries see cond keys only, noise queries see all keys
                c = n_cond
                if bsa is not None and bsa["cond_ok"]:  # release: two BSA calls, (c | c) and (T - c | T) frames
                    (T, Hp, Wp), tc, chunk, s = bsa["grid"], bsa["c"], bsa["chunk"], bsa["sparsity"]
                    out_c = block_sparse_attention(q[:, :, :c], k[:, :, :c], v[:, :, :c], (tc, Hp, Wp), chunk, s)
                    out_n = _bsa_rect(q[:, :, c:], k, v, (T - tc, Hp, Wp), (T, Hp, Wp), chunk, s)
                    out = torch.cat([out_c, out_n], dim=2)
                else:
                    out = torch.cat([sdpa(q[:, :, :c], k[:, :, :c], v[:, :, :c]), sdpa(q[:, :, c:], k, v)], dim=2)
            elif bsa is not None:
                out = block_sparse_attention(q, k, v, bsa["grid"], bsa["chunk"], bsa["sparsity"])
            else:
                out = sdpa(q, k, v)
        if cp is not None:
            out = cp.heads_to_seq(out)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)), kv


class MultiHeadCrossAttention(nn.Module):
    """Cross-attention to text: q_linear, fused kv_linear (rows [k | v]), per-head RMSNorm on q and k, no RoPE."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)

    def text_kv(self, y):
        """y [B, L, C] -> k, v [B, heads, L, hd] (k normed)."""
        B, L, C = y.shape
        k, v = self.kv_linear(y).view(B, L, 2, self.heads, -1).unbind(2)
        return self.k_norm(k).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, k, v, key_mask=None):
        B, N, C = x.shape
        q = self.q_norm(self.q_linear(x).view(B, N, self.heads, -1)).transpose(1, 2)
        return self.proj(sdpa(q, k, v, key_mask).transpose(1, 2).reshape(B, N, C))


class FeedForwardSwiGLU(nn.Module):
    """w2(SiLU(w1 u) * w3 u), no biases; w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LongCatSingleStreamBlock(nn.Module):
    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), FP32Linear(cfg.adaln_tembed_dim, 6 * D))
        self.pre_crs_attn_norm = LayerNormFP32(D, eps=1e-6)  # the only affine LayerNorm (mod_norm_* have no keys)
        self.attn = Attention(D, cfg.num_heads)
        self.cross_attn = MultiHeadCrossAttention(D, cfg.num_heads)
        self.ffn = FeedForwardSwiGLU(D, cfg.ffn_hidden)

    def attention_half(self, x, shift, scale, gate, rope, n_cond, kv_cache, return_kv, bsa=None, cp=None):
        a, kv = self.attn(modulate(x, shift, scale), rope, n_cond, kv_cache, return_kv, bsa, cp)
        return gated_add(x, gate, a), kv

    def mlp_half(self, x, shift, scale, gate, f0, text, c):
        """Cross-attention (zero for cond frames < c, no gate) + modulated FFN on frames f0.. of x (token-wise)."""
        if text is not None:
            k, v, key_mask = text
            n_cond = max(0, min(c, f0 + shift.shape[1]) - f0) * (x.shape[1] // shift.shape[1])
            h = self.pre_crs_attn_norm(x[:, n_cond:])
            out = self.cross_attn(h, k, v, key_mask) if h.shape[1] else h
            if n_cond:
                out = torch.cat([out.new_zeros(x.shape[0], n_cond, x.shape[2]), out], dim=1)
            x = x + out  # residual add in the weight dtype (reference)
        return gated_add(x, gate, self.ffn(modulate(x, shift, scale)))

    def forward(self, x, temb, text, rope, c: int, kv_cache=None, return_kv=False, ckpt=False, chunk=8192,
                bsa=None, cp=None):
        """x [B, N, C]; temb [B, T, adaln] fp32; text (y [B, L, C], key_mask) or None (skip cross-attn);
        c = cond frames inside x (0 with a KV cache); bsa: block-sparse plan or None; cp: context-parallel `Tiling`
        or None (x is then this rank's tile). Returns (x, (k, v) or None)."""
        m = self.adaLN_modulation(temb).unsqueeze(2).chunk(6, dim=-1)  # 6 x [B, T, 1, C] fp32
        S = x.shape[1] // temb.shape[1]
        x, kv = run(self.attention_half, x, m[0], m[1], m[2], rope, c * S, kv_cache, return_kv, bsa, cp, ckpt=ckpt)
        if text is not None:
            text = (*self.cross_attn.text_kv(text[0]), text[1])  # text K/V once per block, outside the chunks
        return run_frames(self.mlp_half, x, m[3:], (text, c), ckpt, chunk), kv


class FinalLayer(nn.Module):
    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), FP32Linear(cfg.adaln_tembed_dim, 2 * cfg.hidden_size))
        self.linear = FP32Linear(cfg.hidden_size, math.prod(cfg.patch_size) * cfg.out_channels)

    def forward(self, x, temb):
        shift, scale = self.adaLN_modulation(temb).unsqueeze(2).chunk(2, dim=-1)  # [shift, scale] order
        return self.linear(modulate(x, shift, scale))  # modulated x is rounded to x's dtype, the Linear is fp32


class PatchEmbed3D(nn.Module):
    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        p = tuple(cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, T, Hp, Wp] -> [B, N, C], raster (t, y, x)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        self.freq_dim = cfg.frequency_embedding_size
        d = cfg.adaln_tembed_dim
        self.mlp = nn.Sequential(FP32Linear(self.freq_dim, d), nn.SiLU(), FP32Linear(d, d))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim))  # fp32 throughout


class CaptionEmbedder(nn.Module):
    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.y_proj = nn.Sequential(nn.Linear(cfg.caption_channels, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))

    def forward(self, y):
        return self.y_proj(y)


class LongCatVideoDiT(nn.Module):
    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.x_embedder = PatchEmbed3D(cfg)
        self.t_embedder = TimestepEmbedder(cfg)
        self.y_embedder = CaptionEmbedder(cfg)
        self.blocks = nn.ModuleList([LongCatSingleStreamBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        self.gradient_checkpointing = False
        self.checkpoint_chunk_tokens = 8192  # with checkpointing: cross-attn + FFN recomputed per ~this many tokens
        # block-sparse self-attention at run time: None (dense) or {sparsity, chunk_3d_shape_q, chunk_3d_shape_k}
        self.bsa = dict(cfg.bsa_params or {}) if cfg.enable_bsa else None
        self._bsa_noted = set()  # fallback notes already printed (once per model and kind)
        self.cp = None  # context parallel at run time: a ContextParallel (model/context_parallel.py) or None

    def set_bsa(self, enabled: bool = True, params: Optional[dict] = None):
        """Switch block-sparse self-attention at run time (e.g. training vs validation), like the release's
        `dit.enable_bsa()` / `disable_bsa()`; params override `cfg.bsa_params` key by key. The config is unchanged."""
        self.bsa = {**(self.cfg.bsa_params or {}), **(params or {})} if enabled else None
        return self

    def set_context_parallel(self, cp=None):
        """Split every forward's tokens over the ranks of `cp` (model/context_parallel.ContextParallel; None: off):
        each rank passes the same full inputs and gets back its own H x W tile of the output, `cp.shard(v)`."""
        if cp is not None:
            if self.cfg.num_heads % cp.size:
                raise ValueError(f"num_heads {self.cfg.num_heads} is not divisible by the context parallel size "
                                 f"{cp.size} (the all-to-all splits the heads)")
            if self.cfg.cp_split_hw not in (None, [1, 1]) and list(self.cfg.cp_split_hw) != list(cp.split):
                raise ValueError(f"the DiT config's cp_split_hw {self.cfg.cp_split_hw} differs from the tiling in "
                                 f"use {list(cp.split)}")
        self.cp = cp
        return self

    def _bsa_note(self, kind: str, msg: str):
        if kind not in self._bsa_noted:
            self._bsa_noted.add(kind)
            print(f"LongCatVideoDiT BSA: {msg}")

    def _bsa_plan(self, T: int, Hp: int, Wp: int, c: int, cached: bool):
        """None (dense self-attention) or the plan every block's self-attention gets."""
        if not self.bsa:
            return None
        p = {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], **self.bsa}
        chunk = tuple(int(v) for v in p["chunk_3d_shape_q"])
        if tuple(int(v) for v in p.get("chunk_3d_shape_k", chunk)) != chunk:
            self._bsa_note("chunk", f"chunk_3d_shape_q {list(chunk)} != chunk_3d_shape_k "
                                    f"{list(p['chunk_3d_shape_k'])} is not supported: dense attention")
            return None
        if cached:
            self._bsa_note("kv_cache", "the KV-cache path uses dense attention")
            return None
        reason = bsa_fallback_reason((T, Hp, Wp), chunk)
        if reason is not None:
            self._bsa_note("T1" if T == 1 else "grid", reason)
            return None
        cond_ok = True
        if 0 < c < T:  # T divisible, so T - c is divisible iff c is
            r = bsa_fallback_reason((c, Hp, Wp), chunk)
            if r is not None:
                self._bsa_note("cond", f"{c} cond latent frame(s): {r} (cond and noise queries; the release asserts)")
                cond_ok = False
        return {"grid": (T, Hp, Wp), "chunk": chunk, "sparsity": float(p["sparsity"]), "c": c, "cond_ok": cond_ok}

    @property
    def dtype(self):
        return self.x_embedder.proj.weight.dtype

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, encoder_attention_mask=None,
                num_cond_latents: int = 0, return_kv: bool = False, kv_cache_dict=None, skip_crs_attn: bool = False):
        """
        hidden_states [B, 16, T, H, W] normalized latents (H, W even); timestep [B] or [B, T] = 1000 sigma per latent
        frame (cond frames: 0, the caller sets it); encoder_hidden_states [B, 1, L, 4096] (release layout) or
        [B, L, 4096]; encoder_attention_mask [B, L] (1 = token, 0 = pad) or None; num_cond_latents c: the first c
        latent frames are conditioning frames (cond mode). With kv_cache_dict (from `cache_cond_kv`), hidden_states
        and timestep hold only the T noise frames and c is the number of cached frames. skip_crs_attn drops the
        cross-attention (text may be None). Returns v = x0 - eps [B, 16, T, H, W] in fp32, and with return_kv also
        {block index: (k, v)}, each [B, heads, N, head_dim], k after k_norm and before RoPE. With context parallel
        on (`set_context_parallel`), the output and the cache are this rank's H x W tile of every frame.
        """
        cfg = self.cfg
        B, _, T, H, W = hidden_states.shape
        _, ph, pw = cfg.patch_size
        if H % ph or W % pw:
            raise ValueError(f"latent H, W = {H}, {W} must be multiples of the patch size {ph}, {pw}")
        Hp, Wp = H // ph, W // pw  # the whole token grid
        tiling = self.cp.tiling(Hp, Wp) if self.cp else None
        if tiling:  # context parallel: this rank keeps its H x W tile of every frame
            hidden_states = self.cp.shard(hidden_states)
            H, W = hidden_states.shape[-2:]
        S = (H // ph) * (W // pw)  # tokens per latent frame (of this rank's tile under context parallel)
        c = int(num_cond_latents or 0)
        if kv_cache_dict:
            if return_kv or c <= 0 or kv_cache_dict[0][0].shape[2] != c * S:
                raise ValueError(f"kv_cache_dict needs num_cond_latents = the cached frames ({c} given, cache of "
                                 f"{kv_cache_dict[0][0].shape[2]} tokens, {S} per frame) and return_kv=False")
        dtype = self.dtype

        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(B, T)
        t = timestep.to(dtype).float()  # rounded to the weight dtype first, like the reference
        temb = self.t_embedder(t.flatten()).view(B, T, -1)  # [B, T, adaln] fp32, one vector per latent frame
        x = self.x_embedder(hidden_states.to(dtype))  # [B, N, C]

        text = None
        if not skip_crs_attn:
            y = encoder_hidden_states.to(dtype)
            if y.ndim == 4 and y.shape[1] != 1:
                raise ValueError(f"encoder_hidden_states {tuple(y.shape)}: expected [B, 1, L, C] or [B, L, C]")
            y = self.y_embedder(y.flatten(1, 2) if y.ndim == 4 else y)  # [B, L, C]
            key_mask = None
            if encoder_attention_mask is not None:
                mask = encoder_attention_mask.reshape(B, -1)  # [B, L] (also takes [B, 1, 1, L])
                if cfg.text_tokens_zero_pad:
                    y = y * mask[:, :, None].to(y.dtype)  # pads -> exact zeros after the projection; all attended
                else:
                    key_mask = (mask != 0)[:, None, None, :]  # the reference's varlen: pads not attended
            text = (y, key_mask)

        t_cached = c if kv_cache_dict else 0
        rope = rope_3d_tables(t_cached + T, Hp, Wp, cfg.head_dim, device=x.device)  # over [cache; x] positions
        c_in_x = 0 if kv_cache_dict else c
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        bsa = self._bsa_plan(T, Hp, Wp, c_in_x, bool(kv_cache_dict))
        kv_out = {}
        for i, block in enumerate(self.blocks):
            cache = kv_cache_dict[i] if kv_cache_dict else None
            x, kv = block(x, temb, text, rope, c_in_x, cache, return_kv, ckpt, self.checkpoint_chunk_tokens, bsa,
                          tiling)
            if return_kv:
                kv_out[i] = kv

        out = self.final_layer(x, temb)  # [B, N, pt*ph*pw*C_out] fp32, channels ordered (tp, hp, wp, c)
        out = out.view(B, T, H // ph, W // pw, ph, pw, cfg.out_channels).permute(0, 6, 1, 2, 4, 3, 5)
        out = out.reshape(B, cfg.out_channels, T, H, W).float()
        return (out, kv_out) if return_kv else out

    def cache_cond_kv(self, cond_latents):
        """Per-block (k, v) of the clean cond latents [B or 1, 16, c, H, W]: the model run on them alone at
        timestep 0 with no text, as the reference's continuation pipeline does. Call under torch.no_grad()."""
        B, _, c = cond_latents.shape[:3]
        t0 = torch.zeros(B, c, device=cond_latents.device)
        return self(cond_latents, t0, None, return_kv=True, skip_crs_attn=True)[1]
