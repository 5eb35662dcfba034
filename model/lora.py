"""
LoRA for any model made of linear layers, by module swap, with files that diffusers, PEFT and ComfyUI load.

    names = apply_lora(dit, LONGCAT_IMAGE_LORA_TARGETS, rank=32, alpha=8, init="gaussian")  # the official recipe
    ... train: only lora_A / lora_B have requires_grad ...
    save_lora("out/pytorch_lora_weights.safetensors", dit)         # diffusers layout, alpha / r folded into lora_B
    load_lora("out/pytorch_lora_weights.safetensors", fresh_dit)   # wraps the layers it needs, rank/alpha from the file

Maths (PEFT's): y = base(x) + lora_B(lora_A(dropout(x))) * scaling, scaling = alpha / r (alpha / sqrt(r) with
rsLoRA). lora_A is [r, in], lora_B is [out, r]; B starts at zero so a fresh adapter changes nothing. The LoRA path
runs in the dtype of its input (autocast-friendly); the adapter weights stay fp32 by default (master weights).

Targets use PEFT's suffix rule: "attn.to_q" adapts every module whose qualified name is "attn.to_q" or ends with
".attn.to_q", so the official LongCat list also hits the single blocks' attn.to_{q,k,v} (their proj_mlp / proj_out
and every AdaLN linear are not adapted). `alpha=None` means alpha = rank (scale 1: SimpleTuner's default and what
every loader assumes when a file has no alpha); the official recipe relies on PEFT's default 8, so pass alpha=8.

A wrapped layer's own weights move to `<name>.base_layer.weight` (PEFT's name); `remove_lora` puts the plain
modules back (optionally merged), so a full-model checkpoint is taken after `remove_lora(model, merge=True)`.

File formats (see ../shared/specs/simpletuner_compat.md §6), all safetensors, all written atomically. Every export
folds the trained scale into the up weights (lora_B <- scaling * lora_B: the same update B·A·alpha/r) and says
alpha = rank (scale 1) wherever the format carries an alpha, so a loader that reads the alpha and one that ignores it
(and assumes alpha = rank, as they all do) apply the trained strength:
  - "diffusers": `transformer.<module>.lora_A.weight` / `.lora_B.weight`, and the LoraConfig as JSON under the header
    key `lora_adapter_metadata`, its keys prefixed "transformer." (diffusers filters the metadata by the same prefix
    as the weights). Load with
        pipe.transformer.load_lora_adapter(path, prefix="transformer")   # use_safetensors=True or not: the same
    (diffusers reads the header only on its safetensors branch; without it, alpha = rank, which is what we store.)
    ComfyUI also loads this file: it maps the same keys as the "comfyui" file and, with no `.alpha`, scales by 1.
  - "comfyui": the same `transformer.<diffusers name>` keys plus a scalar `<...>.alpha` = rank per module. ComfyUI
    runs LongCat-Image as a Flux variant in the native BFL layout (double_blocks, fused qkv / linear1); its LoRA loader
    maps `transformer.<diffusers name>` onto those native weights and q/k/v onto slices of the fused qkv, and reads
    `.alpha` (scale alpha / rank, rank = lora_A's rows). SimpleTuner's `diffusion_model.<diffusers name>` keys match
    nothing there, so they are read by load_lora but never written.
  - "peft": a folder with `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`) and
    `adapter_config.json` (lora_alpha = r), like PeftModel.save_pretrained (the official LongCat-Image recipe's output).
  - "longcat_video": the official LongCat-Video layout, zero-padded to the release loader's fixed rank 128 (see
    longcat_video_lora_state_dict), so `pipe.dit.load_lora(path, name)` with its default arguments loads it.
load_lora also reads kohya keys (`lora_unet_<module_with_underscores>.lora_down/.lora_up/.alpha`), PEFT's
`.lora_A.default.weight` and bare DiffSynth names. Nothing is unpickled.
"""
import collections
import contextlib
import json
import math
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from checkpoint import atomic_write_bytes

