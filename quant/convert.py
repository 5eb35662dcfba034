"""
Quantize a model's linear layers in place, from outside the model (gpt-fast's replace_linear_weight_only_int8),
and save / load the result so a second run starts from the quantized file.

    fmt = check_precision(cfg.base_model_precision)       # ValueError listing the accepted values otherwise
    print0(precision_note(cfg.base_model_precision))       # "...int8-quanto: runs as our int8 ..." (None: say nothing)
    names = quantize_model(dit, cfg.base_model_precision, skip=dit_skip(cfg.quantize_modulation))
    save_quantized("runs/x/transformer-int8.safetensors", dit, cfg.base_model_precision)
    load_quantized("runs/x/transformer-int8.safetensors", fresh_dit)   # swaps the same layers, loads bit-exactly

`base_model_precision` takes SimpleTuner's values; the quanto / torchao ones run as our own formats (same maths:
symmetric per-channel int8 = torchao int8wo / quanto qint8; e4m3 per-channel = torchao fp8 weight-only / quanto
qfloat8),
so neither library is needed. "bf16" / "no_change" / "fp32" quantize nothing (the trainer casts the dtype).
"""
import json

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from checkpoint import atomic_save_safetensors
from quant.linear import BNB_FORMATS, FORMATS, QuantLinear

# base_model_precision -> weight format (None: no quantization)
PRECISIONS = {
    "no_change": None, "bf16": None, "fp32": None,
    "int8-ours": "int8", "int8-quanto": "int8", "int8-torchao": "int8",
    "fp8-ours": "fp8", "fp8-quanto": "fp8", "fp8-torchao": "fp8", "fp8-native": "fp8",
    "int8-bnb": "int8-bnb", "nf4-bnb": "nf4-bnb",
}

# Kept in high precision in the LongCat DiTs (names are dotted sub-paths of a module name; "^" anchors at the top):
# the per-block AdaLN / modulation (musubi keeps it; kernels.md §9), the timestep embedder, the input embedders and the
# final layer (LongCat's own int8 keeps final_layer.linear in bf16). Norms and embeddings are not Linear anyway.
MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear", "adaLN_modulation")
DEFAULT_SKIP = MODULATION + ("norm_out.linear", "time_embed", "t_embedder", "x_embedder", "context_embedder",
                             "^proj_out", "final_layer")


def dit_skip(quantize_modulation: bool = False) -> tuple:
    """The DiT layers kept in high precision. quantize_modulation=True quantizes the per-block AdaLN linears too, as
    LongCat's own int8 does (it keeps only final_layer.linear): they are 27% of LongCat-Image's 6.27B weights, so an
    8-bit LongCat-Image base is 0.50x of bf16 instead of 0.64x. The final layer stays bf16 either way; LongCat-Video's
    modulation is an fp32 island (FP32Linear) and is never quantized (its DiT is 0.52x with or without this)."""
    return DEFAULT_SKIP[len(MODULATION):] if quantize_modulation else DEFAULT_SKIP


# Text encoders (Qwen2.5-VL, umT5) with text_encoder_1_precision: every Linear of the language model is quantized; the
# LM head (prompt rewrite only), Qwen's vision tower (it sees the Edit reference; small) and T5's FFN output `wo` (a
# precision island: transformers keeps it in fp32 and reads its weight dtype) stay as loaded.
TEXT_ENCODER_SKIP = ("lm_head", "visual", "DenseReluDense.wo")

META_KEY = "quantization"  # safetensors header: JSON {"precision": ..., "layers": {name: {"fmt", "group_size"}}}


def check_precision(value: str, key: str = "base_model_precision"):
    """The weight format for a base_model_precision (or text_encoder_1_precision) value (None = no quantization);
    ValueError naming `key` for anything else."""
    if value not in PRECISIONS:
        raise ValueError(f"{key} {value!r} is not supported; accepted values: {', '.join(PRECISIONS)}")
    return PRECISIONS[value]


