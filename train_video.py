"""
Fine-tune LongCat-Video (text-to-video, image-to-video, video continuation) with LoRA or in full.

    python train_video.py --config config.json                       # a SimpleTuner LongCat-Video config works as is
    python train_video.py --config configs/demo_video.json           # the embedded CPU demo (tiny model, synthetic clips)
    torchrun --nproc_per_node 8 train_video.py --config config.json  # DDP: NCCL on GPU, gloo on CPU
    torchrun --nproc_per_node 8 train_video.py --config config.json --context_parallel_size=4  # 2 x 4 ranks

The story of a run: config -> clip discovery (bad files excluded and listed in output_dir/data_report.json) ->
models -> latent and umT5 caches -> LoRA / full (trainer.py) -> the loop -> validation MP4s -> LoRA export
(diffusers/PEFT, ComfyUI and the official LongCat-Video layout).

The objective is the one the released model was trained for (specs/longcat_video.md §5, §8.2), not SimpleTuner's:
  - x_sigma = (1 - sigma) x0 + sigma eps on the noise frames; the first c latent frames are the clean condition x0,
    with timestep 0 in a per-frame timestep tensor, and the DiT runs in cond mode (num_cond_latents = c);
  - the target is x0 - eps (the opposite sign of LongCat-Image's), MSE over the noise frames only;
  - c per sample: 0 (text-to-video), 1 (image-to-video) or 1 + (continuation_cond_frames - 1) // 4 (continuation),
    drawn from `video_task_mix` (default: I2V for is_i2v datasets, T2V otherwise). The I2V condition is the start
    frame of the conditioning dataset when there is one, else the clip's own first latent frame: the Wan VAE is
    causal, so that latent IS the first frame's encode and nothing is encoded twice. Continuation conditions on the
    clip's own first c latent frames for the same reason. A batch holding several c runs one forward per c;
  - sigma = logit-normal, shifted with flow_schedule_shift (12, as sampling), t = 1000 sigma; caption dropout
    trains on the empty prompt's umT5 embedding (what CFG uses at sampling).
Every random draw of a step comes from one generator seeded by `seed`, drawn for the whole global batch, so a resumed
run equals the uninterrupted one and N processes equal one with the same global batch (LoRA dropout aside).
Context parallel (`context_parallel_size` cp > 1, model/context_parallel.py): world = cp x dp; the cp consecutive ranks
of a group share each batch (the sampler and the draws split over the dp groups only) and each keeps an H x W tile of
every clip's tokens; its loss is the mean over its tile, so DDP's mean over all ranks is the full loss's gradient.
"""
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from config import ConfigError, check_ranges, load_config
from trainer import (ALIASES, TrainConfig, Trainer, caption_variants, check_common, compute_dtypes,
                     quantize_text_encoder, run_cli)

TASKS = ("t2v", "i2v", "continuation")

# -----------------------------------------------------------------------------
# config: the shared SimpleTuner options (trainer.TrainConfig) plus LongCat-Video's own


@dataclass
class TrainVideoConfig(TrainConfig):
    model_family: str = "longcat_video"
    model_flavour: str = "final"  # LongCat-Video has one flavour; T2V and I2V use the same weights
    output_dir: str = "output/longcat-video"
    flow_schedule_shift: float = 12.0  # the release samples with shift 12
    framerate: Optional[float] = None  # sample training clips at this fps (None: the files' own frames)
    video_task_mix: Optional[dict] = None  # {"t2v": w, "i2v": w, "continuation": w}; None: per dataset (docstring)
    continuation_cond_frames: int = 13  # pixel frames a continuation sample is conditioned on (13 -> 4 latents)
    attention_implementation: str = "sdpa"  # sdpa (dense) | bsa (our block-sparse attention) | xformers/... -> sdpa
    bsa: Optional[dict] = None  # {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}
    context_parallel_size: int = 1  # ranks that split each clip's tokens (Ulysses); world = this x data parallel
    validation_resolution: Optional[str] = None  # "WxH"; None: the first training bucket's size
    validation_num_video_frames: Optional[int] = None  # None: the first training bucket's frame count
    validation_guidance: float = 4.0
    validation_num_inference_steps: int = 50


VIDEO_BOUNDS = dict(framerate="(0, 1000]", continuation_cond_frames="[5, 100000]", context_parallel_size="[1, 65536]",
                    validation_num_video_frames="[1, 100000]")  # + trainer.TRAIN_BOUNDS (check_common)


