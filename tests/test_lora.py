"""model/lora.py: PEFT maths, suffix matching on the LongCat DiT, merge, freezing, and files that diffusers/PEFT load."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from model.dit_image import ImageDiTConfig, LongCatImageDiT, image_position_ids, text_position_ids
from model.lora import (LONGCAT_IMAGE_LORA_TARGETS, LONGCAT_VIDEO_LORA_TARGETS, METADATA_KEY,
                        SIMPLETUNER_IMAGE_LORA_TARGETS, LoRALinear, apply_lora, lora_disabled, lora_metadata,
                        lora_modules, lora_parameters, lora_state_dict, load_lora, remove_lora, save_lora)

TINY = dict(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
DOUBLE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
OFFICIAL = {f"transformer_blocks.{i}.{m}" for i in range(2) for m in DOUBLE} | \
           {f"single_transformer_blocks.{i}.attn.to_{c}" for i in range(2) for c in "qkv"}


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    dit = LongCatImageDiT(ImageDiTConfig(**TINY)).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # the AdaLN / output layers are zero-initialised in spirit: perturb all
    return dit


def inputs(B=1, L=7, h=4, w=6):
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(B, h * w, 64, generator=g), torch.randn(B, L, 32, generator=g)
    return x, c, torch.full((B,), 0.6), image_position_ids(h, w, offset=L), text_position_ids(L)


def run(dit, args):
    with torch.no_grad():
        return dit(*args)


def randomise_b(model, std=0.2, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def with_lora(rank=4, alpha=2, targets=LONGCAT_IMAGE_LORA_TARGETS, **kw):
    dit = tiny_dit()
    apply_lora(dit, targets, rank=rank, alpha=alpha, **kw)
    randomise_b(dit)
    return dit


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


# -----------------------------------------------------------------------------
# the layer

def test_lora_linear_maths():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    x = torch.randn(3, 5, 24)
    lin = LoRALinear(base, rank=4, alpha=8)
    assert lin.scaling == 2.0 and not any(p.requires_grad for p in base.parameters())
    assert torch.equal(lin(x), base(x))  # B = 0: nothing changes
    with torch.no_grad():
        lin.lora_B.weight.normal_()
    A, B = lin.lora_A.weight, lin.lora_B.weight
    want = x @ base.weight.T + base.bias + 2.0 * (x @ A.T) @ B.T
    assert maxdiff(lin(x), want) < 1e-5
    assert LoRALinear(nn.Linear(8, 8), rank=16, alpha=8, use_rslora=True).scaling == 8 / 4
    assert LoRALinear(nn.Linear(8, 8), rank=16).scaling == 1.0  # alpha None = rank


def test_dropout_is_on_the_lora_input_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    lin = LoRALinear(base, rank=4, alpha=4, dropout=0.5).train()
    x = torch.randn(8, 16)
    assert torch.equal(lin(x), base(x))  # B = 0 even in train mode: the base path never sees dropout
    with torch.no_grad():
        lin.lora_B.weight.normal_()
    torch.manual_seed(5)
    got = lin(x)
    torch.manual_seed(5)
    want = base(x) + F.dropout(x, 0.5, training=True) @ lin.lora_A.weight.T @ lin.lora_B.weight.T
    assert maxdiff(got, want) < 1e-5


def test_inits():
    torch.manual_seed(0)
    g = LoRALinear(nn.Linear(4096, 8), rank=32, init="gaussian")
    assert abs(g.lora_A.weight.std().item() - 1 / 32) < 0.002 and not g.lora_B.weight.any()
    d = LoRALinear(nn.Linear(4096, 8), rank=32)
    bound = 1 / math.sqrt(4096)  # kaiming_uniform(a=sqrt(5)) = nn.Linear's own init
    assert d.lora_A.weight.abs().max() <= bound and d.lora_A.weight.abs().max() > 0.9 * bound
    with pytest.raises(ValueError, match="unknown LoRA init"):
        LoRALinear(nn.Linear(4, 4), rank=2, init="pissa")


def test_merge_unmerge_exact():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    w0 = base.weight.detach().clone()
    lin = LoRALinear(base, rank=8, alpha=3)
    with torch.no_grad():
        lin.lora_B.weight.normal_()
    x = torch.randn(4, 64)
    y = lin(x)
    lin.merge()
    # merged W + s*BA vs W x + s*B(A x): other fp32 sums (64 + 8 terms of O(1), outputs up to ~3), so equal to ~1e-6,
    # not bitwise; a wrong merge (scale, transpose, sign) is off by >= 0.1
    assert lin.merged and maxdiff(lin(x), y) < 1e-5
    lin.merge()  # idempotent
    lin.unmerge()
    assert maxdiff(lin(x), y) < 1e-5 and maxdiff(base.weight, w0) < 1e-6  # W + d - d: one rounding of |W| <= 0.13


def test_merge_needs_a_plain_linear():
    class QuantLinear(nn.Module):  # stands in for a quantized linear: same surface, no plain weight
        in_features, out_features = 8, 8

        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.eye(8))

        def forward(self, x):
            return x @ self.w

    lin = LoRALinear(QuantLinear(), rank=2)
    x = torch.randn(3, 8)
    assert torch.equal(lin(x), x)
    with pytest.raises(TypeError, match="nn.Linear base"):
        lin.merge()


def test_lora_path_runs_in_the_input_dtype():
    torch.manual_seed(0)
    base = nn.Linear(16, 16).to(torch.bfloat16)
    lin = LoRALinear(base, rank=4)
    assert lin.lora_A.weight.dtype == torch.float32  # fp32 master weights
    with torch.no_grad():
        lin.lora_B.weight.normal_()
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert lin(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x.float())
    assert y.dtype == torch.bfloat16


class _CustomLinear(nn.Module):  # a linear-like base that is not an nn.Linear (the quantized-base code path)
    def __init__(self, lin):
        super().__init__()
        self.lin, self.in_features, self.out_features = lin, lin.in_features, lin.out_features

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("base_kind", ["linear", "linear_no_bias", "custom", "hooked"])
@pytest.mark.parametrize("shape", [(2, 5, 12), (7, 12), (12,)])
def test_lora_forward_and_gradients_match_the_plain_maths(base_kind, shape):
    """The fused nn.Linear path (_LoRALinearFn) and the generic path give PEFT's values and gradients: x, A, B, and
    the base weights when they are trained too."""
    torch.manual_seed(0)
    base = nn.Linear(12, 9, bias=base_kind != "linear_no_bias").double()
    lin = LoRALinear(_CustomLinear(base) if base_kind == "custom" else base, rank=3, alpha=5, dtype=torch.float64)
    if base_kind == "hooked":
        base.register_forward_pre_hook(lambda m, args: None)
    base.requires_grad_(True)
    with torch.no_grad():
        lin.lora_B.weight.normal_()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape[:-1], 9, dtype=torch.float64)
    params = [x, lin.lora_A.weight, lin.lora_B.weight, *base.parameters()]
    want = F.linear(x, base.weight, base.bias) + (5 / 3) * (x @ lin.lora_A.weight.T) @ lin.lora_B.weight.T
    want_grads = torch.autograd.grad(want, params, g)
    got = lin(x)
    assert got.shape == want.shape and maxdiff(got, want) < 1e-12
    for p, a, b in zip(params, torch.autograd.grad(got, params, g, retain_graph=True), want_grads):
        assert maxdiff(a, b) < 1e-12, p.shape
    got.mul_(2)  # the output is a plain (non-view) tensor that later in-place ops may write
    got.sum().backward()


# -----------------------------------------------------------------------------
# applying to the LongCat DiT

def test_official_targets_hit_exactly_the_expected_modules():
    dit = tiny_dit()
    names = apply_lora(dit, LONGCAT_IMAGE_LORA_TARGETS, rank=4, alpha=8, init="gaussian")
    assert set(names) == OFFICIAL and len(names) == 30
    assert set(lora_modules(dit)) == OFFICIAL  # not proj_mlp / proj_out / norm*.linear / embedders
    assert isinstance(dit.single_transformer_blocks[0].proj_mlp, nn.Linear)
    assert isinstance(dit.transformer_blocks[0].norm1.linear, nn.Linear)
    trainable = {n for n, p in dit.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in OFFICIAL for ab in "AB"}


def test_simpletuner_targets_and_exclude():
    dit = tiny_dit()
    names = apply_lora(dit, SIMPLETUNER_IMAGE_LORA_TARGETS, rank=4)
    want = {f"transformer_blocks.{i}.attn.{m}" for i in range(2) for m in ("to_q", "to_k", "to_v", "to_out.0")} | \
           {f"single_transformer_blocks.{i}.attn.to_{c}" for i in range(2) for c in "qkv"}
    assert set(names) == want
    dit = tiny_dit()
    names = apply_lora(dit, LONGCAT_IMAGE_LORA_TARGETS, rank=4, exclude=["ff_context.net.2", "single_transformer_blocks.1.attn.to_q"])
    assert set(names) == OFFICIAL - {"transformer_blocks.0.ff_context.net.2", "transformer_blocks.1.ff_context.net.2",
                                     "single_transformer_blocks.1.attn.to_q"}


def test_real_size_parameter_count_on_meta():
    with torch.device("meta"):
        dit = LongCatImageDiT(ImageDiTConfig())  # 10 + 20 blocks, D = 3072
    names = apply_lora(dit, LONGCAT_IMAGE_LORA_TARGETS, rank=32, alpha=8, init="gaussian")
    assert len(names) == 10 * 12 + 20 * 3
    assert sum(p.numel() for p in lora_parameters(dit)) == 47_185_920  # "about 47.2M" (longcat_image.md §8.1)


def test_apply_errors():
    dit = tiny_dit()
    with pytest.raises(ValueError, match="matched no module.*transformer_blocks"):
        apply_lora(dit, LONGCAT_VIDEO_LORA_TARGETS, rank=4)
    with pytest.raises(TypeError, match="not a linear layer"):
        apply_lora(dit, ["attn"], rank=4)
    apply_lora(dit, ["attn.to_q"], rank=4)
    with pytest.raises(ValueError, match="already has a LoRA"):
        apply_lora(dit, ["attn.to_q"], rank=4)


def test_gradients_flow_only_into_lora():
    dit = with_lora()
    dit.train()
    x, c, t, ii, ti = inputs()
    dit(x, c, t, ii, ti).square().mean().backward()
    lora = {id(p) for p in lora_parameters(dit)}
    for n, p in dit.named_parameters():
        if id(p) in lora:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n


def test_remove_disable_and_merge_on_the_dit():
    args = inputs()
    plain = run(tiny_dit(), args)
    dit = with_lora()
    adapted = run(dit, args)
    assert maxdiff(adapted, plain) > 1e-3
    with lora_disabled(dit):
        assert maxdiff(run(dit, args), plain) == 0
    assert maxdiff(run(dit, args), adapted) == 0
    for m in lora_modules(dit).values():
        m.merge()
    assert maxdiff(run(dit, args), adapted) < 1e-5
    with pytest.raises(RuntimeError, match="merged"):
        with lora_disabled(dit):
            pass
    remove_lora(dit)  # unmerges, then drops the adapters
    assert not lora_modules(dit) and maxdiff(run(dit, args), plain) < 1e-5
    dit = with_lora()
    assert set(remove_lora(dit, merge=True)) == OFFICIAL
    assert set(dit.state_dict()) == set(tiny_dit().state_dict())  # the checkpoint keys are back
    assert maxdiff(run(dit, args), adapted) < 1e-5


# -----------------------------------------------------------------------------
# files: diffusers / PEFT load ours, and every layout round-trips through load_lora

def diffusers_twin(base_sd):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.LongCatImageTransformer2DModel(**TINY).eval()
    ref.load_state_dict(base_sd, strict=True)
    return ref


def ref_out(ref, args):
    x, c, t, ii, ti = args
    with torch.no_grad():
        return ref(hidden_states=x, encoder_hidden_states=c, timestep=t, img_ids=ii, txt_ids=ti).sample


CASES = {  # name: (apply_lora calls, load_lora_adapter kwargs)
    "alpha=rank, bare path": ([dict(rank=4, alpha=4)], {}),
    "alpha!=rank": ([dict(rank=4, alpha=2)], dict(use_safetensors=True)),
    "alpha!=rank, bare path": ([dict(rank=4, alpha=8)], {}),  # no header read: alpha = rank, what we store
    "official r32 a8, bare path": ([dict(rank=32, alpha=8, init="gaussian")], {}),
    "official r32 a8 gaussian": ([dict(rank=32, alpha=8, init="gaussian")], dict(use_safetensors=True)),
    "mixed rank/alpha": ([dict(targets=["attn.to_q", "attn.to_k", "attn.to_v"], rank=4, alpha=2),
                          dict(targets=["ff.net.0.proj", "ff.net.2", "attn.to_add_out"], rank=2, alpha=6),
                          dict(targets=["ff_context.net.2"], rank=3, alpha=2)], dict(use_safetensors=True)),
    "rslora": ([dict(rank=4, alpha=3, use_rslora=True)], dict(use_safetensors=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_diffusers_loads_our_file(case, tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="diffusers' load_lora_adapter needs peft (requirements-dev.txt, test-only)")
    import diffusers.loaders.peft as dpeft
    calls, kwargs = CASES[case]
    dit = tiny_dit()
    ref = diffusers_twin(dit.state_dict())
    for call in calls:
        call = {"targets": LONGCAT_IMAGE_LORA_TARGETS, **call}
        apply_lora(dit, call.pop("targets"), **call)
    randomise_b(dit)
    path = save_lora(tmp_path / "pytorch_lora_weights.safetensors", dit)

    seen = []
    real = dpeft._maybe_warn_for_unhandled_keys
    monkeypatch.setattr(dpeft, "_maybe_warn_for_unhandled_keys", lambda keys, name: (seen.append(keys), real(keys, name)))
    ref.load_lora_adapter(str(path), prefix="transformer", **kwargs)
    assert len(seen) == 1
    assert not [k for k in seen[0].unexpected_keys if "lora_" in k]
    assert not [k for k in seen[0].missing_keys if "lora_" in k]
    peft_layers = {n: m for n, m in ref.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert set(peft_layers) == set(lora_modules(dit))
    for n, m in lora_modules(dit).items():  # the update PEFT applies is the trained one (the scale is folded into B)
        p = peft_layers[n]
        (key, scale), = p.scaling.items()
        delta = scale * p.lora_B[key].weight.float() @ p.lora_A[key].weight.float()
        assert maxdiff(delta, m.delta_weight()) <= 1e-5 * m.delta_weight().abs().max().item(), n  # fp32 roundings
    args = inputs()
    diff = maxdiff(ref_out(ref, args), run(dit, args))
    print(f"{case}: max abs diff vs diffusers {diff:.3g}")
    assert diff < 1e-5


def test_diffusers_metadata_content(tmp_path):
    dit = with_lora(rank=32, alpha=8, init="gaussian")
    path = save_lora(tmp_path / "lora.safetensors", dit)
    with safe_open(str(path), framework="pt") as f:
        header, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header[METADATA_KEY])
    assert header == lora_metadata(dit)
    assert meta["transformer.r"] == 32 and meta["transformer.lora_alpha"] == 32  # the scale 8/32 is folded into B
    assert set(meta["transformer.target_modules"]) == OFFICIAL and meta["transformer.use_rslora"] is False
    assert set(sd) == {f"transformer.{n}.lora_{ab}.weight" for n in OFFICIAL for ab in "AB"}
    assert set(lora_state_dict(dit)) == set(sd)
    for n, m in lora_modules(dit).items():  # A as trained, B times 1/4 (a power of two: exact)
        assert torch.equal(sd[f"transformer.{n}.lora_A.weight"], m.lora_A.weight)
        assert torch.equal(sd[f"transformer.{n}.lora_B.weight"], m.lora_B.weight * 0.25)


def test_peft_loads_our_folder(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test-only reference")
    dit = tiny_dit()
    ref = diffusers_twin(dit.state_dict())
    apply_lora(dit, LONGCAT_IMAGE_LORA_TARGETS, rank=4, alpha=2)
    randomise_b(dit)
    save_lora(tmp_path / "adapter", dit, format="peft")
    model = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
    args = inputs()
    diff = maxdiff(ref_out(model, args), run(dit, args))
    print(f"peft folder: max abs diff {diff:.3g}")
    assert diff < 1e-5


def rename(sd, fn):
    return {fn(k): v for k, v in sd.items()}


def layouts(dit, tmp_path):
    """Every layout load_lora reads, as (name, source, metadata)."""
    sd = lora_state_dict(dit, prefix="")
    alphas = {f"{n}.alpha": torch.tensor(m.alpha) for n, m in lora_modules(dit).items()}
    cfg = {"r": 4, "lora_alpha": 2}
    kohya = rename(sd, lambda k: "lora_unet_" + k.rsplit(".lora_", 1)[0].replace(".", "_") +
                   {"A": ".lora_down.weight", "B": ".lora_up.weight"}[k[-len("A.weight")]])
    kohya.update(rename(alphas, lambda k: "lora_unet_" + k[:-len(".alpha")].replace(".", "_") + ".alpha"))
    return [
        ("diffusers file", save_lora(tmp_path / "d.safetensors", dit), None),
        ("comfyui file", save_lora(tmp_path / "c.safetensors", dit, format="comfyui"), None),
        ("peft folder", save_lora(tmp_path / "p", dit, format="peft").parent, None),
        ("peft .default keys", rename(sd, lambda k: "base_model.model." + k.replace(".weight", ".default.weight")), cfg),
        ("simpletuner comfyui", {**rename(sd, lambda k: "diffusion_model." + k),
                                 **rename(alphas, lambda k: "diffusion_model." + k)}, None),
        ("kohya", kohya, None),
    ]


def test_round_trip_every_layout(tmp_path):
    dit = with_lora(rank=4, alpha=2)
    args = inputs()
    want = run(dit, args)
    for name, src, meta in layouts(dit, tmp_path):
        fresh = tiny_dit()  # same base weights, no adapters yet
        loaded = load_lora(src, fresh, metadata=meta)
        assert set(loaded) == OFFICIAL, name
        scaling = 1.0 if name.endswith(("file", "folder")) else 0.5  # our exports fold alpha / r = 0.5 into B
        assert all(m.rank == 4 and m.scaling == scaling for m in lora_modules(fresh).values()), name
        assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
               {f"{n}.lora_{ab}.weight" for n in OFFICIAL for ab in "AB"}, name
        assert maxdiff(run(fresh, args), want) < 1e-6, name
    into_existing = with_lora(rank=4, alpha=4)  # same rank already there: weights and alpha are overwritten
    load_lora(tmp_path / "d.safetensors", into_existing)
    assert maxdiff(run(into_existing, args), want) < 1e-6
    other_rank = tiny_dit()
    apply_lora(other_rank, ["attn.to_q"], rank=8)  # a different rank is replaced by the file's
    load_lora(tmp_path / "c.safetensors", other_rank)
    assert maxdiff(run(other_rank, args), want) < 1e-6


def test_round_trip_rslora_mixed_and_bf16(tmp_path):
    dit = tiny_dit()
    apply_lora(dit, ["attn.to_q", "attn.to_k"], rank=4, alpha=3, use_rslora=True)
    apply_lora(dit, ["ff.net.2"], rank=2, alpha=3, use_rslora=True)
    randomise_b(dit)
    args = inputs()
    for fmt in ("diffusers", "comfyui", "peft"):
        fresh = tiny_dit()
        load_lora(save_lora(tmp_path / fmt / "lora.safetensors" if fmt != "peft" else tmp_path / fmt, dit, format=fmt), fresh)
        assert maxdiff(run(fresh, args), run(dit, args)) < 1e-6, fmt
    path = save_lora(tmp_path / "half.safetensors", dit, dtype=torch.bfloat16)
    with safe_open(str(path), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_diffusers_layout_without_metadata_means_alpha_equals_rank(tmp_path):
    dit = with_lora(rank=4, alpha=2)
    fresh = tiny_dit()
    load_lora(lora_state_dict(dit), fresh)  # a bare state dict: no header
    assert all(m.alpha == 4 and m.scaling == 1.0 for m in lora_modules(fresh).values())


def test_comfyui_layout(tmp_path):
    dit = tiny_dit()
    apply_lora(dit, ["attn.to_q"], rank=4, alpha=2)
    apply_lora(dit, ["attn.to_k"], rank=4, alpha=3, use_rslora=True)
    randomise_b(dit)
    path = save_lora(tmp_path / "c.safetensors", dit, format="comfyui")
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert all(k.startswith("transformer.") for k in sd)
    for n, m in lora_modules(dit).items():  # ComfyUI scales by alpha / rank = 1: the scale is in B
        assert sd[f"transformer.{n}.alpha"].item() == m.rank
        assert maxdiff(sd[f"transformer.{n}.lora_B.weight"], m.lora_B.weight * m.scaling) == 0  # the same fp32 product


def test_atomic_save_leaves_no_temp_files(tmp_path):
    dit = with_lora()
    save_lora(tmp_path / "x.safetensors", dit)
    save_lora(tmp_path / "x.safetensors", dit)  # overwrite in place
    save_lora(tmp_path / "peft", dit, format="peft")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adapter_config.json", "adapter_model.safetensors", "peft",
                                                            "x.safetensors"]


def test_load_errors(tmp_path):
    dit = with_lora(rank=4, alpha=2)
    sd = lora_state_dict(dit)
    a_key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    with pytest.raises(ValueError, match="not LoRA weights.*transformer_blocks.0.attn.to_q.weight"):
        load_lora({**sd, "transformer.transformer_blocks.0.attn.to_q.weight": torch.zeros(1)}, tiny_dit())
    with pytest.raises(ValueError, match="needs both lora_A and lora_B"):
        load_lora({k: v for k, v in sd.items() if k != a_key}, tiny_dit())
    with pytest.raises(ValueError, match="blocks.9.attn.to_q: no such linear layer"):
        load_lora({**sd, "transformer.blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                   "transformer.blocks.9.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, tiny_dit())
    with pytest.raises(ValueError, match="do not fit"):
        load_lora({**sd, a_key: torch.zeros(4, 31)}, tiny_dit())
    with pytest.raises(ValueError, match="two A tensors"):
        load_lora({**sd, a_key.replace(".weight", ".other.weight"): sd[a_key]}, tiny_dit())
    (tmp_path / "lora.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_lora(tmp_path / "lora.bin", tiny_dit())
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_lora(tmp_path / "bad.safetensors", tiny_dit())
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_lora(tmp_path, tiny_dit())
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(2, 64)}, str(tmp_path / "half.safetensors"))
    fresh = tiny_dit()
    with pytest.raises(ValueError, match="x_embedder: has \\['A'\\]"):
        load_lora(tmp_path / "half.safetensors", fresh)
    assert not lora_modules(fresh)  # nothing was changed by a failed load
    with pytest.raises(ValueError, match="unknown LoRA format"):
        save_lora(tmp_path / "y.safetensors", dit, format="kohya")


def test_official_longcat_video_lora_loads_into_the_fused_layers():
    """cfg_step / refinement LoRA layout: ___lorahyphen___ keys, n up blocks for fused qkv (3) and kv_linear (2),
    a stored alpha_scale: y = W x + b + alpha_scale * [up_i (down_i x)]_i."""
    from model.dit_video import LongCatVideoDiT, VideoDiTConfig
    from model.lora import convert_longcat_video_lora, is_longcat_video_lora
    from model.tiny_checkpoint import TINY_VIDEO_DIT
    torch.manual_seed(0)
    dit = LongCatVideoDiT(VideoDiTConfig(**TINY_VIDEO_DIT))
    r, sd, ref = 4, {}, {}
    for name, n in (("blocks.0.attn.qkv", 3), ("blocks.1.cross_attn.kv_linear", 2), ("blocks.0.ffn.w1", 1)):
        layer = dict(dit.named_modules())[name]
        enc = "lora___lorahyphen___" + name.replace(".", "___lorahyphen___")
        down = torch.randn(n * r, layer.in_features)
        ups = [torch.randn(layer.out_features // n, r) for _ in range(n)]
        sd[f"{enc}.lora_down.weight"] = down
        if n == 1:
            sd[f"{enc}.lora_up.weight"] = ups[0]
        else:
            sd.update({f"{enc}.lora_up.blocks.{i}.weight": u for i, u in enumerate(ups)})
        sd[f"{enc}.alpha_scale"] = torch.tensor(0.5)
        ref[name] = (layer, down, ups)
    assert is_longcat_video_lora(sd) and len(convert_longcat_video_lora(sd)) == 9
    loaded = load_lora(sd, dit)
    assert sorted(loaded) == sorted(ref)
    modules = dict(dit.named_modules())
    for name, (base, down, ups) in ref.items():
        x = torch.randn(3, base.in_features)
        n = len(ups)
        want = base(x) + 0.5 * torch.cat([x @ down[i * r:(i + 1) * r].T @ ups[i].T for i in range(n)], dim=-1)
        assert torch.allclose(modules[name](x), want, atol=1e-5)
