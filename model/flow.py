"""
Rectified-flow maths as plain functions: schedules, the Euler sampler step, guidance, and the training objective.

Convention (one for the whole repo): sigma = 1 is pure noise, x_sigma = (1 - sigma) x0 + sigma eps.
  - LongCat-Image predicts the velocity v = eps - x0; sampling moves sigma from 1 to 0, so dt < 0.
  - LongCat-Video predicts x0 - eps (the opposite sign); its pipeline negates the output (see model/ video code).

The sampling schedule reproduces diffusers' FlowMatchEulerDiscreteScheduler with `use_dynamic_shifting` bit for bit
(float32 numpy maths, terminal 0 appended), because the released pipelines are defined through it; the step keeps
its dtype rules (x upcast to fp32, dt * v in v's dtype, result cast to v's dtype). Spec: longcat_image.md §7-§8.
"""
import math
from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class FlowSchedulerConfig:
    """Keys of `scheduler/scheduler_config.json` (FlowMatchEulerDiscreteScheduler) that change the schedule."""
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    # options that exist in diffusers but that no LongCat release uses: accepted only at their neutral value
    _NEUTRAL = dict(invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                    use_beta_sigmas=False, stochastic_sampling=False)

    @classmethod
    def from_dict(cls, d: dict) -> "FlowSchedulerConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for k, v in d.items():
            if k.startswith("_"):
                continue
            if k in cls._NEUTRAL:
                if v != cls._NEUTRAL[k]:
                    raise ValueError(f"scheduler config: {k}={v!r} is not supported (LongCat uses {cls._NEUTRAL[k]!r})")
            elif k in known:
                kwargs[k] = v
            else:
                raise ValueError(f"scheduler config: unknown key {k!r}")
        cfg = cls(**kwargs)
        if cfg.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"scheduler config: time_shift_type={cfg.time_shift_type!r}, expected exponential|linear")
        return cfg


def dynamic_shift_mu(num_tokens: int, cfg: FlowSchedulerConfig = FlowSchedulerConfig()) -> float:
    """mu grows linearly with the image token count: 256 tokens -> base_shift, 4096 tokens -> max_shift."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return num_tokens * m + b


def time_shift(mu: float, sigma, kind: str = "exponential"):
    """sigma' = e^mu / (e^mu + 1/sigma - 1): the flux/SD3 resolution shift (exponential), or mu / (mu + 1/sigma - 1)."""
    a = math.exp(mu) if kind == "exponential" else mu
    return a / (a + (1 / sigma - 1))


def static_shift(shift: float, sigma):
    """The fixed shift s sigma / (1 + (s - 1) sigma); equals time_shift(log s, sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sampling_schedule(num_steps: int, mu: float, cfg: FlowSchedulerConfig = FlowSchedulerConfig(), sigmas=None):
    """
    (sigmas [n+1], timesteps [n]) as float32 tensors. Base sigmas linspace(1, 1/n, n) (or the given list), shifted
    with mu (dynamic) or cfg.shift (static), terminal 0 appended; timesteps = sigmas * num_train_timesteps.
    """
    base = np.linspace(1.0, 1.0 / num_steps, num_steps) if sigmas is None else sigmas
    s = np.array(base).astype(np.float32)
    s = time_shift(mu, s, cfg.time_shift_type) if cfg.use_dynamic_shifting else static_shift(cfg.shift, s)
    s = torch.from_numpy(np.asarray(s)).to(torch.float32)
    timesteps = s * cfg.num_train_timesteps
    return torch.cat([s, torch.zeros(1)]), timesteps


def video_sampling_schedule(num_steps: int, shift: float = 12.0, distill: bool = False):
    """
    LongCat-Video's sigmas [n+1] (float32, terminal 0): base = linspace(1, 0.001, n); distill (cfg_step LoRA) = the
    16 picks floor(linspace(0, 50, n, endpoint=False)) of the 50-point teacher grid 1000, 980, ..., 20 (/1000).
    Both are then shifted statically with `shift` (12 in the release). Spec: longcat_video.md §6.2.
    """
    if distill:
        grid = np.arange(1000, 0, -20, dtype=np.float64) / 1000  # 1.0, 0.98, ..., 0.02
        base = grid[np.floor(np.linspace(0, 50, num_steps, endpoint=False)).astype(int)]
    else:
        base = np.linspace(1.0, 0.001, num_steps)
    s = static_shift(shift, np.array(base).astype(np.float32))
    return torch.cat([torch.from_numpy(np.asarray(s, dtype=np.float32)), torch.zeros(1)])


def cfg_zero_star(v_cond, v_uncond, scale: float):
    """CFG with the per-sample optimised scale s* = <v_c, v_u> / (|v_u|^2 + 1e-8) over all elements of a sample:
    v = s* v_u + g (v_c - s* v_u). (LongCat-Video; no zero-init of early steps.) Spec: longcat_video.md §6.3."""
    dims = tuple(range(1, v_cond.ndim))
    vc, vu = v_cond.float(), v_uncond.float()
    s = (vc * vu).sum(dims, keepdim=True) / (vu.square().sum(dims, keepdim=True) + 1e-8)
    return (s * vu + scale * (vc - s * vu)).to(v_cond.dtype)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x_next = x + (sigma_next - sigma) v, with x upcast to fp32 and the result in v's dtype (sigmas: 0-dim fp32)."""
    return (x.to(torch.float32) + (sigma_next - sigma) * v).to(v.dtype)


def classifier_free_guidance(v_cond, v_uncond, scale: float):
    return v_uncond + scale * (v_cond - v_uncond)


def cfg_renorm(v, v_cond, min_ratio: float = 0.0):
    """Cap each token's guided velocity norm at the conditional one's (norms over the last, packed-channel axis)."""
    ratio = v_cond.norm(dim=-1, keepdim=True) / (v.norm(dim=-1, keepdim=True) + 1e-8)
    return v * ratio.clamp(min=min_ratio, max=1.0)


# -----------------------------------------------------------------------------
# training


def sample_training_sigmas(batch: int, *, generator=None, device=None, dtype=torch.float32, logit_mean=0.0,
                           logit_std=1.0, uniform=False, shift=None, mu=None):
    """
    Training noise levels: logit-normal sigmoid(N(mean, std)) (the official recipe; `uniform` draws U(0,1) instead),
    then either the dynamic shift `mu` (official: one mu from the config resolution), a static `shift`, or none.
    """
    if uniform:
        s = torch.rand(batch, generator=generator, device=device, dtype=torch.float32)
    else:
        s = torch.sigmoid(torch.randn(batch, generator=generator, device=device, dtype=torch.float32) * logit_std + logit_mean)
    if mu is not None:
        s = time_shift(mu, s)
    elif shift is not None and shift > 0:
        s = static_shift(shift, s)
    return s.to(dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma noise, sigma [B] broadcast over the remaining axes."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the LongCat-Image network is trained to output: eps - x0."""
    return noise - x0


def video_velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the LongCat-Video network is trained to output: x0 - eps, the opposite sign of LongCat-Image's (its
    sampler steps with -v; longcat_video.md §6.1, §8). SimpleTuner 4.10.1 trains noise - x0 here: a sign flip."""
    return x0 - noise
