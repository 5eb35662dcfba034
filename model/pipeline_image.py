"""
LongCat-Image sampling as plain functions: text-to-image and instruction editing.

    noise -> pack -> [DiT + CFG (+ renorm) + Euler] x steps -> unpack -> VAE decode -> uint8

Conventions shared with the released diffusers pipelines (so the same seed gives the same image):
  - the initial noise is float32 `randn` [B, 16, H/8, W/8] drawn from a CPU generator, cast to the model dtype, then
    packed 2x2 to [B, N, 64];
  - the schedule is linspace(1, 1/n, n) shifted with mu from the target token count (model/flow.py);
  - the DiT gets `t.to(latent dtype) / 1000` (it multiplies by 1000 after casting to its own dtype);
  - T2I applies CFG-renorm (per-token norm cap), Edit does not; Edit concatenates the reference tokens after the
    noisy tokens on the sequence axis (modality id 2, same timestep) and keeps only the target tokens' output.
Spec: ../shared/specs/longcat_image.md §5-§7.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from model.dit_image import image_position_ids, text_position_ids
from model.flow import (cfg_renorm, classifier_free_guidance, dynamic_shift_mu, euler_step, sampling_schedule)
from model.text_qwen import QUOTE_PAIRS_OFFICIAL, encode_prompt_edit, encode_prompt_t2i, rewrite_prompts
from model.vae_image import pack_latents, unpack_latents

LATENT_CHANNELS = 16
PIXELS_PER_TOKEN = 16  # 8x VAE downsampling x 2x2 packing


@dataclass
class SamplingOptions:
    num_inference_steps: int = 50
    guidance_scale: float = 4.5
    cfg_renorm: bool = True  # T2I only; the Edit pipeline never renormalises
    cfg_renorm_min: float = 0.0
    progress: bool = True


def check_size(width: int, height: int):
    if width % PIXELS_PER_TOKEN or height % PIXELS_PER_TOKEN or width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive multiples of {PIXELS_PER_TOKEN} "
                         f"(8x VAE downsampling and 2x2 latent packing)")


def edit_output_size(width: int, height: int, area: int = 1024 * 1024):
    """Official Edit rule: the reference's aspect ratio at `area` pixels, each side rounded up to a multiple of 16."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    w = w if w % 16 == 0 else (w // 16 + 1) * 16
    h = h if h % 16 == 0 else (h // 16 + 1) * 16
    return int(w), int(h)


def initial_noise(batch: int, width: int, height: int, generator: torch.Generator, dtype) -> torch.Tensor:
    """float32 randn on the generator's device, cast, packed: [B, (H/16)(W/16), 64]."""
    shape = (batch, LATENT_CHANNELS, height // 8, width // 8)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return pack_latents(noise.to(dtype))


def image_to_tensor(images, dtype=torch.float32) -> torch.Tensor:
    """PIL RGB images (same size) -> [B, 3, H, W] in [-1, 1], built with the reference strides (HWC buffer)."""
    arr = np.stack([np.asarray(im.convert("RGB")).astype(np.float32) / 255.0 for im in images])
    return (2.0 * torch.from_numpy(arr.transpose(0, 3, 1, 2)) - 1.0).to(dtype)


def tensor_to_images(x: torch.Tensor) -> list:
    """[B, 3, H, W] in [-1, 1] -> PIL images, rounding like the reference post-processing."""
    x = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (x * 255).round().astype("uint8")]


@torch.no_grad()
def denoise(dit, latents, cond, uncond, img_ids, sigmas, timesteps, opts: SamplingOptions, ref_latents=None,
            renorm=True):
    """
    Euler flow sampling. cond / uncond = (prompt_embeds [B, L, D], txt_ids [L, 3]); uncond is None without CFG.
    ref_latents [B, N_ref, 64] (Edit) are appended to the sequence at every step and dropped from the output.
    """
    n_target = latents.shape[1]
    do_cfg = uncond is not None
    for i in tqdm(range(len(timesteps)), desc="sampling", disable=not opts.progress, leave=False):
        x = latents if ref_latents is None else torch.cat([latents, ref_latents], dim=1)
        t = timesteps[i].expand(x.shape[0]).to(latents.dtype) / 1000
        v = dit(x, cond[0], t, img_ids, cond[1])[:, :n_target]
        if do_cfg:
            v_uncond = dit(x, uncond[0], t, img_ids, uncond[1])[:, :n_target]
            v_guided = classifier_free_guidance(v, v_uncond, opts.guidance_scale)
            v = cfg_renorm(v_guided, v, opts.cfg_renorm_min) if renorm else v_guided
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
    return latents


def _repeat(embeds, n):
    """num_images_per_prompt copies, sample-major ([p0, p0, p1, p1, ...])."""
    B, L, D = embeds.shape
    return embeds.repeat(1, n, 1).view(B * n, L, D)


@torch.no_grad()
def generate_t2i(m, prompts, *, width=1024, height=1024, negative_prompt="", generator=None, opts=SamplingOptions(),
                 num_images_per_prompt=1, rewrite=False, quote_pairs=QUOTE_PAIRS_OFFICIAL, output="pil"):
    """m: a loaded LongCatImage (model/loading.py). Returns PIL images, or packed latents with output="latent"."""
    check_size(width, height)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if rewrite:
        prompts = rewrite_prompts(m.text_encoder, m.text_processor, prompts)
        print(f"rewritten prompt(s): {prompts}")
    embeds = _repeat(encode_prompt_t2i(m.text_encoder, m.tokenizer, prompts, quote_pairs=quote_pairs),
                     num_images_per_prompt).to(m.dit.dtype)  # a no-op unless the DiT is trained in another dtype
    txt_ids = text_position_ids(embeds.shape[1], device=embeds.device)
    cond, uncond = (embeds, txt_ids), None
    if opts.guidance_scale > 1:
        neg = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        neg_embeds = _repeat(encode_prompt_t2i(m.text_encoder, m.tokenizer, neg, quote_pairs=quote_pairs),
                             num_images_per_prompt).to(m.dit.dtype)
        uncond = (neg_embeds, text_position_ids(neg_embeds.shape[1], device=embeds.device))
    dtype = embeds.dtype
    generator = generator if generator is not None else torch.Generator("cpu").manual_seed(0)
    latents = initial_noise(embeds.shape[0], width, height, generator, dtype).to(m.device)
    gh, gw = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
    img_ids = image_position_ids(gh, gw, offset=embeds.shape[1], modality=1, device=m.device)
    sigmas, timesteps = sampling_schedule(opts.num_inference_steps, dynamic_shift_mu(gh * gw, m.scheduler), m.scheduler)
    latents = denoise(m.dit, latents, cond, uncond, img_ids, sigmas.to(m.device), timesteps.to(m.device), opts,
                      renorm=opts.cfg_renorm)
    return latents if output == "latent" else decode(m, latents, width, height)


@torch.no_grad()
def generate_edit(m, prompt: str, image: Image.Image, *, width=None, height=None, negative_prompt="", generator=None,
                  opts=SamplingOptions(), num_images_per_prompt=1, quote_pairs=QUOTE_PAIRS_OFFICIAL, output="pil"):
    """
    Edit `image` following `prompt`. Output size = (width, height) when given, else the official rule
    (`edit_output_size`). The VAE sees the reference resized to the output size (LANCZOS), Qwen sees it at half size.
    """
    if (width is None) != (height is None):
        raise ValueError("give both width and height for the Edit output size, or neither")
    if width is None:
        width, height = edit_output_size(*image.size)
    check_size(width, height)
    image = image.convert("RGB")
    ref_img = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    vl_img = ref_img.resize((width // 2, height // 2), resample=Image.Resampling.LANCZOS)

    embeds = encode_prompt_edit(m.text_encoder, m.tokenizer, m.image_processor, prompt, vl_img,
                                quote_pairs=quote_pairs).to(m.dit.dtype)
    L = embeds.shape[1]
    embeds = _repeat(embeds, num_images_per_prompt)
    cond, uncond = (embeds, text_position_ids(L, device=m.device)), None
    if opts.guidance_scale > 1:
        neg = encode_prompt_edit(m.text_encoder, m.tokenizer, m.image_processor, negative_prompt, vl_img, quote_pairs=quote_pairs)
        uncond = (_repeat(neg, num_images_per_prompt).to(m.dit.dtype), text_position_ids(neg.shape[1], device=m.device))
    dtype, B = embeds.dtype, embeds.shape[0]

    # reference latents: posterior mode, normalised, packed, one copy per generated image
    ref = m.vae.encode(image_to_tensor([ref_img]).to(m.device, m.vae.dtype), sample=False).to(dtype)
    ref = pack_latents(ref).expand(B, -1, -1)
    generator = generator if generator is not None else torch.Generator("cpu").manual_seed(0)
    latents = initial_noise(B, width, height, generator, dtype).to(m.device)

    gh, gw = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
    img_ids = torch.cat([image_position_ids(gh, gw, L, modality=1, device=m.device),
                         image_position_ids(gh, gw, L, modality=2, device=m.device)])
    sigmas, timesteps = sampling_schedule(opts.num_inference_steps, dynamic_shift_mu(gh * gw, m.scheduler), m.scheduler)
    latents = denoise(m.dit, latents, cond, uncond, img_ids, sigmas.to(m.device), timesteps.to(m.device), opts,
                      ref_latents=ref, renorm=False)
    return latents if output == "latent" else decode(m, latents, width, height)


@torch.no_grad()
def decode(m, latents, width, height) -> list:
    z = unpack_latents(latents, height // 8, width // 8).to(m.vae.dtype)
    return tensor_to_images(m.vae.decode(z))
