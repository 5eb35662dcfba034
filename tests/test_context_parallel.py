"""
Context parallelism (model/context_parallel.py) on CPU with gloo: N processes split each clip's tokens, and the
tiny LongCat-Video DiT gives the 1-process outputs and parameter gradients (dense and block-sparse attention, cond
mode, gradient checkpointing, the KV cache; cp 2, and cp 2 x dp 2 on 4 processes); train_video.py with
context_parallel_size 2 follows the 1-process loss curve; bad sizes fail at start-up.

This file is also the worker the equivalence test launches:
    torchrun --nproc_per_node N tests/test_context_parallel.py OUT_DIR CP_SIZE
"""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.context_parallel import ContextParallel, init_context_parallel, split_hw
from model.dit_video import LongCatVideoDiT, VideoDiTConfig

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, depth=2, num_heads=4, caption_channels=64, adaln_tembed_dim=32,
            frequency_embedding_size=32)  # head_dim 16: 2 heads per rank with cp 2

B, T, H, W = 2, 4, 8, 8  # latents: a (4, 4, 4) token grid, cp 2 tiles of 4 x 2 tokens
BSA = {"sparsity": 0.5, "chunk_3d_shape_q": [1, 2, 2], "chunk_3d_shape_k": [1, 2, 2]}
CASES = {  # name: (block-sparse params or None, cond frames c, gradient checkpointing)
    "dense": (None, 0, False),
    "dense_cond": (None, 1, True),
    "bsa": (BSA, 0, False),
    "bsa_cond": (BSA, 2, True),  # with c = 1 the 1-frame cond grid would take the dense path
    # chunks wider than a rank's tile: the release's BSA on its rank-tile-major order could not run this
    "bsa_chunk_wider_than_tile": ({"sparsity": 0.5, "chunk_3d_shape_q": [2, 4, 4], "chunk_3d_shape_k": [2, 4, 4]}, 2,
                                  False),
}


def tiny_dit(bsa=None) -> LongCatVideoDiT:
    torch.manual_seed(0)
    dit = LongCatVideoDiT(VideoDiTConfig(**TINY))
    with torch.no_grad():  # the init zeroes the output layers: give every parameter a gradient
        for p in dit.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return dit.set_bsa(bsa is not None, bsa)


def inputs(c: int, cp=None):
    """Latents, per-frame timesteps (cond frames at 0), text with pads, a target; this dp group's samples."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 16, T, H, W, generator=g)
    t = torch.rand(B, T, generator=g) * 1000
    t[:, :c] = 0
    text, mask = torch.randn(B, 8, 64, generator=g), torch.ones(B, 8)
    mask[1, 5:] = 0
    target = torch.randn(B, 16, T, H, W, generator=g)
    out = x, t, text, mask, target
    return out if cp is None else tuple(v[cp.dp_rank::cp.dp_size] for v in out)


def forward_backward(name: str, cp=None):
    """One step of case `name`: (output, {parameter: gradient}). With cp: this rank's tile of its dp group's samples,
    the loss is the tile's mean and DDP averages the gradients over every rank (as train_video.py does)."""
    bsa, c, ckpt = CASES[name]
    dit = tiny_dit(bsa)
    dit.gradient_checkpointing = ckpt
    x, t, text, mask, target = inputs(c, cp)
    model = dit
    if cp is not None:
        dit.set_context_parallel(cp)
        model, target = torch.nn.parallel.DistributedDataParallel(dit), cp.shard(target)
    out = model(x, t, text, mask, num_cond_latents=c)
    F.mse_loss(out, target).backward()
    return out.detach(), {n: p.grad for n, p in dit.named_parameters()}


@torch.no_grad()
def continuation(cp=None):
    """The KV-cache path: 2 cached cond frames, then the 2 noise frames."""
    dit = tiny_dit().set_context_parallel(cp)
    x, t, text, mask, _ = inputs(0, cp)
    cache = dit.cache_cond_kv(x[:, :, :2])
    return dit(x[:, :, 2:], t[:, 2:], text, mask, num_cond_latents=2, kv_cache_dict=cache)


