"""
Loading released LongCat-Image folders (diffusers layout) into our modules. Every remap lives here.

    model_index.json  transformer/  vae/  text_encoder/  tokenizer/  text_processor/  scheduler/

Weights are safetensors only (single file or sharded with `*.safetensors.index.json`); nothing is unpickled. Modules
are built on the meta device and filled with `load_state_dict(strict, assign=True)`, so a 6B model never exists
twice in memory. Any missing / unexpected key or shape mismatch fails with a report that names them. Configs are
read from the folder (never assumed), so a changed release config changes the model or fails loudly.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from checkpoint import atomic_save_safetensors, atomic_write_bytes, read_json

from model.dit_image import ImageDiTConfig, LongCatImageDiT
from model.flow import FlowSchedulerConfig
from model.vae_image import ImageVAE, ImageVAEConfig, convert_bfl_vae_state_dict, is_bfl_vae_state_dict

IMAGE_FLAVOURS = {
    "final": "meituan-longcat/LongCat-Image",
    "dev": "meituan-longcat/LongCat-Image-Dev",
    "edit": "meituan-longcat/LongCat-Image-Edit",
}
EDIT_PIPELINES = {"LongCatImageEditPipeline"}


class WeightsError(RuntimeError):
    """A folder or file that cannot be turned into the model: the message says what to fix."""


def require_safetensors(folder) -> Path:
    """A transformers model folder, checked before from_pretrained(use_safetensors=True): one that holds only pickle
    weights (pytorch_model*.bin) is refused in one line, since nothing is unpickled here."""
    folder = Path(folder)
    bins = sorted(p.name for p in folder.glob("*.bin"))
    if bins and not any(folder.glob("*.safetensors")):
        raise WeightsError(f"{folder}: only pickle weights ({', '.join(bins)}); safetensors is required. Convert them "
                           "once, where you trust the file: python -c \"from transformers import AutoModel; "
                           f"AutoModel.from_pretrained('{folder}').save_pretrained('{folder}')\" (writes "
                           "model.safetensors), then remove the .bin")
    return folder


def default_device_dtype():
    """bf16 on GPU, fp32 on CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def write_json(path, d: dict):
    atomic_write_bytes(path, (json.dumps(d, indent=2) + "\n").encode())


def save_module_folder(module: torch.nn.Module, folder, config: dict):
    """A diffusers-format component folder: config.json + diffusion_pytorch_model.safetensors (what we load)."""
    folder = Path(folder)
    write_json(folder / "config.json", config)
    atomic_save_safetensors(folder / "diffusion_pytorch_model.safetensors", module.state_dict())


def resolve_load_args(name_or_path, flavour, flavours, device, dtype):
    """(folder, device, dtype) for a loader: the defaults are bf16 on GPU and fp32 on CPU."""
    d_device, d_dtype = default_device_dtype()
    return resolve_model_path(name_or_path, flavour, flavours), torch.device(device or d_device), dtype or d_dtype


def resolve_model_path(name_or_path, flavour=None, flavours=IMAGE_FLAVOURS) -> Path:
    """A local folder as is; otherwise a hub id (or the flavour's hub id) through the local HF cache / a download."""
    if name_or_path is None:
        if flavour not in flavours:
            raise WeightsError(f"model_flavour {flavour!r} is not one of {sorted(flavours)}")
        name_or_path = flavours[flavour]
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    if os.path.exists(name_or_path) or str(name_or_path).count("/") != 1:
        raise WeightsError(f"{name_or_path!r} is not a model folder (expected model_index.json, transformer/, vae/, ...)")
    from huggingface_hub import snapshot_download  # only reached for hub ids
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return Path(snapshot_download(str(name_or_path), local_files_only=offline,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja",
                                                      "*.tiktoken", "merges.txt"]))
    except Exception as e:  # offline, no network, gated, ...
        raise WeightsError(f"cannot fetch {name_or_path} ({type(e).__name__}); download it and pass its local folder "
                           f"with --pretrained_model_name_or_path /path/to/{str(name_or_path).split('/')[-1]}") from None


