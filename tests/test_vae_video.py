"""Video VAE (model/vae_video.py) against diffusers AutoencoderKLWan: fp32 parity of the chunked cached encode and
decode on tiny random configs, the frame/size contract, exact causality, the full Wan2.1 key set on the meta device,
the config checks and the original-Wan-layout converter."""
import re

import pytest
import torch

from model.vae_video import (VideoVAE, VideoVAEConfig, check_video_size, convert_wan_vae_state_dict,
                             is_wan_original_state_dict, latent_frames, pixel_frames)

pytest.importorskip("diffusers")  # test-only reference; the product never imports it
from diffusers import AutoencoderKLWan  # noqa: E402

WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
LONGCAT_VAE_CONFIG = {  # LongCat-Video vae/config.json = Wan2.1 (longcat_video.md §4, vae_and_data.md §2.2)
    "_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.0", "base_dim": 96, "z_dim": 16,
    "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True],
    "dropout": 0.0, "latents_mean": WAN21_MEAN, "latents_std": WAN21_STD,
}
TINY = {  # non-trivial latents_mean/std so a wrong normalisation direction shows
    "res1": dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    "res2": dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=2),
}
TINY_COMMON = dict(attn_scales=[], temperal_downsample=[False, True, True],
                   latents_mean=[0.3, -0.7, 1.1, -0.2], latents_std=[0.6, 1.7, 2.3, 0.9])
H, W = 16, 32  # non-square, so a transposed H/W shows; latents 2 x 4


def tiny_diffusers_vae(name):
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**TINY[name], **TINY_COMMON).eval()
    with torch.no_grad():
        for p in ref.parameters():  # perturb everything: no unit gammas or default inits hide a mix-up
            p.add_(0.05 * torch.randn_like(p))
    return ref


def ours_from(ref):
    model = VideoVAE(VideoVAEConfig.from_dict(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def pipeline_stats(ref, dtype=torch.float32):  # exactly how the LongCat-Video / Wan pipelines build them
    mean = torch.tensor(ref.config.latents_mean).view(1, ref.config.z_dim, 1, 1, 1).to(dtype)
    inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, ref.config.z_dim, 1, 1, 1).to(dtype)
    return mean, inv_std


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def maxdiff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=list(TINY))
def pair(request):
    ref = tiny_diffusers_vae(request.param)
    return request.param, ref, ours_from(ref)


