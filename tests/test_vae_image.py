"""Image VAE (model/vae_image.py) against diffusers AutoencoderKL: fp32 parity on tiny random configs, the full FLUX
key set on the meta device, the BFL layout converter, 2x2 latent packing and the input-size contract."""
import re

import pytest
import torch

from model.vae_image import (ImageVAE, ImageVAEConfig, convert_bfl_vae_state_dict, is_bfl_vae_state_dict,
                             latents_from_moments, pack_latents, unpack_latents)

pytest.importorskip("diffusers")  # test-only reference; the product never imports it
from diffusers import AutoencoderKL  # noqa: E402

SHIFT, SCALE = 0.1159, 0.3611
FLUX_CONFIG = {  # FLUX.1-dev vae/config.json as LongCat-Image ships it (vae_and_data.md §1.1)
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0",
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "out_channels": 3, "latent_channels": 16, "latents_mean": None,
    "latents_std": None, "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": SCALE, "shift_factor": SHIFT, "use_post_quant_conv": False,
    "use_quant_conv": False,
}
TINY = {  # name -> (AutoencoderKL kwargs, image H x W)
    "2level": (dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=16), (48, 80)),
    "4level": (dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, latent_channels=16), (32, 48)),
    "quant_conv": (dict(block_out_channels=[32, 64], layers_per_block=2, latent_channels=4,
                        use_quant_conv=True, use_post_quant_conv=True), (32, 32)),
}


def tiny_diffusers_vae(**kw):
    n = len(kw["block_out_channels"])
    kw = dict(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
              norm_num_groups=32, shift_factor=SHIFT, scaling_factor=SCALE,
              use_quant_conv=False, use_post_quant_conv=False, sample_size=64) | kw
    torch.manual_seed(0)
    ref = AutoencoderKL(**kw).eval()
    with torch.no_grad():
        for p in ref.parameters():  # perturb everything: no identity GroupNorms or zero biases hide a mix-up
            p.add_(0.05 * torch.randn_like(p))
    return ref


