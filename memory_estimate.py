"""
`--estimate_memory`: the expected peak memory of a training run, from the config alone. Reads the config.json files of
the model folder (transformer or dit, vae, text_encoder), the dtypes in its safetensors headers (no tensor data) and
the data backend JSON, builds the models on the meta device (no memory), prints one table and returns;
train_image.py / train_video.py call it right after their config checks, before data discovery or model loading.

    python train_video.py --config config.json --estimate_memory
    est = estimate(cfg, "longcat_video", device="cuda", world_size=8)   # what-if for another machine
    print(format_estimate(est))

The formula (bytes). P = parameter count, b = bytes of one activation element (bf16 autocast on CUDA: 2; CPU: 4),
S = tokens of the largest bucket x train_batch_size, D = model width, n = DiT blocks, w = world size:
  weights      frozen DiT tensors x bytes of base_model_precision (quantized linears: 1 B per weight for int8 / fp8,
               0.5 + 4/64 B for nf4, + a 4 B scale per output row; the skip list is quant/convert.dit_skip's), only
               the resident blocks under block swap (two slots of the largest swapped group), / w under FSDP (plus
               two gathered blocks);
               + trainable P x 4 (fp32 master weights, trainer.py), / w under FSDP
  trainable    trainable P x (4 gradient [+ 4 DDP bucket copy when w > 1] + 8 AdamW | 2 AdamW8bit [+ 4 EMA]),
               / w under FSDP
  activations  (n x SAVED + WORK) x S x D x b / context_parallel_size: SAVED = what one block keeps for backward
               (gradient checkpointing: its input, its SDPA output and the copy the next segment reads; without it:
               every intermediate), WORK = one block's recompute + backward working set; per family below
  encoders     text encoder + VAE weights and one VAE encode batch while the caches fill (the DiT waits in host
               memory meanwhile: on CUDA it is not on the device yet; on CPU it is the same memory);
               after caching they leave the GPU, and are freed when no validation needs them (on CPU, weights that
               are the safetensors file mapping stay resident, and so do a quantized layer's original pages)
  runtime      CPU: the import RSS of a training script; CUDA: context + kernels + 10% allocator slack
The peak is the larger of the caching phase and the training phase. Calibrated on CPU against the measured peak RSS
of real runs (bench/bench_memory_estimate.py; bench/RESULTS.md): the tiny and a ~1B config are within 25%.
"""
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from config import read_json_config

GB = 1e9
# (SAVED, WORK) in units of S x D x b per block, read off model/dit_image.py and model/dit_video.py:
#   image, checkpointed: block input + SDPA output (saved by the selective checkpoint) + its [B, S, D] copy = 3;
#     recompute of the attention segment (modulated input, q/k/v, normed q/k, RoPE'd q/k, the joint concat, SDPA)
#     and its backward (their gradients) ~ 14;
#   video, checkpointed: block input + the attention half's output (the FFN chunks' input) = 2, the text K/V per
#     block is L-sized (see TEXT_SAVED); recompute + backward of the attention half with its fp32 islands
#     (modulate, RMSNorm, RoPE and the gated add run in fp32: 2b) ~ 24;
#   no checkpointing: everything the block's autograd graph holds, ~ 24 (image: attention ~14 + MLP 4D ~10) and ~ 34
#     (video: attention ~18 + cross-attention ~4 + SwiGLU 2 x 2.7D ~12); the working set is one backward node's.
ACTIVATION_UNITS = {("longcat_image", True): (3, 14), ("longcat_image", False): (24, 6),
                    ("longcat_video", True): (2, 24), ("longcat_video", False): (34, 8)}
