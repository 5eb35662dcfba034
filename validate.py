"""
Sample images from a LongCat-Image checkpoint with SimpleTuner's validation option names.

    python validate.py --model_family longcat_image --model_flavour final \\
        --validation_prompt "a red fox in the snow" --validation_resolution 1024x1024 --output_dir out
    python validate.py --model_flavour edit --validation_image cat.png --validation_prompt "make the cat blue"
    python validate.py --config config.json          # a SimpleTuner config.json: the same keys, training keys ignored

`--pretrained_model_name_or_path` takes a diffusers-format folder (model_index.json, transformer/, vae/,
text_encoder/, tokenizer/, text_processor/, scheduler/) or a hub id; without it the flavour picks the release
(final -> meituan-longcat/LongCat-Image, dev -> -Dev, edit -> -Image-Edit). The same seed gives the same image as
the official diffusers pipeline (float32 noise from a CPU generator seeded with validation_seed).
One PNG per image is written to output_dir and its path printed. Bad input exits with a one-line reason.
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from config import ConfigError, check_output_dir, check_ranges, load_config

FAMILIES = ("longcat_image", "longcat_video")
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ValidateConfig:
    model_family: str = "longcat_image"
    model_flavour: str = "final"  # final | dev | edit
    pretrained_model_name_or_path: Optional[str] = None
    validation_prompt: str = "A photo of a cat sitting on a wooden table, soft morning light."
    validation_negative_prompt: str = ""
    validation_resolution: Optional[str] = None  # "WxH" or "N" (square), comma-separated for several; Edit: official rule
    validation_guidance: float = 4.5
    validation_num_inference_steps: int = 50
    validation_seed: int = 42
    validation_image: Optional[str] = None  # Edit reference image
    lora: Optional[str] = None  # a LoRA file or folder: ours, diffusers/PEFT, ComfyUI or kohya layout
    # LongCat-Video
    validation_num_video_frames: int = 93  # (F - 1) % 4 == 0
    framerate: Optional[int] = None  # MP4 frame rate; default 15 (the release's base T2V)
    save_frames: bool = False  # also write every frame as a PNG next to the MP4
    num_validation_images: int = 1
    validation_cfg_renorm: bool = True  # T2I only, as in the official pipeline
    validation_cfg_renorm_min: float = 0.0
    enable_prompt_rewrite: bool = False  # rewrite with the text encoder's LM head before encoding (T2I)
    prompt_quote_pairs: str = "official"  # official (36 pairs, as trained) | diffusers (4 pairs)
    output_dir: str = "output/validation"
    device: Optional[str] = None  # default: cuda if available else cpu
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16


VALIDATE_BOUNDS = dict(validation_guidance="[0, 1e3]", validation_num_inference_steps="[1, 10000]",
                       validation_seed="[0, 18446744073709551615]", validation_num_video_frames="[1, 100000]",
                       framerate="[1, 1000]", num_validation_images="[1, 10000]", validation_cfg_renorm_min="[0, 1e3]")


def parse_resolutions(spec: Optional[str]):
    """'1024x768,512' -> [(1024, 768), (512, 512)] as (width, height)."""
    if spec is None:
        return [None]
    sizes = []
    for part in str(spec).split(","):
        part = part.strip().lower()
        try:
            w, _, h = part.partition("x")
            sizes.append((int(w), int(h or w)))
        except ValueError:
            raise ConfigError(f"validation_resolution: {part!r} is not WxH or N") from None
        if min(sizes[-1]) <= 0:
            raise ConfigError(f"validation_resolution: {part!r} must be a positive WxH (e.g. 832x480)")
    return sizes


def check(cfg: ValidateConfig):
    check_ranges(cfg, VALIDATE_BOUNDS)
    check_output_dir(cfg.output_dir)
    if cfg.model_family not in FAMILIES:
        raise ConfigError(f"model_family {cfg.model_family!r}: this validate.py supports {', '.join(FAMILIES)}")
    if cfg.model_family == "longcat_video":
        if cfg.model_flavour != "final":
            raise ConfigError(f"model_flavour {cfg.model_flavour!r}: LongCat-Video has one flavour, final")
        from model.vae_video import check_video_size
        for size in parse_resolutions(cfg.validation_resolution):
            w, h = size or (832, 480)
            try:
                check_video_size(cfg.validation_num_video_frames, h, w)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if cfg.validation_image and not os.path.isfile(cfg.validation_image):
            raise ConfigError(f"validation_image not found: {cfg.validation_image}")
        return
    if cfg.model_flavour not in ("final", "dev", "edit"):
        raise ConfigError(f"model_flavour {cfg.model_flavour!r}: expected final, dev or edit")
    if cfg.prompt_quote_pairs not in ("official", "diffusers"):
        raise ConfigError(f"prompt_quote_pairs {cfg.prompt_quote_pairs!r}: expected official or diffusers")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype {cfg.dtype!r}: expected one of {', '.join(DTYPES)}")
    if cfg.validation_num_inference_steps < 1 or cfg.num_validation_images < 1:
        raise ConfigError("validation_num_inference_steps and num_validation_images must be >= 1")
    from model.pipeline_image import check_size
    for size in parse_resolutions(cfg.validation_resolution):
        if size is not None:
            try:
                check_size(*size)
            except ValueError as e:
                raise ConfigError(f"validation_resolution: {e}") from None
    if cfg.model_flavour == "edit":
        if not cfg.validation_image:
            raise ConfigError("model_flavour edit needs a reference image: --validation_image path/to/image.png")
        if not os.path.isfile(cfg.validation_image):
            raise ConfigError(f"validation_image not found: {cfg.validation_image}")
    if cfg.lora and not os.path.exists(cfg.lora):
        raise ConfigError(f"lora not found: {cfg.lora}")


def read_validation_image(path):
    """--validation_image through the training loader (data/images.py: EXIF-upright, alpha over white, 16-bit
    scaled), so a reference looks the same here as in training; an unusable file is one ConfigError naming it."""
    from data.images import BadSample, load_image
    try:
        return load_image(path)
    except BadSample as e:
        raise ConfigError(f"validation_image {path}: cannot use it as an image ({e.detail})") from None


def main(argv):
    cfg = load_config(ValidateConfig, argv)
    check(cfg)
    if cfg.model_family == "longcat_video":
        return main_video(cfg, argv)
    from model.loading import load_longcat_image
    from model.pipeline_image import SamplingOptions
    from model.text_qwen import QUOTE_PAIRS_DIFFUSERS, QUOTE_PAIRS_OFFICIAL

    reference = None
    if cfg.model_flavour == "edit":
        reference = read_validation_image(cfg.validation_image)

    t0 = time.time()
    m = load_longcat_image(cfg.pretrained_model_name_or_path, cfg.model_flavour, device=cfg.device,
                           dtype=DTYPES[cfg.dtype])
    print(f"loaded {m.path} ({'edit' if m.is_edit else 't2i'}) on {m.device} in {m.dtype} in {time.time() - t0:.1f}s")
    if cfg.lora:
        from model.lora import load_lora
        print(f"LoRA {cfg.lora}: {len(load_lora(cfg.lora, m.dit))} modules adapted")
    if cfg.model_flavour != "edit" and m.is_edit:
        raise ConfigError(f"{m.path} is a LongCat-Image-Edit checkpoint: use --model_flavour edit with --validation_image")

    opts = SamplingOptions(num_inference_steps=cfg.validation_num_inference_steps,
                           guidance_scale=cfg.validation_guidance, cfg_renorm=cfg.validation_cfg_renorm,
                           cfg_renorm_min=cfg.validation_cfg_renorm_min)
    quotes = QUOTE_PAIRS_OFFICIAL if cfg.prompt_quote_pairs == "official" else QUOTE_PAIRS_DIFFUSERS
    for path in render(m, [(cfg.validation_prompt, reference)], cfg.output_dir, opts,
                       parse_resolutions(cfg.validation_resolution), seed=cfg.validation_seed,
                       negative_prompt=cfg.validation_negative_prompt, num_images=cfg.num_validation_images,
                       rewrite=cfg.enable_prompt_rewrite, quote_pairs=quotes, grid=False):
        print(f"wrote {path}")


def main_video(cfg: ValidateConfig, argv):
    """LongCat-Video: T2V, or I2V from --validation_image; writes an MP4 (and PNG frames with --save_frames)."""
    from config import parse_argv, read_json_config
    from model.loading import load_longcat_video
    raw = parse_argv(list(argv))
    named = [str(v) for v in (read_json_config(raw["config"]) if "config" in raw else {}).values()] + list(map(str, raw.values()))
    if any("qwen" in v.lower() for v in named):
        print("note: LongCat-Video's released text encoder is umT5-XXL (4096-d, 512 tokens), which is what is used; "
              "the Qwen2.5-VL named in the config / quickstart does not fit this model")
    image = None
    if cfg.validation_image:
        image = read_validation_image(cfg.validation_image)
    t0 = time.time()
    m = load_longcat_video(cfg.pretrained_model_name_or_path, device=cfg.device, dtype=DTYPES[cfg.dtype])
    print(f"loaded {m.path} on {m.device} in {m.dtype} in {time.time() - t0:.1f}s")
    if cfg.lora:
        from model.lora import load_lora
        print(f"LoRA {cfg.lora}: {len(load_lora(cfg.lora, m.dit))} modules adapted")
    for path in render_videos(m, [(cfg.validation_prompt, image)], cfg.output_dir,
                              parse_resolutions(cfg.validation_resolution), num_frames=cfg.validation_num_video_frames,
                              steps=cfg.validation_num_inference_steps, guidance=cfg.validation_guidance,
                              negative_prompt=cfg.validation_negative_prompt, seed=cfg.validation_seed,
                              num_videos=cfg.num_validation_images, fps=cfg.framerate or 15,
                              save_frames=cfg.save_frames):
        print(f"wrote {path}")


def render_videos(m, jobs, out_dir, sizes, *, num_frames, steps, guidance, seed, negative_prompt="", num_videos=1,
                  fps=15, save_frames=False, progress=True) -> list:
    """jobs: [(prompt, start frame PIL image or None)]. LongCat-Video T2V (I2V with a start frame) of every job at
    every (W, H) in `sizes` (None: 832x480), video i seeded with seed + i; one MP4 each (and its frames as PNGs with
    save_frames). Returns the MP4 paths."""
    from data.video_io import write_frames_png, write_mp4
    from model.pipeline_video import generate_video
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for j, (prompt, image) in enumerate(jobs):
        for size in sizes:
            w, h = size or (832, 480)
            for i in range(num_videos):
                generator = torch.Generator("cpu").manual_seed(seed + i)
                video = generate_video(m, prompt, width=w, height=h, num_frames=num_frames,
                                       num_inference_steps=steps, guidance=guidance, negative_prompt=negative_prompt,
                                       generator=generator, image=image, progress=progress)
                tag = "i2v" if image is not None else "t2v"
                stem = os.path.join(out_dir, f"{tag}-{j}-{w}x{h}-{video.shape[2]}f-seed{seed + i}")
                write_mp4(stem + ".mp4", video[0], fps=fps)
                paths.append(stem + ".mp4")
                if save_frames:
                    write_frames_png(stem, video[0])
    return paths


def render(m, jobs, out_dir, opts, sizes, *, seed, negative_prompt="", num_images=1, rewrite=False,
           quote_pairs=None, grid=True) -> list:
    """jobs: [(prompt, reference PIL image or None)]. Renders every job at every size (None: the model's default
    size: 1024^2, or the official Edit rule) with a fresh CPU generator seeded with `seed`, writes one PNG per image
    (and grid.png of them all when `grid`), returns the paths."""
    from PIL import Image

    from model.pipeline_image import generate_edit, generate_t2i
    from model.text_qwen import QUOTE_PAIRS_OFFICIAL
    quote_pairs = quote_pairs or QUOTE_PAIRS_OFFICIAL
    os.makedirs(out_dir, exist_ok=True)
    paths, images = [], []
    for j, (prompt, reference) in enumerate(jobs):
        for size in sizes:
            generator = torch.Generator("cpu").manual_seed(seed)
            w, h = size if size else (None, None) if reference is not None else (1024, 1024)
            kw = dict(width=w, height=h, generator=generator, negative_prompt=negative_prompt, opts=opts,
                      num_images_per_prompt=num_images, quote_pairs=quote_pairs)
            if reference is not None:
                out = generate_edit(m, prompt, reference, **kw)
            else:
                out = generate_t2i(m, prompt, rewrite=rewrite, **kw)
            for i, im in enumerate(out):
                tag = "edit" if reference is not None else "t2i"
                paths.append(os.path.join(out_dir, f"{tag}-{j}-{im.width}x{im.height}-seed{seed}-{i}.png"))
                im.save(paths[-1])
                images.append(im)
    if grid and images:
        sheet = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
        x = 0
        for im in images:
            sheet.paste(im, (x, 0))
            x += im.width
        sheet.save(os.path.join(out_dir, "grid.png"))
    return paths


def cli(argv) -> int:
    """main() with bad input turned into a one-line reason on stderr and exit status 2."""
    from model.loading import WeightsError
    try:
        main(argv)
    except (ConfigError, WeightsError, ValueError, OSError) as e:
        print(f"validate.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