def ours_from(ref):
    model = ImageVAE(ImageVAEConfig.from_dict(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def maxdiff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_parity_with_diffusers(name):
    kw, (H, W) = TINY[name]
    ref = tiny_diffusers_vae(**kw)
    model = ours_from(ref)
    torch.manual_seed(1)
    x = torch.rand(2, 3, H, W) * 2 - 1

    post = ref.encode(x).latent_dist
    mean, logvar = model.encode_moments(x)
    z_ref = (post.mode() - SHIFT) * SCALE
    z = model.encode(x)
    zs_ref = (post.sample(generator=torch.Generator().manual_seed(7)) - SHIFT) * SCALE
    zs = model.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    img_ref = ref.decode(z_ref / SCALE + SHIFT).sample
    img = model.decode(z_ref)
    diffs = {"mean": maxdiff(mean, post.mean), "logvar": maxdiff(logvar, post.logvar), "encode_mode": maxdiff(z, z_ref),
             "encode_sample": maxdiff(zs, zs_ref), "decode": maxdiff(img, img_ref)}
    print(f"\n[{name}] max|diff| vs diffusers: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert all(v <= 1e-5 for v in diffs.values()), diffs
    assert maxdiff(zs, z) > 1e-3  # sampling really adds noise
    # batch slicing: one sample at a time. Equal to diffusers' enable_slicing(); vs the batched call only up to
    # rounding, because CPU conv kernels pick their blocking by batch size (~1e-6 observed, both libraries alike)
    ref.enable_slicing()
    z_sl, img_sl = model.encode(x, batch_slice=True), model.decode(z_ref, batch_slice=True)
    assert maxdiff(z_sl, (ref.encode(x).latent_dist.mode() - SHIFT) * SCALE) <= 1e-5
    assert maxdiff(img_sl, ref.decode(z_ref / SCALE + SHIFT).sample) <= 1e-5
    assert maxdiff(z_sl, z) <= 1e-5 and maxdiff(img_sl, img) <= 1e-5


def test_latents_from_moments_and_normalisation():
    mean, logvar = torch.randn(2, 16, 4, 6), torch.randn(2, 16, 4, 6)
    assert latents_from_moments(mean, logvar) is mean  # mode
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    drawn = latents_from_moments(mean, logvar, sample=True, generator=g)
    assert torch.equal(drawn, mean + torch.exp(0.5 * logvar) * eps)
    with torch.device("meta"):
        vae = ImageVAE(ImageVAEConfig())
    mu = torch.randn(3, 16, 2, 2)
    assert torch.equal(vae.normalize(mu), (mu - 0.1159) * 0.3611)
    assert torch.allclose(vae.denormalize(vae.normalize(mu)), mu, atol=1e-6, rtol=0)


def test_config_from_dict():
    cfg = ImageVAEConfig.from_dict(FLUX_CONFIG)
    assert cfg == ImageVAEConfig()  # the defaults are the FLUX values
    ref = tiny_diffusers_vae(**TINY["quant_conv"][0])  # the round trip through diffusers' own config dict
    ours = ImageVAE(ImageVAEConfig.from_dict(dict(ref.config)))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    bad = {
        "act_fn": {"act_fn": "gelu"},
        "down_block_types": {"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]},
        "up_block_types": {"up_block_types": ["UpDecoderBlock2D"] * 3},
        "shift_factor": {"shift_factor": None},
        "scaling_factor": {"scaling_factor": None},
        "latents_mean": {"latents_mean": [0.0] * 16},
        "tile_size": {"tile_size": 512},
    }
    for key, change in bad.items():
        with pytest.raises(ValueError, match=key):
            ImageVAEConfig.from_dict(FLUX_CONFIG | change)
    with pytest.raises(ValueError, match="shift_factor"):
        ImageVAEConfig.from_dict({k: v for k, v in FLUX_CONFIG.items() if k != "shift_factor"})


def test_full_config_on_meta_matches_diffusers_keys():
    with torch.device("meta"):
        ours = ImageVAE(ImageVAEConfig.from_dict(FLUX_CONFIG))
        ref = AutoencoderKL(**{k: v for k, v in FLUX_CONFIG.items() if not k.startswith("_")})
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert len(sd) == 244
    assert sum(p.numel() for p in ours.parameters()) == 83_819_683
    assert list(sd) == list(ref_sd)  # same names, same order
    assert all(sd[k].shape == ref_sd[k].shape for k in sd)
    assert not any("quant_conv" in k for k in sd)


def to_bfl(sd, prefix=""):
    """Our (= diffusers) keys -> BFL ae.safetensors keys: vae_and_data.md §1.4 run backwards."""
    n_up = 1 + max(int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    rules = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."), (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_(q|k|v)\.", r".mid.attn_1.\1."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.conv_norm_out\.", ".norm_out."), (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if ".attn_1." in key and key.endswith("weight") and ".norm." not in key:
            value = value[:, :, None, None]  # BFL uses 1x1 convs for q/k/v/proj_out
        out[prefix + key] = value
    return out


@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model."])
@torch.no_grad()
def test_bfl_layout_converts_and_loads(prefix):
    ref = tiny_diffusers_vae(**TINY["4level"][0])
    bfl = to_bfl(ref.state_dict(), prefix)
    assert prefix + "decoder.up.0.block.0.conv1.weight" in bfl and prefix + "encoder.mid.attn_1.q.weight" in bfl
    assert bfl[prefix + "decoder.mid.attn_1.proj_out.weight"].shape == (32, 32, 1, 1)
    assert is_bfl_vae_state_dict(bfl) and not is_bfl_vae_state_dict(ref.state_dict())
    model = ImageVAE(ImageVAEConfig.from_dict(dict(ref.config))).eval()
    model.load_state_dict(convert_bfl_vae_state_dict(bfl), strict=True)
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    z = model.encode(x)
    assert torch.equal(z, ours_from(ref).encode(x))
    assert torch.equal(model.decode(z), ours_from(ref).decode(z))


def test_bfl_full_size_key_set():
    with torch.device("meta"):
        sd = ImageVAE(ImageVAEConfig()).state_dict()
    bfl = to_bfl(sd)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in bfl  # BFL up.0 = full resolution, 256 -> 128 channels
    assert "decoder.up.0.upsample.conv.weight" not in bfl and "decoder.up.3.upsample.conv.weight" in bfl
    back = convert_bfl_vae_state_dict(bfl)
    assert list(back) == list(sd) and all(back[k].shape == sd[k].shape for k in sd)


def test_pack_unpack():
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import LongCatImagePipeline as P
    z = torch.randn(2, 16, 6, 10)
    x = pack_latents(z)
    assert x.shape == (2, 15, 64)
    c, dy, dx, row, col = 5, 1, 0, 2, 3  # channel c*4+dy*2+dx of token row*(w/2)+col
    assert x[1, row * 5 + col, c * 4 + dy * 2 + dx] == z[1, c, 2 * row + dy, 2 * col + dx]
    assert torch.equal(x, P._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(x, 6, 10), z)
    assert torch.equal(P._unpack_latents(x, 6 * 8, 10 * 8, 8), z)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 10))
    with pytest.raises(ValueError, match="even"):
        unpack_latents(x, 6, 9)
    with pytest.raises(ValueError, match="tokens"):
        unpack_latents(x, 6, 12)


def test_bad_image_sizes():
    model = ImageVAE(ImageVAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1))
    for H, W in [(50, 64), (64, 70), (4, 8)]:
        with pytest.raises(ValueError, match=f"{H}x{W} is not a multiple of 8"):
            model.encode(torch.zeros(1, 3, H, W))
    with pytest.raises(ValueError, match="expected images"):
        model.encode(torch.zeros(1, 4, 64, 64))
