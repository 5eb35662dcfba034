"""LongCat-Video DiT: key table of the real config (meta device), RoPE / timestep maths by hand, and the invariants the
spec implies (cond mode, KV cache, per-frame timesteps, zero-pad text, fp32 islands) on tiny perturbed models.
There is no reference implementation to compare against: see ../shared/specs/longcat_video.md §1-§2, §5.1, §10."""
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from model.dit_video import (LongCatVideoDiT, RMSNorm, VideoDiTConfig, apply_rope_3d, gated_add, modulate,
                             rope_3d_tables, timestep_embedding)

# head_dim 24 (RoPE split [8 | 8 | 8]), FFN 256; every Linear of an fp32 island has a weight shape of its own
TINY = dict(in_channels=16, out_channels=16, hidden_size=96, depth=2, num_heads=4, caption_channels=32, mlp_ratio=4,
            adaln_tembed_dim=32, frequency_embedding_size=24, patch_size=[1, 2, 2])
B, T, H, W, L = 2, 4, 4, 6, 7  # 4 latent frames of 2 x 3 = 6 tokens, 7 text tokens
S = (H // 2) * (W // 2)


def make_model(dtype=torch.float32, seed=0, **over):
    with torch.random.fork_rng():  # same seed, same weights (whatever the dtype or config flags)
        torch.manual_seed(seed)
        model = LongCatVideoDiT(VideoDiTConfig.from_dict({**TINY, **over}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every weight away from its init (norm weights 1, biases 0, ...)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.to(dtype).eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, T, H, W, generator=g)
    t = torch.tensor([[0.0, 310.7, 520.2, 999.0], [0.0, 800.5, 640.3, 131.9]])  # [B, T], cond frame 0 at t=0
    y = torch.randn(B, 1, L, 32, generator=g)  # release layout [B, 1, L, caption_channels]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    return x, t, y, mask


# -----------------------------------------------------------------------------
# the real config: spec §1.2 key table, parameter count, config round trip

D, FF, ADA = 4096, 11008, 512
SPEC_TOP = {
    "x_embedder.proj.weight": (D, 16, 1, 2, 2), "x_embedder.proj.bias": (D,),
    "t_embedder.mlp.0.weight": (ADA, 256), "t_embedder.mlp.0.bias": (ADA,),
    "t_embedder.mlp.2.weight": (ADA, ADA), "t_embedder.mlp.2.bias": (ADA,),
    "y_embedder.y_proj.0.weight": (D, 4096), "y_embedder.y_proj.0.bias": (D,),
    "y_embedder.y_proj.2.weight": (D, D), "y_embedder.y_proj.2.bias": (D,),
    "final_layer.adaLN_modulation.1.weight": (2 * D, ADA), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    "final_layer.linear.weight": (64, D), "final_layer.linear.bias": (64,),
}
SPEC_BLOCK = {
    "adaLN_modulation.1.weight": (6 * D, ADA), "adaLN_modulation.1.bias": (6 * D,),
    "pre_crs_attn_norm.weight": (D,), "pre_crs_attn_norm.bias": (D,),
    "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
    "attn.q_norm.weight": (128,), "attn.k_norm.weight": (128,),
    "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
    "cross_attn.q_linear.weight": (D, D), "cross_attn.q_linear.bias": (D,),
    "cross_attn.kv_linear.weight": (2 * D, D), "cross_attn.kv_linear.bias": (2 * D,),
    "cross_attn.proj.weight": (D, D), "cross_attn.proj.bias": (D,),
    "cross_attn.q_norm.weight": (128,), "cross_attn.k_norm.weight": (128,),
    "ffn.w1.weight": (FF, D), "ffn.w3.weight": (FF, D), "ffn.w2.weight": (D, FF),
}
RELEASE_CONFIG = {  # dit/config.json as quoted by spec §0/§1.1 [cfg], plus diffusers' bookkeeping keys
    "_class_name": "LongCatVideoTransformer3DModel", "_diffusers_version": "0.35.0", "in_channels": 16,
    "out_channels": 16, "hidden_size": 4096, "depth": 48, "num_heads": 32, "caption_channels": 4096, "mlp_ratio": 4,
    "adaln_tembed_dim": 512, "frequency_embedding_size": 256, "patch_size": [1, 2, 2], "enable_flashattn2": True,
    "enable_flashattn3": False, "enable_xformers": False, "enable_bsa": False,
    "bsa_params": {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]},
    "cp_split_hw": None, "text_tokens_zero_pad": True,
}


def test_real_config_keys_and_param_count_on_meta():
    cfg = VideoDiTConfig.from_dict(RELEASE_CONFIG)
    assert cfg == VideoDiTConfig()  # defaults = the released config
    with torch.device("meta"):
        model = LongCatVideoDiT(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = dict(SPEC_TOP)
    for i in range(48):
        want.update({f"blocks.{i}.{k}": s for k, s in SPEC_BLOCK.items()})
    assert len(got) == 1022 and got == want
    assert sum(p.numel() for p in model.parameters()) == 13_581_071_424
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 282_132_992


def test_config_round_trip_and_unknown_keys():
    cfg = VideoDiTConfig.from_dict(TINY)
    assert VideoDiTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["_class_name"] == "LongCatVideoTransformer3DModel"
    with pytest.raises(ValueError, match="depht"):
        VideoDiTConfig.from_dict({**TINY, "depht": 3})
    assert VideoDiTConfig.from_dict({**TINY, "cp_split_hw": [1, 2]}).cp_split_hw == [1, 2]  # context parallel
    with pytest.raises(ValueError, match="cp_split_hw"):
        VideoDiTConfig.from_dict({**TINY, "cp_split_hw": [1, 2, 2]})


# -----------------------------------------------------------------------------
# pure helpers against hand-computed values

def test_rope_tables_hand_computed():
    """head_dim 16 splits [t 8 | h 4 | w 4]; w_j = 10000^(-2j/d) per axis, each angle on an interleaved pair."""
    cos, sin = rope_3d_tables(2, 3, 4, head_dim=16)
    assert cos.shape == (24, 16) and cos.dtype == torch.float32
    n = (1 * 3 + 2) * 4 + 3  # token (t=1, y=2, x=3), raster order
    ang = torch.tensor([1, 1, .1, .1, .01, .01, .001, .001, 2, 2, .02, .02, 3, 3, .03, .03])
    torch.testing.assert_close(cos[n], ang.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[n], ang.sin(), rtol=0, atol=1e-6)
    assert (cos[0] == 1).all() and (sin[0] == 0).all()  # positions start at 0, no centring
    # t_offset (KV-cache path): frame 0 of a 1-frame grid sits at temporal position 2
    cos2, sin2 = rope_3d_tables(1, 3, 4, head_dim=16, t_offset=2)
    torch.testing.assert_close(sin2[2 * 4 + 3], torch.cat([2 * ang[:8], ang[8:]]).sin(), rtol=0, atol=1e-6)
    # the real head_dim: [t 44 | h 42 | w 42]
    _, sin = rope_3d_tables(2, 2, 2, head_dim=128)
    for n, lo, hi in [(4, 0, 44), (2, 44, 86), (1, 86, 128)]:  # tokens (1,0,0), (0,1,0), (0,0,1)
        nz = (sin[n] != 0).nonzero().flatten()
        assert nz.min() == lo and nz.max() == hi - 1 and len(nz) == hi - lo


def test_apply_rope_interleaved_pairs():
    a = torch.tensor([0.3, 0.7, 1.1, -0.4])
    cos, sin = a.repeat_interleave(2).cos()[None], a.repeat_interleave(2).sin()[None]  # one token, head_dim 8
    for j in range(4):
        e_even, e_odd = torch.zeros(1, 8), torch.zeros(1, 8)
        e_even[0, 2 * j], e_odd[0, 2 * j + 1] = 1.0, 1.0
        out_even, out_odd = apply_rope_3d(e_even, cos, sin)[0], apply_rope_3d(e_odd, cos, sin)[0]
        torch.testing.assert_close(out_even[2 * j:2 * j + 2], torch.stack([a[j].cos(), a[j].sin()]))
        torch.testing.assert_close(out_odd[2 * j:2 * j + 2], torch.stack([-a[j].sin(), a[j].cos()]))
        assert out_even.count_nonzero() <= 2 and out_odd.count_nonzero() <= 2


def test_timestep_embedding_cos_first():
    emb = timestep_embedding(torch.tensor([0.0, 5.0]), dim=8)
    assert emb.dtype == torch.float32
    assert emb[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    f = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(emb[1], torch.cat([(5 * f).cos(), (5 * f).sin()]))


# -----------------------------------------------------------------------------
# forward semantics

def test_output_layout_unpatchify():
    """Output channel index ((hp*2 + wp)*16 + c) of token (t, y, x) lands at [c, t, 2y+hp, 2x+wp], in fp32."""
    model = make_model()
    with torch.no_grad():
        model.final_layer.linear.weight.zero_()
        model.final_layer.linear.bias.copy_(torch.arange(64.0))
    x, t, y, mask = inputs()
    out = model(x, t, y, mask)
    assert out.shape == (B, 16, T, H, W) and out.dtype == torch.float32
    hp, wp, c = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(16), indexing="ij")
    want = ((hp * 2 + wp) * 16 + c).float()  # (2, 2, 16)
    assert torch.equal(out[1, :, 3, 2:4, 4:6], want.permute(2, 0, 1))
    with pytest.raises(ValueError):
        model(x[..., :5], t, y, mask)  # odd latent W
    # enable_bsa on a (4, 2, 3) grid, not divisible by the default (4, 4, 4) chunk: dense (was NotImplementedError)
    assert torch.equal(make_model(enable_bsa=True)(x, t, y, mask), make_model()(x, t, y, mask))


@torch.no_grad()
def test_zero_gates_make_every_block_the_identity():
    """Residual wiring and adaLN chunk order (shift, scale, gate) x (msa, mlp): zero the gate rows of every
    adaLN_modulation and the cross-attention proj (cross-attn has no gate) and each block returns its input, so the
    output is final_layer(patch_embed(x)). SimpleTuner's FFN bug (residual replaced by the modulated LN) fails this."""
    model = make_model()
    C = 96
    for blk in model.blocks:
        lin = blk.adaLN_modulation[1]
        for g in (2, 5):  # gate_msa, gate_mlp
            lin.weight[g * C:(g + 1) * C] = 0
            lin.bias[g * C:(g + 1) * C] = 0
        blk.cross_attn.proj.weight.zero_()
        blk.cross_attn.proj.bias.zero_()
    x, t, y, mask = inputs()
    out = model(x, t, y, mask)
    temb = model.t_embedder(t.flatten()).view(B, T, -1)
    want = model.final_layer(model.x_embedder(x), temb)  # [B, N, 64], channels (hp, wp, c)
    want = want.view(B, T, H // 2, W // 2, 2, 2, 16).permute(0, 6, 1, 2, 4, 3, 5).reshape(B, 16, T, H, W)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    model.blocks[1].adaLN_modulation[1].bias[5 * C] = 1.0  # one gate_mlp channel back on: now it differs
    assert not torch.allclose(model(x, t, y, mask), want)


@torch.no_grad()
def test_adaln_chunk_order():
    """Blocks chunk adaLN into (shift, scale, gate) for msa then mlp, the final layer into (shift, scale); modulation is
    LN(x)(1 + scale) + shift. With scale = -1 and shift = s the modulated tensor is exactly s everywhere."""
    model = make_model()
    C = 96
    for lin in [blk.adaLN_modulation[1] for blk in model.blocks] + [model.final_layer.adaLN_modulation[1]]:
        lin.weight.zero_()
        lin.bias.zero_()
        lin.bias[C:2 * C] = -1.0  # scale_msa (final layer: scale)
        lin.bias[:C] = 0.5  # shift_msa (final layer: shift)
        if lin.out_features == 6 * C:
            lin.bias[4 * C:5 * C] = -1.0  # scale_mlp
            lin.bias[3 * C:4 * C] = 0.25  # shift_mlp
    seen = {}
    for name, mod in [("msa", model.blocks[1].attn.qkv), ("mlp", model.blocks[1].ffn.w1),
                      ("final", model.final_layer.linear)]:
        mod.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0]))
    x, t, y, mask = inputs()
    model(x, t, y, mask)
    assert (seen["msa"] == 0.5).all() and (seen["mlp"] == 0.25).all() and (seen["final"] == 0.5).all()


