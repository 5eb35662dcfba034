"""
The video VAE of LongCat-Video: the Wan2.1 causal 3D KL autoencoder (16 latent channels, 4x in time, 8x in space),
in plain PyTorch.

Every 3D conv is causal in time (2 * pad_t zero frames in front, none behind). The encoder is a flat list of residual
blocks (RMS norm, SiLU, causal 3x3x3 conv, twice) and resample blocks (per-frame zero-pad + stride-2 conv; the two
temporal ones add a stride-2 causal (3,1,1) `time_conv`), a mid block (residual, per-frame single-head attention,
residual) and an RMS/SiLU/conv head to 2 * z_dim moments (mean || logvar). The decoder mirrors it with one more
residual block per stage; its temporal upsamplers double the channels with a causal `time_conv` and interleave the
halves in time. With the LongCat (= Wan2.1) config: 194 tensors, 126,892,531 parameters.

Temporal downsampling only exists on the cached path, so the model exposes only that (vae_and_data.md §2.4):
  - encode: frame 0 alone, then chunks of 4 frames; each causal conv keeps the last CACHE_T = 2 frames of its input
    for the next chunk, each temporal downsampler skips its time_conv on the first chunk and keeps its last frame;
  - decode: one latent frame at a time; a temporal upsampler skips its time_conv on the first latent frame (1 latent
    -> 1 frame) and runs it on zero history at the second, so every later latent gives 4 frames; output clamped to
    [-1, 1] as diffusers does.
Both are exactly causal: latent k depends on frames <= 4k only, so the encode of a clip's first frame equals latent 0.

The latent contract (longcat_video.md §4, vae_and_data.md §2.2):
  - videos are [B, 3, F, H, W] in [-1, 1] with F = 4k + 1 and H, W multiples of 16 (8x VAE, 2x2 DiT patch); anything
    else is a ValueError (diffusers would silently drop trailing frames and pixels);
  - `encode` returns and `decode` takes *normalised* latents z = (mu - latents_mean) * (1 / latents_std), computed
    exactly as the LongCat-Video / Wan pipelines do (reciprocal first, then multiply; the inverse divides by it);
    `encode_moments` gives the raw posterior (mean, logvar) for latent caches.

Module names equal the diffusers AutoencoderKLWan state-dict keys, so the HF `vae/diffusion_pytorch_model.safetensors`
loads with strict=True; `convert_wan_vae_state_dict` renames the original `Wan2.1_VAE.pth` layout. Numerics follow
diffusers 0.42.1 operation for operation (bit-identical in fp32 on CPU, tests/test_vae_video.py); RMS norms are
computed in fp32 for half-precision inputs as diffusers 0.42.1 does (LongCat's vendored copy does not: tiny bf16
differences). Left out on purpose: spatial tiling (changes results), the uncached forward (it skips every time_conv),
gradient checkpointing (the VAE is frozen), the Wan2.2 options (is_residual, patch_size), attention outside the mid
blocks (attn_scales, which diffusers' decoder ignores anyway).

References: Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models" (arXiv:2503.20314) §3.1;
Wan-Video/Wan2.1 `wan/modules/vae.py`; diffusers `AutoencoderKLWan` (0.42.1); Meituan LongCat-Video
(arXiv:2510.22200) `longcat_video/modules/autoencoder_kl_wan.py`.
"""
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.vae_image import latents_from_moments

CACHE_T = 2  # frames of history each causal 3x3x3 conv keeps between chunks
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


def check_video_size(frames: int, height: int, width: int, multiple: int = 16) -> None:
    """Raise a one-line ValueError unless frames = 4k + 1 and height, width are multiples of `multiple` (16 for
    LongCat: 8x VAE x 2x2 patch). Trim or resize at the data level; the VAE never crops silently."""
    if frames < 1 or (frames - 1) % 4:
        fix = f"; trim to {(frames - 1) // 4 * 4 + 1}" if frames > 1 else ""
        raise ValueError(f"video has {frames} frames; the Wan VAE needs 4k+1 frames (1, 5, 9, ..., 93){fix}")
    if height % multiple or width % multiple:
        raise ValueError(f"video size {width}x{height} (WxH) is not a multiple of {multiple} (8x VAE x 2x2 patch); "
                         f"resize or crop first")


