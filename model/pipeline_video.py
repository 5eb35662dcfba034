"""
LongCat-Video sampling as plain functions: text-to-video and image-to-video.

    noise [B, 16, T, H/8, W/8] -> [DiT (x0 - eps) + CFG-zero + Euler] x steps -> Wan VAE decode -> frames

Conventions of the release (../shared/specs/longcat_video.md §5-§6), kept so the same seed gives the same video:
  - the initial noise is float32 `randn` [B, 16, T_lat, H/8, W/8] from a CPU generator; for I2V the start frame's
    latent is then one VAE posterior sample drawn from the same generator right after it, normalised, and written
    into latent frame 0;
  - sigmas = shift(linspace(1, 0.001, n)) with the scheduler config's static shift (12), terminal 0; t = 1000 sigma;
  - the network predicts v = x0 - eps, so a step is x <- x + (sigma - sigma_next) v (the release negates v and calls
    diffusers' Euler step; `euler_step(x, -v, ...)` is that step with its dtype rules);
  - CFG is the per-sample "optimized scale" (CFG-zero) over the whole prediction, cond frame included;
  - I2V: frame 0 is clean, gets timestep 0, runs in cond mode (num_cond_latents=1) and is never stepped.
"""
import torch
from PIL import Image
from tqdm import tqdm

from model.flow import cfg_zero_star, euler_step, video_sampling_schedule
from model.text_umt5 import encode_prompt_umt5
from model.vae_video import check_video_size, latent_frames

LATENT_CHANNELS = 16


def image_to_video_tensor(image: Image.Image, width: int, height: int, dtype=torch.float32) -> torch.Tensor:
    """Start frame -> [1, 3, 1, H, W] in [-1, 1]: a stretch resize to the output size (no crop), as the release."""
    import numpy as np
    img = image.convert("RGB").resize((width, height), resample=Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0).permute(2, 0, 1)
    return (2.0 * x - 1.0)[None, :, None].to(dtype)


@torch.no_grad()
def denoise_video(dit, latents, embeds, mask, neg, sigmas, guidance: float, num_cond: int = 0, kv_cache=None,
                  progress=True):
    """
    latents [B, 16, T, h, w]; embeds/mask the prompt, neg = (embeds, mask) of the negative prompt or None.
    The first `num_cond` latent frames are clean conditions: timestep 0, cond mode, never stepped. With `kv_cache`
    (dit.cache_cond_kv of those frames, computed once) the DiT sees only the noise frames at every step.
    """
    B, T = latents.shape[0], latents.shape[2]
    do_cfg = guidance > 1 and neg is not None
    text = torch.cat([neg[0], embeds]) if do_cfg else embeds
    text_mask = torch.cat([neg[1], mask]) if do_cfg else mask
    first = num_cond if kv_cache else 0  # the frames the DiT is called on
    for i in tqdm(range(len(sigmas) - 1), desc="sampling", disable=not progress, leave=False):
        t = (sigmas[i] * 1000).expand(B, T).clone().to(latents.device)
        t[:, :num_cond] = 0
        x, t = latents[:, :, first:], t[:, first:]
        v = dit(torch.cat([x, x]) if do_cfg else x, torch.cat([t, t]) if do_cfg else t, text, text_mask,
                num_cond_latents=num_cond, kv_cache_dict=kv_cache).to(latents.dtype)
        if do_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = cfg_zero_star(v_cond, v_uncond, guidance)
        # the release negates the x0 - eps prediction and takes a diffusers Euler step on the noise frames only
        latents[:, :, num_cond:] = euler_step(latents[:, :, num_cond:], -v[:, :, num_cond - first:], sigmas[i],
                                              sigmas[i + 1])
    return latents


@torch.no_grad()
def generate_video(m, prompt: str, *, width=832, height=480, num_frames=93, num_inference_steps=50, guidance=4.0,
                   negative_prompt="", generator=None, image: Image.Image = None, cond_video: torch.Tensor = None,
                   distill=False, progress=True):
    """
    T2V; I2V when `image` (the start frame) is given; video continuation when `cond_video` ([3, F_c, H, W] in
    [-1, 1], F_c = 4k+1, e.g. the last 13 frames of a clip) is given: its 1 + (F_c - 1) // 4 latents are the clean
    conditions and their attention K/V is computed once (KV cache). m: a loaded LongCatVideo (model/loading.py).
    Returns the video [B, 3, F, H, W] in [-1, 1] (float32, CPU); for continuation it starts with the cond frames.
    """
    check_video_size(num_frames, height, width)
    generator = generator if generator is not None else torch.Generator("cpu").manual_seed(0)
    dtype, device = m.dit.dtype, m.device
    embeds, mask = encode_prompt_umt5(m.text_encoder, m.tokenizer, [prompt])
    neg = encode_prompt_umt5(m.text_encoder, m.tokenizer, [negative_prompt]) if guidance > 1 else None
    embeds, mask = embeds.to(device, dtype), mask.to(device)
    neg = (neg[0].to(device, dtype), neg[1].to(device)) if neg is not None else None

    shape = (1, LATENT_CHANNELS, latent_frames(num_frames), height // 8, width // 8)
    latents = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    num_cond, cache = 0, None
    if image is not None and cond_video is not None:
        raise ValueError("give a start image (I2V) or a cond video (continuation), not both")
    if image is not None:
        cond_video = image_to_video_tensor(image, width, height)[0]
    if cond_video is not None:  # the posterior sample comes from the same generator, right after the noise
        check_video_size(cond_video.shape[1], height, width)
        if tuple(cond_video.shape[2:]) != (height, width):
            raise ValueError(f"cond video is {cond_video.shape[3]}x{cond_video.shape[2]}, the output {width}x{height}")
        num_cond = latent_frames(cond_video.shape[1])
        if num_cond >= latents.shape[2]:
            raise ValueError(f"{cond_video.shape[1]} cond frames leave no frame to generate out of {num_frames}")
        z = m.vae.encode(cond_video[None].to(device, m.vae.dtype), sample=True, generator=generator)
        latents[:, :, :num_cond] = z.float().cpu()
    latents = latents.to(device, dtype)
    if num_cond > 1:  # continuation: the cond frames' K/V once, reused at every step (and by both CFG branches)
        cache = m.dit.cache_cond_kv(latents[:, :, :num_cond])
    sigmas = video_sampling_schedule(num_inference_steps, m.shift, distill=distill).to(device)
    latents = denoise_video(m.dit, latents, embeds, mask, neg, sigmas, guidance, num_cond, cache, progress)
    return m.vae.decode(latents.to(m.vae.dtype)).float().cpu()