@torch.no_grad()
def test_t2v_plain_forward_equals_c0_and_cond_mode_changes_it():
    model = make_model()
    x, t, y, mask = inputs()
    plain = model(x, t, y, mask)
    assert torch.equal(model(x, t, y, mask, num_cond_latents=0), plain)
    assert not torch.allclose(model(x, t, y, mask, num_cond_latents=1), plain)


@torch.no_grad()
@pytest.mark.parametrize("c", [1, 2])
def test_cond_frames_ignore_noise_frames_and_text(c):
    """Cond tokens attend only to cond tokens and get zero cross-attention, so the outputs of frames < c depend only
    on x[:, :, :c] and t[:, :c]: new noise latents, noise timesteps, text and mask leave them unchanged."""
    model = make_model()
    x, t, y, mask = inputs()
    out = model(x, t, y, mask, num_cond_latents=c)
    x2, t2 = x.clone(), t.clone()
    x2[:, :, c:] = torch.randn_like(x2[:, :, c:])
    t2[:, c:] = 123.0
    out2 = model(x2, t2, torch.randn_like(y), torch.ones_like(mask), num_cond_latents=c)
    torch.testing.assert_close(out2[:, :, :c], out[:, :, :c], rtol=0, atol=1e-6)
    assert not torch.allclose(out2[:, :, c:], out[:, :, c:])
    seen = []  # cross-attention is only ever fed the noise tokens
    hook = model.blocks[0].cross_attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    model(x, t, y, mask, num_cond_latents=c)
    hook.remove()
    assert seen == [(T - c) * S]


