"""LongCat-Image DiT vs diffusers' LongCatImageTransformer2DModel on tiny random configs (weights perturbed)."""
import pytest
import torch
from diffusers import LongCatImageTransformer2DModel
from diffusers.models.embeddings import Timesteps, apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

from model.dit_image import (ImageDiTConfig, LongCatImageDiT, apply_rope, image_position_ids, rope_tables,
                             text_position_ids, timestep_sinusoid)

TINY = [
    dict(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
         joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]),
    dict(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
         joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
]


def perturbed(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def make_pair(cfg_dict, dtype=torch.float32):
    ref = perturbed(LongCatImageTransformer2DModel(**cfg_dict)).to(dtype).eval()
    ours = LongCatImageDiT(ImageDiTConfig.from_dict(dict(ref.config))).to(dtype).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def t2i_inputs(cfg, B=2, L=7, h=4, w=6, dtype=torch.float32):
    x = torch.randn(B, h * w, cfg["in_channels"], dtype=dtype)
    c = torch.randn(B, L, cfg["joint_attention_dim"], dtype=dtype)
    t = torch.tensor([0.5, 0.987][:B], dtype=dtype)
    return x, c, t, image_position_ids(h, w, offset=L), text_position_ids(L)


def edit_inputs(cfg, B=1, L=9, h=4, w=4, dtype=torch.float32):
    x = torch.randn(B, 2 * h * w, cfg["in_channels"], dtype=dtype)
    c = torch.randn(B, L, cfg["joint_attention_dim"], dtype=dtype)
    t = torch.full((B,), 0.731, dtype=dtype)
    ids = torch.cat([image_position_ids(h, w, L, modality=1), image_position_ids(h, w, L, modality=2)])
    return x, c, t, ids, text_position_ids(L)


@pytest.mark.parametrize("cfg", TINY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make_inputs", [t2i_inputs, edit_inputs])
def test_dit_matches_diffusers(cfg, dtype, make_inputs):
    ref, ours = make_pair(cfg, dtype)
    x, c, t, img_ids, txt_ids = make_inputs(cfg, dtype=dtype)
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=c, timestep=t, img_ids=img_ids, txt_ids=txt_ids).sample
        got = ours(x, c, t, img_ids, txt_ids)
    diff = (got.float() - want.float()).abs().max().item()
    print(f"{make_inputs.__name__} {dtype}: max abs diff {diff:.3g}")
    assert got.dtype == want.dtype and got.shape == want.shape
    assert diff <= 1e-5 if dtype == torch.float32 else diff == 0.0


@pytest.mark.parametrize("chunk", [1024, 5])
def test_gradient_checkpointing_same_values(chunk):
    """Half-block checkpoints and token-chunked MLP checkpoints recompute the same forward: same loss, same grads
    (chunked GEMMs may round differently in the last bit)."""
    cfg = TINY[0]
    _, ours = make_pair(cfg)
    ours.checkpoint_chunk_tokens = chunk
    x, c, t, img_ids, txt_ids = t2i_inputs(cfg)
    grads, losses = [], []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = ckpt
        loss = ours(x, c, t, img_ids, txt_ids).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    if chunk == 1024:  # no chunking at this length: bit-identical
        assert torch.equal(grads[0], grads[1]) and torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("ckpt", [False, True])
def test_gradients_match_diffusers(ckpt):
    """Our backward (hand-written RoPE / RMSNorm backward, in-place modulation and gates, segment checkpoints that
    keep the SDPA output, chunked MLPs) gives diffusers' gradients for every parameter and the input. (With the
    reference's RoPE backward the gradients agree to ~1e-16 in fp64; RoPE computes in fp32 on both sides.)"""
    cfg = TINY[0]
    ref, ours = make_pair(cfg, torch.float64)
    ours.checkpoint_chunk_tokens = 5
    if ckpt:
        ref.enable_gradient_checkpointing()
    ours.gradient_checkpointing = ckpt
    x, c, t, img_ids, txt_ids = t2i_inputs(cfg, dtype=torch.float64)
    grads = []
    for model, call in [(ref, lambda xx: ref(hidden_states=xx, encoder_hidden_states=c, timestep=t, img_ids=img_ids,
                                             txt_ids=txt_ids).sample),
                        (ours, lambda xx: ours(xx, c, t, img_ids, txt_ids))]:
        model.train()
        xx = x.clone().requires_grad_(True)
        call(xx).square().mean().backward()
        named = dict(model.named_parameters())
        grads.append([xx.grad] + [named[n].grad for n in sorted(named)])
    for a, b in zip(*grads):  # fp64, except that RoPE runs in fp32 on both sides (its rounding, ~1e-7, shows)
        assert (a - b).abs().max() <= 1e-6 * a.abs().max()


def test_position_ids_match_reference():
    assert torch.equal(text_position_ids(11), prepare_pos_ids(modality_id=0, type="text", start=(0, 0), num_token=11))
    for mod in (1, 2):
        want = prepare_pos_ids(modality_id=mod, type="image", start=(838, 838), height=5, width=7)
        assert torch.equal(image_position_ids(5, 7, 838, modality=mod), want)


def test_rope_and_timestep_blocks_exact():
    ids = torch.cat([text_position_ids(9), image_position_ids(3, 4, 9)])
    cos, sin = rope_tables(ids, [4, 6, 6])
    for a, (lo, hi) in enumerate([(0, 4), (4, 10), (10, 16)]):
        rc, rs = get_1d_rotary_pos_embed(hi - lo, ids[:, a], theta=10000, repeat_interleave_real=True, use_real=True,
                                         freqs_dtype=torch.float64)
        assert torch.equal(cos[:, lo:hi], rc) and torch.equal(sin[:, lo:hi], rs)
    x = torch.randn(2, ids.shape[0], 3, 16)
    assert torch.equal(apply_rope(x, cos, sin), apply_rotary_emb(x, (cos, sin), sequence_dim=1))
    t = torch.tensor([0.0, 1.0, 500.0, 988.0])
    assert torch.equal(timestep_sinusoid(t), Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t))


def test_final_norm_is_scale_then_shift():
    """Feed norm_out a bias that is non-zero only in its first half: that half must act as the scale."""
    cfg = ImageDiTConfig(**{**TINY[1], "num_layers": 0, "num_single_layers": 0})
    m = LongCatImageDiT(cfg)
    D = cfg.dim
    with torch.no_grad():
        m.norm_out.linear.weight.zero_()
        m.norm_out.linear.bias.zero_()
        m.norm_out.linear.bias[:D] = 1.0  # scale = 1 -> output doubles the normalised tokens, shift stays 0
    scale, shift = m.norm_out(torch.randn(1, D))
    assert torch.all(scale == 1.0) and torch.all(shift == 0.0)


def test_real_config_meta_counts():
    with torch.device("meta"):
        m = LongCatImageDiT(ImageDiTConfig())
    sd = m.state_dict()
    assert len(sd) == 612
    assert sum(p.numel() for p in m.parameters()) == 6_270_668_864
    with torch.device("meta"):
        ref = LongCatImageTransformer2DModel(num_layers=10, num_single_layers=20)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="unknown key"):
        ImageDiTConfig.from_dict({"num_layer": 3})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        ImageDiTConfig.from_dict({"attention_head_dim": 64})