def load_safetensors(path, prefix="diffusion_pytorch_model") -> dict:
    """A .safetensors file, or a folder holding `<prefix>.safetensors` or a sharded `<prefix>.safetensors.index.json`."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: only .safetensors weights are loaded (no pickle files)")
        return load_file(str(path))
    single, index = path / f"{prefix}.safetensors", path / f"{prefix}.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise WeightsError(f"{path}: shard(s) listed in {index.name} are missing: {missing}")
        sd = {}
        for s in shards:
            sd.update(load_file(str(path / s)))
        return sd
    found = sorted(p.name for p in path.glob("*")) if path.is_dir() else []
    raise WeightsError(f"{path}: no {single.name} or {index.name} (found: {found or 'nothing'})")


def load_weights(module: torch.nn.Module, sd: dict, what: str, dtype=None, device=None):
    """Strict load with a readable report; tensors are cast/moved first and assigned (the module may be on meta)."""
    want = module.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
                  for k in sorted(set(sd) & set(want)) if sd[k].shape != want[k].shape]
    if missing or unexpected or mismatched:
        def show(xs):
            return f"{len(xs)} ({', '.join(xs[:8])}{', ...' if len(xs) > 8 else ''})"
        raise WeightsError(f"{what}: weights do not match the model built from its config.json: missing {show(missing)}; "
                           f"unexpected {show(unexpected)}; shape mismatches {show(mismatched)}")
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    return module


def load_image_dit(folder, device=None, dtype=None) -> LongCatImageDiT:
    folder = Path(folder)
    cfg = ImageDiTConfig.from_dict(read_json(folder / "config.json"))
    with torch.device("meta"):
        dit = LongCatImageDiT(cfg)
    return load_weights(dit, load_safetensors(folder), f"transformer ({folder})", dtype, device).eval()


def load_image_vae(path, device=None, dtype=None, config: ImageVAEConfig = None) -> ImageVAE:
    """A diffusers `vae/` folder, or a single file such as BFL's `ae.safetensors` (keys converted; the FLUX.1 config
    unless `config` is given)."""
    path = Path(path)
    cfg = ImageVAEConfig.from_dict(read_json(path / "config.json")) if path.is_dir() else (config or ImageVAEConfig())
    sd = load_safetensors(path)
    if is_bfl_vae_state_dict(sd):
        sd = convert_bfl_vae_state_dict(sd)
    with torch.device("meta"):
        vae = ImageVAE(cfg)
    return load_weights(vae, sd, f"vae ({path})", dtype, device).eval()


@dataclass
class LongCatImage:
    """Everything sampling needs, loaded from one folder."""
    dit: LongCatImageDiT
    vae: ImageVAE
    text_encoder: torch.nn.Module
    tokenizer: object
    text_processor: object  # Qwen2VLProcessor (prompt rewrite)
    image_processor: object  # Qwen image processor (Edit vision context)
    scheduler: FlowSchedulerConfig
    is_edit: bool
    path: Path
    device: torch.device
    dtype: torch.dtype


def load_longcat_image(name_or_path=None, flavour="final", device=None, dtype=None, dit_device=None) -> LongCatImage:
    """dit_device: where the transformer goes if not `device` (block swap loads it into host memory first)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from model.text_qwen import load_text_processor

    root, device, dtype = resolve_load_args(name_or_path, flavour, IMAGE_FLAVOURS, device, dtype)
    missing = [p for p in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler") if not (root / p).is_dir()]
    if missing:
        raise WeightsError(f"{root}: missing component folder(s) {missing}; expected a diffusers-format LongCat-Image folder")
    index = read_json(root / "model_index.json") if (root / "model_index.json").exists() else {}
    is_edit = index.get("_class_name") in EDIT_PIPELINES if index else flavour == "edit"
    if flavour == "edit" and index and not is_edit:
        raise WeightsError(f"{root}: model_flavour edit needs a LongCat-Image-Edit folder, this one is {index['_class_name']}")

    dit = load_image_dit(root / "transformer", dit_device or device, dtype)
    vae = load_image_vae(root / "vae", device, dtype)
    if dit.cfg.in_channels != 64 or vae.config.latent_channels != 16 or vae.downscale_factor != 8:
        raise WeightsError(f"{root}: transformer in_channels={dit.cfg.in_channels} and vae latent_channels="
                           f"{vae.config.latent_channels} / downscale {vae.downscale_factor} do not fit LongCat-Image "
                           f"(64 = 16 x 2x2 packed channels, 8x VAE)")
    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(require_safetensors(root / "text_encoder"),
                                                                      dtype=dtype, use_safetensors=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    if not (root / "text_processor" / "preprocessor_config.json").exists():
        raise WeightsError(f"{root}: text_processor/preprocessor_config.json is missing (the Qwen image processor config)")
    text_processor = load_text_processor(root)
    image_processor = text_processor.image_processor
    sched_file = root / "scheduler" / "scheduler_config.json"
    scheduler = FlowSchedulerConfig.from_dict(read_json(sched_file)) if sched_file.exists() else FlowSchedulerConfig()
    return LongCatImage(dit, vae, text_encoder, tokenizer, text_processor, image_processor, scheduler, is_edit, root,
                        device, dtype)


# -----------------------------------------------------------------------------
# LongCat-Video: dit/ vae/ text_encoder/ tokenizer/ scheduler/ [lora/]

VIDEO_FLAVOURS = {"final": "meituan-longcat/LongCat-Video"}


@dataclass
class LongCatVideo:
    dit: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    shift: float  # static flow shift from scheduler_config.json (12.0 in the release)
    path: Path
    device: torch.device
    dtype: torch.dtype


def load_longcat_video(name_or_path=None, flavour="final", device=None, dtype=None, dit_device=None) -> LongCatVideo:
    """dit_device: where the DiT goes if not `device` (block swap loads it into host memory first)."""
    from model.dit_video import LongCatVideoDiT, VideoDiTConfig
    from model.text_umt5 import load_umt5
    from model.vae_video import VideoVAE, VideoVAEConfig, convert_wan_vae_state_dict, is_wan_original_state_dict

    root, device, dtype = resolve_load_args(name_or_path, flavour, VIDEO_FLAVOURS, device, dtype)
    missing = [p for p in ("dit", "vae", "text_encoder", "tokenizer") if not (root / p).is_dir()]
    if missing:
        raise WeightsError(f"{root}: missing component folder(s) {missing}; expected a LongCat-Video folder "
                           "(dit/, vae/, text_encoder/, tokenizer/, scheduler/)")
    try:
        dit_cfg = VideoDiTConfig.from_dict(read_json(root / "dit" / "config.json"))
        vae_cfg = VideoVAEConfig.from_dict(read_json(root / "vae" / "config.json"))
        sched_file = root / "scheduler" / "scheduler_config.json"
        sched = FlowSchedulerConfig.from_dict(read_json(sched_file)) if sched_file.exists() else None
    except (ValueError, NotImplementedError) as e:
        raise WeightsError(f"{root}: {e}") from None
    if sched is not None and sched.use_dynamic_shifting:
        raise WeightsError(f"{sched_file}: LongCat-Video uses a static shift (use_dynamic_shifting false)")
    with torch.device("meta"):
        dit, vae = LongCatVideoDiT(dit_cfg), VideoVAE(vae_cfg)
    dit = load_weights(dit, load_safetensors(root / "dit"), f"dit ({root / 'dit'})", dtype, dit_device or device).eval()
    sd = load_safetensors(root / "vae")
    vae = load_weights(vae, convert_wan_vae_state_dict(sd) if is_wan_original_state_dict(sd) else sd,
                       f"vae ({root / 'vae'})", dtype, device).eval()
    tokenizer, text_encoder = load_umt5(root, device=device, dtype=dtype)
    return LongCatVideo(dit, vae, text_encoder, tokenizer, sched.shift if sched else 12.0, root, device, dtype)
