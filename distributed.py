"""
Process-group plumbing shared by train_image.py and train_video.py: one init, rank-0 printing, a few collectives,
and the seeding policy. Nothing runs at import time.

A script runs the same way on one device and under torchrun:

    python train_image.py --config cfg.json                          # 1 GPU, or CPU when there is none
    torchrun --nproc_per_node=8 train_image.py --config cfg.json     # 8 GPUs, NCCL
    torchrun --nproc_per_node=2 train_image.py --config cfg.json     # CPU box: gloo (tests use this)

torchrun is detected from the RANK / WORLD_SIZE / LOCAL_RANK variables it sets. Without them there is no process
group at all and every collective below is a no-op, so the single-process path never touches torch.distributed.

Seeding policy (seed_everything + shared_seed):
  * seed_everything(seed, rank) seeds torch (CPU and CUDA), numpy and `random` with seed + rank, so diffusion noise,
    timesteps, dropout and data augmentation differ per rank (otherwise every rank trains on the same noise).
  * Weights that must be identical on every rank (model build, LoRA init) are created inside `with shared_seed(seed):`,
    which draws from a torch stream seeded with `seed` on every rank and then puts the per-rank stream back, so the
    model size never shifts the noise stream. DDP would also broadcast rank 0's weights, but FSDP and frozen,
    unwrapped modules do not, so the init does not rely on it.
"""
import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool  # rank 0: the only process that prints, logs and writes files
    backend: str | None  # "nccl", "gloo", or None when there is no process group


def init_distributed(device_type: str | None = None) -> Dist:
    """Start the process group when launched by torchrun; pick the device. device_type forces "cpu" or "cuda"."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:  # plain `python script.py`: one process, no process group
        return Dist(0, 0, 1, torch.device(device_type), True, None)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before init, so NCCL and object collectives use this GPU
        tdist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        tdist.init_process_group("gloo")
    return Dist(rank, local_rank, world_size, device, rank == 0, tdist.get_backend())


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def print0(*args, **kwargs):
    """print on rank 0 only. Reads RANK from the environment, so it also works before init_distributed."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def barrier():
    if _active():
        tdist.barrier()


def cleanup():
    if _active():
        tdist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks, as a new float tensor (the input is untouched). Identity on one process."""
    out = tensor.detach().clone().float()
    if _active():
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)  # gloo has no AVG op: sum, then divide
        out /= tdist.get_world_size()
    return out


def broadcast_object(obj, src: int = 0):
    """Rank src's `obj` on every rank (any picklable value; in-process only, never read from disk)."""
    if not _active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank, e.g. the per-rank RNG states for a checkpoint."""
    if not _active():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def fully_shard_blocks(model: torch.nn.Module, bf16: bool):
    """FSDP2 in place: every block of the model's top-level ModuleLists (LongCat-Image's transformer_blocks and
    single_transformer_blocks, LongCat-Video's blocks) is one unit that all-gathers its weights just before its
    forward / backward and frees them after; the root unit holds the rest (embedders, final layer). Parameters
    become DTensors sharded over ranks along dim 0; gradients are reduce-scattered as a mean over ranks, like DDP.
    bf16: compute with bf16 copies of the fp32 master shards, reduce gradients in fp32 (CUDA with mixed_precision bf16).
    FSDP hooks only `forward`: a block's `joint` (LongCat-Image's single blocks, run on the joint sequence) is
    registered as a forward too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()  # param, reduce
    for blocks in model.children():
        if isinstance(blocks, torch.nn.ModuleList):
            for block in blocks:
                fully_shard(block, mp_policy=mp)
                if hasattr(block, "joint"):
                    register_fsdp_forward_method(block, "joint")
    fully_shard(model, mp_policy=mp)


def gather_full_state(model: torch.nn.Module) -> dict:
    """The state dict of a fully_shard_blocks model as whole CPU tensors on rank 0 ({} elsewhere). Every rank must
    call it: each DTensor is all-gathered in turn, so other ranks hold one full tensor at a time, never the model."""
    from torch.distributed.tensor import DTensor
    out = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if tdist.get_rank() == 0:
            out[name] = t.cpu()
    return out


def seed_everything(seed: int, rank: int = 0):
    """Per-rank streams: torch (CPU + every CUDA device), numpy and `random` all get seed + rank. See module doc."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)  # numpy only accepts 32-bit seeds
    torch.manual_seed(s)  # also seeds every CUDA device


@contextlib.contextmanager
def shared_seed(seed: int):
    """Inside: torch draws from `seed` on every rank (identical model init). After: the per-rank stream resumes."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
