"""
Checkpoints, atomic file writes and the metrics log. Every file read back from a user path is safetensors or JSON.

Layout of one checkpoint (names follow SimpleTuner's output_dir/checkpoint-<step>/):

    checkpoint-<step>/
        model.safetensors                 the trainable weights handed in (LoRA or full), metadata {"step", "format"}
        shards/                           instead, under FSDP: each rank's shards of the weights, optimizer state
                                          and EMA (checkpoint_sharded.py)
        extra.safetensors                 optional extra tensors (EMA weights, ...)
        optimizer.safetensors + .json     optimizer.state_dict(): tensor leaves / everything else (see _encode)
        scheduler.json (+ .safetensors)   lr_scheduler.state_dict(), same encoding
        rng.safetensors + rng.json        RNG states of every rank that was passed in (torch CPU/CUDA, numpy, random)
        training_state.json               {"step": step, "state": {epoch, sampler position, ...}}
        config.json                       the run's resolved config: a checkpoint rebuilds its own run
        manifest.json                     written last: bytes + sha256 of every other file

A save writes into checkpoint-<step>.tmp-<pid>/, fsyncs every file and the folder, renames it to checkpoint-<step>
and fsyncs output_dir: a crash leaves either the old state or the whole new checkpoint, plus a .tmp- folder that
the next rotation deletes. Loading checks the manifest first (file present, size, sha256), so a checkpoint cut short
by a full disk is reported and skipped instead of crashing the resume (SimpleTuner#2613).

Why not torch.save / accelerate.save_state: both pickle, and unpickling a file runs code from it. The optimizer
state is instead split generically into tensors (safetensors) and a tagged JSON tree, which round-trips
torch.optim.AdamW (0-dim float `step` tensors) and bitsandbytes AdamW8bit (int `step`, nested uint8 quant state)
exactly. Only rank 0 writes: save_checkpoint, rotate_checkpoints and MetricsLogger do nothing on other ranks.
"""
import atexit
import errno
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_CKPT = re.compile(r"checkpoint-(\d+)")
_PARTIAL = re.compile(r"checkpoint-\d+\.(tmp|old)-\d+")  # a save that never committed, or a replaced one
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__skipped__")
SHARDS = "shards"  # the sub-folder of a sharded (FSDP) checkpoint: checkpoint_sharded.py
_SKIP = object()  # decoded value of a leaf that could not be stored: the live object keeps its own value


class NonFiniteError(ValueError):
    """A NaN or infinite loss, gradient or tensor: one line naming the step (and batch) or the file."""


def _local(t):  # an FSDP DTensor's shard on this rank, else the tensor
    return t.to_local() if hasattr(t, "to_local") else t


def non_finite_names(tensors: dict) -> list:
    """Names of the floating-point tensors holding a NaN or an infinity (one device sync per tensor)."""
    return [n for n, t in tensors.items() if _local(t).is_floating_point() and not torch.isfinite(_local(t)).all()]


def refuse_non_finite(tensors: dict, source, what: str = "refusing to use it"):
    """NonFiniteError naming `source` (a file, a checkpoint) when any tensor is not finite."""
    bad = non_finite_names(tensors)
    if bad:
        raise NonFiniteError(f"{source}: non-finite values (NaN/inf) in {len(bad)} tensor(s), e.g. "
                             f"{', '.join(bad[:3])}; {what}")