@torch.no_grad()
def test_parity_with_diffusers(pair):
    name, ref, model = pair
    mean_c, inv_std = pipeline_stats(ref)
    worst = {}
    for T in (1, 5, 9, 13):
        torch.manual_seed(T)
        x = torch.rand(1, 3, T, H, W) * 2 - 1  # batch 2 in the slicing test below
        post = ref.encode(x).latent_dist
        mean, logvar = model.encode_moments(x)
        z_ref = (post.mode() - mean_c) * inv_std
        z = model.encode(x)
        zs_ref = (post.sample(generator=torch.Generator().manual_seed(7)) - mean_c) * inv_std
        zs = model.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        video_ref = ref.decode(z_ref / inv_std + mean_c).sample
        video = model.decode(z_ref)
        assert z.shape == (1, 4, latent_frames(T), H // 8, W // 8) and video.shape == x.shape
        diffs = {"mean": maxdiff(mean, post.mean), "logvar": maxdiff(logvar, post.logvar),
                 "encode_mode": maxdiff(z, z_ref), "encode_sample": maxdiff(zs, zs_ref),
                 "decode": maxdiff(video, video_ref)}
        worst = {k: max(v, worst.get(k, 0.0)) for k, v in diffs.items()}
        assert maxdiff(zs, z) > 1e-3  # sampling really adds noise
        assert video.abs().max() <= 1.0  # clamped, as diffusers
    print(f"\n[{name}] T in 1,5,9,13, max|diff| vs diffusers: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    assert all(v == 0.0 for v in worst.values()), worst  # bit-identical in fp32


@torch.no_grad()
def test_batch_slice_matches_diffusers_slicing(pair):
    _, ref, model = pair
    mean_c, inv_std = pipeline_stats(ref)
    x = torch.rand(2, 3, 5, H, W) * 2 - 1
    ref.enable_slicing()
    try:
        z_ref = (ref.encode(x).latent_dist.mode() - mean_c) * inv_std
        video_ref = ref.decode(z_ref / inv_std + mean_c).sample
    finally:
        ref.disable_slicing()
    assert maxdiff(model.encode(x, batch_slice=True), z_ref) == 0.0
    assert maxdiff(model.decode(z_ref, batch_slice=True), video_ref) == 0.0


@torch.no_grad()
def test_bf16_matches_diffusers():  # RMS norm in fp32 for half inputs, as diffusers 0.42.1
    ref = tiny_diffusers_vae("res1")
    model = ours_from(ref)
    ref, model = ref.to(torch.bfloat16), model.to(torch.bfloat16)  # diffusers warns about .to(); harmless here
    mean_c, inv_std = pipeline_stats(ref, torch.bfloat16)  # the reciprocal is taken in bf16, as they do
    x = (torch.rand(1, 3, 5, H, W) * 2 - 1).to(torch.bfloat16)
    z_ref = (ref.encode(x).latent_dist.mode() - mean_c) * inv_std
    assert maxdiff(model.encode(x), z_ref) == 0.0
    assert maxdiff(model.decode(z_ref), ref.decode(z_ref / inv_std + mean_c).sample) == 0.0


# -----------------------------------------------------------------------------
# frame / size contract and causality (vae_and_data.md §6.2)

def test_frame_and_size_rules(pair):
    _, _, model = pair
    assert [latent_frames(f) for f in (1, 5, 9, 13, 93)] == [1, 2, 3, 4, 24]
    assert [pixel_frames(t) for t in (1, 2, 24)] == [1, 5, 93]
    check_video_size(93, 480, 832)
    for frames in (0, 2, 6, 8, 10, 12):  # diffusers would silently drop trailing frames
        with pytest.raises(ValueError, match="4k\\+1"):
            latent_frames(frames)
        with pytest.raises(ValueError, match="4k\\+1"):
            model.encode(torch.zeros(1, 3, frames, H, W))
    for h, w in ((40, 32), (16, 24), (36, 52)):  # multiples of 8 (or not) but not of 16
        with pytest.raises(ValueError, match="multiple of 16"):
            model.encode(torch.zeros(1, 3, 5, h, w))
    with pytest.raises(ValueError, match="expected videos"):
        model.encode(torch.zeros(1, 3, H, W))
    with pytest.raises(ValueError, match="expected latents"):
        model.decode(torch.zeros(1, 3, 2, 4, 6))


@torch.no_grad()
def test_causality(pair):
    """Latent k depends on frames <= 4k only (k = 0 is the I2V start-frame latent) and the frames of latent k on latents
    <= k only. Redrawing the later frames (latents) keeps every shape and op the same, so the earlier outputs must be
    bit-identical on any CPU. A prefix encode (decode) runs other shapes (quant_conv over fewer frames, oneDNN picks
    another blocking), so it equals the full one up to fp32 rounding only: rel-L2 <= 1e-5 (~100 fp32 eps; any leak of a
    later frame moves a latent by O(0.1))."""
    _, _, model = pair
    torch.manual_seed(3)
    x = torch.rand(1, 3, 13, H, W) * 2 - 1
    z = model.encode(x)
    video = model.decode(z)
    for k in range(3):
        later = x.clone()
        later[:, :, 1 + 4 * k:] = torch.rand_like(later[:, :, 1 + 4 * k:]) * 2 - 1
        z_later = model.encode(later)
        assert torch.equal(z_later[:, :, :k + 1], z[:, :, :k + 1]), k
        assert not torch.allclose(z_later[:, :, k + 1:], z[:, :, k + 1:]), k  # the redraw reached the later latents
        assert rel_l2(model.encode(x[:, :, :1 + 4 * k]), z[:, :, :k + 1]) <= 1e-5, k
    for k in range(1, 4):
        later = z.clone()
        later[:, :, k:] = torch.randn_like(later[:, :, k:])
        video_later = model.decode(later)
        assert torch.equal(video_later[:, :, :pixel_frames(k)], video[:, :, :pixel_frames(k)]), k
        assert not torch.allclose(video_later[:, :, pixel_frames(k):], video[:, :, pixel_frames(k):]), k
        assert rel_l2(model.decode(z[:, :, :k]), video[:, :, :pixel_frames(k)]) <= 1e-5, k


def test_normalisation_formula():
    with torch.device("meta"):  # normalize only reads the config, so a latent cache needs no weights
        model = VideoVAE(VideoVAEConfig())
    mu = torch.randn(2, 16, 3, 4, 6) * 3
    mean = torch.tensor(WAN21_MEAN).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(WAN21_STD).view(1, 16, 1, 1, 1)
    assert torch.equal(model.normalize(mu), (mu - mean) * inv_std)  # the LongCat pipeline's normalize_latents
    assert torch.equal(model.denormalize(mu), mu / inv_std + mean)  # and its denormalize_latents
    torch.testing.assert_close(model.denormalize(model.normalize(mu)), mu)
    torch.testing.assert_close(model.normalize(mu), (mu - mean) / torch.tensor(WAN21_STD).view(1, 16, 1, 1, 1))


# -----------------------------------------------------------------------------
# config and the full-size key set

def test_config_round_trip_and_errors():
    cfg = VideoVAEConfig.from_dict(LONGCAT_VAE_CONFIG)
    assert cfg == VideoVAEConfig()  # the class defaults are the LongCat / Wan2.1 values
    d = cfg.to_dict()
    assert d["_class_name"] == "AutoencoderKLWan" and VideoVAEConfig.from_dict(d) == cfg
    with torch.device("meta"):
        AutoencoderKLWan(**{k: v for k, v in d.items() if not k.startswith("_")})  # diffusers accepts what we write
    bad = {"temporal_downsample": [False, True, True], "is_residual": True, "patch_size": 2, "attn_scales": [0.5],
           "latents_mean": [0.0] * 4, "temperal_downsample": [True, True, True], "scale_factor_spatial": 16}
    for key, value in bad.items():
        with pytest.raises(ValueError, match=key):
            VideoVAEConfig.from_dict({**LONGCAT_VAE_CONFIG, key: value})


def test_full_config_key_set_on_meta():
    with torch.device("meta"):
        ref = AutoencoderKLWan(**{k: v for k, v in LONGCAT_VAE_CONFIG.items() if not k.startswith("_")})
        model = VideoVAE(VideoVAEConfig.from_dict(LONGCAT_VAE_CONFIG))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs and len(ours) == 194
    assert sum(p.numel() for p in model.parameters()) == 126_892_531
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)


# -----------------------------------------------------------------------------
# original Wan2.1 layout (vae_and_data.md §2.5)

def to_wan_original(sd: dict, num_res_blocks: int) -> dict:
    """Our (= diffusers) keys -> the original Wan2.1_VAE.pth keys: the inverse of the §2.5 table, written
    independently of the converter under test."""
    per_stage = num_res_blocks + 2  # decoder: num_res_blocks + 1 residual blocks and one resample per stage
    out = {}
    for key, value in sd.items():
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.upsamples.{int(m[1]) * per_stage + int(m[2])}.", key)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.upsamples.{int(m[1]) * per_stage + per_stage - 1}.", k)
        k = k.replace("encoder.down_blocks.", "encoder.downsamples.")
        for ours, wan in ((".norm1.", ".residual.0."), (".conv1.", ".residual.2."), (".norm2.", ".residual.3."),
                          (".conv2.", ".residual.6."), (".conv_shortcut.", ".shortcut.")):
            k = k.replace(ours, wan)
        for ours, wan in (("mid_block.resnets.0.", "middle.0."), ("mid_block.attentions.0.", "middle.1."),
                          ("mid_block.resnets.1.", "middle.2."), ("norm_out.", "head.0."), ("conv_out.", "head.2."),
                          ("conv_in.", "conv1.")):
            k = k.replace(f"coder.{ours}", f"coder.{wan}")
        k = re.sub(r"^quant_conv\.", "conv1.", k)
        k = re.sub(r"^post_quant_conv\.", "conv2.", k)
        out[k] = value
    return out


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_wan_original_layout(name):
    ref = tiny_diffusers_vae(name)
    model = ours_from(ref)
    sd = model.state_dict()
    wan = to_wan_original(sd, TINY[name]["num_res_blocks"])
    first_up = TINY[name]["num_res_blocks"] + 1  # the flat index of the first decoder resample
    assert f"decoder.upsamples.{first_up}.time_conv.weight" in wan and "encoder.middle.1.to_qkv.weight" in wan
    assert is_wan_original_state_dict(wan) and not is_wan_original_state_dict(sd)
    converted = convert_wan_vae_state_dict(wan)
    assert converted.keys() == sd.keys() and all(converted[k] is sd[k] for k in sd)
    loaded = VideoVAE(model.config).eval()
    loaded.load_state_dict(converted, strict=True)
    x = torch.rand(1, 3, 5, H, W) * 2 - 1
    z = model.encode(x)
    assert torch.equal(loaded.encode(x), z) and torch.equal(loaded.decode(z), model.decode(z))


def test_wan_original_layout_full_size():
    with torch.device("meta"):
        model = VideoVAE(VideoVAEConfig())
    sd = model.state_dict()
    wan = to_wan_original(sd, 2)
    # diffusers' converter hard-codes the Wan2.1 decoder (3 blocks per stage, a shortcut only at upsamples.4), so it
    # is a reference for the full-size layout only; ours regroups any depth (the tiny configs above)
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    assert convert_wan_vae_to_diffusers(wan).keys() == sd.keys()  # our inverse is the real Wan layout
    assert convert_wan_vae_state_dict(wan).keys() == sd.keys()
    assert "decoder.upsamples.11.resample.1.weight" in wan and "decoder.upsamples.4.shortcut.weight" in wan