def latent_frames(frames: int) -> int:
    """Pixel frames (4k + 1, checked) -> latent frames k + 1, e.g. 93 -> 24."""
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"video has {frames} frames; the Wan VAE needs 4k+1 frames (1, 5, 9, ..., 93)")
    return (frames - 1) // 4 + 1


def pixel_frames(latent_t: int) -> int:
    """Latent frames -> decoded pixel frames: 1 + 4 (T_lat - 1), e.g. 24 -> 93."""
    if latent_t < 1:
        raise ValueError(f"need at least one latent frame, got {latent_t}")
    return 1 + 4 * (latent_t - 1)


@dataclass
class VideoVAEConfig:
    # field names = keys of a diffusers AutoencoderKLWan vae/config.json; defaults = the Wan2.1 values LongCat ships
    base_dim: int = 96
    decoder_base_dim: int | None = None  # None = base_dim
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2  # encoder; the decoder uses num_res_blocks + 1
    attn_scales: tuple = ()
    temperal_downsample: tuple = (False, True, True)  # [sic], per encoder level; the decoder uses it reversed
    dropout: float = 0.0
    latents_mean: tuple = WAN21_LATENTS_MEAN
    latents_std: tuple = WAN21_LATENTS_STD
    is_residual: bool = False  # Wan2.2 (AvgDown3D / DupUp3D shortcuts): not supported
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None  # Wan2.2 pixel patchify: not supported
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            setattr(self, name, tuple(getattr(self, name)))
        n = len(self.dim_mult)
        if self.is_residual:
            raise ValueError("vae config: is_residual=True is the Wan2.2 VAE; LongCat-Video uses Wan2.1 (False)")
        if self.patch_size not in (None, 1):
            raise ValueError(f"vae config: patch_size={self.patch_size} is the Wan2.2 VAE; only null (or 1) is "
                             f"supported")
        if self.attn_scales:
            raise ValueError(f"vae config: attn_scales={list(self.attn_scales)} not supported; Wan2.1 uses [] "
                             f"(attention in the mid blocks only)")
        if n < 2 or len(self.temperal_downsample) != n - 1 or sum(map(bool, self.temperal_downsample)) != 2:
            raise ValueError(f"vae config: temperal_downsample must have len(dim_mult) - 1 = {n - 1} entries, exactly "
                             f"two True (4x in time), got {list(self.temperal_downsample)}")
        if self.scale_factor_temporal != 4 or self.scale_factor_spatial != 2 ** (n - 1):
            raise ValueError(f"vae config: scale_factor_temporal/scale_factor_spatial = {self.scale_factor_temporal}/"
                             f"{self.scale_factor_spatial} do not match the architecture (4/{2 ** (n - 1)})")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"vae config: latents_mean/std need z_dim = {self.z_dim} values, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")
        if min(self.latents_std) <= 0:
            raise ValueError("vae config: latents_std must be positive")

    @classmethod
    def from_dict(cls, d: dict) -> "VideoVAEConfig":
        """Build from a diffusers `vae/config.json` dict. `_*` keys are ignored; unknown keys and options this class
        cannot honour (Wan2.2: is_residual, patch_size; attn_scales) are a ValueError naming the key."""
        kw = {k: v for k, v in d.items() if not k.startswith("_")}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ValueError(f"vae config: unknown key(s) {unknown}; expected a subset of {sorted(known)}")
        for key in ("scale_factor_temporal", "scale_factor_spatial", "latents_mean", "latents_std"):
            if key in kw and kw[key] is None:
                raise ValueError(f"vae config: {key} is null; LongCat-Video needs it")
        return cls(**kw)

    def to_dict(self) -> dict:
        """The diffusers `vae/config.json` for this config (so diffusers can load a folder we write)."""
        d = {"_class_name": "AutoencoderKLWan", **{f.name: getattr(self, f.name) for f in fields(self)}}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# -----------------------------------------------------------------------------
