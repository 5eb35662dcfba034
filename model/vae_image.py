"""
The image VAE of LongCat-Image: the FLUX.1 KL autoencoder (16 latent channels, 8x down), in plain PyTorch.

Encoder: conv_in, one stage per entry of `block_out_channels` (ResNet blocks, then a stride-2 conv on all but the
last stage), a mid block (ResNet, single-head self-attention over the H*W tokens, ResNet), GroupNorm + SiLU +
conv_out to 2 * latent_channels moments (mean || logvar). The decoder mirrors it with one more ResNet per stage and
nearest x2 upsampling. With the FLUX config: 244 tensors, 83,819,683 parameters, 1024^2 px <-> 16 x 128^2 latents.

The latent contract (see ../shared/specs/vae_and_data.md §1.3, longcat_image.md §4):
  - images are [B, 3, H, W] in [-1, 1] with H, W multiples of 8 (a ValueError otherwise: the convs would silently
    drop the remainder); LongCat-Image additionally needs multiples of 16 for 2x2 packing (pack_latents checks);
  - `encode` returns and `decode` takes *normalised* latents z = (mu - shift_factor) * scaling_factor, so no caller
    ever touches 0.1159 / 0.3611; `encode_moments` gives the raw posterior (mean, logvar) for latent caches;
  - `decode` does not clamp its output (neither does diffusers); map to pixels with clamp(x / 2 + 0.5, 0, 1).

Module names equal the diffusers AutoencoderKL state-dict keys, so the HF `vae/diffusion_pytorch_model.safetensors`
loads with strict=True; `convert_bfl_vae_state_dict` renames BFL's `ae.safetensors` (the LDM layout). Numerics follow
diffusers operation for operation (bit-identical in fp32 on CPU, tests/test_vae_image.py). Left out on purpose: tiling
(changes GroupNorm/attention context, so never for training latents), gradient checkpointing (the VAE is frozen), the
DiagonalGaussianDistribution object. Run in fp32 or bf16, never fp16 (force_upcast: fp16 can overflow).

References: Kingma & Welling 2013 (arXiv:1312.6114); Rombach et al. 2022, LDM (arXiv:2112.10752) §3.1 (and §4.3.2,
App. D.1 for the latent scaling factor); black-forest-labs/flux `src/flux/modules/autoencoder.py`; diffusers
`AutoencoderKL` (0.42.1).
"""
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ImageVAEConfig:
    # field names = keys of a diffusers AutoencoderKL vae/config.json; defaults = the FLUX.1 values LongCat ships
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder; the decoder uses layers_per_block + 1
    latent_channels: int = 16
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False  # 1x1 conv on the moments (SD-style VAEs); FLUX has none
    use_post_quant_conv: bool = False  # 1x1 conv on the latents before the decoder
    sample_size: int = 1024  # diffusers' tiling threshold; informational here
    force_upcast: bool = True  # "do not run in fp16"; informational here

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageVAEConfig":
        """Build from a diffusers `vae/config.json` dict. `_*` keys are ignored; anything this class cannot honour
        (another activation or block type, latents_mean/std, a missing shift/scale) is a ValueError naming the key."""
        kw = {k: v for k, v in d.items() if not k.startswith("_")}
        n = len(kw.get("block_out_channels", cls.block_out_channels))
        if kw.pop("act_fn", "silu") != "silu":
            raise ValueError(f"vae config: act_fn={d['act_fn']!r} is not supported (only 'silu')")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            got = kw.pop(key, [want] * n)
            if list(got) != [want] * n:
                raise ValueError(f"vae config: {key} must be {n} x {want!r} (one per block_out_channels), got {got}")
        for key in ("latents_mean", "latents_std"):
            if kw.pop(key, None) is not None:
                raise ValueError(f"vae config: {key} is not supported (this VAE normalises with shift/scaling_factor)")
        for key in ("shift_factor", "scaling_factor"):
            if kw.get(key) is None:
                raise ValueError(f"vae config: {key} is missing or null; LongCat needs both shift and scaling factor")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ValueError(f"vae config: unknown key(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**kw)

    def to_dict(self) -> dict:
        """The diffusers `vae/config.json` for this config (so diffusers can load a folder we write)."""
        n = len(self.block_out_channels)
        d = {"_class_name": "AutoencoderKL", **{f.name: getattr(self, f.name) for f in fields(self)}}
        d.update(block_out_channels=list(self.block_out_channels), act_fn="silu",
                 down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
        return d


# -----------------------------------------------------------------------------
# building blocks (diffusers names: ResnetBlock2D, Downsample2D, Upsample2D, Attention, UNetMidBlock2D)

def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-norm residual block without time embedding: x + conv2(silu(gn2(conv1(silu(gn1(x))))))."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None  # BFL: nin_shortcut

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 in every released config
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv: H -> H/2 for even H."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidAttention(nn.Module):
    """Single-head self-attention over the H*W positions, head dim = C, scale 1/sqrt(C), residual added."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list so the key reads to_out.0 (diffusers)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x.reshape(B, C, H * W)).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)  # a strided view, not a copy
        return h + x  # h first: the sum inherits h's memory layout, as in diffusers, so the next conv rounds alike


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([MidAttention(channels, groups)] if attention else [])  # registered first,
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])  # as in diffusers

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):  # diffusers DownEncoderBlock2D
    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout)] if downsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):  # diffusers UpDecoderBlock2D
    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: ImageVAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, H, W) -> (B, 2 * latent_channels, H/f, W/f)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: ImageVAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.up_blocks = nn.ModuleList([  # up_blocks.0 is the lowest resolution (BFL counts the other way)
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):  # (B, latent_channels, h, w) -> (B, 3, h*f, w*f)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# -----------------------------------------------------------------------------
# the autoencoder

def latents_from_moments(mean, logvar, sample: bool = False, generator: torch.Generator | None = None, eps=None):
    """Posterior mode (mean) or one draw mean + exp(logvar / 2) * eps, in raw VAE space (not normalised).
    eps is drawn like diffusers' DiagonalGaussianDistribution.sample: shape and dtype of `mean`, on the generator's
    device (a CPU generator draws on the CPU, then moves), so the same generator state gives the same latents.
    A latent cache stores (mean, logvar) and later calls vae.normalize(latents_from_moments(...)); for that an
    ImageVAE built under torch.device("meta") is enough (normalize only reads the config). `eps` (shape of mean) may
    be given instead of a generator, e.g. drawn for a whole global batch by a trainer."""
    if not sample:
        return mean
    if eps is None:
        device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps.to(mean.device, mean.dtype)


class ImageVAE(nn.Module):
    def __init__(self, config: ImageVAEConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    @property
    def dtype(self):
        return self.encoder.conv_in.weight.dtype

    @property
    def downscale_factor(self) -> int:  # 8 for FLUX
        return 2 ** (len(self.config.block_out_channels) - 1)

    def normalize(self, mu):  # raw VAE latent -> diffusion-space latent
        return (mu - self.config.shift_factor) * self.config.scaling_factor

    def denormalize(self, z):  # diffusion-space latent -> raw VAE latent
        return z / self.config.scaling_factor + self.config.shift_factor

    def _moments(self, x):
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _decode(self, mu):
        if self.post_quant_conv is not None:
            mu = self.post_quant_conv(mu)
        return self.decoder(mu)

    def encode_moments(self, x, batch_slice: bool = False):
        """Images [B, 3, H, W] in [-1, 1] -> raw posterior (mean, logvar), each [B, latent_channels, H/f, W/f],
        logvar clamped to [-30, 20]. batch_slice=True encodes one sample at a time (same result, less memory)."""
        f = self.downscale_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of {f}; resize or crop first "
                             f"(the encoder would silently drop the remainder)")
        if batch_slice and x.shape[0] > 1:
            moments = torch.cat([self._moments(xi) for xi in x.split(1)])
        else:
            moments = self._moments(x)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x, sample: bool = False, generator: torch.Generator | None = None, batch_slice: bool = False):
        """Images [B, 3, H, W] in [-1, 1] -> normalised latents z = (mu - shift) * scale, [B, 16, H/8, W/8].
        sample=False takes the posterior mode (inference edit references), sample=True one posterior draw (the
        official trainer's targets)."""
        mean, logvar = self.encode_moments(x, batch_slice=batch_slice)
        return self.normalize(latents_from_moments(mean, logvar, sample, generator))

    def decode(self, z, batch_slice: bool = False):
        """Normalised latents [B, 16, h, w] -> images [B, 3, 8h, 8w], roughly in [-1, 1] (not clamped)."""
        mu = self.denormalize(z)
        if batch_slice and mu.shape[0] > 1:
            return torch.cat([self._decode(m) for m in mu.split(1)])
        return self._decode(mu)


# -----------------------------------------------------------------------------
# 2x2 latent packing for the DiT (longcat_image.md §4.2)

def pack_latents(z):
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: token = row * (w/2) + col, channel = c * 4 + dy * 2 + dx."""
    B, C, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents: latent size {h}x{w} must be even (image sides a multiple of 16)")
    z = z.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, dy, dx)
    return z.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(x, h: int, w: int):
    """Inverse of pack_latents; h, w are the LATENT height and width (image size / 8)."""
    B, N, D = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"unpack_latents: latent size {h}x{w} must be even (image sides a multiple of 16)")
    if N != (h // 2) * (w // 2) or D % 4:
        raise ValueError(f"unpack_latents: {N} tokens of width {D} do not fit a {h}x{w} latent "
                         f"(need {(h // 2) * (w // 2)} tokens of width 4C)")
    x = x.reshape(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, dy, w/2, dx)
    return x.reshape(B, D // 4, h, w)


# -----------------------------------------------------------------------------
# BFL / LDM checkpoint layout (ae.safetensors) -> ours (vae_and_data.md §1.4)

_BFL_PREFIXES = ("first_stage_model.", "vae.")  # some repacks nest the AE under one of these
_BFL_RULES = [  # (pattern, replacement) applied in order to each key, after the prefix is stripped
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
]
_ATTN_WEIGHT = re.compile(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _strip_bfl_prefix(sd: dict) -> dict:
    for prefix in _BFL_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def is_bfl_vae_state_dict(sd: dict) -> bool:
    """True for the BFL/LDM layout (encoder.down.0.block.0..., mid.attn_1), False for the diffusers layout."""
    return any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid."))
               for k in _strip_bfl_prefix(sd))


def convert_bfl_vae_state_dict(sd: dict) -> dict:
    """Rename a BFL `ae.safetensors` / LDM first-stage state dict to our (= diffusers) keys. The decoder's level
    index is reversed (BFL decoder.up.0 is the full-resolution level) and the 1x1-conv attention weights
    [C, C, 1, 1] are squeezed to Linear [C, C]. Keys we do not know are passed through for strict loading to flag."""
    sd = _strip_bfl_prefix(sd)
    ups = [int(m[1]) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    n_up = max(ups) + 1 if ups else 0
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                     lambda m: f"decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets.", key)
        key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                     lambda m: f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.", key)
        for pattern, repl in _BFL_RULES:
            key = re.sub(pattern, repl, key)
        if _ATTN_WEIGHT.search(key) and value.ndim > 2:
            value = value.flatten(1)  # [C, C, 1, 1] -> [C, C]
        out[key] = value
    return out