def precision_note(value: str):
    """The one line to print at start-up about what `value` really runs as (None when it means itself)."""
    fmt = check_precision(value)
    if fmt is None:
        return None
    what = {"int8": "our int8 weight-only QuantLinear (symmetric per-output-channel, scale amax/127)",
            "fp8": "our fp8 weight-only QuantLinear (float8_e4m3fn per-output-channel, scale amax/448)",
            "int8-bnb": "bitsandbytes Linear8bitLt (LLM.int8, frozen int8 weights)",
            "nf4-bnb": "bitsandbytes Linear4bit NF4 (QLoRA)"}[fmt]
    if value.endswith(("-quanto", "-torchao")):
        lib = "optimum-quanto" if value.endswith("-quanto") else "torchao"
        return f"base_model_precision={value}: runs as {what}, the same maths without {lib}"
    return f"base_model_precision={value}: {what}"


def _skipped(name: str, patterns) -> bool:
    padded = "." + name + "."
    for p in patterns:
        if p.startswith("^"):
            if (name + ".").startswith(p[1:] + "."):
                return True
        elif "." + p + "." in padded:
            return True
    return False


def quantizable(model: nn.Module, skip=DEFAULT_SKIP) -> list:
    """Names of the plain nn.Linear layers quantize_model would swap (LoRA adapters and Linear subclasses excluded)."""
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and n.rsplit(".", 1)[-1] not in ("lora_A", "lora_B") and not _skipped(n, skip)]


def quantize_model(model: nn.Module, precision: str, skip=DEFAULT_SKIP, group_size=None,
                   bnb_threshold: float = 6.0, device=None) -> list:
    """Swap every quantizable nn.Linear for its quantized version, in place; returns the swapped names. device: move
    each layer there first, so a model loaded into host memory reaches the accelerator already in 8 bits, one 16-bit
    layer at a time (the rest of the model is the caller's to move)."""
    fmt = check_precision(precision)
    if fmt is None:
        return []
    names = quantizable(model, skip)
    for n in names:
        linear = model.get_submodule(n) if device is None else model.get_submodule(n).to(device)
        model.set_submodule(n, QuantLinear.from_linear(linear, fmt, group_size, bnb_threshold))
    return names


def save_quantized(path, model: nn.Module, precision: str):
    """
    The whole state_dict as safetensors (int8 / float8 tensors stored as such), the layer formats in the header.
    Save before apply_lora: the names in the file are those of the plain model.
    """
    fmt = check_precision(precision)
    if fmt in BNB_FORMATS:
        raise ValueError(f"{precision}: bitsandbytes layers are re-quantized from the 16-bit checkpoint at start-up; "
                         f"save_quantized writes our formats {FORMATS} only")
    layers = {n: {"fmt": m.fmt, "group_size": m.group_size}
              for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    meta = {META_KEY: json.dumps({"precision": precision, "layers": layers})}
    atomic_save_safetensors(path, model.state_dict(), meta)


def read_quant_metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if META_KEY not in meta:
        raise ValueError(f"{path}: no '{META_KEY}' header entry; not written by save_quantized")
    return json.loads(meta[META_KEY])


@torch.no_grad()
def load_quantized(path, model: nn.Module) -> list:
    """Swap the layers named in the file's header for empty QuantLinears, then load every tensor (strict)."""
    info = read_quant_metadata(path)
    for n, spec in info["layers"].items():
        lin = model.get_submodule(n)
        if not isinstance(lin, (nn.Linear, QuantLinear)):
            raise TypeError(f"{path}: {n} is a {type(lin).__name__} in the model, the file has a quantized linear")
        w = lin.weight if isinstance(lin, nn.Linear) else lin.weight_q
        dtype = lin.bias.dtype if lin.bias is not None else (w.dtype if w.is_floating_point() else torch.bfloat16)
        model.set_submodule(n, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, spec["fmt"],
                                           spec["group_size"], device=w.device, dtype=dtype))
    model.load_state_dict(load_file(str(path)), strict=True)  # copies onto each tensor's device / dtype
    return list(info["layers"])
