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
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from config import ConfigError, load_config
from trainer import (ALIASES, TrainConfig, Trainer, caption_variants, check_common, compute_dtypes,
                     quantize_text_encoder, run_cli)

# -----------------------------------------------------------------------------
# config: the shared SimpleTuner options (trainer.TrainConfig) plus LongCat-Image's own


@dataclass
class TrainImageConfig(TrainConfig):
    model_family: str = "longcat_image"
    model_flavour: str = "final"  # final | dev | edit
    output_dir: str = "output/longcat-image"
    flow_schedule_auto_shift: bool = False  # mu from each batch's token count instead of the static shift
    validation_resolution: Optional[str] = None  # None: 1024x1024 (T2I); the official size rule (Edit)


def check_config(cfg: TrainImageConfig):
    if cfg.model_family != "longcat_image":
        raise ConfigError(f"model_family {cfg.model_family!r}: train_image.py trains longcat_image "
                          "(LongCat-Video: train_video.py)")
    if cfg.model_flavour not in ("final", "dev", "edit"):
        raise ConfigError(f"model_flavour {cfg.model_flavour!r}: expected one of final, dev, edit")
    check_common(cfg, "train_image.py")
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
    if cfg.estimate_memory:  # before anything big is read: config.json files only
        from memory_estimate import print_estimate
        return print_estimate(cfg, "longcat_image")
    from data.buckets import apply_geometry
    from data.cache import (CaptionEntry, LatentCache, TextCache, edit_compute_fn, files_fingerprint, model_identity,
                            t2i_compute_fn, vae_compute_fn)
    from data.datasets import GLOBAL_DEFAULT_KEYS, load_datasets
    from data.discovery import discover
    from data.images import load_image, to_tensor
    from data.sampler import BucketBatchSampler
    from checkpoint import lock_output_dir
    from distributed import barrier, cleanup, init_distributed, print0
    from model.dit_image import image_position_ids, text_position_ids
    from model.flow import dynamic_shift_mu, sample_training_sigmas
    from model.encoder_offload import EncoderOffload
    from model.loading import load_longcat_image
    from model.lora import LONGCAT_IMAGE_LORA_TARGETS
    from model.vae_image import latents_from_moments, pack_latents

    # ---- init -------------------------------------------------------------------------------------------------------
    dist = init_distributed()
    is_edit = cfg.model_flavour == "edit"
    device = dist.device
    weight_dtype, autocast = compute_dtypes(cfg, device)
    if dist.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        lock_output_dir(cfg.output_dir, log=print0)  # one run per output_dir (checkpoint.py), released at exit
    print0(f"train_image: {cfg.model_type} on LongCat-Image {cfg.model_flavour}, {dist.world_size} process(es) on "
           f"{device.type}, weights {weight_dtype}")

    # ---- data -------------------------------------------------------------------------------------------------------
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
    m = load_longcat_image(cfg.pretrained_model_name_or_path, cfg.model_flavour, device=device, dtype=weight_dtype,
                           dit_device="cpu")  # the DiT waits on the host while the caches fill; Trainer moves it
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

    text_quant = quantize_text_encoder(cfg, m.text_encoder, log=print0)
    weights_id = files_fingerprint(m.path / "vae")
    latent_cache = {ds: LatentCache(spec.cache_dir_vae or os.path.join(cfg.output_dir, "cache", "vae"),
                                    model_identity({**asdict(vae.config), "dtype": str(weight_dtype)}, weights_id))
                    for ds, spec in index.specs.items()}
    text_cache = TextCache(os.path.join(cfg.output_dir, "cache", "text"),
                           model_identity({"flavour": cfg.model_flavour, "dtype": str(weight_dtype), **text_quant},
                                          *(files_fingerprint(m.path / d) for d in ("text_encoder", "tokenizer",
                                                                                    "text_processor"))),
                           kind="edit" if is_edit else "t2i")
    samples = index.all_samples()
    images = samples + [s.conditioning for s in samples if s.conditioning is not None]
    if dist.is_main:  # temp files of dead runs, latents of deleted or changed files: listed in data_report.json
        from data.cache import prune_at_startup
        prune_at_startup(latent_cache, [text_cache], images, report=index.report_path, log=print0)
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
    validates = not cfg.validation_disable and cfg.validation_step_interval > 0 and (
        (cfg.validation_using_datasets or cfg.eval_dataset_id is not None) if is_edit
        else cfg.validation_prompt is not None)  # what validation() renders something for
    offload = EncoderOffload(m, device, needed_later=validates and dist.is_main, log=print0)
    offload.park()  # training reads only the caches: the encoders leave the accelerator (or memory) until validation

    # ---- trainable parameters, optimizer, resume (trainer.py) ------------------------------------------------------
    trainer = Trainer(cfg, dit, dist, lora_targets=LONGCAT_IMAGE_LORA_TARGETS, max_steps=max_steps,
                      lora_exports={"comfyui": "_comfyui"}, full_folder="transformer", log=print0)
    compute_dtype = dit.x_embedder.weight.dtype  # fp32 when the whole DiT trains (autocast, if on, does bf16 math)
    gen = torch.Generator().manual_seed(cfg.seed)  # every random draw of the loop, for the whole global batch
    step = trainer.resume(gen, sampler)

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
    while step < max_steps:
        lr = trainer.begin_step(step)
        for micro in range(cfg.gradient_accumulation_steps):
            x0, noise, sigma, embeds, img_ids, txt_ids, ref = make_batch(trainer.note_batch(next(batches)))
            with trainer.sync(final=micro == cfg.gradient_accumulation_steps - 1), autocast:
                loss = training_loss(trainer.model, x0, noise, sigma, embeds, img_ids, txt_ids, ref)
            trainer.backward(loss)
        step, _ = trainer.end_step(step, lr)
        if validates and step % cfg.validation_step_interval == 0 and dist.is_main:
            dit.eval()  # no LoRA dropout in the previews
            with autocast, offload.on_device():
                validation(cfg, m, index, step, is_edit)
            dit.train()
        barrier()
    trainer.finish()  # loss trend, LoRA export (diffusers/PEFT + ComfyUI) or the full transformer/ folder
    cleanup()
    return step


def cli(argv) -> int:
    return run_cli(main, argv, "train_image.py")


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