# building blocks (diffusers names: WanCausalConv3d, WanRMS_norm, WanResidualBlock, WanAttentionBlock, WanResample)
# The feature cache is a dict {module: tensor} that lives for one encode or decode call; a module that keeps history
# between chunks stores what it needs under its own key (diffusers: a list indexed by call order, the same thing).

class CausalConv3d(nn.Conv3d):
    """Conv3d with spatial padding on both sides and temporal padding 2 * pad_t in front only. `history` (frames of
    the previous chunk's input) is prepended and replaces as many front zero frames."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__(cin, cout, kernel_size, stride=stride, padding=padding)
        pt, ph, pw = self.padding
        self.causal_padding = (pw, pw, ph, ph, 2 * pt, 0)  # F.pad order: W, H, T
        self.padding = (0, 0, 0)

    def forward(self, x, history=None):
        pad = list(self.causal_padding)
        if history is not None and pad[4] > 0:
            x = torch.cat([history.to(x.device), x], dim=2)
            pad[4] -= history.shape[2]
        return super().forward(F.pad(x, pad))


def cached_conv(conv: CausalConv3d, x, cache: dict):
    """Run `conv` on this chunk with the previous chunk's last CACHE_T input frames, then store this chunk's (a
    one-frame chunk keeps the last cached frame in front of its own)."""
    prev = cache.get(conv)
    keep = x[:, :, -CACHE_T:].clone()
    if keep.shape[2] < CACHE_T and prev is not None:
        keep = torch.cat([prev[:, :, -1:].to(keep.device), keep], dim=2)
    out = conv(x, prev)
    cache[conv] = keep
    return out


class RMSNorm(nn.Module):
    """x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma; no eps, no bias. gamma is (C, 1, 1, 1) for videos and
    (C, 1, 1) for the per-frame attention. Half-precision inputs are normalised in fp32 (diffusers 0.42.1)."""

    def __init__(self, dim: int, video: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))

    def forward(self, x):
        low = x.dtype.itemsize < 4
        return F.normalize(x.float() if low else x, dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """shortcut(x) + conv2(dropout(silu(norm2(conv1(silu(norm1(x))))))); convs causal 3x3x3, shortcut 1x1x1."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.norm1 = RMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None  # Wan: shortcut

    def forward(self, x, cache: dict):
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = cached_conv(self.conv1, F.silu(self.norm1(x)), cache)
        x = F.dropout(F.silu(self.norm2(x)), self.dropout, self.training)
        return cached_conv(self.conv2, x, cache) + h


