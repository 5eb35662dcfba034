"""
Our LoRA exports, loaded the way each client loads them, land at the trained strength (issue 15, items 10 and 11).

The clients' rules are re-implemented here from reading their code (we depend on neither):
  - the LongCat-Video release pipeline, `pipe.dit.load_lora(path, name)` as its demos call it
    (LongCatVideoTransformer3DModel.load_lora in longcat_video/modules/longcat_video_dit.py; LoRANetwork, LoRAModule
    and LoRAUPParallel in longcat_video/modules/lora_utils.py): defaults multiplier=1.0, lora_network_dim=128,
    lora_network_alpha=64. One module per `<name>.lora_down.weight` key (name = "lora___lorahyphen___" + module path
    with "." spelled "___lorahyphen___"), skipped unless the model has that module and it is a Linear; n = the number
    of `<name>.lora_up.blocks.*` keys (else 1); down = Linear(in, n*dim), up = n Linear(dim, out/n) applied to the n
    chunks of down's output, or one Linear(dim, out); buffer alpha_scale = alpha / dim. Then
    load_state_dict(file, strict=True): every key present both ways, every shape equal (the stored alpha_scale
    replaces alpha / dim). Forward: base(x) + up(down(x)) * multiplier * alpha_scale.
  - ComfyUI (comfy/lora.py load_lora, comfy/weight_adapter/lora.py LoRAAdapter.load / calculate_weight): for each
    mapped key prefix x (for LongCat-Image, "transformer.<diffusers module name>"), alpha = file["x.alpha"].item() if
    present else None; up/down from "x.lora_up.weight"/"x.lora_down.weight", else "x_lora.up.weight"/..., else
    "x.lora_B.weight"/"x.lora_A.weight"; W += strength * (alpha / down.shape[0] if alpha is not None else 1.0) *
    (up @ down) in fp32. Keys it does not consume are reported as "lora key not loaded".
  - diffusers' `load_lora_adapter` (the real one, a test-only dependency): tests/test_lora.py, with and without
    use_safetensors=True.

Strength is checked per module against the trained delta (scaling * B @ A in fp32) with STRENGTH_RTOL, relative to
the delta's largest entry: the exports fold the scale into B (one fp32 rounding per element, 2^-24 relative, none
when the scale is a power of two) and the client's product may sum the rank terms in another order (the zero padding
adds exact zeros), so the difference is a few fp32 ulps of the largest products; 1e-5 is far above that and far below
any strength error (a wrong alpha is off by a factor such as 2 or 0.5).
"""
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from model.lora import (LONGCAT_IMAGE_LORA_TARGETS, LONGCAT_VIDEO_LORA_TARGETS, apply_lora, load_lora,
                        lora_modules, save_lora)
from tests.test_lora import inputs, run, tiny_dit

STRENGTH_RTOL = 1e-5


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def randomise_b(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)


def assert_strength(got: dict, model):
    """got: {module name: the [out, in] update the client applies}; it must be the trained one, module for module."""
    mods = lora_modules(model)
    assert set(got) == set(mods)
    for name, m in mods.items():
        want = m.delta_weight()
        err = (got[name].float() - want).abs().max().item()
        assert err <= STRENGTH_RTOL * want.abs().max().item(), (name, err, want.abs().max().item())


# -----------------------------------------------------------------------------
# the LongCat-Video release pipeline: pipe.dit.load_lora(path, name), default arguments

LC_PREFIX, LC_HYPHEN = "lora___lorahyphen___", "___lorahyphen___"