TEXT_SAVED = 4  # video: per block, the text K/V (2 x L x D) and their normed copies, in units of L x D x b
CPU_RUNTIME = 0.48 * GB  # peak RSS of a training script on the tiny model: imports + first steps (measured, RESULTS)
CUDA_CONTEXT = 0.6 * GB  # CUDA context, cuBLAS / cuDNN workspaces
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation on top of the dynamic memory
SWAP_IN_FLIGHT = 2  # block swap / FSDP: the block computing and the next one being copied in (gathered)
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3, 9 / 16)  # the aspects a bucket may take (photo and video sizes)


@dataclass
class Estimate:
    """The terms of one run's peak memory (bytes) and what they were computed from."""
    device: str
    inputs: dict
    caching: dict = field(default_factory=dict)  # term -> bytes while the latent / prompt caches fill
    training: dict = field(default_factory=dict)  # term -> bytes during the training steps
    notes: list = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(sum(self.caching.values()), sum(self.training.values()))


# -----------------------------------------------------------------------------
# the models, on the meta device


def model_folder(cfg, family: str) -> Path:
    """The local model folder; a hub id fetches its config.json files only (never the weights)."""
    from model.loading import IMAGE_FLAVOURS, VIDEO_FLAVOURS, WeightsError
    flavours = IMAGE_FLAVOURS if family == "longcat_image" else VIDEO_FLAVOURS
    name = cfg.pretrained_model_name_or_path or flavours.get(cfg.model_flavour)
    if name and os.path.isdir(name):
        return Path(name)
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(name), allow_patterns=["*config.json", "model_index.json"]))
    except Exception as e:  # offline, no network, gated, not a hub id ...
        raise WeightsError(f"{name!r}: not a local model folder and its config.json files cannot be fetched "
                           f"({type(e).__name__})") from None


def meta_models(root: Path, family: str):
    """(dit, vae, text_encoder) built from the folder's config.json files on the meta device."""
    from transformers import AutoConfig
    with torch.device("meta"):
        if family == "longcat_image":
            from transformers import Qwen2_5_VLForConditionalGeneration
            from model.dit_image import ImageDiTConfig, LongCatImageDiT
            from model.vae_image import ImageVAE, ImageVAEConfig
            dit = LongCatImageDiT(ImageDiTConfig.from_dict(read_json_config(root / "transformer" / "config.json")))
            vae = ImageVAE(ImageVAEConfig.from_dict(read_json_config(root / "vae" / "config.json")))
            te = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(root / "text_encoder"))
        else:
            from transformers import UMT5EncoderModel
            from model.dit_video import LongCatVideoDiT, VideoDiTConfig
            from model.vae_video import VideoVAE, VideoVAEConfig
            dit = LongCatVideoDiT(VideoDiTConfig.from_dict(read_json_config(root / "dit" / "config.json")))
            vae = VideoVAE(VideoVAEConfig.from_dict(read_json_config(root / "vae" / "config.json")))
            te = UMT5EncoderModel(AutoConfig.from_pretrained(root / "text_encoder"))
    return dit, vae.requires_grad_(False), te.requires_grad_(False)  # the encoders are frozen (frozen_bytes)


def dit_blocks(dit: nn.Module) -> list:
    """The DiT's blocks in execution order (block swap moves the last ones)."""
    if hasattr(dit, "blocks"):
        return list(dit.blocks)
    return list(dit.transformer_blocks) + list(dit.single_transformer_blocks)


def linear_bytes(m: nn.Linear, fmt) -> float:
    """A frozen linear's weight stored in `fmt` (quant/linear.py): the weight plus a fp32 scale per output row."""
    n = m.in_features * m.out_features
    per_weight = {"int8": 1, "fp8": 1, "int8-bnb": 1, "nf4-bnb": 0.5 + 4 / 64}[fmt]  # nf4: fp32 absmax per 64
    return n * per_weight + m.out_features * 4


def frozen_bytes(module: nn.Module, dtype_bytes: int, quantized: set, fmt, prefix: str = "") -> float:
    """Bytes of the frozen tensors under `module`: quantized linears (names in `quantized`) in `fmt`, the rest in
    the weight dtype; trainable parameters are not counted here."""
    total = 0.0
    for name, m in module.named_modules(prefix=prefix.rstrip(".")):
        if name in quantized:
            total += linear_bytes(m, fmt) + (m.bias.numel() * dtype_bytes if m.bias is not None else 0)
            continue
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        total += sum(t.numel() * dtype_bytes for t in own if not t.requires_grad)
    return total


# -----------------------------------------------------------------------------
# the largest bucket of the data backend config


def largest_bucket(cfg, family: str) -> tuple:
    """((W, H, F), batch size, dataset id) of the bucket with the most tokens any training dataset can produce:
    data/datasets.py parses the file, data/buckets.py plans a source image of each aspect in ASPECTS (or of the
    dataset's crop_aspect_buckets) within its aspect limits; F is the clip length (1 for images)."""
    from data.buckets import BucketPlanner
    from data.datasets import GLOBAL_DEFAULT_KEYS, VIDEO_DEFAULT_KEYS, load_datasets
    video = family == "longcat_video"
    keys = GLOBAL_DEFAULT_KEYS | (VIDEO_DEFAULT_KEYS if video else set())
    specs = load_datasets(cfg.data_backend_config, is_edit=cfg.model_flavour == "edit", is_video=video,
                          defaults={k: getattr(cfg, k) for k in keys}, log=lambda *a: None)
    best = None
    for spec in specs:
        if spec.dataset_type == "conditioning":
            continue
        planner = BucketPlanner(spec, alignment=cfg.aspect_bucket_alignment)
        crop_aspects = spec.crop and spec.crop_aspect_buckets
        aspects = [b["aspect"] for b in spec.crop_aspect_buckets] if crop_aspects else ASPECTS
        lo, hi = spec.minimum_aspect_ratio or 0, spec.maximum_aspect_ratio or math.inf
        frames = 1
        if video:  # aspect_ratio: every clip is num_frames long; resolution_frames: up to max_frames
            v = spec.video
            frames = v.num_frames if v.bucket_strategy == "aspect_ratio" or not v.max_frames else \
                1 + (v.max_frames - 1) // v.frames_step() * v.frames_step()
        for a in aspects:
            if not lo <= a <= hi:
                continue
            w, h = planner.plan((round(8192 * min(a, 1)), round(8192 / max(a, 1))), "estimate").bucket
            batch = spec.train_batch_size or cfg.train_batch_size
            key = (w * h * ((frames - 1) // 4 + 1) * batch, (w, h, frames), batch, spec.id)
            best = max(best or key, key)
    if best is None:
        from config import ConfigError
        raise ConfigError(f"data_backend_config {cfg.data_backend_config}: no training dataset to estimate from")
    return best[1:]


def tokens(family: str, bucket: tuple, edit: bool) -> tuple:
    """(image or video tokens, text tokens) of one sample: 16 px per token side (VAE /8, 2x2 patches), video
    latent frames (F - 1) / 4 + 1; text: 512 prompt tokens (the Qwen T2I template's, umT5's)."""
    w, h, f = bucket
    grid = (w // 16) * (h // 16)
    if family == "longcat_video":
        return grid * ((f - 1) // 4 + 1), 512
    return grid * (2 if edit else 1), 512


# -----------------------------------------------------------------------------
# the terms


def dit_weights(dit, cfg, weight_bytes: int, fmt, swap: int, group: int, fsdp_world: int) -> tuple:
    """(frozen DiT bytes on the device during training, bytes of the quantized layers' original weights, trainable
    master bytes). Block swap (model/block_swap.py): the last `swap` blocks leave the device in groups of `group`,
    two device slots the size of the largest group hold the one running and the one prefetched. FSDP: a 1/w shard
    of everything, plus the two blocks gathered at a time."""
    from quant.convert import dit_skip, quantizable
    quantized = set(quantizable(dit, dit_skip(cfg.quantize_modulation))) if fmt else set()
    frozen = frozen_bytes(dit, weight_bytes, quantized, fmt)
    originals = sum(dit.get_submodule(n).weight.numel() for n in quantized) * weight_bytes
    blocks = dit_blocks(dit)
    names = {id(m): n for n, m in dit.named_modules()}
    per_block = [frozen_bytes(b, weight_bytes, quantized, fmt, prefix=names[id(b)]) for b in blocks]
    if swap:
        swapped = per_block[len(blocks) - swap:]
        groups = [sum(swapped[i:i + group]) for i in range(0, len(swapped), group)]
        frozen -= sum(swapped) - SWAP_IN_FLIGHT * max(groups)
    trainable = sum(p.numel() for p in dit.parameters() if p.requires_grad) * 4
    if fsdp_world > 1:
        frozen = frozen / fsdp_world + SWAP_IN_FLIGHT * max(per_block)
    return frozen, originals, trainable / fsdp_world


def checkpoint_element_bytes(folder: Path) -> int:
    """Bytes per element of a DiT checkpoint's tensors, from the dtypes in its safetensors header (the JSON in front
    of the data; no tensor is read); 2 (the releases' bf16) for a folder without weights."""
    import json
    import struct
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return 2
    with open(files[0], "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return 4 if any(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__") else 2


def trainable_state(n_trainable: int, optimizer: str, use_ema: bool, ddp: bool, fsdp_world: int) -> dict:
    from optim import OPTIMIZERS
    state = {"gradients (fp32)": n_trainable * 4 * (2 if ddp else 1),
             "optimizer states": n_trainable * (2 if OPTIMIZERS[optimizer] == "adamw8bit" else 8)}
    if use_ema:
        state["EMA (fp32)"] = n_trainable * 4
    return {k: v / fsdp_world for k, v in state.items()}


def activations(family: str, dit, S: int, L: int, b: int, ckpt: bool, cp: int) -> tuple:
    """(saved for backward over all blocks, one block's recompute + backward working set), bytes."""
    saved, work = ACTIVATION_UNITS[(family, ckpt)]
    D, n = (dit.cfg.hidden_size, dit.cfg.depth) if family == "longcat_video" else (dit.cfg.dim, len(dit_blocks(dit)))
    text = TEXT_SAVED * L * D * b if family == "longcat_video" else 0  # the image DiT's text is inside S
    return n * (saved * S * D * b / cp + text), work * S * D * b / cp


def vae_encode_bytes(vae, family: str, bucket: tuple, batch: int, b: int) -> float:
    """One VAE encode batch (vae_batch_size samples) without gradients, in maps of the first level's channels at full
    resolution: ~5 for the image VAE (a resnet's input, GroupNorm temporaries, conv output), ~8 for the Wan VAE,
    which runs 4 frames at a time with 2 cached frames per causal conv (6 frames) and concatenates them (measured on
    CPU: bench/RESULTS.md)."""
    w, h, f = bucket
    if family == "longcat_video":
        return 8 * batch * vae.config.base_dim * 6 * w * h * b
    return 5 * batch * vae.config.block_out_channels[0] * w * h * b


def encoder_bytes(te, cfg, weight_bytes: int) -> float:
    from quant.convert import TEXT_ENCODER_SKIP, check_precision, quantizable
    fmt = check_precision(cfg.text_encoder_1_precision, "text_encoder_1_precision")
    quantized = set(quantizable(te, TEXT_ENCODER_SKIP)) if fmt else set()
    return frozen_bytes(te, weight_bytes, quantized, fmt)


def estimate(cfg, family: str, device: str = "cpu", world_size: int = 1) -> Estimate:
    """Every term of the peak for `cfg` on `device` with `world_size` processes (the docstring's formula)."""
    from model.lora import LONGCAT_IMAGE_LORA_TARGETS, LONGCAT_VIDEO_LORA_TARGETS, apply_lora
    from quant.convert import check_precision
    from trainer import swaps_blocks, uses_fsdp
    on_gpu = device == "cuda"
    weight_bytes = 4 if not on_gpu or cfg.base_model_precision == "fp32" else 2
    b = 2 if on_gpu and cfg.mixed_precision == "bf16" else 4
    strategy = "fsdp" if uses_fsdp(cfg) else "ddp"
    cp = max(1, getattr(cfg, "context_parallel_size", 1))  # a train_video.py option
    fsdp_world = world_size // cp if strategy == "fsdp" and world_size > 1 else 1
    # block swap lowers the device's memory; on CPU only the disk store lowers the process's (host to host otherwise)
    swapping = on_gpu or cfg.musubi_block_swap_device == "disk" or bool(cfg.group_offload_to_disk_path)
    fmt = check_precision(cfg.base_model_precision)
    root = model_folder(cfg, family)
    dit, vae, te = meta_models(root, family)
    loaded = sum(t.numel() for t in [*dit.parameters(), *dit.buffers()]) * weight_bytes  # what caching sees
    edit = cfg.model_flavour == "edit"
    bucket, batch, ds = largest_bucket(cfg, family)
    n_img, L = tokens(family, bucket, edit)
    S = batch * (n_img + (L if family == "longcat_image" else 0))  # the image DiT attends over [text; image]
    if cfg.model_type == "lora":
        targets = cfg.peft_lora_target_modules or (LONGCAT_IMAGE_LORA_TARGETS if family == "longcat_image"
                                                   else LONGCAT_VIDEO_LORA_TARGETS)
        with torch.device("meta"):
            apply_lora(dit, targets, rank=cfg.lora_rank)
    else:
        dit.requires_grad_(True)
    n_trainable = sum(p.numel() for p in dit.parameters() if p.requires_grad)
    n_blocks = len(dit_blocks(dit))
    swap = (n_blocks if cfg.enable_group_offload else min(cfg.musubi_blocks_to_swap, n_blocks)) if swapping else 0
    group = cfg.group_offload_blocks_per_group if cfg.enable_group_offload else 1
    frozen, originals, master = dit_weights(dit, cfg, weight_bytes, fmt, swap, group, fsdp_world)
    saved, work = activations(family, dit, S, batch * L, b, cfg.gradient_checkpointing, cp)
    te_bytes = encoder_bytes(te, cfg, weight_bytes)
    vae_bytes = sum(t.numel() for t in [*vae.parameters(), *vae.buffers()]) * weight_bytes
    caching_act = vae_encode_bytes(vae, family, bucket, cfg.vae_batch_size, weight_bytes)
    w, h, f = bucket
    est = Estimate(device, dict(model=str(root), bucket=f"{w}x{h}" + (f"@{f}" if family == "longcat_video" else ""),
                                dataset=ds, batch=batch, tokens=S, trainable_params=n_trainable,
                                precision=cfg.base_model_precision, blocks_swapped=swap, world_size=world_size,
                                strategy=strategy if world_size > 1 else "single",
                                checkpointing=cfg.gradient_checkpointing))
    runtime = CPU_RUNTIME if not on_gpu else CUDA_CONTEXT
    # train_*.py keep the DiT in host memory until the Trainer moves it (after caching; quantized layer by layer)
    est.caching = {"DiT weights (not yet quantized)": 0 if on_gpu else loaded,
                   "text encoder + VAE weights": te_bytes + vae_bytes, "VAE encode batch": caching_act,
                   "runtime": runtime}
    # after caching the encoders are parked (model/encoder_offload.py): in host memory when validation will need them
    # (the same RAM on a CPU run), freed otherwise; but on CPU a text encoder loaded without a dtype conversion is
    # the safetensors file mapping, which stays resident after the park (one tensor keeps the whole mapping alive)
    validates = not cfg.validation_disable and cfg.validation_step_interval > 0 and (
        cfg.validation_prompt is not None or cfg.validation_using_datasets or cfg.eval_dataset_id is not None)
    encoders_stay = not on_gpu and (validates or checkpoint_element_bytes(root / "text_encoder") == weight_bytes)
    # CPU, checkpoint already in the compute dtype: the weights ARE the safetensors file mapping, which lives while
    # any tensor of the file does, so the quantized layers' original pages stay resident next to their 8-bit copies
    folder = root / ("transformer" if family == "longcat_image" else "dit")
    mapped = originals if not on_gpu and checkpoint_element_bytes(folder) == weight_bytes else 0
    est.training = {"DiT frozen weights": frozen, "trainable weights (fp32 master)": master,
                    **({"file pages of the quantized layers (CPU)": mapped} if mapped else {}),
                    **trainable_state(n_trainable, cfg.optimizer, cfg.use_ema, strategy == "ddp" and world_size > 1,
                                      fsdp_world),
                    "activations saved for backward": saved, "one block's recompute + backward": work,
                    "text encoder + VAE weights": te_bytes + vae_bytes if encoders_stay else 0,
                    "runtime": runtime}
    if on_gpu:
        slack = ALLOCATOR_SLACK * (saved + work)
        est.training["runtime"] += slack
        est.caching["runtime"] += ALLOCATOR_SLACK * caching_act
    if swap:
        est.notes.append(f"block swap: {swap} blocks' frozen weights live in {cfg.musubi_block_swap_device} "
                         "(not in this total)")
    if not swapping and swaps_blocks(cfg):
        est.notes.append("block swap to host memory saves nothing on CPU (musubi_block_swap_device disk does)")
    return est


def measured_peak_rss(cmd: list, cwd=None, env=None) -> tuple:
    """(exit status, peak RSS bytes, stderr) of `cmd`, the kernel's high-water mark: nothing sampled, nothing missed.
    The command is forked from a bare Python launcher, not from the caller: Linux carries a parent's RSS high-water mark
    into a forked child's ru_maxrss (through fork and exec), so a child of a 5 GB process would read >= 5 GB."""
    import subprocess
    import sys
    launcher = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execv(sys.argv[1], sys.argv[1:])\n"
                "_, status, usage = os.wait4(pid, 0)\nprint('PEAK_RSS_KB', usage.ru_maxrss, flush=True)\n"
                "sys.exit(os.waitstatus_to_exitcode(status))")
    out = subprocess.run([sys.executable, "-c", launcher, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    kb = int(out.stdout.rsplit("PEAK_RSS_KB", 1)[1])
    return out.returncode, kb * 1024, out.stderr


# -----------------------------------------------------------------------------
# the printout


def format_estimate(est: Estimate) -> str:
    i = est.inputs
    lines = [f"memory estimate on {est.device}: {i['model']}",
             f"  largest bucket {i['bucket']} x batch {i['batch']} (dataset {i['dataset']}): {i['tokens']:,} tokens; "
             f"{i['trainable_params']:,} trainable parameters; base {i['precision']}; {i['blocks_swapped']} blocks "
             f"swapped; {i['world_size']} process(es), {i['strategy']}; checkpointing {i['checkpointing']}"]
    width = max(len(k) for k in [*est.caching, *est.training])
    for phase, terms in (("caching (encoders on the device)", est.caching), ("training", est.training)):
        lines.append(f"  {phase}:")
        lines += [f"    {k:<{width}}  {v / GB:8.2f} GB" for k, v in terms.items()]
        lines.append(f"    {'total':<{width}}  {sum(terms.values()) / GB:8.2f} GB")
    lines.append(f"  expected peak: {est.peak / GB:.2f} GB per process")
    lines += [f"  note: {n}" for n in est.notes]
    return "\n".join(lines)


def print_estimate(cfg, family: str):
    """What --estimate_memory prints: this machine's device, the torchrun world size (WORLD_SIZE), exit 0."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(format_estimate(estimate(cfg, family, device, int(os.environ.get("WORLD_SIZE", "1")))))