def check_config(cfg: TrainVideoConfig):
    check_ranges(cfg, VIDEO_BOUNDS)
    if cfg.model_family != "longcat_video":
        raise ConfigError(f"model_family {cfg.model_family!r}: train_video.py trains longcat_video "
                          "(LongCat-Image: train_image.py)")
    if cfg.model_flavour != "final":
        raise ConfigError(f"model_flavour {cfg.model_flavour!r}: LongCat-Video has one flavour, final (T2V and I2V "
                          "share the weights; I2V comes from the datasets' is_i2v)")
    check_common(cfg, "train_video.py")
    if cfg.video_task_mix is not None:
        unknown = set(cfg.video_task_mix) - set(TASKS)
        if unknown:
            raise ConfigError(f"video_task_mix: unknown task(s) {sorted(unknown)}; the tasks are {', '.join(TASKS)}")
        if any(float(w) < 0 for w in cfg.video_task_mix.values()) or sum(map(float, cfg.video_task_mix.values())) <= 0:
            raise ConfigError("video_task_mix: weights must be >= 0 with a positive sum")
    if cfg.continuation_cond_frames < 5 or (cfg.continuation_cond_frames - 1) % 4:
        raise ConfigError(f"continuation_cond_frames {cfg.continuation_cond_frames}: must be 4k+1 and >= 5 (13 in the "
                          "release), i.e. at least 2 latent frames")
    if cfg.attention_implementation not in ("sdpa", "bsa"):
        print(f"note: attention_implementation {cfg.attention_implementation!r} is not ours to choose here: "
              "LongCat-Video trains with PyTorch SDPA ('sdpa') or our block-sparse attention ('bsa')")
        cfg.attention_implementation = "sdpa"
    if cfg.bsa is not None and cfg.attention_implementation != "bsa":
        raise ConfigError("bsa settings are given but attention_implementation is not 'bsa'")
    if cfg.context_parallel_size < 1:
        raise ConfigError(f"context_parallel_size must be >= 1, got {cfg.context_parallel_size}")
    from validate import parse_resolutions
    from model.vae_video import check_video_size
    if not cfg.validation_disable and cfg.validation_resolution is not None:
        for w, h in parse_resolutions(cfg.validation_resolution):
            try:
                check_video_size(cfg.validation_num_video_frames or 1, h, w)
            except ValueError as e:
                raise ConfigError(f"validation_resolution / validation_num_video_frames: {e}") from None
    if cfg.validation_num_video_frames is not None and (cfg.validation_num_video_frames - 1) % 4:
        raise ConfigError(f"validation_num_video_frames {cfg.validation_num_video_frames} is not 4k+1 (93 is)")


def task_weights(cfg: TrainVideoConfig, spec) -> list:
    """[w_t2v, w_i2v, w_continuation] for one dataset."""
    if cfg.video_task_mix is not None:
        return [float(cfg.video_task_mix.get(t, 0)) for t in TASKS]
    return [0.0, 1.0, 0.0] if spec.video.is_i2v else [1.0, 0.0, 0.0]


# -----------------------------------------------------------------------------
# the objective


def training_loss(dit, x0, noise, sigma, embeds, mask, num_cond: int = 0, cp=None):
    """x0, noise [B, 16, T, h, w] normalised latents; sigma [B]; the first `num_cond` latent frames of x0 are the
    clean condition (timestep 0, cond mode). MSE(pred, x0 - eps) over the noise frames only; with context parallel
    (cp) the DiT returns this rank's H x W tile and the MSE is over that tile."""
    from model.flow import interpolate, video_velocity_target
    B, T, c = x0.shape[0], x0.shape[2], num_cond
    x_t = torch.cat([x0[:, :, :c], interpolate(x0[:, :, c:], noise[:, :, c:], sigma)], dim=2)
    t = (sigma.float() * 1000)[:, None].expand(B, T).clone()
    t[:, :c] = 0
    pred = dit(x_t, t, embeds, mask, num_cond_latents=c)
    target = video_velocity_target(x0[:, :, c:], noise[:, :, c:])
    return F.mse_loss(pred[:, :, c:].float(), (target if cp is None else cp.shard(target)).float())


