"""
distributed_strategy fsdp on the tiny LongCat-Image and synthetic data (CPU, gloo): FSDP2 over 2 processes (batch 1
each) equals 1 process (batch 2), global-norm clipping and EMA included; resuming the sharded checkpoint of step 3
reproduces the straight 6-step run exactly, and 1 process resumes it too (DCP reshards); the checkpoint holds only
safetensors + JSON, and its manifest catches a damaged shard; bad settings fail at start-up.
"""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_image
from test_train_image import REPO, args, losses, world  # noqa: F401  (world: the shared module fixture)


def fsdp_args(world, out, **kw):  # noqa: F811
    """A full fine-tune whose LR does not depend on max_train_steps, clipped by the global norm (small enough to
    clip), with EMA and gradient accumulation (no reduce-scatter on the first micro-batch)."""
    base = dict(model_type="full", distributed_strategy="fsdp", max_train_steps=6, lr_scheduler="constant_with_warmup",
                grad_clip_method="norm", max_grad_norm=0.5, use_ema=True, ema_decay=0.9, learning_rate=3e-4,
                gradient_accumulation_steps=2)
    return args(world, out, **{**base, **kw})


@pytest.fixture(scope="module")
def two(world, tmp_path_factory, torchrun):  # noqa: F811
    """The straight 2-process FSDP run: 6 steps, sharded checkpoints at 3 and 6. Validation is asked for and turned
    off with a note (rank 0 alone cannot run the sharded model)."""
    out = tmp_path_factory.mktemp("fsdp") / "two"
    log = torchrun(2, REPO / "train_image.py", *fsdp_args(world, out, train_batch_size=1, validation_disable=False,
                                                         validation_prompt="a square", validation_step_interval=3,
                                                         validation_resolution="32x32"))
    assert "no validation images under distributed_strategy fsdp" in log and not (out / "validation").exists()
    return out


def grad_norms(out):
    return [json.loads(line)["grad_norm"] for line in open(out / "metrics.jsonl")]


def weights(out, folder="transformer"):
    return load_file(str(out / folder / "diffusion_pytorch_model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_processes_match_one(world, two, tmp_path):  # noqa: F811
    one = tmp_path / "one"
    train_image.main(fsdp_args(world, one, train_batch_size=2))  # 1 process: nothing to shard, same checkpoints
    l1, l2 = losses(one), losses(two)
    print("1 process:", l1, "\n2 processes:", l2)
    assert len(l1) == len(l2) == 6 and max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5
    g1, g2 = grad_norms(one), grad_norms(two)  # the norm over all shards, not over rank 0's half
    print("grad norm, 1 process:", g1, "\n2 processes:", g2)
    assert min(g1) > 0.5 and max(abs(a - b) / a for a, b in zip(g1, g2)) < 1e-5  # and > max_grad_norm: clipped
    for folder in ("transformer", "transformer_ema"):  # gathered from the shards to rank 0
        d = max_diff(weights(one, folder), weights(two, folder))
        print(f"{folder}: max |1 process - 2 processes| = {d:.2e}")
        assert d < 1e-5

    ckpt = two / "checkpoint-6"
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert all(f.endswith((".safetensors", ".json")) for f in files), files  # nothing pickled
    shards = [f for f in files if f.startswith("shards/")]
    assert len(shards) == 2 and "model.safetensors" not in files
    assert set(json.loads((ckpt / "manifest.json").read_text())["files"]) == set(files) - {"manifest.json"}
    full = weights(two)
    name = next(n for n in full if n.endswith("to_q.weight"))
    with safe_open(str(ckpt / shards[0]), "pt") as f:
        piece = f.get_tensor(f"model.{name}")  # rank 0 holds its half of every weight (dim 0), not the whole
    assert piece.shape[0] == full[name].shape[0] // 2


@pytest.mark.slow
def test_resume_from_the_sharded_checkpoint_is_exact(world, two, tmp_path, torchrun):  # noqa: F811
    """Steps 1-3 come from the straight run's checkpoint-3 (what a 3-step run leaves: the LR does not depend on the
    length), then 2 fresh processes resume it for steps 4-6."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(two / "metrics.jsonl", resumed / "metrics.jsonl")  # resume keeps steps <= 3 and rewrites the rest
    log = torchrun(2, REPO / "train_image.py", *fsdp_args(world, resumed, train_batch_size=1))
    assert "resumed from" in log
    assert losses(resumed) == losses(two)
    for folder in ("transformer", "transformer_ema"):
        a, b = weights(two, folder), weights(resumed, folder)
        assert all(torch.equal(a[k], b[k]) for k in a), f"resume changed {folder}"


@pytest.mark.slow
def test_one_process_resumes_the_two_process_checkpoint(world, two, tmp_path):  # noqa: F811
    """DCP reshards on load: the 2-process shards fill the whole tensors of a single process."""
    one = tmp_path / "one"
    train_image.main(fsdp_args(world, one, train_batch_size=2, resume_from_checkpoint=str(two / "checkpoint-3")))
    assert len(losses(one)) == 3  # steps 4-6
    assert max(abs(a - b) for a, b in zip(losses(one), losses(two)[3:])) < 1e-5
    assert max_diff(weights(one), weights(two)) < 1e-5


@pytest.mark.parametrize("override, message", [
    (dict(distributed_strategy="zero3"), "distributed_strategy 'zero3': expected one of ddp, fsdp"),
    (dict(fsdp_enable=True, model_type="lora"), "it needs model_type full"),
    (dict(distributed_strategy="fsdp", model_type="full", optimizer="adamw8bit"), "cannot be sharded by FSDP"),
])
def test_bad_fsdp_config_fails_at_start(world, tmp_path, capsys, override, message):  # noqa: F811
    assert train_image.cli(args(world, tmp_path / "bad", **override)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_a_damaged_shard_is_caught_by_the_manifest(two, tmp_path):
    from checkpoint import CorruptCheckpoint, latest_valid_checkpoint, verify_checkpoint
    out = tmp_path / "out"
    for step in (3, 6):
        shutil.copytree(two / f"checkpoint-{step}", out / f"checkpoint-{step}")
    shard = next((out / "checkpoint-6" / "shards").iterdir())
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="shards/shard-.* does not match its sha256"):
        verify_checkpoint(out / "checkpoint-6")
    assert latest_valid_checkpoint(out).name == "checkpoint-3"
