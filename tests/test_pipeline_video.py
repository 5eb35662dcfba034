"""LongCat-Video sampling end to end on a tiny random release-layout folder: T2V and I2V MP4s via validate.py, the
I2V noise convention (start-frame latent = the posterior sample drawn right after the noise), bad sizes refused."""
import numpy as np
import pytest
import torch
from PIL import Image

import validate
from data.video_io import read_video
from model.loading import load_longcat_video
from model.pipeline_video import LATENT_CHANNELS, generate_video, image_to_video_tensor
from model.tiny_checkpoint import write_tiny_longcat_video
from model.vae_video import latent_frames


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_longcat_video(tmp_path_factory.mktemp("video") / "tiny")


def start_image():
    return Image.fromarray((np.random.RandomState(0).rand(40, 60, 3) * 255).astype("uint8"))


@pytest.mark.parametrize("i2v", [False, True])
def test_validate_writes_a_playable_mp4(folder, tmp_path, capsys, i2v):
    args = ["--model_family", "longcat_video", "--pretrained_model_name_or_path", str(folder), "--validation_prompt",
            "a red ball rolls", "--validation_resolution", "64x48", "--validation_num_video_frames", "9",
            "--validation_num_inference_steps", "3", "--output_dir", str(tmp_path), "--save_frames"]
    if i2v:
        start_image().save(tmp_path / "start.png")
        args += ["--validation_image", str(tmp_path / "start.png")]
    assert validate.cli(args) == 0
    out = capsys.readouterr().out
    mp4 = [line.split("wrote ", 1)[1] for line in out.splitlines() if line.startswith("wrote ") and line.endswith(".mp4")]
    frames = read_video(mp4[0])
    assert frames.shape == (9, 48, 64, 3) and (frames.shape[0] - 1) % 4 == 0
    assert len(list((tmp_path / mp4[0].rsplit("/", 1)[1][:-4]).glob("*.png"))) == 9


def test_i2v_start_frame_is_the_vae_round_trip_of_the_image(folder):
    m = load_longcat_video(str(folder))
    img, seed, (w, h, F) = start_image(), 3, (64, 48, 9)
    video = generate_video(m, "a ball", width=w, height=h, num_frames=F, num_inference_steps=3, guidance=4.0,
                           generator=torch.Generator().manual_seed(seed), image=img, progress=False)
    g = torch.Generator().manual_seed(seed)  # the release's order: noise first, then the posterior sample
    torch.randn((1, LATENT_CHANNELS, latent_frames(F), h // 8, w // 8), generator=g)
    z0 = m.vae.encode(image_to_video_tensor(img, w, h), sample=True, generator=g)
    want = m.vae.decode(z0)[:, :, 0]  # the causal decoder: frame 0 depends on latent 0 only
    assert torch.allclose(video[:, :, 0], want, atol=1e-5), (video[:, :, 0] - want).abs().max()
    again = generate_video(m, "a ball", width=w, height=h, num_frames=F, num_inference_steps=3, guidance=4.0,
                           generator=torch.Generator().manual_seed(seed), image=img, progress=False)
    assert torch.equal(video, again)  # same seed, same video


@pytest.mark.parametrize("args, reason", [
    (["--validation_num_video_frames", "90"], "4k+1 frames"),
    (["--validation_resolution", "100x48"], "not a multiple of 16"),
    (["--model_flavour", "edit"], "one flavour"),
])
def test_impossible_video_sizes_are_refused(args, reason, capsys, tmp_path):
    assert validate.cli(["--model_family", "longcat_video", *args, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and "\n" not in err


def test_qwen_named_in_a_config_gets_a_note(folder, tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_family": "longcat_video", "pretrained_t5_model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct",'
                   f' "pretrained_model_name_or_path": "{folder}", "validation_resolution": "32x32",'
                   ' "validation_num_video_frames": 1, "validation_num_inference_steps": 1}')
    assert validate.cli(["--config", str(cfg), "--output_dir", str(tmp_path)]) == 0
    assert "umT5-XXL" in capsys.readouterr().out


def test_continuation_with_kv_cache_equals_plain_cond_mode(folder, monkeypatch):
    """Video continuation: the cond frames' K/V computed once equals running them in cond mode at every step."""
    m = load_longcat_video(str(folder))
    cond = torch.rand(3, 5, 48, 64) * 2 - 1  # 5 frames -> 2 cond latents
    kw = dict(width=64, height=48, num_frames=13, num_inference_steps=3, guidance=4.0, cond_video=cond, progress=False)
    cached = generate_video(m, "a ball", generator=torch.Generator().manual_seed(2), **kw)
    monkeypatch.setattr(m.dit, "cache_cond_kv", lambda latents: None)  # no cache: full cond-mode calls
    plain = generate_video(m, "a ball", generator=torch.Generator().manual_seed(2), **kw)
    assert cached.shape == (1, 3, 13, 48, 64)
    assert (cached - plain).abs().max() < 1e-4