def validation(cfg, m, index, step: int, buckets):
    """T2V of validation_prompt and, for I2V datasets (validation_using_datasets / eval_dataset_id), I2V of their
    start frames, as MP4s in output_dir/validation/step-<N>/."""
    from data.clips import start_frame_image
    from validate import parse_resolutions, render_videos
    w, h, frames = buckets[0]
    jobs = []
    if cfg.validation_prompt is not None:
        jobs.append((cfg.validation_prompt, None))
    if cfg.validation_using_datasets or cfg.eval_dataset_id:
        ds = cfg.eval_dataset_id if cfg.eval_dataset_id in index.samples else next(iter(index.samples))
        if index.specs[ds].video.is_i2v:
            for s in index.samples[ds][:cfg.num_validation_images]:
                jobs.append((cfg.validation_prompt or caption_variants(s)[0], start_frame_image(s)))
    if not jobs:
        return
    sizes = parse_resolutions(cfg.validation_resolution) if cfg.validation_resolution else [(w, h)]
    out = os.path.join(cfg.output_dir, "validation", f"step-{step}")
    paths = render_videos(m, jobs, out, sizes, num_frames=cfg.validation_num_video_frames or frames,
                          steps=cfg.validation_num_inference_steps, guidance=cfg.validation_guidance,
                          seed=cfg.validation_seed, negative_prompt=cfg.validation_negative_prompt,
                          fps=cfg.framerate or 15, progress=False)
    print(f"validation: wrote {len(paths)} video(s) to {out}")


# -----------------------------------------------------------------------------


