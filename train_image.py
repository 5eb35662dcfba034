"""
Fine-tune LongCat-Image (text-to-image, flavours final/dev) or LongCat-Image-Edit with LoRA or in full.

    python train_image.py --config config.json                       # a SimpleTuner config.json works as is
    python train_image.py --config configs/demo_image.json           # the embedded CPU demo (tiny model, synthetic data)
    python train_image.py --config config.json --max_train_steps=10 --learning_rate=5e-5
    torchrun --nproc_per_node 8 train_image.py --config config.json  # DDP: NCCL on GPU, gloo on CPU

The story of a run: config -> data discovery (bad samples excluded and listed in output_dir/data_report.json) ->
models -> latent and text caches -> LoRA / full -> optimizer -> resume -> the loop (flow-matching loss, clipping,
checkpoints, validation images, metrics.jsonl) -> LoRA export (diffusers/PEFT and ComfyUI layouts).

The objective is the official one (specs/longcat_image.md §8.1): x_sigma = (1 - sigma) x0 + sigma eps, the network
predicts eps - x0, MSE in fp32; sigma = sigmoid(N(0, s)) then shifted; Edit appends the clean reference tokens
(modality 2, same timestep) and the loss covers the target tokens only. Every random draw of a step (noise, sigma, posterior
sample, caption choice and dropout) comes from one generator seeded by `seed` and drawn for the whole global batch, so
a resumed run equals the uninterrupted one, and N processes equal one with the same global batch (LoRA dropout
masks, drawn per rank, are the one exception: with lora_dropout > 0 the runs agree in distribution only).
"""
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from config import ConfigError, load_config

# -----------------------------------------------------------------------------
# config: SimpleTuner option names and defaults (specs/simpletuner_compat.md §3), plus a few of ours


@dataclass
class TrainImageConfig:
    model_type: str = "lora"  # lora | full
    model_family: str = "longcat_image"
    model_flavour: str = "final"  # final | dev | edit
    pretrained_model_name_or_path: Optional[str] = None
    base_model_precision: str = "no_change"  # no_change | bf16 | fp32 | int8-*/fp8-* (ours) | int8-bnb | nf4-bnb
    data_backend_config: str = "config/multidatabackend.json"
    output_dir: str = "output/longcat-image"
    seed: int = 42
    # batches and steps
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 0  # 0: num_train_epochs decides
    num_train_epochs: int = 1
    # optimizer and schedule
    optimizer: str = "adamw_bf16"
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    lr_num_cycles: float = 1.0
    lr_power: float = 0.8
    lr_end: float = 4e-7
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 2.0
    grad_clip_method: str = "value"  # value | norm (SimpleTuner's default is value)
    mixed_precision: str = "bf16"  # bf16 | no; bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = True
    use_ema: bool = False
    ema_decay: float = 0.995
    # LoRA
    lora_rank: int = 16
    lora_alpha: Optional[float] = None  # None: = rank
    lora_dropout: float = 0.1
    lora_init_type: str = "default"  # default | gaussian
    peft_lora_target_modules: Optional[list] = None  # None: the official LongCat LoRA set
    init_lora: Optional[str] = None
    # objective
    caption_dropout_probability: float = 0.1
    flow_schedule_shift: float = 3.0
    flow_schedule_auto_shift: bool = False  # mu from each batch's token count instead of the static shift
    flow_sigmoid_scale: float = 1.0
    flow_use_uniform_schedule: bool = False
    latent_sample_mode: str = "sample"  # sample (official trainer) | mode: how cached posteriors become latents
    # data defaults for every dataset that does not set them (SimpleTuner global flags)
    aspect_bucket_alignment: int = 64
    resolution: Optional[float] = None
    resolution_type: Optional[str] = None
    caption_strategy: Optional[str] = None
    instance_prompt: Optional[str] = None
    minimum_image_size: Optional[float] = None
    maximum_image_size: Optional[float] = None
    target_downsample_size: Optional[float] = None
    crop: Optional[bool] = None
    crop_style: Optional[str] = None
    crop_aspect: Optional[str] = None
    cache_dir_vae: Optional[str] = None
    vae_batch_size: int = 4
    # SimpleTuner options that would change what is trained and that this version does not implement: accepted only
    # at their neutral value, so a config that relies on them fails at start-up instead of training something else
    lora_type: str = "standard"
    use_dora: bool = False
    loss_type: str = "l2"
    flow_use_beta_schedule: bool = False
    flow_custom_timesteps: Optional[str] = None
    train_text_encoder: bool = False
    pretrained_transformer_model_name_or_path: Optional[str] = None
    pretrained_vae_model_name_or_path: Optional[str] = None
    musubi_blocks_to_swap: int = 0
    enable_group_offload: bool = False
    fsdp_enable: bool = False
    deepspeed_config: Optional[str] = None
    # checkpoints
    checkpoint_step_interval: int = 500
    checkpoints_total_limit: int = 5
    resume_from_checkpoint: Optional[str] = "latest"
    lora_format: str = "diffusers"  # the main export; a ComfyUI copy is always written too
    # validation
    validation_prompt: Optional[str] = None
    validation_negative_prompt: str = ""
    validation_resolution: Optional[str] = None  # None: 1024x1024 (T2I); the official size rule (Edit)
    validation_guidance: float = 4.5
    validation_num_inference_steps: int = 30
    validation_seed: int = 42
    validation_step_interval: int = 100
    num_validation_images: int = 1
    validation_using_datasets: bool = False
    eval_dataset_id: Optional[str] = None
    validation_disable: bool = False