def poison_non_finite_grads(loss_sum, params) -> tuple:
    """(loss_sum, or NaN when any gradient is not finite; the 0-dim bool 'all gradients finite'). Tensor ops only, no
    device sync: the step's existing loss .item() (after the mean over ranks) then reveals a bad gradient on any rank.
    Call it before clipping: value clipping would turn an infinite gradient into a finite one."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads or not isinstance(loss_sum, torch.Tensor):
        return loss_sum, True
    ok = torch.stack([torch.isfinite(g).all() for g in grads]).all().to(loss_sum.device)
    return torch.where(ok, loss_sum, torch.full_like(loss_sum, float("nan"))), ok


def last_good_checkpoint(output_dir) -> str:
    path = latest_valid_checkpoint(output_dir, log=lambda *a: None) if Path(output_dir).is_dir() else None
    return str(path) if path is not None else "none (no checkpoint was written yet)"


def check_step_finite(loss: float, step: int, output_dir, files=(), grads_ok=True):
    """Stop the run at the first non-finite loss or gradient: NonFiniteError naming the step, the batch's files and
    the last good checkpoint. Nothing of this step is checkpointed or exported."""
    if math.isfinite(loss):
        return
    what = "gradient" if not bool(grads_ok) else "loss"
    raise NonFiniteError(f"non-finite {what} (loss {loss}) at step {step}; batch: {', '.join(map(str, files)) or '?'}; "
                         f"nothing of this step was saved; last good checkpoint: {last_good_checkpoint(output_dir)} "
                         "(lower learning_rate or fix those files, then resume)")


def check_weights_finite(tensors: dict, step: int, output_dir, writing: str):
    """Before a checkpoint or an export: refuse to write weights that hold NaN/inf."""
    refuse_non_finite(tensors, f"weights after step {step}",
                      f"not writing {writing}; last good checkpoint: {last_good_checkpoint(output_dir)} "
                      "(lower learning_rate, then resume)")


class CorruptCheckpoint(Exception):
    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_tensors: dict  # name -> CPU tensor, as passed to save_checkpoint
    extra_tensors: dict
    state: dict  # the `state` passed to save_checkpoint (epoch, sampler position, ...)
    config: dict


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))  # torchrun, before init_process_group


# ------------------------------------------------------------------------------------------------------------------
# durable, atomic writes


def _fsync(path):  # works for files and folders on Linux
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path, data: bytes):  # durable but not atomic: used inside a not-yet-committed folder
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def _save_tensors(path, tensors: dict, metadata: dict | None = None):
    # safetensors refuses two entries on one storage (tied weights, a qmap shared by params): copy the repeats
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        out[name] = (t.clone() if ptr in seen else t).contiguous()
        seen.add(ptr)
    save_file(out, str(path), metadata=metadata)
    _fsync(path)


TMP_MARK = ".tmp-"  # in the names of temp files that atomic writes rename into place


def _atomic(path, write):  # write(tmp) to a temp file beside `path`, then rename it over `path`
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")  # hidden; never matches *.safetensors
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never a torn one
    _fsync(path.parent)


def atomic_write_bytes(path, data: bytes):
    _atomic(path, lambda tmp: _write(tmp, data))


def atomic_write_json(path, obj):
    atomic_write_bytes(path, _json_bytes(obj))


def atomic_save_safetensors(path, tensors: dict, metadata: dict | None = None):
    """For LoRA exports and the like; metadata values must be str."""
    _atomic(path, lambda tmp: _save_tensors(tmp, tensors, metadata))


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------------------------
# state dicts <-> (tagged JSON tree, flat tensor dict)


def _encode(obj, key: str, tensors: dict, strict: bool):
    """JSON value for obj. Tensor leaves go to `tensors` under their dotted path (state.0.exp_avg) and leave a
    {"__tensor__": name} stub; tuples and dicts with non-str keys (the optimizer's int param ids) are tagged so they
    come back as the same types. Other objects: an error if strict, else skipped with a message."""
    sub = lambda k: f"{key}.{k}" if key else str(k)  # noqa: E731
    if isinstance(obj, torch.Tensor):
        name, n = key, 0
        while name in tensors:  # "a.b" the key vs a -> b the nesting: keep both
            n += 1
            name = f"{key}#{n}"
        tensors[name] = obj
        return {"__tensor__": name}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj  # json writes and reads floats exactly (repr), nan/inf included (as NaN/Infinity)
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, sub(i), tensors, strict) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, sub(k), tensors, strict) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, key, {}, True), _encode(v, sub(k), tensors, strict)] for k, v in obj.items()]}
    if strict:
        raise TypeError(f"{key}: a {type(obj).__name__} cannot be stored without pickle")
    print(f"checkpoint: not storing {key} (a {type(obj).__name__}); on load the live object keeps its own value")
    return {"__skipped__": type(obj).__name__}


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [None if v is _SKIP else v for v in (_decode(v, tensors) for v in obj)]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and next(iter(obj)) in _TAGS:
        tag, val = next(iter(obj.items()))
        if tag == "__tensor__":
            return tensors[val]
        if tag == "__tuple__":
            return tuple(_decode(val, tensors))
        if tag == "__skipped__":
            return _SKIP
        pairs = ((_decode(k, tensors), _decode(v, tensors)) for k, v in val)
        return {k: v for k, v in pairs if v is not _SKIP}
    return {k: v for k, v in ((k, _decode(v, tensors)) for k, v in obj.items()) if v is not _SKIP}


def _save_state(folder: Path, name: str, obj, strict: bool):
    tensors = {}
    doc = _encode(obj, "", tensors, strict)
    if tensors:
        _save_tensors(folder / f"{name}.safetensors", tensors)
    _write(folder / f"{name}.json", _json_bytes(doc))


def _load_state(folder: Path, name: str, files: dict):
    if f"{name}.json" not in files:
        raise ValueError(f"{folder} was saved without {name} state")
    tensors = load_file(folder / f"{name}.safetensors") if f"{name}.safetensors" in files else {}
    return _decode(read_json(folder / f"{name}.json"), tensors)


# ------------------------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    """This process's RNG states: torch CPU, every CUDA device, numpy's global and python's `random`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(mt), gauss_next],
    }