def main(argv):
    cfg = load_config(TrainVideoConfig, argv, aliases=ALIASES)
    check_config(cfg)
    if cfg.estimate_memory:  # before anything big is read: config.json files only
        from memory_estimate import print_estimate
        return print_estimate(cfg, "longcat_video")
    from data.cache import (CaptionEntry, LatentCache, TextCache, files_fingerprint, model_identity, umt5_compute_fn,
                            umt5_from_cache, vae_compute_fn)
    from data.clips import load_clip, load_start_frame
    from data.datasets import GLOBAL_DEFAULT_KEYS, VIDEO_DEFAULT_KEYS, load_datasets
    from data.discovery import discover
    from data.sampler import BucketBatchSampler
    from checkpoint import lock_output_dir
    from distributed import barrier, cleanup, init_distributed, print0
    from model.context_parallel import init_context_parallel
    from model.flow import sample_training_sigmas
    from model.encoder_offload import EncoderOffload
    from model.loading import load_longcat_video
    from model.lora import LONGCAT_VIDEO_LORA_TARGETS
    from model.vae_image import latents_from_moments
    from model.vae_video import latent_frames

    # ---- init -------------------------------------------------------------------------------------------------------
    dist = init_distributed()
    device = dist.device
    weight_dtype, autocast = compute_dtypes(cfg, device)
    if dist.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        lock_output_dir(cfg.output_dir, log=print0)  # one run per output_dir (checkpoint.py), released at exit
    print0(f"train_video: {cfg.model_type} on LongCat-Video, {dist.world_size} process(es) on {device.type}, "
           f"weights {weight_dtype}")
    cp = None  # context parallel: this rank's place in the cp x dp layout
    if cfg.context_parallel_size > 1:
        try:
            cp = init_context_parallel(dist.rank, dist.world_size, cfg.context_parallel_size)
        except ValueError as e:
            raise ConfigError(f"context_parallel_size {cfg.context_parallel_size}: {e}") from None
        print0(f"context parallel: {cp.dp_size} group(s) of {cp.size} ranks, H x W tiles {cp.split}")
    dp_size, dp_rank = (cp.dp_size, cp.dp_rank) if cp else (dist.world_size, dist.rank)

    # ---- data -------------------------------------------------------------------------------------------------------
    defaults = {k: getattr(cfg, k) for k in GLOBAL_DEFAULT_KEYS | VIDEO_DEFAULT_KEYS}
    specs = load_datasets(cfg.data_backend_config, is_video=True, defaults=defaults, log=print0)
    index = discover(specs, seed=cfg.seed, alignment=cfg.aspect_bucket_alignment, is_video=True,
                     output_dir=cfg.output_dir, log=print0)
    if cfg.eval_dataset_id is not None and cfg.eval_dataset_id not in index.samples:
        print0(f"note: eval_dataset_id {cfg.eval_dataset_id!r} is not in {cfg.data_backend_config}; validation takes "
               f"its start frames from {next(iter(index.samples))!r}")
    c_cont = latent_frames(cfg.continuation_cond_frames)
    for ds, per_bucket in index.buckets.items():  # impossible task / length combinations fail now, not at step 900
        short = [b for b in per_bucket if latent_frames(b[2]) <= c_cont]
        if task_weights(cfg, index.specs[ds])[2] > 0 and short:
            raise ConfigError(f"dataset {ds!r}: continuation on {cfg.continuation_cond_frames} cond frames needs "
                              f"clips longer than that, but bucket(s) {short} are not; lower continuation_cond_frames "
                              "or its weight in video_task_mix")
        if task_weights(cfg, index.specs[ds])[1] > 0 and any(latent_frames(b[2]) < 2 for b in per_bucket):
            raise ConfigError(f"dataset {ds!r}: image-to-video needs clips of at least 5 frames")
    print0(index.summary())
    print0(index.bucket_table())
    sampler = BucketBatchSampler(index, batch_size=cfg.train_batch_size, seed=cfg.seed, world_size=dp_size,
                                 rank=dp_rank, log=print0)
    steps_per_epoch = math.ceil(sampler.batches_per_epoch / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps if cfg.max_train_steps > 0 else steps_per_epoch * cfg.num_train_epochs

    # ---- models -----------------------------------------------------------------------------------------------------
    m = load_longcat_video(cfg.pretrained_model_name_or_path, device=device, dtype=weight_dtype,
                           dit_device="cpu")  # the DiT waits on the host while the caches fill; Trainer moves it
    dit, vae = m.dit, m.vae
    if cfg.attention_implementation == "bsa":
        dit.set_bsa(True, cfg.bsa)
        print0(f"block-sparse self-attention on: {dit.bsa}")
    if cp is not None:  # the heads split over the group, every bucket's token grid into its tiles: checked now
        try:
            dit.set_context_parallel(cp)
            for w, h, _ in (b for per in index.buckets.values() for b in per):
                cp.tiling(h // 16, w // 16)  # VAE 8 x patch 2
        except ValueError as e:
            raise ConfigError(f"context_parallel_size {cp.size}: {e}") from None

    # ---- caches: video posteriors (clips and start frames) and umT5 embeddings, once, split across ranks ------------
    text_quant = quantize_text_encoder(cfg, m.text_encoder, log=print0)
    weights_id = files_fingerprint(m.path / "vae")
    latent_cache = {ds: LatentCache(spec.cache_dir_vae or os.path.join(cfg.output_dir, "cache", "vae"),
                                    model_identity({**vae.config.to_dict(), "dtype": str(weight_dtype)}, weights_id))
                    for ds, spec in index.specs.items()}
    text_cache = TextCache(os.path.join(cfg.output_dir, "cache", "text"),
                           model_identity({"dtype": str(weight_dtype), **text_quant},
                                          *(files_fingerprint(m.path / d) for d in ("text_encoder", "tokenizer"))),
                           kind="umt5")
    samples = index.all_samples()
    starts = [s.conditioning for s in samples if s.conditioning is not None]  # I2V start-frame images
    start_ids = {s.dataset_id for s in starts}
    if dist.is_main:  # temp files of dead runs, latents of deleted or changed files: listed in data_report.json
        from data.cache import prune_at_startup
        prune_at_startup(latent_cache, [text_cache], samples + starts, report=index.report_path, log=print0)
    vae_fn = vae_compute_fn(vae, lambda s: load_start_frame(s) if s.dataset_id in start_ids else load_clip(s))
    for ds in sorted({s.dataset_id for s in samples + starts}):
        latent_cache[ds].build([s for s in samples + starts if s.dataset_id == ds], vae_fn,
                               batch_size=cfg.vae_batch_size, desc=f"latents {ds}", rank=dist.rank,
                               world_size=dist.world_size, barrier=barrier)
    captions = [CaptionEntry(c) for s in samples for c in caption_variants(s)] + [CaptionEntry("")]
    text_cache.build(captions, umt5_compute_fn(m.text_encoder, m.tokenizer), batch_size=4, desc="prompts",
                     rank=dist.rank, world_size=dist.world_size, barrier=barrier)
    needs_models = not cfg.validation_disable and (cfg.validation_prompt is not None or cfg.validation_using_datasets
                                                   or cfg.eval_dataset_id is not None)
    offload = EncoderOffload(m, device, needed_later=needs_models and dist.is_main, log=print0)
    offload.park()  # training reads only the caches: the encoders leave the accelerator (or memory) until validation

    # ---- trainable parameters, optimizer, resume (trainer.py) ------------------------------------------------------
    trainer = Trainer(cfg, dit, dist, lora_targets=LONGCAT_VIDEO_LORA_TARGETS, max_steps=max_steps,
                      lora_exports={"comfyui": "_comfyui", "longcat_video": "_longcat_video"}, full_folder="dit",
                      log=print0)
    compute_dtype = dit.x_embedder.proj.weight.dtype
    gen = torch.Generator().manual_seed(cfg.seed)  # every random draw of the loop, for the whole global batch
    step = trainer.resume(gen, sampler)

    def latents(entries, sl, global_batch):  # cached posteriors -> normalised latents [B, 16, T, h, w]
        mean = torch.stack([e["mean"] for e in entries]).float()
        logvar = torch.stack([e["logvar"] for e in entries]).float()
        sample = cfg.latent_sample_mode == "sample"
        eps = torch.randn((global_batch, *mean.shape[1:]), generator=gen)[sl] if sample else None
        return vae.normalize(latents_from_moments(mean, logvar, sample, eps=eps))

    def make_batch(batch):
        """This rank's share of one global batch, grouped by task: [(c, x0, noise, sigma, embeds, mask, weight)].
        Every draw is made for every global position, so all ranks stay in step."""
        B = len(batch)
        global_batch, sl = B * dp_size, slice(dp_rank * B, (dp_rank + 1) * B)  # same for a cp group's ranks
        variant = torch.randint(0, 1 << 30, (global_batch,), generator=gen)[sl].tolist()
        dropped = (torch.rand(global_batch, generator=gen) < cfg.caption_dropout_probability)[sl].tolist()
        spec = index.specs[batch[0].dataset_id]
        tasks = torch.multinomial(torch.tensor(task_weights(cfg, spec)), global_batch, replacement=True,
                                  generator=gen)[sl].tolist()
        texts = [CaptionEntry("" if d else caption_variants(s)[v % len(caption_variants(s))])
                 for s, v, d in zip(batch, variant, dropped)]
        embeds, mask = umt5_from_cache([text_cache.load(t) for t in texts])
        x0 = latents([latent_cache[s.dataset_id].load(s) for s in batch], sl, global_batch)
        if batch[0].conditioning is not None:  # start-frame files (one dataset: all or none): the I2V condition
            first = latents([latent_cache[s.conditioning.dataset_id].load(s.conditioning) for s in batch], sl,
                            global_batch)
            i2v = torch.tensor([t == 1 for t in tasks])[:, None, None, None, None]
            x0[:, :, :1] = torch.where(i2v, first, x0[:, :, :1])  # T2V / continuation keep the clip's own frames
        noise = torch.randn((global_batch, *x0.shape[1:]), generator=gen)[sl]
        sigma = sample_training_sigmas(global_batch, generator=gen, logit_std=cfg.flow_sigmoid_scale,
                                       uniform=cfg.flow_use_uniform_schedule, shift=cfg.flow_schedule_shift)[sl]
        groups = []
        for task in sorted(set(tasks)):
            idx = [i for i, t in enumerate(tasks) if t == task]
            c = (0, 1, c_cont)[task]
            to = lambda x: x[idx].to(device, compute_dtype)  # noqa: E731
            groups.append((c, to(x0), to(noise), sigma[idx].to(device), to(embeds), mask[idx].to(device),
                           len(idx) / B))
        return groups

    # ---- the loop ---------------------------------------------------------------------------------------------------
    batches = iter(sampler)
    while step < max_steps:
        lr = trainer.begin_step(step)
        for micro in range(cfg.gradient_accumulation_steps):
            groups = make_batch(trainer.note_batch(next(batches)))
            for g, (c, x0, noise, sigma, embeds, mask, weight) in enumerate(groups):
                final = micro == cfg.gradient_accumulation_steps - 1 and g == len(groups) - 1
                with trainer.sync(final), autocast:
                    loss = training_loss(trainer.model, x0, noise, sigma, embeds, mask, c, cp) * weight
                trainer.backward(loss)
        step, _ = trainer.end_step(step, lr)
        if (needs_models and cfg.validation_step_interval > 0 and step % cfg.validation_step_interval == 0
                and dist.is_main):
            dit.eval()  # no LoRA dropout in the previews
            dit.set_context_parallel(None)  # rank 0 samples alone
            with autocast, offload.on_device():
                validation(cfg, m, index, step, [b for per in index.buckets.values() for b in per])
            dit.train().set_context_parallel(cp)
        barrier()
    trainer.finish()  # loss trend, LoRA export (diffusers/PEFT, ComfyUI, official LongCat-Video) or the dit/ folder
    cleanup()
    return step


def cli(argv) -> int:
    return run_cli(main, argv, "train_video.py")


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
