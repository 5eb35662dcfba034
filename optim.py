"""
Optimizers and learning-rate schedules with SimpleTuner's option names, shared by the training scripts.

Optimizers: `adamw` (torch AdamW, fp32 state; also accepted: SimpleTuner's `adamw_bf16` and `torch-adamw`) and
`adamw8bit` (bitsandbytes AdamW8bit; also `bnb-adamw8bit`, `ao-adamw8bit`). Anything else fails listing the choices.
Schedules are plain functions of the step (nanoGPT's get_lr), so resuming needs only the step number:
constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, sine (all with linear warmup).
"""
import math

import torch

from config import ConfigError

OPTIMIZERS = {"adamw": "adamw", "adamw_bf16": "adamw", "torch-adamw": "adamw", "adamw8bit": "adamw8bit",
              "bnb-adamw8bit": "adamw8bit", "ao-adamw8bit": "adamw8bit"}
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "sine")


def check_optimizer_options(optimizer: str, lr_scheduler: str):
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer {optimizer!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")
    if lr_scheduler not in SCHEDULES:
        raise ConfigError(f"lr_scheduler {lr_scheduler!r} is not supported; choose one of {', '.join(SCHEDULES)}")


def make_optimizer(params, name: str, lr: float, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8):
    kind = OPTIMIZERS[name]
    params = [p for p in params if p.requires_grad]
    if kind == "adamw8bit":
        import bitsandbytes as bnb  # optional dependency path; imported only when asked for
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def lr_at(step: int, *, base_lr: float, schedule: str, warmup: int, total: int, num_cycles: float = 1.0,
          power: float = 0.8, lr_end: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based). Warmup is linear from 0 for `warmup` steps (not for `constant`)."""
    if schedule == "constant":
        return base_lr
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant_with_warmup":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
    if schedule == "polynomial":
        return (base_lr - lr_end) * (1.0 - progress) ** power + lr_end if base_lr > lr_end else base_lr
    if schedule == "sine":
        return base_lr * math.sin(math.pi / 2 * (1.0 - progress)) if progress < 1.0 else 0.0
    raise ValueError(f"unknown lr_scheduler {schedule!r}")


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr
