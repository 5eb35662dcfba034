"""
--estimate_memory: it reads config.json files only (a folder without weights works), its weight and trainable terms
equal the bytes of the real modules (quantized, with LoRA), block swap / FSDP / precision move the right terms, and on
CPU the estimate of a tiny run is within 25% of the run's measured peak RSS.
"""
import shutil
import sys
from pathlib import Path

import pytest

import train_image
from data.synthetic import make_synthetic_dataset, write_t2i_backend
from memory_estimate import (GB, dit_blocks, estimate, format_estimate, frozen_bytes, measured_peak_rss,
                             meta_models)
from model.lora import LONGCAT_IMAGE_LORA_TARGETS, apply_lora
from model.tiny_checkpoint import write_tiny_longcat_image, write_tiny_longcat_video
from quant.convert import dit_skip, quantize_model
from trainer import ALIASES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    ckpt = write_tiny_longcat_image(root / "tiny")
    configs_only = root / "configs-only"  # the same folder without a single weight file
    shutil.copytree(ckpt, configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
    images = make_synthetic_dataset(str(root / "images"), n=8, sizes=[(256, 256)], seed=0)
    backend = write_t2i_backend(str(root / "t2i.json"), images, str(root / "cache"), resolution=256,
                                resolution_type="pixel_area")
    return dict(root=root, ckpt=str(ckpt), configs_only=str(configs_only), backend=backend)


def image_cfg(world, **kw):
    from config import load_config
    opts = dict(pretrained_model_name_or_path=world["ckpt"], data_backend_config=world["backend"],
                output_dir=str(world["root"] / "out"), train_batch_size=2, max_train_steps=3, lora_rank=8,
                lora_dropout=0.0, optimizer="adamw", mixed_precision="no", validation_disable=True,
                checkpoint_step_interval=0, resume_from_checkpoint="", **kw)
    cfg = load_config(train_image.TrainImageConfig, [f"--{k}={v}" for k, v in opts.items()], aliases=ALIASES,
                      quiet=True)
    train_image.check_config(cfg)
    return cfg


def test_cli_prints_the_table_from_config_files_only(world, capsys):
    """No weights in the folder, no data discovery: the estimate still prints, and main() returns before training."""
    out = world["root"] / "cli-out"
    assert train_image.cli([f"--pretrained_model_name_or_path={world['configs_only']}",
                            f"--data_backend_config={world['backend']}", f"--output_dir={out}",
                            "--estimate_memory"]) == 0
    text = capsys.readouterr().out
    assert "expected peak" in text and "256x256 x batch 1" in text and "activations saved for backward" in text
    assert not out.exists()  # nothing written: discovery and the caches never ran


@pytest.mark.parametrize("precision,modulation", [("no_change", False), ("int8-quanto", False),
                                                  ("fp8-torchao", True)])
def test_weight_terms_equal_the_real_modules(world, precision, modulation):
    """The DiT frozen bytes and LoRA parameter count of the meta-device estimate equal those of the real tiny DiT
    quantized (quant/convert.py) and LoRA-wrapped (model/lora.py) as the Trainer does it."""
    from model.loading import load_image_dit
    cfg = image_cfg(world, base_model_precision=precision, quantize_modulation=modulation)
    est = estimate(cfg, "longcat_image", "cpu")
    dit = load_image_dit(Path(world["ckpt"]) / "transformer")
    quantize_model(dit, precision, skip=dit_skip(modulation))
    apply_lora(dit, LONGCAT_IMAGE_LORA_TARGETS, rank=8)
    real_frozen = sum(t.nbytes for t in [*dit.parameters(), *dit.buffers()] if not t.requires_grad)
    real_trainable = sum(p.numel() for p in dit.parameters() if p.requires_grad)
    assert est.training["DiT frozen weights"] == real_frozen
    assert est.inputs["trainable_params"] == real_trainable
    assert est.training["trainable weights (fp32 master)"] == 4 * real_trainable
    assert est.training["optimizer states"] == 8 * real_trainable


def test_the_terms_follow_the_options(world):
    """bf16 halves the weights on CUDA, block swap keeps two slots of swapped blocks on CUDA (nothing on CPU with the
    host store), DDP doubles the gradients, checkpointing shrinks the saved activations, full fine-tuning makes
    everything trainable."""
    cuda = {p: estimate(image_cfg(world, base_model_precision=p), "longcat_image", "cuda") for p in ("fp32", "bf16")}
    assert cuda["bf16"].training["DiT frozen weights"] == pytest.approx(cuda["fp32"].training["DiT frozen weights"] / 2,
                                                                        rel=1e-3)
    base = estimate(image_cfg(world), "longcat_image", "cuda")
    swapped = estimate(image_cfg(world, musubi_blocks_to_swap=4), "longcat_image", "cuda")
    dit = meta_models(Path(world["ckpt"]), "longcat_image")[0].requires_grad_(False)
    blocks = [frozen_bytes(b, 2, set(), None) for b in dit_blocks(dit)]  # all 4 swapped, two slots of the largest
    assert swapped.training["DiT frozen weights"] == pytest.approx(base.training["DiT frozen weights"] - sum(blocks)
                                                                   + 2 * max(blocks))
    assert estimate(image_cfg(world, musubi_blocks_to_swap=4), "longcat_image", "cpu").training[
        "DiT frozen weights"] == estimate(image_cfg(world), "longcat_image", "cpu").training["DiT frozen weights"]
    fsdp = estimate(image_cfg(world), "longcat_image", "cuda", world_size=4)
    assert fsdp.training["gradients (fp32)"] == 2 * base.training["gradients (fp32)"]  # DDP: + the bucket copy
    nockpt = estimate(image_cfg(world, gradient_checkpointing=False), "longcat_image", "cpu")
    ckpt = estimate(image_cfg(world), "longcat_image", "cpu")
    assert nockpt.training["activations saved for backward"] > 4 * ckpt.training["activations saved for backward"]
    full = estimate(image_cfg(world, model_type="full"), "longcat_image", "cpu")
    assert full.training["DiT frozen weights"] == 0 and full.training["optimizer states"] > 0
    sharded = estimate(image_cfg(world, model_type="full", distributed_strategy="fsdp"), "longcat_image", "cpu", 4)
    assert sharded.training["optimizer states"] == full.training["optimizer states"] / 4
    dit, _, _ = meta_models(Path(world["ckpt"]), "longcat_image")
    assert full.inputs["trainable_params"] == sum(p.numel() for p in dit.parameters())


def test_video_family_reads_its_folder(tmp_path):
    """LongCat-Video: dit/ vae/ text_encoder/ configs and the clip length of the video block."""
    from data.synthetic import write_i2v_backend
    from train_video import TrainVideoConfig
    from config import load_config
    ckpt = write_tiny_longcat_video(tmp_path / "tinyv")
    for d in ("clips", "starts"):
        (tmp_path / d).mkdir()
    backend = write_i2v_backend(str(tmp_path / "v.json"), str(tmp_path / "clips"), str(tmp_path / "starts"),
                                str(tmp_path / "cache"), resolution=64, num_frames=17)
    cfg = load_config(TrainVideoConfig, [f"--pretrained_model_name_or_path={ckpt}", f"--data_backend_config={backend}",
                                         "--train_batch_size=1"], aliases=ALIASES, quiet=True)
    est = estimate(cfg, "longcat_video", "cpu")
    w, h, f = map(int, est.inputs["bucket"].replace("@", "x").split("x"))
    assert f == 17 and est.inputs["tokens"] == (w // 16) * (h // 16) * 5
    assert "expected peak" in format_estimate(est)


def test_tiny_run_is_within_25_percent_of_its_measured_peak(world, tmp_path):
    """A real 3-step LoRA run of the tiny model at 256 px in a child process: its kernel-reported peak RSS."""
    cfg = image_cfg(world)
    est = estimate(cfg, "longcat_image", "cpu")
    args = [f"--pretrained_model_name_or_path={world['ckpt']}", f"--data_backend_config={world['backend']}",
            f"--output_dir={tmp_path / 'run'}", "--train_batch_size=2", "--max_train_steps=3", "--lora_rank=8",
            "--optimizer=adamw", "--mixed_precision=no", "--validation_disable", "--checkpoint_step_interval=0"]
    status, measured, err = measured_peak_rss([sys.executable, str(REPO / "train_image.py"), *args], cwd=REPO)
    assert status == 0, err[-2000:]
    print(f"estimate {est.peak / GB:.3f} GB, measured {measured / GB:.3f} GB")
    assert 0.75 < est.peak / measured < 1.25