ALIASES = {"checkpointing_steps": "checkpoint_step_interval", "validation_steps": "validation_step_interval"}
NOT_YET = dict(lora_type="standard", use_dora=False, loss_type="l2", flow_use_beta_schedule=False,
               flow_custom_timesteps=None, train_text_encoder=False, pretrained_transformer_model_name_or_path=None,
               pretrained_vae_model_name_or_path=None, musubi_blocks_to_swap=0, enable_group_offload=False,
               fsdp_enable=False, deepspeed_config=None)


def check_config(cfg: TrainImageConfig):
    from optim import check_optimizer_options
    if cfg.model_family != "longcat_image":
        raise ConfigError(f"model_family {cfg.model_family!r}: train_image.py trains longcat_image "
                          "(LongCat-Video: train_video.py)")
    choices = dict(model_type=("lora", "full"), model_flavour=("final", "dev", "edit"),
                   grad_clip_method=("value", "norm"), mixed_precision=("bf16", "no", "fp16"),
                   latent_sample_mode=("sample", "mode"), lora_init_type=("default", "gaussian"),
                   lora_format=("diffusers", "comfyui", "peft"))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key} {getattr(cfg, key)!r}: expected one of {', '.join(allowed)}")
    from quant.convert import check_precision
    try:
        quantized = check_precision(cfg.base_model_precision) is not None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if quantized and cfg.model_type != "lora":
        raise ConfigError(f"base_model_precision {cfg.base_model_precision} freezes the base in 8/4 bits: it needs "
                          "model_type lora")
    for key, neutral in NOT_YET.items():
        if getattr(cfg, key) != neutral:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} is not supported by this version of train_image.py "
                              f"(remove it or set {neutral!r})")
    from data.buckets import check_alignment
    try:
        check_alignment(cfg.aspect_bucket_alignment)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha must be > 0 (or unset, meaning lora_rank), got {cfg.lora_alpha}")
    if cfg.validation_num_inference_steps < 1 or cfg.num_validation_images < 1:
        raise ConfigError("validation_num_inference_steps and num_validation_images must be >= 1")
    if cfg.init_lora and (cfg.model_type != "lora" or not os.path.exists(cfg.init_lora)):
        raise ConfigError(f"init_lora {cfg.init_lora!r}: " + ("needs model_type lora" if cfg.model_type != "lora"
                                                              else "file not found"))
    if cfg.optimizer in ("adamw8bit", "bnb-adamw8bit", "ao-adamw8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"optimizer {cfg.optimizer} needs bitsandbytes (pip install bitsandbytes)") from None
    if cfg.mixed_precision == "fp16":
        raise ConfigError("mixed_precision fp16 is not supported for LongCat (it overflows); use bf16 or no")
    for key in ("train_batch_size", "gradient_accumulation_steps", "lora_rank", "vae_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.caption_dropout_probability <= 1:
        raise ConfigError("caption_dropout_probability must be in [0, 1]")
    if cfg.max_train_steps <= 0 and cfg.num_train_epochs <= 0:
        raise ConfigError("set max_train_steps or num_train_epochs to a positive number")
    check_optimizer_options(cfg.optimizer, cfg.lr_scheduler)
    if not cfg.validation_disable:
        from validate import parse_resolutions
        from model.pipeline_image import check_size
        for size in parse_resolutions(cfg.validation_resolution):
            try:
                if size:
                    check_size(*size)
            except ValueError as e:
                raise ConfigError(f"validation_resolution: {e}") from None


# -----------------------------------------------------------------------------
# small pure pieces of a step


def training_loss(dit, x0, noise, sigma, embeds, img_ids, txt_ids, ref=None):
    """Official objective on packed latents [B, N, 64]: MSE(pred, eps - x0) over the N target tokens."""
    from model.flow import interpolate, velocity_target
    x_t = interpolate(x0, noise, sigma)
    inp = x_t if ref is None else torch.cat([x_t, ref], dim=1)  # Edit: clean reference tokens after the target
    pred = dit(inp, embeds, sigma.to(x0.dtype), img_ids, txt_ids)[:, :x0.shape[1]]
    return F.mse_loss(pred.float(), velocity_target(x0, noise).float())


@dataclass
class CaptionEntry:
    """What the text cache keys on: the caption text (and, for Edit, the reference it is encoded with)."""
    caption: str
    conditioning: Optional[object] = None


def caption_variants(sample) -> list:
    return sample.caption if isinstance(sample.caption, list) else [sample.caption or ""]


def validation(cfg, m, index, step: int, is_edit: bool):
    """Render the validation prompts (Edit: references from eval_dataset_id or the training data) to
    output_dir/validation/step-<N>/ as PNGs plus one grid.png."""
    from data.images import load_image
    from model.pipeline_image import SamplingOptions
    from validate import parse_resolutions, render
    jobs = []
    if is_edit:
        if not cfg.validation_using_datasets and cfg.eval_dataset_id is None:
            return
        ds = cfg.eval_dataset_id or next(iter(index.samples))
        if ds not in index.samples:
            print(f"validation: eval_dataset_id {ds!r} is not a training dataset with references; skipped")
            return
        for s in index.samples[ds][:cfg.num_validation_images]:
            prompt = cfg.validation_prompt or caption_variants(s)[0]
            jobs.append((prompt, load_image(s.conditioning.path)))
    elif cfg.validation_prompt is not None:
        jobs.append((cfg.validation_prompt, None))
    if not jobs:
        return
    opts = SamplingOptions(num_inference_steps=cfg.validation_num_inference_steps,
                           guidance_scale=cfg.validation_guidance, progress=False)
    out = os.path.join(cfg.output_dir, "validation", f"step-{step}")
    paths = render(m, jobs, out, opts, parse_resolutions(cfg.validation_resolution), seed=cfg.validation_seed,
                   negative_prompt=cfg.validation_negative_prompt,
                   num_images=1 if is_edit else cfg.num_validation_images)
    print(f"validation: wrote {len(paths)} image(s) to {out}")


# -----------------------------------------------------------------------------


def main(argv):
    cfg = load_config(TrainImageConfig, argv, aliases=ALIASES)
    check_config(cfg)
    from checkpoint import (MetricsLogger, load_checkpoint, peak_memory_bytes, resolve_resume, rng_state,
                            rotate_checkpoints, save_checkpoint, set_aside_newer)
    from data.buckets import apply_geometry
    from data.cache import (LatentCache, TextCache, edit_compute_fn, files_fingerprint, model_identity,
                            t2i_compute_fn, vae_compute_fn)
    from data.datasets import load_datasets
    from data.discovery import discover
    from data.images import load_image, to_tensor
    from data.sampler import BucketBatchSampler
    from distributed import all_gather_object, all_reduce_mean, barrier, cleanup, init_distributed, print0
    from model.dit_image import image_position_ids, text_position_ids
    from model.flow import dynamic_shift_mu, sample_training_sigmas
    from model.loading import load_longcat_image
    from model.lora import LONGCAT_IMAGE_LORA_TARGETS, apply_lora, load_lora, save_lora
    from model.vae_image import latents_from_moments, pack_latents
    from optim import lr_at, make_optimizer, set_lr

    # ---- init -------------------------------------------------------------------------------------------------------
    dist = init_distributed()
    is_edit = cfg.model_flavour == "edit"
    device = dist.device
    on_gpu = device.type == "cuda"
    weight_dtype = torch.float32 if (not on_gpu or cfg.base_model_precision == "fp32") else torch.bfloat16
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and cfg.mixed_precision == "bf16"
                else nullcontext())
    if dist.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
    print0(f"train_image: {cfg.model_type} on LongCat-Image {cfg.model_flavour}, {dist.world_size} process(es) on "
           f"{device.type}, weights {weight_dtype}")

    # ---- data -------------------------------------------------------------------------------------------------------
    from data.datasets import GLOBAL_DEFAULT_KEYS
    defaults = {k: getattr(cfg, k) for k in GLOBAL_DEFAULT_KEYS}
    specs = load_datasets(cfg.data_backend_config, is_edit=is_edit, defaults=defaults, log=print0)
    index = discover(specs, seed=cfg.seed, alignment=cfg.aspect_bucket_alignment, is_edit=is_edit,
                     output_dir=cfg.output_dir, log=print0)  # every rank: identical, atomic writes (the report too)
    if is_edit and cfg.eval_dataset_id is not None and cfg.eval_dataset_id not in index.samples:
        raise ConfigError(f"eval_dataset_id {cfg.eval_dataset_id!r} is not a training dataset with references; "
                          f"choose one of {sorted(index.samples)}")
    if (is_edit and not cfg.validation_disable and cfg.validation_prompt is not None
            and not (cfg.validation_using_datasets or cfg.eval_dataset_id)):
        print0("note: Edit validation needs reference images: set validation_using_datasets (or eval_dataset_id); "
               "no validation images will be rendered")
    print0(index.summary())
    print0(index.bucket_table())
    sampler = BucketBatchSampler(index, batch_size=cfg.train_batch_size, seed=cfg.seed, world_size=dist.world_size,
                                 rank=dist.rank, log=print0)
    steps_per_epoch = math.ceil(sampler.batches_per_epoch / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps if cfg.max_train_steps > 0 else steps_per_epoch * cfg.num_train_epochs

    # ---- models -----------------------------------------------------------------------------------------------------
    m = load_longcat_image(cfg.pretrained_model_name_or_path, cfg.model_flavour, device=device, dtype=weight_dtype)
    dit, vae = m.dit, m.vae
    if m.is_edit != is_edit:
        raise ConfigError(f"{m.path} is a LongCat-Image{'-Edit' if m.is_edit else ''} checkpoint but model_flavour is "
                          f"{cfg.model_flavour!r}")

    # ---- caches: VAE posteriors and prompt embeddings, computed once (split across ranks) ----------------------------
    def pixels(sample):
        return to_tensor(apply_geometry(load_image(sample.path), sample.geometry))

    def vl_image(ref):  # Qwen sees the reference at half the training size (official Edit recipe)
        img = apply_geometry(load_image(ref.path), ref.geometry)
        return img.resize((img.width // 2, img.height // 2), resample=3)  # BICUBIC

    weights_id = files_fingerprint(m.path / "vae")
    latent_cache = {ds: LatentCache(spec.cache_dir_vae or os.path.join(cfg.output_dir, "cache", "vae"),
                                    model_identity({**asdict(vae.config), "dtype": str(weight_dtype)}, weights_id))
                    for ds, spec in index.specs.items()}
    text_cache = TextCache(os.path.join(cfg.output_dir, "cache", "text"),
                           model_identity({"flavour": cfg.model_flavour, "dtype": str(weight_dtype)},
                                          *(files_fingerprint(m.path / d) for d in ("text_encoder", "tokenizer",
                                                                                    "text_processor"))),
                           kind="edit" if is_edit else "t2i")
    samples = index.all_samples()
    images = samples + [s.conditioning for s in samples if s.conditioning is not None]
    vae_fn = vae_compute_fn(vae, pixels)
    for ds in sorted({s.dataset_id for s in images}):
        latent_cache[ds].build([s for s in images if s.dataset_id == ds], vae_fn, batch_size=cfg.vae_batch_size,
                               desc=f"latents {ds}", rank=dist.rank, world_size=dist.world_size, barrier=barrier)
    captions = [CaptionEntry(c, s.conditioning) for s in samples for c in caption_variants(s)]
    captions += [CaptionEntry("", s.conditioning) for s in samples] if is_edit else [CaptionEntry("")]
    text_fn = (edit_compute_fn(m.text_encoder, m.tokenizer, m.image_processor, vl_image) if is_edit
               else t2i_compute_fn(m.text_encoder, m.tokenizer))
    text_cache.build(captions, text_fn, batch_size=4, desc="prompts", rank=dist.rank, world_size=dist.world_size,
                     barrier=barrier)
    if cfg.validation_disable or cfg.validation_prompt is None and not (is_edit and cfg.validation_using_datasets):
        m.text_encoder.to("cpu")  # not needed again: training reads the cache (encoder offload)

    # ---- trainable parameters ---------------------------------------------------------------------------------------
    from quant.convert import precision_note, quantize_model
    if precision_note(cfg.base_model_precision):
        swapped = quantize_model(dit, cfg.base_model_precision)
        print0(f"{precision_note(cfg.base_model_precision)} ({len(swapped)} linear layers quantized)")
    if cfg.model_type == "lora":
        targets = cfg.peft_lora_target_modules or LONGCAT_IMAGE_LORA_TARGETS
        torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
        adapted = apply_lora(dit, targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             init=cfg.lora_init_type)
        if cfg.init_lora:
            load_lora(cfg.init_lora, dit)
        print0(f"LoRA rank {cfg.lora_rank} alpha {cfg.lora_alpha or cfg.lora_rank} on {len(adapted)} modules")
    else:
        dit.requires_grad_(True)
    torch.manual_seed(cfg.seed + dist.rank)  # the global RNG feeds only LoRA dropout: a different mask per rank
    for p in dit.parameters():  # trainable weights are kept in fp32 (master weights); autocast does the rest
        if p.requires_grad:
            p.data = p.data.float()
    dit.gradient_checkpointing = cfg.gradient_checkpointing
    dit.train()
    compute_dtype = dit.x_embedder.weight.dtype  # fp32 when the whole DiT trains (autocast, if on, does bf16 math)
    trainable = {n: p for n, p in dit.named_parameters() if p.requires_grad}
    print0(f"trainable parameters: {sum(p.numel() for p in trainable.values()):,}")
    model = dit
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(dit, device_ids=[device.index] if on_gpu else None)
    ema = {n: p.detach().clone() for n, p in trainable.items()} if cfg.use_ema else None

    optimizer = make_optimizer(trainable.values(), cfg.optimizer, cfg.learning_rate, (cfg.adam_beta1, cfg.adam_beta2),
                               cfg.adam_weight_decay, cfg.adam_epsilon)
    lr_kw = dict(base_lr=cfg.learning_rate, schedule=cfg.lr_scheduler, warmup=cfg.lr_warmup_steps, total=max_steps,
                 num_cycles=cfg.lr_num_cycles, power=cfg.lr_power, lr_end=cfg.lr_end)

    # ---- resume -----------------------------------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(cfg.seed)  # every random draw of the loop, for the whole global batch
    step = 0
    ckpt_path = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint, log=print0)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, optimizer=optimizer, log=print0)
        missing = set(trainable) - set(ckpt.model_tensors)
        if missing:
            raise ConfigError(f"{ckpt_path} does not hold this run's trainable weights (e.g. {sorted(missing)[:3]}); "
                              "was it written with another model_type / LoRA targets?")
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(ckpt.model_tensors[n])
            if ema is not None:
                for n in ema:
                    ema[n].copy_(ckpt.extra_tensors.get(f"ema.{n}", trainable[n]))
        gen.set_state(ckpt.extra_tensors["generator"])
        sampler.load_state_dict(ckpt.state["sampler"], log=print0)
        step = ckpt.step
        set_aside_newer(cfg.output_dir, step, log=print0)
        print0(f"resumed from {ckpt_path} at step {step}")
    metrics = MetricsLogger(os.path.join(cfg.output_dir, "metrics.jsonl"), resume_step=step if step else None) \
        if dist.is_main else None

    # ---- helpers that read the caches -------------------------------------------------------------------------------
    def latents(entries, sl, global_batch):  # cached posteriors -> normalised, packed latents [B, N, 64]
        mean = torch.stack([e["mean"] for e in entries]).float()
        logvar = torch.stack([e["logvar"] for e in entries]).float()
        sample = cfg.latent_sample_mode == "sample"
        eps = torch.randn((global_batch, *mean.shape[1:]), generator=gen)[sl] if sample else None
        return pack_latents(vae.normalize(latents_from_moments(mean, logvar, sample, eps=eps))).to(device, compute_dtype)

    def make_batch(batch):
        """This rank's share of one global batch; draws for every global position so all ranks stay in step."""
        B = len(batch)  # a dataset may override train_batch_size
        global_batch, sl = B * dist.world_size, slice(dist.rank * B, (dist.rank + 1) * B)
        w, h = batch[0].geometry.bucket
        variant = torch.randint(0, 1 << 30, (global_batch,), generator=gen)[sl]
        dropped = (torch.rand(global_batch, generator=gen) < cfg.caption_dropout_probability)[sl]
        texts = []
        for s, v, d in zip(batch, variant.tolist(), dropped.tolist()):
            caps = caption_variants(s)
            texts.append(CaptionEntry("" if d else caps[v % len(caps)], s.conditioning))
        embeds = torch.stack([text_cache.load(t)["prompt_embeds"] for t in texts]).to(device, compute_dtype)
        # posterior draws for the full global batch, then this rank's slice (same shapes across the batch)
        x0 = latents([latent_cache[s.dataset_id].load(s) for s in batch], sl, global_batch)
        ref = None
        if is_edit:
            ref = latents([latent_cache[s.conditioning.dataset_id].load(s.conditioning) for s in batch], sl, global_batch)
        N = x0.shape[1]
        noise = torch.randn((global_batch, *x0.shape[1:]), generator=gen)[sl].to(device, compute_dtype)
        mu = dynamic_shift_mu(N, m.scheduler) if cfg.flow_schedule_auto_shift else None
        sigma = sample_training_sigmas(global_batch, generator=gen, logit_std=cfg.flow_sigmoid_scale,
                                       uniform=cfg.flow_use_uniform_schedule, shift=cfg.flow_schedule_shift,
                                       mu=mu)[sl].to(device)
        L = embeds.shape[1]
        img_ids = image_position_ids(h // 16, w // 16, offset=L, modality=1, device=device)
        if is_edit:
            img_ids = torch.cat([img_ids, image_position_ids(h // 16, w // 16, offset=L, modality=2, device=device)])
        return x0, noise, sigma, embeds, img_ids, text_position_ids(L, device=device), ref

    # ---- the loop ---------------------------------------------------------------------------------------------------
    batches = iter(sampler)
    history = []  # this session's losses, for the closing summary line
    bar = tqdm(total=max_steps, initial=step, desc="train", disable=not dist.is_main, dynamic_ncols=True)
    while step < max_steps:
        t0 = time.time()
        lr = lr_at(step, **lr_kw)
        set_lr(optimizer, lr)
        loss_sum = 0.0
        for micro in range(cfg.gradient_accumulation_steps):
            x0, noise, sigma, embeds, img_ids, txt_ids, ref = make_batch(next(batches))
            sync = micro == cfg.gradient_accumulation_steps - 1 or dist.world_size == 1
            with (nullcontext() if sync else model.no_sync()), autocast:
                loss = training_loss(model, x0, noise, sigma, embeds, img_ids, txt_ids, ref)
            (loss / cfg.gradient_accumulation_steps).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip_method == "norm":
            torch.nn.utils.clip_grad_norm_(trainable.values(), cfg.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_value_(trainable.values(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for n, p in trainable.items():
                    ema[n].lerp_(p.detach(), 1 - cfg.ema_decay)
        step += 1
        loss_avg = all_reduce_mean(loss_sum / cfg.gradient_accumulation_steps).item()  # a sync point, once a step
        dt = time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", it_s=f"{1 / dt:.2f}")
        history.append(loss_avg)
        if metrics:
            metrics.log(step, loss=loss_avg, lr=lr, step_time=dt, peak_mem_bytes=peak_memory_bytes(device),
                        epoch=sampler.epoch)

        if (cfg.checkpoint_step_interval > 0 and step % cfg.checkpoint_step_interval == 0) or step == max_steps:
            extra = {"generator": gen.get_state(), **({f"ema.{n}": t for n, t in ema.items()} if ema else {})}
            path = save_checkpoint(cfg.output_dir, step, model_tensors={n: p.detach() for n, p in trainable.items()},
                                   optimizer=optimizer, extra_tensors=extra, config=asdict(cfg),
                                   state={"sampler": sampler.state_dict(), "epoch": sampler.epoch},
                                   rng=all_gather_object(rng_state()) if dist.world_size > 1 else True)
            if dist.is_main:
                rotate_checkpoints(cfg.output_dir, cfg.checkpoints_total_limit, keep=path, log=print0)
        if (not cfg.validation_disable and cfg.validation_step_interval > 0
                and step % cfg.validation_step_interval == 0 and dist.is_main):
            dit.eval()  # no LoRA dropout in the previews
            with autocast:
                validation(cfg, m, index, step, is_edit)
            dit.train()
        barrier()
    bar.close()
    n = min(20, len(history) // 2)
    if n:
        print0(f"loss: mean of the first {n} steps {sum(history[:n]) / n:.4f} -> last {n} {sum(history[-n:]) / n:.4f}")

    # ---- export -----------------------------------------------------------------------------------------------------
    if dist.is_main:
        from model.loading import save_module_folder
        for suffix, weights in [("", None)] + ([("_ema", ema)] if ema else []):
            if weights:  # write the EMA weights through the same exporters, then put the trained ones back
                trained = {n: p.detach().clone() for n, p in trainable.items()}
                with torch.no_grad():
                    for n, p in trainable.items():
                        p.copy_(weights[n])
            if cfg.model_type == "lora":
                exports = {cfg.lora_format: f"pytorch_lora_weights{suffix}",
                           "comfyui": f"pytorch_lora_weights{suffix}_comfyui"}  # one file when lora_format is comfyui
                for fmt, name in exports.items():
                    ext = "" if fmt == "peft" else ".safetensors"
                    print0(f"wrote {save_lora(os.path.join(cfg.output_dir, name + ext), dit, format=fmt)}")
            else:
                save_module_folder(dit, os.path.join(cfg.output_dir, f"transformer{suffix}"), dit.cfg.to_dict())
                print0(f"wrote {os.path.join(cfg.output_dir, f'transformer{suffix}')}")
            if weights:
                with torch.no_grad():
                    for n, p in trainable.items():
                        p.copy_(trained[n])
        if metrics:
            metrics.close()
    cleanup()
    return step


def cli(argv) -> int:
    """main() with bad input turned into a one-line reason on stderr and exit status 2."""
    from checkpoint import CorruptCheckpoint
    from data.cache import CacheError
    from data.discovery import DataError
    from model.loading import WeightsError
    try:
        main(argv)
    except (ConfigError, DataError, WeightsError, CorruptCheckpoint, CacheError, ValueError, OSError) as e:
        print(f"train_image.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