class AttentionBlock(nn.Module):
    """Per-frame single-head self-attention over the H*W positions (head dim C), 1x1 convs for qkv and proj."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)  # original Wan zero-initialises it

    def forward(self, x):
        B, C, T, H, W = x.shape
        h = self.norm(x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W))
        qkv = self.to_qkv(h).reshape(B * T, 1, 3 * C, H * W).permute(0, 1, 3, 2).contiguous()  # (BT, 1, HW, 3C)
        h = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # (BT, 1, HW, C)
        h = self.proj(h.squeeze(1).permute(0, 2, 1).reshape(B * T, C, H, W))
        return h.view(B, T, C, H, W).permute(0, 2, 1, 3, 4) + x


class MidBlock(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])  # registered first, as in diffusers
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout) for _ in range(2)])

    def forward(self, x, cache: dict):
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Upsample2x(nn.Module):
    """Nearest-exact x2 in H and W, computed in fp32 (diffusers WanUpsample)."""

    def forward(self, x):
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Per-frame spatial x2 down (zero-pad right/bottom, 3x3 stride-2 conv) or up (nearest-exact, 3x3 conv to C/2),
    optionally with the causal temporal x2 `time_conv` that only runs on the cached path."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":  # C -> 2C, the halves become two consecutive frames
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":  # stride 2 in time, no padding: the previous chunk's last frame goes in front
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache: dict):
        B, C, T, H, W = x.shape
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        T = x.shape[2]
        x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W))
        x = x.view(B, T, x.shape[1], x.shape[2], x.shape[3]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d":
            prev = cache.get(self)
            if prev is None:  # first chunk (one frame): keep it, no temporal downsampling
                cache[self] = x.clone()
            else:
                keep = x[:, :, -1:].clone()
                x = self.time_conv(torch.cat([prev[:, :, -1:], x], dim=2))
                cache[self] = keep
        return x

    def _time_up(self, x, cache: dict):
        prev = cache.get(self)
        if prev is None:  # first latent frame: 1 -> 1 frame, no time_conv; mark the slot (diffusers: "Rep")
            cache[self] = "first"
            return x
        keep = x[:, :, -CACHE_T:].clone()
        if keep.shape[2] < CACHE_T:  # second latent frame: zero history; later: the previous last frame
            front = torch.zeros_like(keep) if isinstance(prev, str) else prev[:, :, -1:].to(keep.device)
            keep = torch.cat([front, keep], dim=2)
        x = self.time_conv(x) if isinstance(prev, str) else self.time_conv(x, prev)
        cache[self] = keep
        B, C2, T, H, W = x.shape
        x = x.reshape(B, 2, C2 // 2, T, H, W)
        x = torch.stack((x[:, 0], x[:, 1]), 3)  # (B, C, T, 2, H, W): interleave the halves in time
        return x.reshape(B, C2 // 2, T * 2, H, W)


class UpBlock(nn.Module):  # diffusers WanUpBlock
    def __init__(self, cin: int, cout: int, num_layers: int, dropout: float, upsample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if j == 0 else cout, cout, dropout) for j in range(num_layers)])
        self.upsamplers = nn.ModuleList([Resample(cout, upsample)] if upsample else [])

    def forward(self, x, cache: dict):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x, cache)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VideoVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        blocks = []  # a flat list, as in Wan (downsamples) and diffusers (down_blocks)
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin if j == 0 else cout, cout, cfg.dropout))
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], cfg.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x, cache: dict):  # one chunk (1 or 4 frames) -> its latent frames (1), moments 2 * z_dim
        x = cached_conv(self.conv_in, x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return cached_conv(self.conv_out, F.silu(self.norm_out(x)), cache)


class Decoder(nn.Module):
    def __init__(self, cfg: VideoVAEConfig):
        super().__init__()
        base, n = cfg.decoder_base_dim or cfg.base_dim, len(cfg.dim_mult)
        dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        up_time = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], cfg.dropout)
        self.up_blocks = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            mode = None if i == n - 1 else "upsample3d" if up_time[i] else "upsample2d"
            # Wan2.1 quirk: each upsampler halves the channels, so stages after the first take cin // 2
            self.up_blocks.append(UpBlock(cin // 2 if i > 0 else cin, cout, cfg.num_res_blocks + 1, cfg.dropout, mode))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z, cache: dict):  # one latent frame -> 1 frame (the first) or 4 frames
        x = self.mid_block(cached_conv(self.conv_in, z, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return cached_conv(self.conv_out, F.silu(self.norm_out(x)), cache)


# -----------------------------------------------------------------------------
# the autoencoder

class VideoVAE(nn.Module):
    def __init__(self, config: VideoVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    @property
    def dtype(self):
        return self.encoder.conv_in.weight.dtype

    @property
    def downscale_factor(self) -> int:  # spatial, 8 for Wan2.1
        return self.config.scale_factor_spatial

    def _stats(self, like):  # the pipelines' exact recipe: config lists -> tensors in the latents' dtype
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32).view(shape).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(self.config.latents_std, dtype=torch.float32).view(shape).to(like.device,
                                                                                                    like.dtype)
        return mean, inv_std

    def normalize(self, mu):  # raw VAE latent [B, z, T, h, w] -> diffusion-space latent
        mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    def denormalize(self, z):  # diffusion-space latent -> raw VAE latent
        mean, inv_std = self._stats(z)
        return z / inv_std + mean

    def _moments(self, x):
        cache = {}
        chunks = [x[:, :, :1]] + [x[:, :, t:t + 4] for t in range(1, x.shape[2], 4)]  # frame 0, then 4-frame chunks
        h = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        return self.quant_conv(h)

    def _decode(self, mu):
        x, cache = self.post_quant_conv(mu), {}
        out = torch.cat([self.decoder(x[:, :, i:i + 1], cache) for i in range(x.shape[2])], dim=2)
        return out.clamp(-1.0, 1.0)

    def encode_moments(self, x, batch_slice: bool = False):
        """Videos [B, 3, F, H, W] in [-1, 1], F = 4k + 1, H and W multiples of 16 -> raw posterior (mean, logvar),
        each [B, z_dim, k + 1, H/8, W/8], logvar clamped to [-30, 20]. batch_slice=True encodes one sample at a time
        (diffusers' enable_slicing: less memory)."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected videos [B, {self.config.in_channels}, F, H, W], got {tuple(x.shape)}")
        check_video_size(x.shape[2], x.shape[3], x.shape[4], multiple=2 * self.downscale_factor)
        if batch_slice and x.shape[0] > 1:
            moments = torch.cat([self._moments(xi) for xi in x.split(1)])
        else:
            moments = self._moments(x)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x, sample: bool = False, generator: torch.Generator | None = None, batch_slice: bool = False):
        """Videos [B, 3, F, H, W] -> normalised latents [B, 16, (F-1)/4 + 1, H/8, W/8]. sample=False takes the
        posterior mode (deterministic; makes latent 0 of a video equal its first frame's encode), sample=True one
        draw mean + std * eps, as LongCat's pipeline does for conditioning frames (same generator -> same draw as
        diffusers' latent_dist.sample)."""
        mean, logvar = self.encode_moments(x, batch_slice=batch_slice)
        return self.normalize(latents_from_moments(mean, logvar, sample, generator))

    def decode(self, z, batch_slice: bool = False):
        """Normalised latents [B, 16, T, h, w] -> videos [B, 3, 1 + 4(T-1), 8h, 8w] clamped to [-1, 1]."""
        if z.ndim != 5 or z.shape[1] != self.config.z_dim or z.shape[2] < 1:
            raise ValueError(f"expected latents [B, {self.config.z_dim}, T, h, w], got {tuple(z.shape)}")
        mu = self.denormalize(z)
        if batch_slice and mu.shape[0] > 1:
            return torch.cat([self._decode(m) for m in mu.split(1)])
        return self._decode(mu)