@torch.no_grad()
@pytest.mark.parametrize("c", [1, 2])
def test_kv_cache_equals_no_cache(c):
    """Continuation: cache the cond frames once (t=0, no text), then run only the noise frames: same noise-frame
    output as one cond-mode forward over all frames (with the cond frames at t=0). The cache is built at batch 1 and
    broadcast to the batch of 2, as a CFG pair does."""
    model = make_model()
    x, t, y, mask = inputs()
    x[1, :, :c] = x[0, :, :c]  # both samples share the cond frames
    t[:, :c] = 0
    full = model(x, t, y, mask, num_cond_latents=c)
    cache = model.cache_cond_kv(x[:1, :, :c])
    assert len(cache) == 2 and cache[0][0].shape == (1, 4, c * S, 24)
    part = model(x[:, :, c:], t[:, c:], y, mask, num_cond_latents=c, kv_cache_dict=cache)
    torch.testing.assert_close(part, full[:, :, c:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        model(x[:, :, c:], t[:, c:], y, mask, num_cond_latents=c + 1, kv_cache_dict=cache)


@torch.no_grad()
def test_per_frame_timesteps():
    """(a) a [B] timestep is the [B, T] timestep with equal columns. (b) Changing t[:, j] changes the AdaLN
    parameters of frame j only: in block 0 the modulated self-attention input (the input of attn.qkv) changes on the
    tokens of frame j and nowhere else. (c) Self-attention then mixes frames, so in T2V every frame's output changes,
    (d) while in cond mode the cond frames' outputs do not change when a noise frame's timestep does."""
    model = make_model()
    x, _, y, mask = inputs()
    t_flat = torch.tensor([250.0, 700.0])
    assert torch.equal(model(x, t_flat, y, mask), model(x, t_flat[:, None].expand(B, T), y, mask))
    qkv_in = []
    hook = model.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: qkv_in.append(a[0]))
    t = torch.full((B, T), 500.0)
    t2 = t.clone()
    t2[:, 2] = 100.0
    outs = [model(x, tt, y, mask) for tt in (t, t2)]
    hook.remove()
    changed = (qkv_in[0] != qkv_in[1]).any(-1).any(0)  # [N]: which tokens changed
    assert changed.tolist() == [2 * S <= n < 3 * S for n in range(T * S)]
    assert all(not torch.allclose(outs[0][:, :, f], outs[1][:, :, f]) for f in range(T))
    a, b = (model(x, tt, y, mask, num_cond_latents=2) for tt in (t, t2))
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2], rtol=0, atol=1e-6)


