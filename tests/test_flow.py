"""Flow-matching maths vs diffusers' FlowMatchEulerDiscreteScheduler and calculate_shift; training conventions."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.longcat_image.pipeline_longcat_image import calculate_shift

from model.flow import (FlowSchedulerConfig, cfg_renorm, classifier_free_guidance, dynamic_shift_mu, euler_step,
                        interpolate, sample_training_sigmas, sampling_schedule, time_shift, velocity_target)

LONGCAT_SCHED = dict(num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)


@pytest.mark.parametrize("tokens", [16, 256, 1024, 4032, 4096, 6000])
def test_mu_matches_reference(tokens):
    assert dynamic_shift_mu(tokens) == calculate_shift(tokens, 256, 4096, 0.5, 1.15)


def test_mu_known_values():
    assert dynamic_shift_mu(4096) == pytest.approx(1.15) and dynamic_shift_mu(1024) == pytest.approx(0.63)


@pytest.mark.parametrize("steps", [1, 2, 6, 30, 50])
@pytest.mark.parametrize("tokens", [16, 1024, 4096])
@pytest.mark.parametrize("dynamic", [True, False])
def test_schedule_bitwise(steps, tokens, dynamic):
    cfg = FlowSchedulerConfig.from_dict({**LONGCAT_SCHED, "use_dynamic_shifting": dynamic})
    ref = FlowMatchEulerDiscreteScheduler(**{**LONGCAT_SCHED, "use_dynamic_shifting": dynamic})
    mu = dynamic_shift_mu(tokens, cfg)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
    sigmas, timesteps = sampling_schedule(steps, mu, cfg)
    assert torch.equal(sigmas, ref.sigmas) and torch.equal(timesteps, ref.timesteps)


def test_schedule_1024_50_steps_values():
    sigmas, _ = sampling_schedule(50, dynamic_shift_mu(4096))
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert sigmas[1].item() == pytest.approx(0.99358, abs=1e-5) and sigmas[-2].item() == pytest.approx(0.06055, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_matches_scheduler_step(dtype):
    ref = FlowMatchEulerDiscreteScheduler(**LONGCAT_SCHED)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1.0 / 4, 4), mu=0.8)
    sigmas, timesteps = sampling_schedule(4, 0.8)
    x = torch.randn(2, 24, 64).to(dtype)
    x_ref = x.clone()
    for i, t in enumerate(timesteps):
        v = torch.randn(2, 24, 64).to(dtype)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        assert x.dtype == x_ref.dtype and torch.equal(x, x_ref)


def test_euler_is_exact_on_a_straight_path():
    """With the true velocity eps - x0 the sampler lands on x0 from pure noise in any number of steps."""
    x0, eps = torch.randn(1, 8, 64, dtype=torch.float64), torch.randn(1, 8, 64, dtype=torch.float64)
    sigmas, _ = sampling_schedule(7, 0.9)
    x = eps.clone()
    for i in range(7):
        x = euler_step(x, velocity_target(x0, eps), sigmas[i].double(), sigmas[i + 1].double())
    assert torch.allclose(x, x0, atol=1e-6)


def test_guidance_and_renorm():
    vc, vu = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    v = classifier_free_guidance(vc, vu, 4.5)
    assert torch.equal(v, vu + 4.5 * (vc - vu))
    r = cfg_renorm(v, vc)
    assert torch.all(r.norm(dim=-1) <= vc.norm(dim=-1) * (1 + 1e-5))  # per-token cap
    assert torch.equal(cfg_renorm(vc, vc, 0.0), vc * (vc.norm(dim=-1, keepdim=True) / (vc.norm(dim=-1, keepdim=True) + 1e-8)).clamp(max=1))


def test_training_conventions():
    x0, eps = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    s = torch.tensor([0.0, 0.5, 1.0])
    xt = interpolate(x0, eps, s)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], eps[2])  # sigma = 1 is pure noise
    assert torch.equal(velocity_target(x0, eps), eps - x0)
    g = torch.Generator().manual_seed(0)
    sig = sample_training_sigmas(10000, generator=g, mu=dynamic_shift_mu(4096))
    assert 0 < sig.min() and sig.max() < 1 and sig.mean() > 0.6  # shift 3.16 pushes towards noise
    base = torch.sigmoid(torch.randn(10000, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(sig, time_shift(dynamic_shift_mu(4096), base))


def test_scheduler_config_rejects_unsupported():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowSchedulerConfig.from_dict({**LONGCAT_SCHED, "use_karras_sigmas": True})
    cfg = FlowSchedulerConfig.from_dict({**dict(FlowMatchEulerDiscreteScheduler(**LONGCAT_SCHED).config)})
    assert cfg.use_dynamic_shifting and cfg.max_shift == 1.15


def test_video_schedules_match_the_spec_values():
    from model.flow import video_sampling_schedule
    s = video_sampling_schedule(50, shift=12.0)
    assert len(s) == 51 and s[0] == 1.0 and s[-1] == 0.0
    assert [round(v, 4) for v in s[-4:-1].tolist()] == [0.3435, 0.2078, 0.0119]  # spec §6.2: ... 0.344, 0.208, 0.0119
    assert (s[:-1] * 1000 > 500).sum() == 46  # 46 of the 50 timesteps above 500
    d = video_sampling_schedule(16, shift=12.0, distill=True)
    assert len(d) == 17 and round(d[1].item(), 4) == 0.9947 and [round(v, 4) for v in d[-3:-1].tolist()] == [0.6614, 0.5106]
    raw = video_sampling_schedule(16, shift=1.0, distill=True)  # unshifted: the teacher-grid picks
    assert [round(v, 2) for v in raw[:-1].tolist()] == [1.0, .94, .88, .82, .76, .70, .64, .58, .50, .44, .38, .32,
                                                       .26, .20, .14, .08]


def test_cfg_zero_star():
    from model.flow import cfg_zero_star
    vc, vu = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    out = cfg_zero_star(vc, vu, 4.0)
    for b in range(2):
        s = (vc[b] * vu[b]).sum() / (vu[b].square().sum() + 1e-8)
        assert torch.allclose(out[b], s * vu[b] + 4.0 * (vc[b] - s * vu[b]), atol=1e-5)
    assert torch.allclose(cfg_zero_star(vc, vc, 4.0), vc, atol=1e-5)  # identical branches: s* = 1, no guidance
