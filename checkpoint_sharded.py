"""
Sharded checkpoints of an FSDP run (distributed_strategy fsdp): every rank writes its own shards of the weights, the
EMA and the optimizer state through torch.distributed.checkpoint (DCP), so no rank ever holds the full model, and a
resume may use another number of processes (DCP reshards on load: 2 processes -> 1, 2 -> 4, ...).

    checkpoint-<step>/
        shards/shard-<r+1>-model-00001-of-00001.safetensors   rank r's pieces: model.<name>, ema.<name>,
                                                               optimizer.state.<name>.<exp_avg|...> (plain tensors
                                                               such as the 0-dim `step` once, by one rank)
        optimizer.json                 the optimizer state's non-tensor part (param groups) with stubs for the tensors
        extra.safetensors, rng.*, training_state.json, config.json, manifest.json     as in checkpoint.py

Why DCP's HuggingFaceStorageWriter/Reader and not its default FileSystemWriter: the default keeps the shard layout
in a pickled `.metadata` file that loading unpickles. The HF pair writes the offsets of each piece into the
safetensors header (JSON) and rebuilds the layout from those headers, so only safetensors and JSON are read back,
as everywhere else. The optimizer state is keyed by parameter name (get_optimizer_state_dict), the same on every
rank and for any sharding. The shards go into checkpoint.save_checkpoint's temp folder first; rank 0 then adds the
rest, hashes everything into manifest.json and commits the folder with one rename, as for any checkpoint.
output_dir must be a filesystem that every rank sees (as DCP itself assumes).
"""
import os
import shutil
from pathlib import Path

import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from checkpoint import (SHARDS, _decode, _encode, _fsync, _json_bytes, _rank, _write, load_checkpoint, read_json,
                        save_checkpoint)
from distributed import barrier, broadcast_object


def _no_dist() -> bool:  # one process without a process group: DCP reads / writes everything itself
    return not (tdist.is_available() and tdist.is_initialized())


def _optimizer_state(model, optimizer) -> tuple:
    """(JSON tree with tensor stubs, {"optimizer.<path>": tensor}) of the optimizer state keyed by parameter name.
    An empty state is first filled by a zero-lr step (torch's own _init_optim_state), so loading has targets."""
    tensors = {}
    doc = _encode(get_optimizer_state_dict(model, optimizer), "", tensors, strict=True)
    return doc, {f"optimizer.{k}": t for k, t in tensors.items()}


def is_sharded(path) -> bool:
    return (Path(path) / SHARDS).is_dir()


def save_sharded_checkpoint(output_dir, step: int, *, model, optimizer, tensors: dict, **rest) -> Path:
    """Every rank calls this. tensors: {"model.<name>" / "ema.<name>": DTensor or tensor}, written shard by shard;
    rest (extra_tensors, state, config, rng) goes to checkpoint.save_checkpoint, which rank 0 runs to commit."""
    output_dir = Path(output_dir)
    tmp = output_dir / f"checkpoint-{step}.tmp-{broadcast_object(os.getpid())}"  # rank 0's, as save_checkpoint's
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SHARDS).mkdir(parents=True)
    barrier()
    doc, optim = _optimizer_state(model, optimizer)
    dcp.save({**tensors, **optim}, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True),
             no_dist=_no_dist())  # returns once every rank's files are written and fsynced
    if _rank() == 0:
        _fsync(tmp / SHARDS)
        _write(tmp / "optimizer.json", _json_bytes(doc))
    path = save_checkpoint(output_dir, step, model_tensors=None, tmp=tmp, **rest)
    barrier()  # nobody moves on (and maybe crashes) before the commit
    return path


def load_sharded_checkpoint(path, *, model, optimizer, model_tensors: dict, extra_tensors: dict, log=print):
    """Every rank calls this. Verifies the checkpoint and restores RNG, extra tensors and state as load_checkpoint
    does, then loads into the live tensors in place: model_tensors {name: tensor} (all required) and extra_tensors
    {"ema.<name>": tensor} (those the checkpoint lacks are left alone), and the optimizer. The returned Checkpoint's
    model_tensors / extra_tensors are those live tensors (the loaded ones), plus extra.safetensors."""
    path = Path(path)
    ckpt = load_checkpoint(path, log=log)  # verify (sha256 of every shard too), RNG of this rank, extra, state
    saved = set(HuggingFaceStorageReader(str(path / SHARDS)).read_metadata().state_dict_metadata)
    missing = sorted(n for n in model_tensors if f"model.{n}" not in saved)
    if missing:
        raise ValueError(f"{path} does not hold this run's trainable weights (e.g. {missing[:3]}); was it written "
                         "for another model?")
    extra = {k: t for k, t in extra_tensors.items() if k in saved}
    doc, optim = _optimizer_state(model, optimizer)
    dcp.load({**{f"model.{n}": t for n, t in model_tensors.items()}, **extra, **optim},
             storage_reader=HuggingFaceStorageReader(str(path / SHARDS)), no_dist=_no_dist())
    set_optimizer_state_dict(model, optimizer, _decode(read_json(path / "optimizer.json"),
                                                       {k[len("optimizer."):]: t for k, t in optim.items()}))
    ckpt.model_tensors, ckpt.extra_tensors = dict(model_tensors), {**ckpt.extra_tensors, **extra}
    return ckpt
