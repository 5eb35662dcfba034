"""
End to end against diffusers: a tiny LongCat-Image (and -Edit) folder written by diffusers' save_pretrained loads
with validate.py unchanged, and the PNG it writes equals LongCatImagePipeline / LongCatImageEditPipeline output
(uint8 max abs diff <= 1) for the same prompt, size, steps, guidance and seed.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, LongCatImageEditPipeline, LongCatImagePipeline,
                       LongCatImageTransformer2DModel)
from PIL import Image

import validate
from model.loading import load_longcat_image
from model.pipeline_image import SamplingOptions, edit_output_size, generate_t2i
from model.text_qwen import make_text_processor
from model.tiny_checkpoint import write_tiny_longcat_image
from model.tiny_qwen import build_tiny_image_processor, build_tiny_qwen25vl, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


def perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()  # as from_pretrained leaves it (diffusers' resnets take another memory layout in train mode)


def diffusers_folder(root: Path, edit: bool):
    """Tiny random components saved with diffusers' save_pretrained. Only the processor cannot be saved without
    torchvision (transformers' video-processor lookup); its image-processor config is written beside it."""
    torch.manual_seed(1)
    tok = build_tiny_tokenizer()
    te, ip = build_tiny_qwen25vl(tok, seed=1), build_tiny_image_processor()
    tr = perturb(LongCatImageTransformer2DModel(in_channels=64, num_layers=1, num_single_layers=2,
                                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                                pooled_projection_dim=64, axes_dims_rope=[4, 6, 6]), 2)
    vae = perturb(AutoencoderKL(block_out_channels=[16, 16, 32, 32], layers_per_block=1, latent_channels=16,
                                norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                                shift_factor=0.1159, scaling_factor=0.3611, down_block_types=["DownEncoderBlock2D"] * 4,
                                up_block_types=["UpDecoderBlock2D"] * 4), 3)
    cls = LongCatImageEditPipeline if edit else LongCatImagePipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=te, tokenizer=tok,
               text_processor=make_text_processor(tok, ip), transformer=tr)
    try:
        pipe.save_pretrained(root)
    except AttributeError:  # 'NoneType' object has no attribute '_auto_class': the absent video processor
        pass
    ip.save_pretrained(root / "text_processor")
    pipe.save_config(root)  # model_index.json
    return pipe


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    root = tmp_path_factory.mktemp("longcat_t2i")
    return root, diffusers_folder(root, edit=False)


@pytest.fixture(scope="module")
def edit(tmp_path_factory):
    root = tmp_path_factory.mktemp("longcat_edit")
    return root, diffusers_folder(root, edit=True)


def run_validate(*args):
    r = subprocess.run([sys.executable, str(REPO / "validate.py"), *args], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = [line.split("wrote ", 1)[1] for line in r.stdout.splitlines() if line.startswith("wrote ")]
    return [np.asarray(Image.open(p).convert("RGB")).astype(np.int16) for p in pngs]


def test_t2i_png_matches_diffusers(t2i, tmp_path):
    root, pipe = t2i
    prompt = 'A poster that says "Hi" in a garden, don\'t crop it'
    got = run_validate("--pretrained_model_name_or_path", str(root), "--validation_prompt", prompt,
                       "--validation_resolution", "96x64", "--validation_num_inference_steps", "4",
                       "--validation_guidance", "4.0", "--validation_seed", "7", "--num_validation_images", "2",
                       "--output_dir", str(tmp_path))
    want = pipe(prompt=prompt, width=96, height=64, num_inference_steps=4, guidance_scale=4.0,
                generator=torch.Generator("cpu").manual_seed(7), num_images_per_prompt=2,
                enable_prompt_rewrite=False).images
    assert len(got) == 2 and got[0].shape == (64, 96, 3)
    diffs = [np.abs(g - np.asarray(w).astype(np.int16)).max() for g, w in zip(got, want)]
    print("T2I uint8 max abs diff per image:", diffs)
    assert max(diffs) <= 1


def test_edit_png_matches_diffusers(edit, tmp_path, monkeypatch):
    root, pipe = edit
    ref = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 56, 3), dtype=np.uint8))
    ref.save(tmp_path / "ref.png")
    w, h = edit_output_size(56, 40, area=96 * 64)  # keep CPU time low: the official rule at a small area
    import diffusers.pipelines.longcat_image.pipeline_longcat_image_edit as edit_module
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: edit_output_size(56, 40, 96 * 64))
    prompt = "make the sky 'red'"
    got = run_validate("--pretrained_model_name_or_path", str(root), "--model_flavour", "edit",
                       "--validation_image", str(tmp_path / "ref.png"), "--validation_prompt", prompt,
                       "--validation_resolution", f"{w}x{h}", "--validation_num_inference_steps", "3",
                       "--validation_guidance", "4.5", "--validation_seed", "3", "--output_dir", str(tmp_path))
    want = pipe(image=ref, prompt=prompt, num_inference_steps=3, guidance_scale=4.5,
                generator=torch.Generator("cpu").manual_seed(3)).images
    diff = np.abs(got[0] - np.asarray(want[0]).astype(np.int16)).max()
    print(f"Edit {w}x{h} uint8 max abs diff:", diff)
    assert got[0].shape == (h, w, 3) and diff <= 1


