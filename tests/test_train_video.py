"""
train_video.py on tiny random LongCat-Video models and synthetic clips (CPU): the objective is the released model's
(target x0 - eps, clean cond frames at timestep 0 left out of the loss), the demo's loss falls, resume is bit-exact,
2 processes equal 1, the LongCat-Video quickstart config trains, the LoRA exports load (ours, diffusers/PEFT layout,
the official LongCat-Video layout), bad input fails at start-up.
"""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import train_video
from model.dit_video import LongCatVideoDiT, VideoDiTConfig
from model.tiny_checkpoint import TINY_VIDEO_DIT
from tests.test_train_image import assert_runs_match, losses
from test_video_data import QUICKSTART_I2V  # the quickstart's multidatabackend.json, verbatim

REPO = Path(__file__).resolve().parents[1]


class Spy(torch.nn.Module):
    """Wraps a DiT and records what it was called with."""

    def __init__(self, dit):
        super().__init__()
        self.dit, self.calls = dit, []

    def forward(self, x, t, embeds, mask, num_cond_latents=0):
        self.calls.append(dict(x=x.detach().clone(), t=t.detach().clone(), c=num_cond_latents))
        return self.dit(x, t, embeds, mask, num_cond_latents=num_cond_latents)


def tiny_inputs(B=2, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(B, 16, T, 4, 4, generator=g), torch.randn(B, 16, T, 4, 4, generator=g)
    embeds, mask = torch.randn(B, 8, 64, generator=g), torch.ones(B, 8, dtype=torch.int64)
    return x0, noise, torch.tensor([0.3, 0.8])[:B], embeds, mask


def test_i2v_loss_ignores_frame_0_and_gives_it_timestep_0():
    torch.manual_seed(0)
    spy = Spy(LongCatVideoDiT(VideoDiTConfig(**TINY_VIDEO_DIT)))
    x0, noise, sigma, embeds, mask = tiny_inputs()
    loss = train_video.training_loss(spy, x0, noise, sigma, embeds, mask, num_cond=1)
    call = spy.calls[-1]
    assert call["c"] == 1
    assert torch.equal(call["t"][:, 0], torch.zeros(2)) and torch.allclose(call["t"][:, 1:], 1000 * sigma[:, None]
                                                                           .expand(2, 2))
    assert torch.equal(call["x"][:, :, 0], x0[:, :, 0])  # the condition is clean x0
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(call["x"][:, :, 1:], (1 - s[..., None]) * x0[:, :, 1:] + s[..., None] * noise[:, :, 1:])
    other = noise.clone()
    other[:, :, 0] = 100 * torch.randn_like(other[:, :, 0])  # the target there is x0 - eps: changing eps changes it
    assert train_video.training_loss(spy, x0, other, sigma, embeds, mask, num_cond=1).item() == loss.item()
    # without a condition frame 0 counts
    assert train_video.training_loss(spy, x0, other, sigma, embeds, mask, num_cond=0).item() != \
        train_video.training_loss(spy, x0, noise, sigma, embeds, mask, num_cond=0).item()


def test_target_is_x0_minus_eps():
    """A network that outputs exactly x0 - eps has zero loss (the opposite sign of LongCat-Image's target)."""
    x0, noise, sigma, embeds, mask = tiny_inputs()

    class Oracle(torch.nn.Module):
        def forward(self, x, t, embeds, mask, num_cond_latents=0):
            return x0 - noise
    assert train_video.training_loss(Oracle(), x0, noise, sigma, embeds, mask, num_cond=2).item() == 0.0
    assert train_video.training_loss(Oracle(), noise, x0, sigma, embeds, mask).item() > 1.0  # the flipped sign


# -----------------------------------------------------------------------------
# end to end on a tiny LongCat-Video folder and synthetic clips

GOLDEN = REPO / "tests" / "assets" / "loss_video_tiny.txt"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data.synthetic import make_synthetic_video_dataset, write_i2v_backend
    from model.tiny_checkpoint import write_tiny_longcat_video
    root = tmp_path_factory.mktemp("train-video")
    ckpt = write_tiny_longcat_video(root / "tiny")
    clips, starts = make_synthetic_video_dataset(str(root / "data"), n=8, sizes=((64, 64),), num_frames=13)
    backend = write_i2v_backend(str(root / "i2v.json"), clips, starts, str(root / "cache"), num_frames=13)
    return dict(root=root, ckpt=str(ckpt), backend=backend, clips=clips, starts=starts)


def args(world, out, **kw):
    base = dict(model_type="lora", pretrained_model_name_or_path=world["ckpt"], data_backend_config=world["backend"],
                output_dir=str(out), train_batch_size=2, max_train_steps=6, learning_rate=1e-3, lora_rank=4,
                lora_dropout=0.0, optimizer="adamw", lr_scheduler="cosine", lr_warmup_steps=2,
                mixed_precision="no", gradient_checkpointing=True, checkpoint_step_interval=3,
                validation_disable=True, caption_dropout_probability=0.2, flow_schedule_shift=3.0,
                video_task_mix='{"t2v": 1, "i2v": 1, "continuation": 1}', continuation_cond_frames=5)
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def test_demo_loss_falls_and_follows_golden_curve(world, tmp_path):
    out = tmp_path / "full"
    train_video.main(args(world, out, model_type="full", max_train_steps=40, train_batch_size=4,
                          gradient_checkpointing=False, lr_warmup_steps=5, checkpoint_step_interval=0,
                          video_task_mix='{"t2v": 0.2, "i2v": 0.8}'))
    curve = losses(out)
    first, last = sum(curve[:10]) / 10, sum(curve[-10:]) / 10
    print(f"loss {first:.4f} -> {last:.4f}")
    assert len(curve) == 40 and last < 0.8 * first
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert {"step", "loss", "lr", "step_time", "peak_mem_bytes"} <= set(rows[0])
    assert (out / "dit" / "config.json").exists() and (out / "data_report.json").exists()
    if os.environ.get("LONGCAT_UPDATE_GOLDEN"):
        GOLDEN.write_text("".join(f"{i + 1} {v:.6f}\n" for i, v in enumerate(curve)))
    golden = [float(line.split()[1]) for line in GOLDEN.read_text().splitlines()]
    diffs = [abs(a - b) for a, b in zip(curve[:20], golden[:20])]
    assert max(diffs) < 2e-3, f"loss curve left the golden one: max diff {max(diffs):.2e} (steps 1-20)"


def test_resume_reproduces_the_uninterrupted_run(world, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = dict(lora_dropout=0.1)  # dropout exercises the restored global RNG too
    train_video.main(args(world, straight, **common))
    real_save = checkpoint.save_checkpoint

    def save_then_crash(output_dir, step, **kw):
        path = real_save(output_dir, step, **kw)
        if step == 3:
            raise KeyboardInterrupt("simulated crash after checkpoint-3")
        return path
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_video.main(args(world, resumed, **common))
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    train_video.main(args(world, resumed, **common))
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume changed the LoRA weights"
    assert losses(straight) == losses(resumed)


@pytest.mark.slow
def test_two_processes_match_one(world, tmp_path, torchrun):
    one, two = tmp_path / "one", tmp_path / "two"
    train_video.main(args(world, one, train_batch_size=2, max_train_steps=4))
    torchrun(2, REPO / "train_video.py", *args(world, two, train_batch_size=1, max_train_steps=4))
    assert_runs_match(one, two, steps=4)


QUICKSTART_VIDEO = """{
  "model_family": "longcat_video",
  "model_flavour": "final",
  "model_type": "lora",
  "train_batch_size": 1,
  "gradient_checkpointing": true,
  "lora_rank": 8,
  "learning_rate": 1e-4,
  "validation_resolution": "480x832",
  "validation_num_video_frames": 93,
  "validation_num_inference_steps": 40,
  "validation_guidance": 4.0,
  "validation_using_datasets": true,
  "eval_dataset_id": "longcat-video-val"
}"""


def test_video_quickstart_config_trains_two_steps(world, tmp_path, capsys):
    """The Hindi LongCat-Video I2V quickstart's files (003), unchanged except paths: 93-frame clips at 480p."""
    from data.synthetic import make_synthetic_video_dataset
    clips, starts = make_synthetic_video_dataset(str(tmp_path / "data"), n=1, sizes=((128, 96),), num_frames=93)
    data = (QUICKSTART_I2V.replace("/data/video-clips", clips).replace("/data/video-start-frames", starts)
            .replace("/cache/", str(tmp_path / "cache") + "/"))
    (tmp_path / "multidatabackend.json").write_text(data)
    cfg = QUICKSTART_VIDEO.replace(
        '"model_type"', f'"pretrained_model_name_or_path": "{world["ckpt"]}",\n  "data_backend_config": '
                        f'"{tmp_path / "multidatabackend.json"}",\n  "output_dir": "{tmp_path / "out"}",\n  "model_type"')
    (tmp_path / "config.json").write_text(cfg)
    assert train_video.cli(["--config", str(tmp_path / "config.json"), "--max_train_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "@93" in out and "longcat-video-val" in out  # 93-frame buckets; the missing eval split is named
    assert len(losses(tmp_path / "out")) == 2 and (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_lora_exports_load(world, tmp_path):
    """diffusers/PEFT layout and the official LongCat-Video layout hold the same adapters; validate.py samples with
    the trained LoRA into an MP4; validation during training writes MP4s (T2V and I2V)."""
    from model.loading import load_longcat_video
    from model.lora import is_longcat_video_lora, load_lora
    out = tmp_path / "lora"
    train_video.main(args(world, out, max_train_steps=2, lora_alpha=2.0, validation_disable=False,
                          validation_step_interval=2, validation_prompt="a red circle moving right",
                          validation_using_datasets=True, validation_num_inference_steps=2))
    assert sorted(p.name[:3] for p in (out / "validation" / "step-2").glob("*.mp4")) == ["i2v", "t2v"]
    official = load_file(str(out / "pytorch_lora_weights_longcat_video.safetensors"))
    assert is_longcat_video_lora(official)
    x = torch.randn(1, 16, 2, 4, 4)
    t, text, mask = torch.tensor([500.0]), torch.randn(1, 512, 64), torch.ones(1, 512, dtype=torch.int64)
    outs = []
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_longcat_video.safetensors"):
        m = load_longcat_video(world["ckpt"])
        assert len(load_lora(str(out / name), m.dit)) == 2 * 7  # 7 target layers per block
        with torch.no_grad():
            outs.append(m.dit(x, t, text, mask))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5
    import validate
    assert validate.cli(["--model_family", "longcat_video", "--pretrained_model_name_or_path", world["ckpt"],
                         "--lora", str(out / "pytorch_lora_weights.safetensors"), "--validation_resolution", "64x64",
                         "--validation_num_video_frames", "5", "--validation_num_inference_steps", "2",
                         "--output_dir", str(tmp_path / "val")]) == 0
    assert list((tmp_path / "val").glob("*.mp4"))


@pytest.mark.parametrize("override, message", [
    (dict(learning_rat=1e-4), "did you mean 'learning_rate'"),
    (dict(model_family="longcat_image"), "train_image.py"),
    (dict(video_task_mix='{"i2v": 1, "v2v": 1}'), "unknown task"),
    (dict(continuation_cond_frames=6), "4k+1"),
    (dict(validation_num_video_frames=90), "4k+1"),
    (dict(continuation_cond_frames=13), "continuation on 13 cond frames"),  # the clips have 13 frames
])
def test_bad_config_fails_at_start(world, tmp_path, capsys, override, message):
    assert train_video.cli(args(world, tmp_path / "bad", **override)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_clips_are_reported_and_invalid_num_frames_fails(world, tmp_path, capsys):
    import shutil
    data = tmp_path / "clips"
    shutil.copytree(world["clips"], data)
    (data / "zz-broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    (data / "zz-broken.txt").write_text("a broken clip")
    backend = json.loads(Path(world["backend"]).read_text())
    backend[0]["instance_data_dir"] = str(data)
    (tmp_path / "b.json").write_text(json.dumps(backend))
    assert train_video.cli(args(world, tmp_path / "out", data_backend_config=tmp_path / "b.json",
                                max_train_steps=1)) == 0
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert [Path(e["path"]).name for e in report["excluded"]] == ["zz-broken.mp4"]
    backend[0]["video"] = {"num_frames": 12}
    (tmp_path / "b.json").write_text(json.dumps(backend))
    assert train_video.cli(args(world, tmp_path / "out2", data_backend_config=tmp_path / "b.json")) == 2
    assert "13" in capsys.readouterr().err  # names the nearest valid counts (9 or 13)


def test_lora_trains_through_block_sparse_attention(world, tmp_path, capsys):
    """attention_implementation bsa: the DiT's self-attention is our block-sparse kernel (PyTorch path on CPU) and
    the LoRA gradients flow through it, and its loss curve tracks the dense run's (half the key blocks dropped)."""
    bsa = '{"sparsity": 0.5, "chunk_3d_shape_q": [1, 2, 2], "chunk_3d_shape_k": [1, 2, 2]}'
    kw = dict(max_train_steps=8, video_task_mix='{"t2v": 1}', checkpoint_step_interval=0)
    train_video.main(args(world, tmp_path / "bsa", attention_implementation="bsa", bsa=bsa, **kw))
    assert "block-sparse self-attention on" in capsys.readouterr().out
    train_video.main(args(world, tmp_path / "dense", **kw))
    a = load_file(str(tmp_path / "bsa" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "dense" / "pytorch_lora_weights.safetensors"))
    ups = [k for k in a if "lora_B" in k]
    assert all(a[k].abs().max() > 0 for k in ups)  # trained (lora_B starts at zero)
    assert any(not torch.equal(a[k], b[k]) for k in ups)  # the sparse attention changed the gradients
    sparse, dense = losses(tmp_path / "bsa"), losses(tmp_path / "dense")
    print("BSA:", sparse, "\ndense:", dense)
    assert max(abs(x - y) / y for x, y in zip(sparse, dense)) < 0.05  # the loss tracks the dense run's


def test_int8_umt5_text_encoder(world, tmp_path, capsys):
    """text_encoder_1_precision on umT5: the linears are quantized (T5's fp32 `wo` island kept) before the prompt
    cache is filled, in a cache of its own."""
    out = tmp_path / "q"
    assert train_video.cli(args(world, out, max_train_steps=2, text_encoder_1_precision="int8-quanto")) == 0
    assert "text-encoder linear layers quantized" in capsys.readouterr().out
    assert len(losses(out)) == 2