@torch.no_grad()
def test_timesteps_rounded_to_weight_dtype():
    """bf16 weights: the network sees bf16-rounded timesteps (spacing 4 in [512, 1024)), so t and round_bf16(t) give
    bit-identical outputs; fp32 weights see the exact values."""
    x, _, y, mask = inputs()
    t = torch.tensor([[517.3, 0.0, 301.9, 999.0], [130.6, 700.9, 0.0, 1000.0]])
    t_rounded = t.to(torch.bfloat16).float()
    assert not torch.equal(t, t_rounded)
    bf16 = make_model(torch.bfloat16)
    assert torch.equal(bf16(x, t, y, mask), bf16(x, t_rounded, y, mask))
    fp32 = make_model()
    assert not torch.allclose(fp32(x, t, y, mask), fp32(x, t_rounded, y, mask))


@torch.no_grad()
def test_zero_pad_text_semantics():
    """Zero-pad mode (released config): pads are zeroed after the caption projection, so their input values do not
    matter, but they are attended (bias-only keys), so the result differs from masking them out. Masked mode equals
    running each sample on its valid tokens alone."""
    zero_pad, masked = make_model(), make_model(text_tokens_zero_pad=False)  # same seed: same weights
    x, t, y, mask = inputs()
    y_junk = torch.where(mask[:, None, :, None].bool(), y, torch.randn_like(y) * 100)
    kv_in = []  # the text the cross-attention sees: pads are exact zeros AFTER y_embedder, so k/v are bias-only
    hook = zero_pad.blocks[0].cross_attn.kv_linear.register_forward_pre_hook(lambda m, a: kv_in.append(a[0]))
    out = zero_pad(x, t, y, mask)
    hook.remove()
    assert kv_in[0].shape == (B, L, 96)  # all L tokens attended
    assert (kv_in[0][mask == 0] == 0).all() and (kv_in[0][mask == 1] != 0).all()
    torch.testing.assert_close(zero_pad(x, t, y_junk, mask), out, rtol=0, atol=1e-6)
    assert not torch.allclose(zero_pad(x, t, y, None), out)  # no mask: pad values are used
    out_masked = masked(x, t, y_junk, mask)
    assert not torch.allclose(out_masked, out)
    for b in range(B):
        n = int(mask[b].sum())
        alone = masked(x[b:b + 1], t[b:b + 1], y[b:b + 1, :, :n], None)
        torch.testing.assert_close(out_masked[b:b + 1], alone, rtol=1e-5, atol=1e-5)