def release_load_lora(sd: dict, dit: nn.Module, multiplier=1.0, lora_network_dim=128, lora_network_alpha=64) -> dict:
    """The release's LoRANetwork + load_state_dict(strict=True) on `sd`; returns {module: the [out, in] update its
    forward adds: multiplier * alpha_scale * [up_i @ down_i]_i}. Raises as strict loading does."""
    expected, nets = {}, {}
    for key in sd:
        if not key.endswith("lora_down.weight"):
            continue
        lora_name = key.split(".lora_down.weight")[0]
        module_name = lora_name.replace(LC_PREFIX, "").replace(LC_HYPHEN, ".")
        module = dit
        try:
            for part in module_name.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        if not isinstance(module, nn.Linear):  # the release checks the class name "Linear"
            continue
        n = sum(1 for k in sd if k.startswith(lora_name + ".lora_up.blocks")) or 1
        assert module.out_features % n == 0
        dim = lora_network_dim
        expected[f"{lora_name}.lora_down.weight"] = (n * dim, module.in_features)
        if n > 1:
            expected.update({f"{lora_name}.lora_up.blocks.{i}.weight": (module.out_features // n, dim) for i in range(n)})
        else:
            expected[f"{lora_name}.lora_up.weight"] = (module.out_features, dim)
        expected[f"{lora_name}.alpha_scale"] = ()  # torch.tensor(alpha / dim): a 0-d buffer
        nets[module_name] = (lora_name, n, dim)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs {expected[k]}" for k in expected if k in sd and
                  tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        raise RuntimeError(f"Error(s) in loading state_dict for LoRANetwork: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}, size mismatch {mismatched[:3]}")
    out = {}
    for module_name, (lora_name, n, dim) in nets.items():
        down = sd[f"{lora_name}.lora_down.weight"].float()
        ups = [sd[f"{lora_name}.lora_up.blocks.{i}.weight"].float() for i in range(n)] if n > 1 else \
              [sd[f"{lora_name}.lora_up.weight"].float()]
        scale = multiplier * sd[f"{lora_name}.alpha_scale"].float().item()
        out[module_name] = scale * torch.cat([up @ down[i * dim:(i + 1) * dim] for i, up in enumerate(ups)])
    return out


def tiny_video_dit():
    from model.dit_video import LongCatVideoDiT, VideoDiTConfig
    from model.tiny_checkpoint import TINY_VIDEO_DIT
    torch.manual_seed(0)
    return LongCatVideoDiT(VideoDiTConfig(**TINY_VIDEO_DIT))


def trained_video_dit(rank, alpha, use_rslora=False):
    dit = tiny_video_dit()
    apply_lora(dit, LONGCAT_VIDEO_LORA_TARGETS, rank=rank, alpha=alpha, use_rslora=use_rslora)
    randomise_b(dit)
    return dit


@pytest.mark.parametrize("rank, alpha, rslora", [(4, 8, False), (4, 2, False), (16, 5, True), (128, 64, False)])
def test_release_pipeline_default_load_lora_takes_our_file_at_the_trained_strength(rank, alpha, rslora, tmp_path):
    """Item 10: `pipe.dit.load_lora(path, name)` with the default lora_network_dim=128 loads our rank-r file (all 48
    keys of the 2-block model: 7 layers, qkv in 3 slices, kv_linear in 2) and applies scaling * B @ A."""
    dit = trained_video_dit(rank, alpha, rslora)
    sd, _ = read(save_lora(tmp_path / "lora_longcat_video.safetensors", dit, format="longcat_video"))
    assert len(sd) == 2 * (5 + 3 + 3 + 4 + 3 + 3 + 3) == 48
    assert_strength(release_load_lora(sd, tiny_video_dit()), dit)
    # enable_loras casts the LoRA modules, alpha_scale included, to the model dtype: the scale stays exact in bf16
    assert all(v.to(torch.bfloat16).item() == v.item() for k, v in sd.items() if k.endswith("alpha_scale"))


def test_release_pipeline_rank_above_its_default(tmp_path):
    """A rank above 128 cannot be padded down to the default: the file keeps it, a warning names the call that loads
    it, and that call applies the trained strength."""
    dit = trained_video_dit(160, 16)
    with pytest.warns(UserWarning, match="lora_network_dim=160"):
        sd, _ = read(save_lora(tmp_path / "big.safetensors", dit, format="longcat_video"))
    with pytest.raises(RuntimeError, match="size mismatch"):
        release_load_lora(sd, tiny_video_dit())
    assert_strength(release_load_lora(sd, tiny_video_dit(), lora_network_dim=160), dit)


def test_our_loader_reads_the_padded_official_file_back(tmp_path):
    """load_lora (validate.py --lora, init_lora) drops the zero padding again: rank r per slice, the same output."""
    dit = trained_video_dit(4, 8)
    fresh = tiny_video_dit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rank 4: no warning
        path = save_lora(tmp_path / "lc.safetensors", dit, format="longcat_video")
    assert len(load_lora(path, fresh)) == 14
    ranks = {n.rsplit(".", 1)[-1]: m.rank for n, m in lora_modules(fresh).items()}
    assert ranks == {"qkv": 12, "kv_linear": 8, "proj": 4, "q_linear": 4, "w1": 4, "w2": 4, "w3": 4}
    for name, m in lora_modules(fresh).items():
        want = lora_modules(dit)[name].delta_weight()
        assert (m.delta_weight() - want).abs().max().item() <= STRENGTH_RTOL * want.abs().max().item(), name


# -----------------------------------------------------------------------------
# ComfyUI: comfy/lora.py load_lora + comfy/weight_adapter/lora.py

def comfyui_load_lora(sd: dict, module_names, strength=1.0, prefix="transformer.") -> dict:
    """{module: the [out, in] update ComfyUI adds to its weight}; every file key must be consumed."""
    loaded, out = set(), {}
    for name in module_names:
        x = prefix + name
        alpha = None
        if f"{x}.alpha" in sd:
            alpha = sd[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up_key, down_key in ((f"{x}.lora_up.weight", f"{x}.lora_down.weight"),
                                 (f"{x}_lora.up.weight", f"{x}_lora.down.weight"),
                                 (f"{x}.lora_B.weight", f"{x}.lora_A.weight")):
            if up_key in sd:
                up, down = sd[up_key].float(), sd[down_key].float()
                scale = alpha / down.shape[0] if alpha is not None else 1.0
                out[name] = (strength * scale) * torch.mm(up, down)
                loaded |= {up_key, down_key}
                break
    assert not set(sd) - loaded, f"lora key not loaded: {sorted(set(sd) - loaded)[:3]}"
    return out


IMAGE_CASES = {  # name: apply_lora calls on the tiny LongCat-Image DiT
    "alpha 8 rank 4 (issue: half strength)": [dict(rank=4, alpha=8)],
    "official r32 a8 gaussian": [dict(rank=32, alpha=8, init="gaussian")],
    "alpha 3 rank 4": [dict(rank=4, alpha=3)],
    "rslora": [dict(rank=4, alpha=3, use_rslora=True)],
    "mixed rank/alpha": [dict(targets=["attn.to_q", "attn.to_k", "attn.to_v"], rank=4, alpha=2),
                         dict(targets=["ff.net.0.proj", "ff.net.2"], rank=2, alpha=6)],
}


def trained_image_dit(calls):
    dit = tiny_dit()
    for call in calls:
        call = {"targets": LONGCAT_IMAGE_LORA_TARGETS, **call}
        apply_lora(dit, call.pop("targets"), **call)
    randomise_b(dit)
    return dit


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_comfyui_applies_the_trained_strength(case, fmt, tmp_path):
    """Item 11: ComfyUI loads both image files (pytorch_lora_weights.safetensors has no `.alpha`, so ComfyUI scales
    it by 1; the ComfyUI copy has `.alpha` = rank) with every key consumed, at the trained strength."""
    dit = trained_image_dit(IMAGE_CASES[case])
    sd, _ = read(save_lora(tmp_path / f"{fmt}.safetensors", dit, format=fmt))
    assert_strength(comfyui_load_lora(sd, lora_modules(dit)), dit)


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_alpha_is_rank_wherever_a_file_carries_it(case, tmp_path):
    """Item 11: the diffusers header, the ComfyUI `.alpha` and the PEFT adapter_config all say alpha = rank (scale 1,
    what a loader assumes without them), so a loader that reads the alpha and one that does not agree."""
    import json
    dit = trained_image_dit(IMAGE_CASES[case])
    mods = lora_modules(dit)
    _, header = read(save_lora(tmp_path / "d.safetensors", dit))
    meta = {k.split(".", 1)[1]: v for k, v in json.loads(header["lora_adapter_metadata"]).items()}
    comfy, _ = read(save_lora(tmp_path / "c.safetensors", dit, format="comfyui"))
    save_lora(tmp_path / "peft", dit, format="peft")
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for cfg in (meta, peft_cfg):
        assert cfg["use_rslora"] is False
        for name, m in mods.items():
            rank = cfg["rank_pattern"].get(name, cfg["r"])
            alpha = cfg["alpha_pattern"].get(name, cfg["lora_alpha"])
            assert rank == m.rank and alpha == rank, name
    assert all(comfy[f"transformer.{n}.alpha"].item() == m.rank for n, m in mods.items())


def test_all_exports_load_back_into_ours_at_the_same_output(tmp_path):
    """validate.py --lora / init_lora: every layout we write gives the trained model's output."""
    dit = trained_image_dit([dict(rank=4, alpha=8)])
    args = inputs()
    want = run(dit, args)
    for src in (save_lora(tmp_path / "d.safetensors", dit), save_lora(tmp_path / "c.safetensors", dit, format="comfyui"),
                save_lora(tmp_path / "p", dit, format="peft").parent):
        fresh = tiny_dit()
        load_lora(src, fresh)
        assert (run(fresh, args) - want).abs().max().item() < 1e-5, src  # as test_round_trip_every_layout


def test_files_of_the_old_exporter_still_load_at_their_strength(tmp_path):
    """Files written before the fold (raw B, lora_alpha / `.alpha` / alpha_scale = the trained values) keep loading
    at the trained strength: the header alpha, the `.alpha` tensors and alpha_scale are still read."""
    import json
    from safetensors.torch import save_file
    from model.lora import METADATA_KEY, lora_config, lora_state_dict
    dit = trained_image_dit([dict(rank=4, alpha=8)])
    sd = lora_state_dict(dit)  # the training parameterization: B not scaled
    cfg = {f"transformer.{k}": v for k, v in lora_config(dit).items()}
    save_file(sd, str(tmp_path / "old_d.safetensors"), {"format": "pt", METADATA_KEY: json.dumps(cfg)})
    save_file({**sd, **{f"transformer.{n}.alpha": torch.tensor(8.0) for n in lora_modules(dit)}},
              str(tmp_path / "old_c.safetensors"))
    args = inputs()
    for name in ("old_d", "old_c"):
        fresh = tiny_dit()
        load_lora(tmp_path / f"{name}.safetensors", fresh)
        assert all(m.scaling == 2.0 for m in lora_modules(fresh).values())
        assert (run(fresh, args) - run(dit, args)).abs().max().item() < 1e-5, name
    video = trained_video_dit(4, 8)
    old = {}
    for name, m in lora_modules(video).items():  # the old official-layout export: rank r, alpha_scale = scaling
        key, n = LC_PREFIX + name.replace(".", LC_HYPHEN), {"qkv": 3, "kv_linear": 2}.get(name.rsplit(".", 1)[-1], 1)
        old[f"{key}.lora_down.weight"] = torch.cat([m.lora_A.weight.detach()] * n)
        b = m.lora_B.weight.detach()
        old.update({f"{key}.lora_up.blocks.{i}.weight": u for i, u in enumerate(b.chunk(n))} if n > 1 else
                   {f"{key}.lora_up.weight": b})
        old[f"{key}.alpha_scale"] = torch.tensor(m.scaling)
    fresh = tiny_video_dit()
    load_lora(old, fresh)
    for name, m in lora_modules(fresh).items():
        want = lora_modules(video)[name].delta_weight()
        assert (m.delta_weight() - want).abs().max().item() <= STRENGTH_RTOL * want.abs().max().item(), name