# Meituan's LongCat-Image train_examples (r=32, alpha 8, gaussian init): ~47.2M parameters on the 10+20-block model
LONGCAT_IMAGE_LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                              "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                              "ff_context.net.0.proj", "ff_context.net.2"]
# SimpleTuner's longcat_image default: image-stream q/k/v/out of the double blocks and q/k/v of the single blocks
SIMPLETUNER_IMAGE_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv"]
# the LongCat-Video module names of its shipped cfg_step LoRA (for model/dit_video.py)
LONGCAT_VIDEO_LORA_TARGETS = ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "ffn.w1",
                              "ffn.w2", "ffn.w3"]

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


class LoRALinear(nn.Module):
    """A frozen linear-like `base_layer` (nn.Linear, or anything with in_features/out_features) plus a low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha=None, dropout: float = 0.0, init: str = "default",
                 use_rslora: bool = False, dtype=torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base_layer = base.requires_grad_(False)
        self.rank, self.alpha, self.use_rslora = rank, float(rank if alpha is None else alpha), use_rslora
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(iter(base.parameters()), next(iter(base.buffers()), torch.empty(0))).device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora(init)
        self.merged = False
        self.disabled = False

    def reset_lora(self, init: str = "default"):
        if init == "default":  # A like nn.Linear's own init (PEFT's True), B = 0
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":  # PEFT's "gaussian": A ~ N(0, 1/r)
            nn.init.normal_(self.lora_A.weight, std=1 / self.rank)
        else:
            raise ValueError(f"unknown LoRA init {init!r}: use 'default' or 'gaussian'")
        nn.init.zeros_(self.lora_B.weight)

    # linear-like surface, so code that reads these off a layer keeps working after the swap
    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)  # the BASE weight: the LoRA update is not in it
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x):
        if self.merged or self.disabled:
            return self.base_layer(x)
        base = self.base_layer
        if (type(base) is nn.Linear and isinstance(self.dropout, nn.Identity) and x.dtype == base.weight.dtype
                and not torch.is_autocast_enabled(x.device.type) and not base._forward_hooks
                and not base._forward_pre_hooks):  # the common case: one fused function, see _LoRALinearFn
            return _LoRALinearFn.apply(x, base.weight, base.bias, self.lora_A.weight.to(x.dtype),
                                       self.lora_B.weight.to(x.dtype), self.scaling)
        # dropout, or a quantized / hooked / custom base (only its output is used, never written to): the LoRA
        # branch on 2-D tokens (a linear's 3-D output is a view, costly to write in place), summed into its product
        h = F.linear(self.dropout(x).reshape(-1, x.shape[-1]), self.lora_A.weight.to(x.dtype))  # [N, r], x's dtype
        p = F.linear(h, self.lora_B.weight.to(h.dtype))  # or autocast's
        if self.scaling != 1:
            p.mul_(self.scaling)
        y = base(x)
        y2 = y.reshape(-1, y.shape[-1])
        return (p.add_(y2) if p.dtype == y.dtype else y2 + p.to(y.dtype)).view(y.shape)  # y + scaling * h B^T

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _plain_weight(self):
        if type(self.base_layer) is not nn.Linear:
            raise TypeError(f"merge/unmerge needs an nn.Linear base, got {type(self.base_layer).__name__}")
        return self.base_layer.weight

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            w = self._plain_weight()
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self._plain_weight()
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}" + (", rslora" if self.use_rslora else "")


class _LoRALinearFn(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T for a plain nn.Linear base, x [N, in]: the same maths as base(x) + the LoRA
    branch, with fewer [N, out] / [N, in] temporaries. Forward: one output, the LoRA product accumulated into it by
    the GEMM (addmm_), no separate product, scaled copy or sum. Backward: dX = dY W + (s dY B) A accumulated in place,
    dA = (s dY B)^T x, dB = s dY^T h; dW / db only if the base weights require grad (they are frozen in LoRA)."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, s):
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        h = x2.mm(a.t())  # [N, r]
        y = x2.new_empty(*x.shape[:-1], w.shape[0])  # returned as is (not a view), so later in-place ops are cheap
        y2 = y.view(-1, w.shape[0])
        torch.mm(x2, w.t(), out=y2) if bias is None else torch.addmm(bias, x2, w.t(), out=y2)
        y2.addmm_(h, b.t(), alpha=s)
        ctx.save_for_backward(x2, h, w, a, b)
        ctx.s, ctx.x_shape = s, x.shape
        return y

    @staticmethod
    def backward(ctx, gy):
        x2, h, w, a, b = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad
        gy = gy.reshape(-1, gy.shape[-1])
        gx = gw = gbias = ga = gb = None
        gh = gy.mm(b)  # dL/dh / s  [N, r]
        if s != 1:
            gh.mul_(s)
        if need[0]:
            gx = gy.new_empty(ctx.x_shape)
            gx2 = gx.view(-1, w.shape[1])
            torch.mm(gy, w, out=gx2)
            gx2.addmm_(gh, a)
        if need[1]:
            gw = gy.t().mm(x2)
        if need[2]:
            gbias = gy.sum(0)
        if need[3]:
            ga = gh.t().mm(x2)
        if need[4]:
            gb = gy.t().mm(h)
            if s != 1:
                gb.mul_(s)
        return gx, gw, gbias, ga, gb, None


# -----------------------------------------------------------------------------
# applying, removing, switching off

def _matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_linear_like(m: nn.Module) -> bool:
    return not isinstance(m, LoRALinear) and hasattr(m, "in_features") and hasattr(m, "out_features")


def lora_modules(model: nn.Module) -> dict:
    """{qualified name: LoRALinear} in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def _freeze_all_but_lora(model: nn.Module):
    model.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)