class DtypeLog(TorchFunctionMode):
    """Records (op, input dtypes, weight shape) of linear / conv / layer_norm / SDPA calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("linear", "conv3d", "layer_norm", "scaled_dot_product_attention"):
            ts = [a for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((name, [a.dtype for a in ts], tuple(ts[1].shape) if name == "linear" else None))
        return func(*args, **kwargs)


@torch.no_grad()
def test_fp32_islands_with_bf16_weights():
    """Spec §1.9: with bf16 weights, the timestep MLP, every adaLN Linear, the final Linear and all LayerNorm math run
    in fp32; the patch embed, caption / qkv / proj / cross / FFN Linears and attention run in bf16; output is fp32."""
    model = make_model(torch.bfloat16)
    x, t, y, mask = inputs()
    with DtypeLog() as log:
        out = model(x, t, y, mask, num_cond_latents=1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # t_embedder mlp.0 / mlp.2, block adaLN, final adaLN, final linear
    fp32_shapes = {(32, 24), (32, 32), (6 * 96, 32), (2 * 96, 32), (64, 96)}
    f32, b16 = torch.float32, torch.bfloat16
    for name, dtypes, wshape in log.calls:
        want = f32 if name == "layer_norm" or wshape in fp32_shapes else b16
        assert set(dtypes) == {want}, (name, wshape, dtypes)
    n_fp32_linear = sum(1 for n, _, w in log.calls if n == "linear" and w in fp32_shapes)
    assert n_fp32_linear == 2 + 2 + 1 + 1  # t_embedder x2, adaLN x2 blocks, final adaLN, final linear
    # the elementwise islands: modulate / gated add in fp32 with one rounding, RoPE in fp32 with one rounding
    xb = torch.randn(1, 12, 8).to(b16)
    shift, scale, gate = torch.randn(3, 1, 2, 1, 8).unbind(0)
    ln = F.layer_norm(xb.float().view(1, 2, 6, 8), (8,), eps=1e-6)
    assert torch.equal(modulate(xb, shift, scale), (ln * (1 + scale) + shift).view(1, 12, 8).to(b16))
    yb = torch.randn(1, 12, 8).to(b16)
    want = (xb.float().view(1, 2, 6, 8) + gate * yb.float().view(1, 2, 6, 8)).view(1, 12, 8).to(b16)
    assert torch.equal(gated_add(xb, gate, yb), want)
    cos, sin = rope_3d_tables(2, 2, 3, head_dim=8)
    q = torch.randn(1, 2, 12, 8).to(b16)
    assert torch.equal(apply_rope_3d(q, cos, sin), apply_rope_3d(q.float(), cos, sin).to(b16))
    # q/k RMSNorm: normalise in fp32, round to bf16, THEN multiply by the bf16 weight
    norm = RMSNorm(8).to(b16)
    norm.weight.add_(torch.randn(8).to(b16))
    want = (q.float() * torch.rsqrt(q.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(b16) * norm.weight
    assert torch.equal(norm(q), want)


def test_gradient_checkpointing_same_grads():
    """Per-block checkpoints, the cross-attn + FFN half recomputed one frame at a time (cond mode, so a chunk boundary
    falls between cond and noise frames): same loss, same grads."""
    model = make_model()
    model.checkpoint_chunk_tokens = S  # one frame per chunk
    x, t, y, mask = inputs()
    losses, grads = [], []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        loss = model(x, t, y, mask, num_cond_latents=1)[:, :, 1:].square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0


@torch.no_grad()
def test_bf16_forward_close_to_fp32():
    """bf16 forward runs and tracks fp32 (given the bf16-rounded timesteps the bf16 model sees)."""
    x, t, y, mask = inputs()
    ref = make_model()(x, t.to(torch.bfloat16).float(), y, mask, num_cond_latents=1)
    out = make_model(torch.bfloat16)(x, t, y, mask, num_cond_latents=1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    print(f"bf16 vs fp32 relative error {rel:.3g}")
    assert rel < 0.05


# -----------------------------------------------------------------------------
# block-sparse self-attention (spec §7): grid (T, H/2, W/2) = (4, 4, 4), chunk (2, 2, 2) -> 8 blocks of 8 tokens

BSA_CHUNK = [2, 2, 2]


def bsa_inputs(h=8, w=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, t, y, mask = inputs(seed)
    return torch.randn(B, 16, T, h, w, generator=g), t, y, mask


def bsa_params(sparsity):
    return {"sparsity": sparsity, "chunk_3d_shape_q": BSA_CHUNK, "chunk_3d_shape_k": BSA_CHUNK}


def add_lora_like(model, seed=3):
    """A rank-2 delta on blocks[0].attn.qkv through a forward hook: returns its two parameters."""
    g = torch.Generator().manual_seed(seed)
    qkv = model.blocks[0].attn.qkv
    A = torch.nn.Parameter(torch.randn(2, qkv.in_features, generator=g) * 0.1)
    Bm = torch.nn.Parameter(torch.randn(qkv.out_features, 2, generator=g) * 0.1)
    qkv.register_forward_hook(lambda m, inp, out: out + inp[0] @ A.T @ Bm.T)
    return A, Bm


def fwd_bwd(model, args, c=0):
    lora = add_lora_like(model)
    out = model(*args, num_cond_latents=c)
    out.square().mean().backward()
    return out.detach(), [p.grad for p in lora] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("c", [0, 2])
def test_bsa_sparsity0_equals_dense_fwd_and_grads(c):
    args = bsa_inputs()
    out_d, g_d = fwd_bwd(make_model(), args, c)
    out_b, g_b = fwd_bwd(make_model(enable_bsa=True, bsa_params=bsa_params(0.0)), args, c)
    torch.testing.assert_close(out_b, out_d, atol=1e-5, rtol=1e-5)
    for gb, gd in zip(g_b, g_d):
        torch.testing.assert_close(gb, gd, atol=1e-5, rtol=1e-5)


def test_bsa_runtime_switch_and_sparse_grads():
    args = bsa_inputs()
    model = make_model()
    lora = add_lora_like(model)
    with torch.no_grad():
        dense = model(*args)
        model.set_bsa(True, bsa_params(0.5))
        sparse = model(*args)
        model.set_bsa(False)
        assert torch.equal(model(*args), dense)
        model.bsa = bsa_params(0.5)  # plain attribute works too
        assert torch.equal(model(*args), sparse)
    assert (sparse - dense).abs().max() > 1e-3  # 4 of 8 key blocks per query block
    model.train()
    model(*args).square().mean().backward()
    for p in lora:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@torch.no_grad()
def test_bsa_cond_mode_cond_frames_ignore_noise():
    """Sparsity 0.5, c = 2: cond outputs depend on the cond frames only; noise queries use the (T-c | T) BSA call."""
    model = make_model(enable_bsa=True, bsa_params=bsa_params(0.5))
    x, t, y, mask = bsa_inputs()
    out = model(x, t, y, mask, num_cond_latents=2)
    x2 = x.clone()
    x2[:, :, 2:] = torch.randn_like(x2[:, :, 2:])
    out2 = model(x2, t, y, mask, num_cond_latents=2)
    torch.testing.assert_close(out2[:, :, :2], out[:, :, :2], atol=1e-6, rtol=1e-6)
    dense = make_model()(x, t, y, mask, num_cond_latents=2)
    assert (out[:, :, :2] - dense[:, :, :2]).abs().max() > 1e-3  # cond queries: BSA over the (2, 4, 4) cond grid
    assert (out[:, :, 2:] - dense[:, :, 2:]).abs().max() > 1e-3


def test_bsa_gradient_checkpointing_same_grads():
    args = bsa_inputs()
    outs = []
    for ckpt in (False, True):
        model = make_model(enable_bsa=True, bsa_params=bsa_params(0.5))
        model.gradient_checkpointing = ckpt
        outs.append(fwd_bwd(model, args, c=2))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=0, rtol=0)
    for g1, g0 in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-5)


def test_bsa_rect_equals_block_sparse_attention_on_equal_grids():
    from kernels.block_sparse_attention import block_sparse_attention
    from model.dit_video import _bsa_rect
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g) for _ in range(3))
    grid, chunk = (4, 4, 4), (2, 2, 2)
    torch.testing.assert_close(_bsa_rect(q, k, v, grid, grid, chunk, 0.5),
                               block_sparse_attention(q, k, v, grid, chunk, 0.5), atol=1e-6, rtol=1e-6)
    # noise queries (frames 2..3) over all keys at sparsity 0 = dense
    torch.testing.assert_close(_bsa_rect(q[:, :, 32:], k, v, (2, 4, 4), grid, chunk, 0.0),
                               F.scaled_dot_product_attention(q[:, :, 32:], k, v), atol=1e-6, rtol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("case", ["T1", "grid", "cond"])
def test_bsa_fallbacks_are_dense_and_noted_once(case, capsys):
    x, t, y, mask = bsa_inputs(h=6, w=6) if case == "grid" else bsa_inputs()  # grid (4, 3, 3): not divisible
    c = 1 if case == "cond" else 0  # 1 cond frame: not a multiple of the temporal chunk 2
    if case == "T1":
        x, t = x[:, :, :1], t[:, :1]
    dense = make_model()(x, t, y, mask, num_cond_latents=c)
    model = make_model(enable_bsa=True, bsa_params=bsa_params(0.5))
    for _ in range(2):
        assert torch.equal(model(x, t, y, mask, num_cond_latents=c), dense)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "BSA" in ln]
    assert len(lines) == 1, lines


@torch.no_grad()
def test_bsa_chunk_mismatch_and_kv_cache_are_dense(capsys):
    x, t, y, mask = bsa_inputs()
    dense = make_model()
    ref = dense(x, t, y, mask)
    model = make_model(enable_bsa=True, bsa_params={**bsa_params(0.5), "chunk_3d_shape_k": [2, 2, 4]})
    assert torch.equal(model(x, t, y, mask), ref)
    assert "chunk_3d_shape_k" in capsys.readouterr().out
    model.set_bsa(True, bsa_params(0.5))
    cache = model.cache_cond_kv(x[:, :, :2])  # T = 2 cond frames: BSA inside (grid (2, 4, 4))
    out = model(x[:, :, 2:], t[:, 2:], y, mask, num_cond_latents=2, kv_cache_dict=cache)
    ref_c = dense(x[:, :, 2:], t[:, 2:], y, mask, num_cond_latents=2, kv_cache_dict=dense.cache_cond_kv(x[:, :, :2]))
    assert out.shape == ref_c.shape and "KV-cache" in capsys.readouterr().out