# -----------------------------------------------------------------------------
# original Wan2.1 layout (Wan2.1_VAE.pth) -> ours (vae_and_data.md §2.5)

_WAN_RULES = [  # (pattern, replacement), applied in order to each key
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
    (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    (r"\.residual\.0\.", ".norm1."),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.", ".norm2."),
    (r"\.residual\.6\.", ".conv2."),
    (r"\.shortcut\.", ".conv_shortcut."),
]


def is_wan_original_state_dict(sd: dict) -> bool:
    """True for the original Wan layout (encoder.downsamples.*, decoder.upsamples.*, middle, head, conv1/conv2),
    False for the diffusers layout."""
    return any(k.startswith(("encoder.downsamples.", "decoder.upsamples.", "encoder.middle.", "decoder.middle.",
                             "encoder.head.", "conv1.")) for k in sd)


def convert_wan_vae_state_dict(sd: dict) -> dict:
    """Rename an original Wan2.1 VAE state dict to our (= diffusers AutoencoderKLWan) keys. The encoder's flat index
    is kept; the decoder's flat `upsamples` list (per stage: num_res_blocks + 1 residual blocks, then a resample on
    all but the last) is regrouped into up_blocks.{stage}.resnets.{j} / .upsamplers.0, found from which indices hold
    resample weights, so any depth works. Values are untouched; unknown keys pass through for strict loading to
    flag."""
    ups = {}  # flat decoder index -> True if it is a resample block
    for k in sd:
        if m := re.match(r"decoder\.upsamples\.(\d+)\.", k):
            ups[int(m[1])] = ups.get(int(m[1]), False) or bool(re.match(r"(resample|time_conv)\.", k[m.end():]))
    where, stage, j = {}, 0, 0
    for n in sorted(ups):
        if ups[n]:
            where[n], stage, j = f"decoder.up_blocks.{stage}.upsamplers.0.", stage + 1, 0
        else:
            where[n], j = f"decoder.up_blocks.{stage}.resnets.{j}.", j + 1
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^decoder\.upsamples\.(\d+)\.", lambda m: where[int(m[1])], key)
        for pattern, repl in _WAN_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out