def apply_lora(model: nn.Module, targets, rank: int, alpha=None, dropout: float = 0.0, init: str = "default",
               exclude=(), use_rslora: bool = False, dtype=torch.float32) -> list:
    """Wrap every linear whose name suffix-matches `targets` (and no `exclude` entry); freeze everything else."""
    targets, exclude = [targets] if isinstance(targets, str) else list(targets), list(exclude)
    hits = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets) and not _matches(n, exclude)]
    if not hits:
        names = [n for n, m in model.named_modules() if _is_linear_like(m)]
        raise ValueError(f"LoRA targets {targets} matched no module (exclude={exclude}); the model's linear layers "
                         f"include {names[:8]}{' ...' if len(names) > 8 else ''}")
    for n, m in hits:
        if isinstance(m, LoRALinear):
            raise ValueError(f"{n} already has a LoRA adapter; call remove_lora(model) first")
        if not _is_linear_like(m):
            raise TypeError(f"LoRA target {n} is a {type(m).__name__}, not a linear layer; use a more specific target")
    for n, m in hits:
        model.set_submodule(n, LoRALinear(m, rank, alpha, dropout, init, use_rslora, dtype))
    _freeze_all_but_lora(model)
    return [n for n, _ in hits]


def remove_lora(model: nn.Module, merge: bool = False) -> list:
    """Put the plain base layers back, with the update merged in (nn.Linear bases) or dropped. Base stays frozen."""
    mods = lora_modules(model)
    for n, m in mods.items():
        m.merge() if merge else m.unmerge()
        model.set_submodule(n, m.base_layer)
    return list(mods)


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model (e.g. a DPO reference or a 'without LoRA' validation image) without touching the weights."""
    mods = list(lora_modules(model).values())
    if any(m.merged for m in mods):
        raise RuntimeError("cannot disable a merged LoRA; unmerge first")
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d


# -----------------------------------------------------------------------------
# state dicts, metadata, files

def _folded_b(m: LoRALinear) -> torch.Tensor:
    """lora_B with the scale folded in (scaling * B, computed in fp32, in B's dtype): B' A = scaling B A. Exact when
    the scale is 1 or a power of two, else one fp32 rounding per element."""
    b = m.lora_B.weight.detach()
    return b if m.scaling == 1 else (b.float() * m.scaling).to(b.dtype)


def lora_state_dict(model: nn.Module, prefix: str = "transformer.", fold_scale: bool = False) -> dict:
    """diffusers/PEFT layout: {prefix}<module>.lora_A.weight [r, in] and .lora_B.weight [out, r]; the training
    parameterization, or with fold_scale the exported one (lora_B times alpha / r: apply it with scale 1)."""
    sd = {}
    for n, m in lora_modules(model).items():
        sd[f"{prefix}{n}.lora_A.weight"] = m.lora_A.weight.detach()
        sd[f"{prefix}{n}.lora_B.weight"] = _folded_b(m) if fold_scale else m.lora_B.weight.detach()
    return sd


def lora_config(model: nn.Module, fold_scale: bool = False) -> dict:
    """The peft LoraConfig fields that describe the adapters: the most common rank/alpha plus per-module patterns.
    fold_scale: describe lora_state_dict(..., fold_scale=True) instead: alpha = rank everywhere, no rsLoRA."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    if not fold_scale and len({m.use_rslora for m in mods.values()}) > 1:
        raise ValueError("cannot describe a mix of rsLoRA and plain LoRA adapters in one config")
    alphas = {n: float(m.rank) if fold_scale else m.alpha for n, m in mods.items()}
    r = collections.Counter(m.rank for m in mods.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    dropout = collections.Counter(getattr(m.dropout, "p", 0.0) for m in mods.values()).most_common(1)[0][0]
    num = lambda a: int(a) if float(a).is_integer() else a  # noqa: E731  (JSON shows 8, not 8.0)
    return {"r": r, "lora_alpha": num(alpha), "target_modules": list(mods), "lora_dropout": dropout,
            "use_rslora": False if fold_scale else next(iter(mods.values())).use_rslora,
            "rank_pattern": {n: m.rank for n, m in mods.items() if m.rank != r},
            "alpha_pattern": {n: num(a) for n, a in alphas.items() if a != alpha}}


def lora_metadata(model: nn.Module, prefix: str = "transformer") -> dict:
    """safetensors header of our diffusers-layout file (scale folded into lora_B, so lora_alpha = r): the LoraConfig
    under `lora_adapter_metadata`, keys "<prefix>.*"."""
    cfg = {f"{prefix}.{k}": v for k, v in lora_config(model, fold_scale=True).items()}
    return {"format": "pt", METADATA_KEY: json.dumps(cfg, indent=2, sort_keys=True)}


def save_lora(path, model: nn.Module, format: str = "diffusers", dtype=None) -> Path:
    """Write the adapters as "diffusers" (a file), "comfyui" (a file), "peft" (a folder) or "longcat_video" (a file
    in the official LongCat-Video layout); returns the weights file. Every layout holds the update scaling·B·A with
    the scale folded into the up weights and alpha = rank (see the module docstring), so that each client applies the
    trained strength whether or not it reads the alpha."""
    path = Path(path)
    cast = lambda sd: {k: v.to("cpu", dtype or v.dtype).contiguous() for k, v in sd.items()}  # noqa: E731
    if format == "peft":
        path.mkdir(parents=True, exist_ok=True)
        cfg = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "bias": "none",
               "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
               **lora_config(model, fold_scale=True)}
        atomic_write_bytes(path / "adapter_config.json", (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
        path = path / "adapter_model.safetensors"
        data = safetensors_bytes(cast(lora_state_dict(model, "base_model.model.", fold_scale=True)), {"format": "pt"})
    elif format == "diffusers":
        data = safetensors_bytes(cast(lora_state_dict(model, "transformer.", fold_scale=True)), lora_metadata(model))
    elif format == "comfyui":
        sd = cast(lora_state_dict(model, "transformer.", fold_scale=True))
        for n, m in lora_modules(model).items():  # ComfyUI scales by alpha / rank: alpha = rank, scale 1
            sd[f"transformer.{n}.alpha"] = torch.tensor(float(m.rank), dtype=torch.float32)
        data = safetensors_bytes(sd, {"format": "pt"})
    elif format == "longcat_video":  # the official LongCat-Video pipeline's LoRA files
        data = safetensors_bytes(cast(longcat_video_lora_state_dict(model)), {"format": "pt"})
    else:
        raise ValueError(f"unknown LoRA format {format!r}: use 'diffusers', 'comfyui', 'peft' or 'longcat_video'")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


# -----------------------------------------------------------------------------
# loading any of the layouts above

_KEY = re.compile(r"^(?P<mod>.+?)\.(?:(?P<ab>lora_A|lora_B|lora_down|lora_up)(?:\.[\w-]+)?\.weight|alpha)$")
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.")


def _read(src):
    """(state dict, LoRA config dict or None) from a .safetensors file or a folder holding one."""
    src, config = Path(src), None
    if src.is_dir():
        found = [src / f for f in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors") if (src / f).is_file()]
        if not found:
            raise FileNotFoundError(f"{src} holds no adapter_model.safetensors or pytorch_lora_weights.safetensors")
        src = found[0]
    if src.name == "adapter_model.safetensors" and (src.parent / "adapter_config.json").is_file():  # a PEFT folder
        config = json.loads((src.parent / "adapter_config.json").read_text())
    if src.suffix != ".safetensors":
        raise ValueError(f"{src}: only .safetensors LoRA files are read (no pickle)")
    try:
        with safe_open(str(src), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            header = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{src} is not a readable safetensors file: {e}") from e
    if header.get(METADATA_KEY):
        config = json.loads(header[METADATA_KEY])
    return sd, config


# the official LongCat-Video LoRA files (cfg_step_lora, refinement_lora; longcat_video.md §6.5):
#   lora___lorahyphen___<module path, "." spelled ___lorahyphen___>.{lora_down.weight | lora_up.weight |
#   lora_up.blocks.<i>.weight | alpha_scale}; a fused layer (qkv: n=3, kv_linear: n=2) has one down [n*r, in] and n
#   ups [out/n, r]: output slice i = up_i @ down[i*r:(i+1)*r] @ x, times alpha_scale.
_LC_PREFIX, _LC_DOT = "lora___lorahyphen___", "___lorahyphen___"
# The release's loader, LongCatVideoTransformer3DModel.load_lora(path, key, multiplier=1.0, lora_network_dim=128,
# lora_network_alpha=64) (longcat_video/modules/longcat_video_dit.py, LoRANetwork / LoRAModule in
# longcat_video/modules/lora_utils.py), builds every module at rank lora_network_dim (down [n*128, in], up_i
# [out/n, 128]) and load_state_dict(strict=True)s the file into them: the stored alpha_scale buffer replaces the
# alpha / dim it was built with, but the shapes must be rank 128 exactly. So we write rank 128, zero-padded.
LONGCAT_VIDEO_LOADER_RANK = 128


def is_longcat_video_lora(sd: dict) -> bool:
    return bool(sd) and all(k.startswith(_LC_PREFIX) for k in sd)


def convert_longcat_video_lora(sd: dict) -> dict:
    """Official LongCat-Video LoRA -> `<module>.lora_A.weight / .lora_B.weight / .alpha`. A fused layer's n ups
    become one block-diagonal B [out, n*r] (exactly the same update), and alpha = alpha_scale * rank so that our
    scaling alpha / rank equals the stored alpha_scale. Rank components that contribute nothing (a zero down row or a
    zero up column: the zero padding of our own exports) are dropped, which changes no product."""
    mods = collections.defaultdict(dict)
    for key, t in sd.items():
        enc, _, part = key[len(_LC_PREFIX):].partition(".")
        mods[enc.replace(_LC_DOT, ".")][part] = t
    out = {}
    for mod, p in mods.items():
        ups = [p[f"lora_up.blocks.{i}.weight"] for i in range(len(p)) if f"lora_up.blocks.{i}.weight" in p]
        ups = ups or [p["lora_up.weight"]]
        down, up = p["lora_down.weight"], torch.block_diag(*ups)
        keep = (down != 0).any(dim=1) & (up != 0).any(dim=0) if down.shape[0] == up.shape[1] else None
        if keep is not None and not keep.all():
            if not keep.any():
                keep[0] = True  # an all-zero adapter keeps one (zero) component: rank >= 1
            down, up = down[keep], up[:, keep]
        out[f"{mod}.lora_A.weight"] = down
        out[f"{mod}.lora_B.weight"] = up
        out[f"{mod}.alpha"] = torch.tensor(float(p.get("alpha_scale", torch.tensor(1.0))) * down.shape[0])
    return out


def _fused_parts(name: str) -> int:
    """How many output slices the official layout gives a fused layer (longcat_video.md §6.5), else 1."""
    if name.endswith("final_layer.adaLN_modulation.1"):
        return 2
    if name.endswith("adaLN_modulation.1"):
        return 6
    return 3 if name.endswith("attn.qkv") else 2 if name.endswith("kv_linear") else 1


def longcat_video_lora_state_dict(model: nn.Module, rank: int = LONGCAT_VIDEO_LOADER_RANK) -> dict:
    """Our adapters in the official LongCat-Video layout, the same update, loadable by the release's
    `dit.load_lora(path, name)` with its default lora_network_dim (128). Each module's A [r, in] and folded B
    (scaling * B, [out, r]) are zero-padded to R = max(rank, every module's r) rank components: A gets R - r zero
    rows, B R - r zero columns, so B_pad A_pad = B A term for term (the extra terms are exact zeros). A fused layer of
    n slices gets down = [A_pad; A_pad; ...] (n copies, [n*R, in]) and up_i = the i-th row block of B_pad
    ([out/n, R]); alpha_scale = 1 (the scale is in the ups: exact in the bf16 the release casts LoRAs to). So
    up_i @ down_i @ x * alpha_scale = (B A x * scaling)[slice i]. A rank above `rank` cannot be padded down: the file
    then has rank R and needs dit.load_lora(path, name, lora_network_dim=R) (a warning says so)."""
    mods = lora_modules(model)
    R = max([rank, *(m.rank for m in mods.values())])
    if R > rank:
        warnings.warn(f"LoRA rank {R} > {rank}: the official LongCat-Video file has rank {R}; load it with "
                      f"dit.load_lora(path, name, lora_network_dim={R})", stacklevel=3)
    sd = {}
    for name, m in mods.items():
        a, b, n = m.lora_A.weight.detach(), _folded_b(m), _fused_parts(name)
        if b.shape[0] % n:
            raise ValueError(f"{name}: {b.shape[0]} outputs do not split into the official {n} slices")
        a, b = F.pad(a, (0, 0, 0, R - m.rank)), F.pad(b, (0, R - m.rank))
        key = _LC_PREFIX + name.replace(".", _LC_DOT)
        sd[f"{key}.lora_down.weight"] = torch.cat([a] * n)
        if n == 1:
            sd[f"{key}.lora_up.weight"] = b
        for i, up in enumerate(b.chunk(n) if n > 1 else []):
            sd[f"{key}.lora_up.blocks.{i}.weight"] = up
        sd[f"{key}.alpha_scale"] = torch.tensor(1.0)
    return sd


def _unprefixed_config(config):
    """diffusers writes "transformer.r" etc.; PEFT's adapter_config.json has plain "r"."""
    if not config:
        return {}
    pre = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("transformer.")}
    return pre or {k: v for k, v in config.items() if "." not in k}


def _pattern(patterns: dict, name: str):
    for key, value in (patterns or {}).items():
        key = key.removeprefix("^")
        if name == key or name.endswith("." + key):
            return value
    return None


def _refuse_non_finite(sd: dict, src):
    """A LoRA holding NaN/inf would silently render black images or train on a nan loss: refuse it, naming the file."""
    bad = [k for k, t in sd.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        where = "LoRA state dict" if isinstance(src, dict) else f"LoRA {src}"
        raise ValueError(f"{where}: non-finite values (NaN/inf) in {len(bad)} tensor(s), e.g. {', '.join(bad[:3])}; "
                         "refusing to load it")


def load_lora(src, model: nn.Module, metadata=None, dtype=torch.float32) -> list:
    """
    Load a LoRA file/folder (or a state dict) in any layout above into `model`, wrapping layers that have no adapter
    yet (or whose rank differs) with the rank from the tensor shapes. Alpha: `.alpha` tensors, else the config in the
    file header / adapter_config.json / `metadata` (r, lora_alpha, alpha_pattern, use_rslora), else alpha = rank.
    Every key must land somewhere: unknown keys, missing halves, absent modules and shape mismatches are errors.
    Returns the loaded module names. Newly wrapped models are frozen except for the LoRA weights.
    """
    sd, config = (dict(src), None) if isinstance(src, dict) else _read(src)
    if is_longcat_video_lora(sd):
        sd = convert_longcat_video_lora(sd)
    config = _unprefixed_config(metadata if metadata is not None else config)
    _refuse_non_finite(sd, src)
    underscored = {n.replace(".", "_"): n for n, _ in model.named_modules()}
    parts, unknown = collections.defaultdict(dict), []
    for key, t in sd.items():
        m = _KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        mod = m["mod"]
        if mod.startswith("lora_unet_"):  # kohya: dots became underscores
            mod = underscored.get(mod[len("lora_unet_"):], mod)
        else:
            mod = next((mod[len(p):] for p in _PREFIXES if mod.startswith(p)), mod)
        part = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B", None: "alpha"}[m["ab"]]
        if part in parts[mod]:
            raise ValueError(f"LoRA file has two {part} tensors for {mod} (several adapters in one file?), e.g. {key}")
        parts[mod][part] = t
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) are not LoRA weights in any known layout: {unknown[:5]}")

    modules, problems = dict(model.named_modules()), []
    for mod, p in parts.items():
        target = modules.get(mod)
        base = target.base_layer if isinstance(target, LoRALinear) else target
        if "A" not in p or "B" not in p:
            problems.append(f"{mod}: has {sorted(p)} but needs both lora_A and lora_B")
        elif target is None or not _is_linear_like(base):
            problems.append(f"{mod}: no such linear layer in the model")
        elif p["A"].ndim != 2 or p["B"].ndim != 2 or p["A"].shape[0] != p["B"].shape[1] or \
                (p["A"].shape[1], p["B"].shape[0]) != (base.in_features, base.out_features):
            problems.append(f"{mod}: lora_A {tuple(p['A'].shape)} / lora_B {tuple(p['B'].shape)} do not fit a "
                            f"[{base.out_features} x {base.in_features}] layer")
        elif isinstance(target, LoRALinear) and target.merged:
            problems.append(f"{mod}: its adapter is merged; unmerge before loading")
    if problems:
        raise ValueError(f"cannot load LoRA ({len(problems)} problem(s)): " + "; ".join(problems[:6]) +
                         (" ..." if len(problems) > 6 else ""))

    created = False
    for mod, p in parts.items():
        target, rank = modules[mod], p["A"].shape[0]
        if "alpha" in p:
            alpha, rslora = float(p["alpha"]), False
        else:
            alpha = _pattern(config.get("alpha_pattern"), mod)
            alpha = alpha if alpha is not None else config.get("lora_alpha", rank)
            rslora = bool(config.get("use_rslora", False))
        if isinstance(target, LoRALinear) and target.rank == rank:
            target.alpha, target.use_rslora = float(alpha), rslora
            target.scaling = target.alpha / (math.sqrt(rank) if rslora else rank)
        else:
            base = target.base_layer if isinstance(target, LoRALinear) else target
            dropout = getattr(getattr(target, "dropout", None), "p", 0.0)
            target = LoRALinear(base, rank, alpha, dropout, "default", rslora, dtype)
            model.set_submodule(mod, target)
            created = True
        with torch.no_grad():
            target.lora_A.weight.copy_(p["A"])
            target.lora_B.weight.copy_(p["B"])
    if created:
        _freeze_all_but_lora(model)
    return list(parts)