def worker(out_dir: str, cp_size: int):
    import torch.distributed as tdist
    from safetensors.torch import save_file
    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    cp = init_context_parallel(rank, tdist.get_world_size(), cp_size)
    result = {"continuation": continuation(cp)}
    for name in CASES:
        out, grads = forward_backward(name, cp)
        result[f"{name}/out"] = out.contiguous()
        result.update({f"{name}/grad/{n}": g for n, g in grads.items()})
    save_file(result, os.path.join(out_dir, f"rank{rank}.safetensors"))
    tdist.destroy_process_group()


# -----------------------------------------------------------------------------
# tests


def test_split_hw_is_the_release_tiling():
    assert [split_hw(n) for n in (1, 2, 4, 6, 8)] == [(1, 1), (1, 2), (2, 2), (2, 3), (2, 4)]


@pytest.mark.parametrize("world, cp_size", [(2, 2), (4, 2)])
def test_dit_outputs_and_gradients_match_one_process(tmp_path, world, cp_size, torchrun):
    from safetensors.torch import load_file
    torchrun(world, Path(__file__), tmp_path, cp_size)
    ref = {name: forward_backward(name) for name in CASES}
    assert (ref["bsa"][0] - ref["dense"][0]).abs().max() > 1e-2  # block-sparse attention really ran
    ref_cont = continuation()
    for rank in range(world):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        cp = ContextParallel(cp_size, rank % cp_size, split_hw(cp_size), None, world // cp_size, rank // cp_size)
        tile = lambda v: cp.shard(v[cp.dp_rank::cp.dp_size])  # noqa: E731
        assert (got["continuation"] - tile(ref_cont)).abs().max() < 1e-5, f"KV-cache path, rank {rank}"
        for name, (out, grads) in ref.items():
            err = (got[f"{name}/out"] - tile(out)).abs().max().item()
            assert err < 1e-5, f"{name}: output of rank {rank} differs by {err:.2e}"
            errs = {n: (got[f"{name}/grad/{n}"] - g).abs().max().item() / max(g.abs().max().item(), 1e-3)
                    for n, g in grads.items()}
            worst = max(errs, key=errs.get)
            assert errs[worst] < 1e-5, f"{name}: gradient of {worst} on rank {rank} differs by {errs[worst]:.2e} (rel)"


def test_bad_sizes_fail():
    with pytest.raises(ValueError, match="context-parallel groups of 2"):
        init_context_parallel(0, 3, 2)
    with pytest.raises(ValueError, match="cp_split_hw"):
        init_context_parallel(0, 2, 2, split=(2, 2))
    cp = ContextParallel(8, 0, (2, 4), None, 1, 0)
    with pytest.raises(ValueError, match="num_heads 4 is not divisible"):
        tiny_dit().set_context_parallel(cp)
    with pytest.raises(ValueError, match="multiples of 32 and 64"):
        cp.tiling(4, 6)


# -----------------------------------------------------------------------------
# train_video.py (its test helpers are imported lazily: the torchrun workers above stay light)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny LongCat-Video folder and synthetic I2V clips of tests/test_train_video.py (64x64, 13 frames)."""
    from data.synthetic import make_synthetic_video_dataset, write_i2v_backend
    from model.tiny_checkpoint import write_tiny_longcat_video
    root = tmp_path_factory.mktemp("train-video-cp")
    clips, starts = make_synthetic_video_dataset(str(root / "data"), n=8, sizes=((64, 64),), num_frames=13)
    return dict(root=root, ckpt=str(write_tiny_longcat_video(root / "tiny")),
                backend=write_i2v_backend(str(root / "i2v.json"), clips, starts, str(root / "cache"), num_frames=13))


def test_train_video_context_parallel_matches_one_process(world, tmp_path, torchrun):
    import train_video
    from tests.test_train_image import assert_runs_match
    from tests.test_train_video import args
    one, two = tmp_path / "one", tmp_path / "two"
    kw = dict(train_batch_size=2, max_train_steps=3, checkpoint_step_interval=0)
    train_video.main(args(world, one, **kw))
    torchrun(2, REPO / "train_video.py", *args(world, two, context_parallel_size=2, **kw))
    assert_runs_match(one, two, steps=3)


def test_train_video_context_parallel_needs_a_multiple_of_the_world(world, tmp_path, capsys):
    import train_video
    from tests.test_train_video import args
    assert train_video.cli(args(world, tmp_path / "bad", context_parallel_size=2)) == 2
    err = capsys.readouterr().err
    assert "context_parallel_size" in err and "Traceback" not in err


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]))