def set_rng_state(s: dict, log=print):
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        if len(s["cuda"]) != torch.cuda.device_count():
            log(f"checkpoint: RNG saved for {len(s['cuda'])} CUDA devices, {torch.cuda.device_count()} visible")
        for i, state in enumerate(s["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, mt, gauss_next = s["python"]
    random.setstate((version, tuple(mt), gauss_next))


# ------------------------------------------------------------------------------------------------------------------
# save / verify / load


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(output_dir, step: int, *, model_tensors: dict | None, optimizer=None, lr_scheduler=None,
                    extra_tensors: dict | None = None, state: dict | None = None, config: dict | None = None,
                    rng=True, tmp=None) -> Path:
    """Write output_dir/checkpoint-<step>/ atomically and return its path (other ranks: the path, nothing written).
    rng: True = this process's RNG; a list = one rng_state() per rank (all_gather_object(rng_state()), which every
    rank must call) so that each rank resumes its own noise stream; False = none.
    tmp: a temp folder that already holds files of this checkpoint (checkpoint_sharded puts the shards/ there
    first); they are committed with the rest, and model_tensors may then be None."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    if _rank() != 0:
        return final
    if tmp is None:
        tmp = output_dir / f"{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    meta = {"step": str(step), "format": "pt"}
    if model_tensors is not None:
        _save_tensors(tmp / "model.safetensors", model_tensors, meta)
    if extra_tensors:
        _save_tensors(tmp / "extra.safetensors", extra_tensors, meta)
    if optimizer is not None:
        _save_state(tmp, "optimizer", optimizer.state_dict(), strict=True)
    if lr_scheduler is not None:  # a LambdaLR's lambdas are not in its state; callable objects' fields may be
        _save_state(tmp, "scheduler", lr_scheduler.state_dict(), strict=False)
    if rng:
        _save_state(tmp, "rng", {"ranks": [rng_state()] if rng is True else list(rng)}, strict=True)
    _write(tmp / "training_state.json", _json_bytes({"step": step, "state": state or {}}))
    _write(tmp / "config.json", _json_bytes(config or {}))
    files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    _write(tmp / "manifest.json", _json_bytes({"step": step, "files": files}))
    _fsync(tmp)
    old = None
    if final.exists():  # re-save of a step: rename(2) cannot replace a non-empty folder, so move the old one aside
        old = output_dir / f"{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)  # the commit
    _fsync(output_dir)
    if old is not None:
        shutil.rmtree(old)
    return final


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (full disk, I/O error); its temp folder is already removed."""


def estimate_checkpoint_bytes(*groups) -> int:
    """Bytes of the tensors a checkpoint will hold: pass the trainable weights (dict), the optimizer (its state's
    tensors), the EMA (dict or None), ..."""
    total = 0
    for g in groups:
        if g is None:
            continue
        if hasattr(g, "state_dict") and hasattr(g, "param_groups"):  # an optimizer: its state tensors
            g = [t for st in g.state.values() for t in st.values()]
        for t in (g.values() if isinstance(g, dict) else g):
            if isinstance(t, torch.Tensor):
                total += _local(t).nbytes
    return total


def _no_space(e: BaseException) -> bool:
    text = str(e)
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in text or "StorageFull" in text


def _previous(output_dir) -> str:
    found = find_checkpoints(output_dir) if Path(output_dir).is_dir() else []
    return f"the previous checkpoint {found[-1][1].name} is intact" if found else "there is no earlier checkpoint"


def guarded_checkpoint_write(output_dir, step: int, write, nbytes: int):
    """Run write() (one checkpoint save) so that a failure leaves nothing behind: check the free space against
    `nbytes` first; on ANY error remove checkpoint-<step>.tmp-<pid> (rank 0, whose pid names it) and re-raise, an
    OSError / safetensors error as a one-line CheckpointWriteError (KeyboardInterrupt and the like pass unchanged)."""
    name, mb = f"checkpoint-{step}", lambda n: f"{n / 2 ** 20:.1f} MB"  # noqa: E731
    free = shutil.disk_usage(output_dir).free
    if free < nbytes:
        raise CheckpointWriteError(errno.ENOSPC, f"no space left on device for {name} (needs ~{mb(nbytes)}, "
                                   f"{mb(free)} free in {output_dir}); {_previous(output_dir)}")
    try:
        return write()
    except BaseException as e:
        if _rank() == 0:
            shutil.rmtree(Path(output_dir) / f"{name}.tmp-{os.getpid()}", ignore_errors=True)
        if not isinstance(e, Exception) or isinstance(e, (NonFiniteError, CorruptCheckpoint)):
            raise
        if _no_space(e):
            raise CheckpointWriteError(errno.ENOSPC, f"no space left on device writing {name} (needs ~{mb(nbytes)}, "
                                       f"{mb(shutil.disk_usage(output_dir).free)} free); "
                                       f"{_previous(output_dir)}") from None
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            raise CheckpointWriteError(getattr(e, "errno", None) or errno.EIO,
                                       f"writing {name} failed ({e}); {_previous(output_dir)}") from None
        raise


def verify_checkpoint(path, full: bool = True) -> dict:
    """Return the manifest, or raise CorruptCheckpoint: a file missing, of the wrong size, or (full) the wrong sha256."""
    path = Path(path)
    try:
        manifest = read_json(path / "manifest.json")
        listed = {name: (int(m["bytes"]), str(m["sha256"])) for name, m in manifest["files"].items()}
    except FileNotFoundError:
        raise CorruptCheckpoint(path, "no manifest.json (the save never finished)") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CorruptCheckpoint(path, f"unreadable manifest.json ({e!r})") from None
    sharded = any(name.startswith(SHARDS + "/") for name in listed)  # weights in shards/, not model.safetensors
    for name in ("training_state.json", *(() if sharded else ("model.safetensors",)), *listed):
        parts = name.split("/")
        if (name not in listed or parts[-1].startswith(".") or not parts[-1]
                or not (len(parts) == 1 or len(parts) == 2 and parts[0] == SHARDS)):
            raise CorruptCheckpoint(path, f"manifest.json does not list {name!r} properly")
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(path, f"{name} is missing")
        size, sha = listed[name]
        if f.stat().st_size != size:
            raise CorruptCheckpoint(path, f"{name} has {f.stat().st_size} bytes, the manifest says {size} (truncated?)")
        if full and _sha256(f) != sha:
            raise CorruptCheckpoint(path, f"{name} does not match its sha256 (corrupted)")
    return manifest


def load_checkpoint(path, *, optimizer=None, lr_scheduler=None, restore_rng: bool = True, log=print) -> Checkpoint:
    """Verify, then load: tensors come back on CPU; optimizer / scheduler / RNG (this rank's) are restored in place."""
    path = Path(path)
    files = verify_checkpoint(path)["files"]
    ts = read_json(path / "training_state.json")
    extra = load_file(path / "extra.safetensors") if "extra.safetensors" in files else {}
    if optimizer is not None:
        optimizer.load_state_dict(_load_state(path, "optimizer", files))
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(_load_state(path, "scheduler", files))
    if restore_rng and "rng.json" not in files:
        log(f"checkpoint: {path.name} was saved without RNG state; the RNG streams are not restored")
    elif restore_rng:
        ranks, rank = _load_state(path, "rng", files)["ranks"], _rank()
        if rank < len(ranks):
            set_rng_state(ranks[rank], log)
        else:
            log(f"checkpoint: {path.name} holds RNG state for {len(ranks)} rank(s); rank {rank} keeps its seeded "
                "stream, so its noise differs from an uninterrupted run")
    model = load_file(path / "model.safetensors") if "model.safetensors" in files else {}  # {}: see shards/
    return Checkpoint(path, ts["step"], model, extra, ts["state"], read_json(path / "config.json"))


# ------------------------------------------------------------------------------------------------------------------
# finding, resuming, rotating


def find_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """[(step, path)] of every checkpoint-<step> folder, oldest first (valid or not)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _CKPT.fullmatch(p.name)))


def _partials(output_dir) -> list[Path]:
    d = Path(output_dir)
    return sorted(p for p in d.iterdir() if p.is_dir() and _PARTIAL.fullmatch(p.name)) if d.is_dir() else []


def latest_valid_checkpoint(output_dir, log=print) -> Path | None:
    """Newest checkpoint whose manifest verifies; says why it skipped each partial or corrupt one on the way."""
    for p in _partials(output_dir):
        log(f"checkpoint: skipping {p.name}: a save that never finished (not committed)")
    for _, p in reversed(find_checkpoints(output_dir)):
        try:
            verify_checkpoint(p)
            return p
        except CorruptCheckpoint as e:
            log(f"checkpoint: skipping {p.name}: {e.reason}; falling back to an older one")
    return None


def resolve_resume(output_dir, resume_from_checkpoint, log=print) -> Path | None:
    """SimpleTuner's resume_from_checkpoint: None/"" -> None (fresh), "latest" -> newest valid checkpoint or None,
    a path or a checkpoint-<N> name inside output_dir -> that checkpoint (CorruptCheckpoint if it does not verify)."""
    value = "" if resume_from_checkpoint is None else str(resume_from_checkpoint)
    if value == "":
        return None
    if value == "latest":
        path = latest_valid_checkpoint(output_dir, log)
        if path is None:
            log("no checkpoint found, starting fresh")
        return path
    if "://" in value:
        raise ValueError(f"resume_from_checkpoint={value!r}: only local folders are supported")
    candidates = ([Path(output_dir) / value] if Path(value).name == value else []) + [Path(value)]
    path = next((c for c in candidates if c.is_dir()), None)
    if path is None:
        raise FileNotFoundError(f"resume_from_checkpoint={value!r}: no such folder (looked in {output_dir} too)")
    verify_checkpoint(path)
    return path


# what a resumed run may not change: it alters what is trained (the weights' shapes and meaning, the base they sit
# on, the optimizer state's layout). Everything else that differs resumes, with a note listing it.
RESUME_FIXED = ("model_type", "model_family", "model_flavour", "pretrained_model_name_or_path",
                "pretrained_transformer_model_name_or_path", "base_model_precision", "quantize_modulation",
                "mixed_precision", "optimizer", "train_text_encoder")
RESUME_FIXED_LORA = ("lora_rank", "lora_alpha", "peft_lora_target_modules", "lora_type", "use_dora")
RESUME_SILENT = ("output_dir", "resume_from_checkpoint", "estimate_memory", "init_lora")  # not worth a note


def check_resume_config(path, config: dict, log=print):
    """Compare this run's config with the one saved in checkpoint `path` (config.json) before anything is loaded:
    ConfigError naming the key and both values for a change in RESUME_FIXED (and the LoRA keys of a LoRA run; alpha
    compared as the effective alpha, None meaning the rank); a note listing any other changed key. seed is one of
    those: the step generator, RNG and sampler position come from the checkpoint, so the resumed steps do not use
    it, but later epochs shuffle with it (the run is no longer the same as an uninterrupted one with either seed).
    A checkpoint saved without a config (older versions) resumes unchecked, with a note."""
    from config import ConfigError
    if path is None:
        return
    try:
        saved = read_json(Path(path) / "config.json")
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict) or not saved:
        log(f"note: {Path(path).name} holds no saved config (an older version wrote it): resuming without checking "
            "that this run's config matches it")
        return
    saved, config = dict(saved), dict(config)
    for c in (saved, config):
        if c.get("lora_alpha") is None and "lora_rank" in c:
            c["lora_alpha"] = c["lora_rank"]
        c["lora_alpha"] = float(c["lora_alpha"]) if c.get("lora_alpha") is not None else None
    fixed = RESUME_FIXED + (RESUME_FIXED_LORA if config.get("model_type") == "lora" else ())
    for key in fixed:
        if key in saved and key in config and saved[key] != config[key]:
            raise ConfigError(f"resume from {Path(path).name}: {key} was {saved[key]!r} there, this run sets "
                              f"{config[key]!r}; that changes what is trained: set it back, or start fresh in another "
                              "output_dir (or resume_from_checkpoint none)")
    changed = sorted(k for k in config if k in saved and saved[k] != config[k] and k not in RESUME_SILENT)
    if changed:
        diff = ", ".join(f"{k} ({saved[k]!r} -> {config[k]!r})" for k in changed)
        log(f"note: resuming {Path(path).name} with changed {diff}")


def check_resume_shapes(path, trainable: dict, saved: dict):
    """ConfigError when a trainable weight's shape differs from the checkpoint's (e.g. another lora_rank, and a
    checkpoint too old to hold its config)."""
    from config import ConfigError
    for n, p in trainable.items():
        if n in saved and tuple(getattr(p, "shape", ())) != tuple(saved[n].shape):
            raise ConfigError(f"resume from {Path(path).name}: {n} has shape {tuple(saved[n].shape)} there, "
                              f"{tuple(p.shape)} in this run (another lora_rank or model?); set the config back, or "
                              "start fresh in another output_dir")


def set_aside_newer(output_dir, step: int, log=print) -> list:
    """Resuming from an older checkpoint abandons the newer ones: rename them to `abandoned-checkpoint-<N>` (kept,
    never resumed from or rotated away) so `latest` means this run from now on. Rank 0 only."""
    moved = []
    if _rank() != 0:
        return moved
    for n, path in find_checkpoints(output_dir):
        if n > step:
            target = Path(path).with_name(f"abandoned-{Path(path).name}")
            os.replace(path, target)
            moved.append(str(target))
            log(f"resuming from step {step}: set aside the newer {Path(path).name} as {target.name}")
    return moved


def rotate_checkpoints(output_dir, total_limit: int | None, *, keep=None, log=print) -> list[Path]:
    """Keep the newest `total_limit` valid checkpoints (plus `keep`, the one just written, always); delete older ones
    and leftover .tmp-/.old- folders. Corrupt ones newer than the kept set stay until they age out. Rank 0 only."""
    if _rank() != 0:
        return []
    removed = _partials(output_dir)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    if not total_limit or total_limit <= 0:  # None / 0: SimpleTuner's "keep them all"
        return removed
    keep = Path(keep).resolve() if keep is not None else None
    kept = 0
    for _, p in reversed(find_checkpoints(output_dir)):
        if p.resolve() == keep:
            kept += 1
        elif kept < total_limit:
            try:
                verify_checkpoint(p, full=False)  # sizes only: hashing every checkpoint at every save is too slow
                kept += 1
            except CorruptCheckpoint as e:
                log(f"checkpoint: not counting {p.name} towards the limit: {e.reason}")
        else:
            shutil.rmtree(p)
            removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------------------------
# one run per output_dir

LOCK_NAME = ".lock"
_held_locks = {}  # resolved lock path -> the token written in it, released at exit


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def lock_output_dir(output_dir, log=print) -> Path:
    """Take output_dir/.lock (pid, host, start time; created with O_CREAT|O_EXCL) before anything is written or
    resumed, rank 0 only. A live holder: ConfigError naming its pid and host. A stale lock (this host, pid gone; or
    this very process, an earlier run in it) is taken over with a note. Released at exit or by release_output_dir."""
    from config import ConfigError
    path = (Path(output_dir) / LOCK_NAME).resolve()
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text())
                pid, host = int(held["pid"]), str(held["host"])
            except (OSError, ValueError, KeyError, TypeError):
                try:
                    if time.time() - path.stat().st_mtime < 10:  # being written by a run starting right now
                        raise ConfigError(f"output_dir {output_dir} is being locked by another run starting now "
                                          f"({path})") from None
                except FileNotFoundError:
                    continue
                held, pid, host = {}, None, me["host"]
            if host != me["host"] or (pid is not None and pid != me["pid"] and _pid_alive(pid)):
                raise ConfigError(f"output_dir {output_dir} is in use by another run (pid {pid} on {host}, lock "
                                  f"{path}); wait for it, use another output_dir, or delete the lock if that run "
                                  "is gone")
            if pid != me["pid"]:
                log(f"note: taking over the stale lock {path} of a run that is gone (pid {pid} on {host})")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held_locks[path] = me
        return path
    raise ConfigError(f"could not take the lock {path}: another run keeps taking it")


def release_output_dir(output_dir=None):
    """Remove this process's lock(s) (all of them when output_dir is None); a lock another run took over is left."""
    for path in [p for p in _held_locks if output_dir is None or p == (Path(output_dir) / LOCK_NAME).resolve()]:
        me = _held_locks.pop(path)
        try:
            if json.loads(path.read_text()) == me:
                path.unlink()
        except (OSError, ValueError):
            pass


atexit.register(release_output_dir)  # normal exit, an exception or Ctrl-C; a killed process leaves a stale lock


# ------------------------------------------------------------------------------------------------------------------
# metrics


def _step_of(line: str):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLogger:
    """Appends one JSON object per line to `path` (metrics.jsonl), flushed per line, rank 0 only.
    resume_step=None starts an empty file; resume_step=N keeps the lines with step <= N and drops later ones (and
    a torn last line), so a resumed run's file reads as one run."""

    def __init__(self, path, resume_step: int | None = None):
        self.path, self.file = Path(path), None
        if _rank() != 0:
            return
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                step = _step_of(line)
                if step is not None and step <= resume_step:
                    kept.append(line + "\n")
        atomic_write_bytes(self.path, "".join(kept).encode())
        self.file = open(self.path, "a", buffering=1)  # line-buffered

    def log(self, step: int, **values):
        """One line: {"step": step, **values}, e.g. loss, lr, step_time, peak_mem_bytes. Tensors become numbers."""
        if self.file is None:
            return
        row = {"step": int(step)}
        for k, v in values.items():
            row[k] = v.item() if isinstance(v, (torch.Tensor, np.generic)) else v
        self.file.write(strict_json_line(row) + "\n")
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def strict_json_line(row: dict) -> str:
    """json.dumps with non-finite floats written as null: bare NaN / Infinity are not JSON."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()},
                      allow_nan=False)


def peak_memory_bytes(device) -> int:
    """CUDA: torch.cuda.max_memory_allocated (tensor memory only; reset with reset_peak_memory_stats).
    CPU: the process's peak resident set size from getrusage (ru_maxrss: KiB on Linux, bytes on macOS), i.e.
    everything the process ever held (interpreter, weights, data), never reset."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