@pytest.mark.parametrize("size", [(1024, 1024), (1024, 768), (768, 1344), (333, 777), (50, 2000)])
def test_edit_output_size_rule(size):
    from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import calculate_dimensions
    assert edit_output_size(*size) == calculate_dimensions(1024 * 1024, size[0] / size[1])
    assert edit_output_size(1024, 768) == (1184, 896)


def test_latents_bitwise_in_process(t2i):
    """Packed latents after sampling are bit-identical to diffusers' output_type='latent' (fp32, CPU). Both sides run
    the same ops on the same shapes: the negative prompt is given per image, so diffusers encodes it at batch 2 as we
    do (its default "" is encoded at batch 1 and broadcast: another matmul shape, equal only up to rounding)."""
    root, pipe = t2i
    m = load_longcat_image(str(root))
    opts = SamplingOptions(num_inference_steps=3, guidance_scale=3.0, progress=False)
    ours = generate_t2i(m, ["a cat", "a dog"], width=64, height=64, generator=torch.Generator().manual_seed(0),
                        opts=opts, output="latent")
    ref = pipe(prompt=["a cat", "a dog"], width=64, height=64, num_inference_steps=3, guidance_scale=3.0,
               negative_prompt=["", ""], generator=torch.Generator().manual_seed(0), enable_prompt_rewrite=False,
               output_type="latent").images
    assert torch.equal(ours, ref)


def test_our_tiny_folder_opens_in_diffusers(tmp_path):
    """The folder model/tiny_checkpoint.py writes is a real diffusers folder: diffusers loads it, same latents."""
    root = write_tiny_longcat_image(tmp_path / "tiny")
    m = load_longcat_image(str(root))
    ref = LongCatImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
                               vae=AutoencoderKL.from_pretrained(root / "vae"),
                               transformer=LongCatImageTransformer2DModel.from_pretrained(root / "transformer"),
                               text_encoder=m.text_encoder, tokenizer=m.tokenizer, text_processor=m.text_processor)
    opts = SamplingOptions(num_inference_steps=2, guidance_scale=4.5, progress=False)
    ours = generate_t2i(m, "a red circle", width=64, height=48, generator=torch.Generator().manual_seed(5), opts=opts,
                        output="latent")
    want = ref(prompt="a red circle", width=64, height=48, num_inference_steps=2, guidance_scale=4.5,
               generator=torch.Generator().manual_seed(5), enable_prompt_rewrite=False, output_type="latent").images
    assert torch.equal(ours, want)


@pytest.mark.parametrize("args, reason", [
    (["--validation_resolution", "100x64"], "multiples of 16"),
    (["--model_flavour", "edit"], "needs a reference image"),
    (["--validation_resolutin", "64"], "did you mean 'validation_resolution'"),
    (["--pretrained_model_name_or_path", "/nonexistent/longcat"], "not a model folder"),
    (["--validation_guidance", "high"], "validation_guidance"),
])
def test_bad_input_is_one_line(args, reason, capsys, tmp_path):
    assert validate.cli([*args, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and "\n" not in err and "Traceback" not in err


def test_missing_weights_named(tmp_path, capsys):
    root = write_tiny_longcat_image(tmp_path / "tiny")
    (root / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    assert validate.cli(["--pretrained_model_name_or_path", str(root), "--output_dir", str(tmp_path)]) == 2
    assert "diffusion_pytorch_model.safetensors" in capsys.readouterr().err


def test_offline_hub_id_says_which_path(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    assert validate.cli(["--model_flavour", "dev", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "meituan-longcat/LongCat-Image-Dev" in err and "--pretrained_model_name_or_path" in err


def test_validation_image_is_read_like_training(tmp_path, capsys, monkeypatch):
    """Issue 15 item 7: --validation_image goes through data/images.load_image (a 16-bit PNG was 99.6% white, a
    transparent background black), and a decompression bomb is one line naming the file, exit 2."""
    from data.images import load_image
    gray16 = np.full((8, 8), 128 * 257, dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "cut.png")
    for name, want in (("g16.png", 128.0), ("cut.png", None)):
        img = validate.read_validation_image(str(tmp_path / name))
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.asarray(load_image(tmp_path / name)))
        if want is not None:
            assert np.asarray(img).mean() == want
    cut = np.asarray(validate.read_validation_image(str(tmp_path / "cut.png")))
    assert cut[0, 0].tolist() == [255, 0, 0] and cut[1, 1].tolist() == [255, 255, 255]  # background white, not black

    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 px is over twice the limit: DecompressionBombError
    for family in (["--model_flavour", "edit"], ["--model_family", "longcat_video"]):
        assert validate.cli([*family, "--validation_image", str(tmp_path / "bomb.png"), "--validation_prompt", "x",
                             "--pretrained_model_name_or_path", str(tmp_path / "none"),
                             "--output_dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert "bomb.png" in err and "decompression-bomb" in err and "\n" not in err and "Traceback" not in err
