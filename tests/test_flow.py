"""Schedules equal diffusers' FlowMatchEulerDiscreteScheduler; conversions are consistent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from qwen_jax import flow

QWEN_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                      max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                      stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                      use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)


def diffusers_sigmas(config, num_steps, image_seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(image_seq_len, config["base_image_seq_len"], config["max_image_seq_len"],
                         config["base_shift"], config["max_shift"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.numpy(), scheduler.timesteps.numpy()


@pytest.mark.parametrize("num_steps", [2, 4, 8, 50])
@pytest.mark.parametrize("pixels", [(1024, 1024), (1328, 1328), (928, 1664)])
def test_qwen_image_schedule_matches_diffusers(num_steps, pixels):
    seq_len = (pixels[0] // 16) * (pixels[1] // 16)
    want, timesteps = diffusers_sigmas(QWEN_SCHEDULER, num_steps, seq_len)
    cfg = flow.SchedulerConfig.from_diffusers_config(QWEN_SCHEDULER)
    got = flow.sampling_sigmas(num_steps, cfg, image_seq_len=seq_len)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(flow.model_time(got[:-1]), (timesteps / np.float32(1000)).astype(np.float32))


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # diffusers 0/0
def test_one_step_with_terminal_stretch_is_refused_not_nan():
    want, _ = diffusers_sigmas(QWEN_SCHEDULER, 1, 4096)
    assert np.isnan(want[0])  # diffusers' own answer is 0/0
    with pytest.raises(ValueError, match="shift_terminal"):
        flow.sampling_sigmas(1, flow.SchedulerConfig.qwen_image(), image_seq_len=4096)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 50])
@pytest.mark.parametrize("seq_len", [4096, 6889, 6032])
def test_fixed_shift_schedule_matches_diffusers(num_steps, seq_len):
    # Qwen-Image-Lightning's scheduler: base_shift = max_shift = ln 3, so every resolution gets shift 3.
    lightning = dict(QWEN_SCHEDULER, base_shift=np.log(3), max_shift=np.log(3), shift_terminal=None)
    want, _ = diffusers_sigmas(lightning, num_steps, seq_len)
    np.testing.assert_allclose(flow.sampling_sigmas(num_steps, flow.SchedulerConfig.fixed_shift(3.0)),
                               want, rtol=0, atol=1e-6)
    same = flow.sampling_sigmas(num_steps, flow.SchedulerConfig.from_diffusers_config(lightning), image_seq_len=seq_len)
    np.testing.assert_allclose(same, want, rtol=0, atol=1e-6)


def test_reference_values():
    np.testing.assert_allclose(flow.sampling_sigmas(2, flow.SchedulerConfig.fixed_shift(3.0)), [1.0, 0.75, 0.0])
    np.testing.assert_allclose(flow.sampling_sigmas(4, flow.SchedulerConfig.fixed_shift(3.0)),
                               [1.0, 0.9, 0.75, 0.5, 0.0], atol=1e-6)
    s = flow.sampling_sigmas(50, flow.SchedulerConfig.qwen_image(), image_seq_len=4096)
    np.testing.assert_allclose(s[:5], [1.0, 0.989701, 0.979191, 0.968465, 0.957516], atol=1e-6)
    np.testing.assert_allclose(s[-3:], [0.058476, 0.02, 0.0], atol=1e-6)
    explicit = flow.sampling_sigmas(sigmas=[1.0, 0.5], cfg=flow.SchedulerConfig.fixed_shift(3.0))
    np.testing.assert_allclose(explicit, [1.0, 0.75, 0.0])


def test_euler_step_matches_diffusers_step():
    import torch

    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=0.7)
    x, v = np.random.default_rng(0).standard_normal((2, 2, 5, 8), np.float32)
    want = scheduler.step(torch.from_numpy(v), scheduler.timesteps[1], torch.from_numpy(x), return_dict=False)[0]
    s = scheduler.sigmas.numpy()
    got = flow.euler_step(jnp.asarray(x), jnp.asarray(v), s[1], s[2])
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=0, atol=1e-6)


def test_conversions_invert_each_other():
    k1, k2 = jax.random.split(jax.random.key(0))
    x0, noise = jax.random.normal(k1, (3, 4, 8)), jax.random.normal(k2, (3, 4, 8))
    sigma = jnp.array([0.1, 0.5, 0.9])
    x_t = flow.add_noise(x0, noise, sigma)
    v = flow.velocity(x0, noise)
    np.testing.assert_allclose(flow.x0_from_velocity(x_t, v, sigma), x0, atol=1e-6)
    np.testing.assert_allclose(flow.noise_from_velocity(x_t, v, sigma), noise, atol=1e-6)
    # an exact velocity carries x_sigma to x_sigma' along the straight path
    np.testing.assert_allclose(flow.euler_step(x_t, v, sigma, 0.0), x0, atol=1e-5)
    np.testing.assert_allclose(flow.renoise_step(x_t, v, sigma, 0.3, noise), flow.add_noise(x0, noise, 0.3), atol=1e-5)


def test_bad_schedules_are_explained():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        flow.SchedulerConfig.from_diffusers_config(dict(QWEN_SCHEDULER, use_karras_sigmas=True))
    with pytest.raises(ValueError, match="mu"):
        flow.shift_sigmas([1.0, 0.5], flow.SchedulerConfig.qwen_image())
    with pytest.raises(ValueError, match="num_steps"):
        flow.sampling_sigmas(0)


def test_training_sigmas():
    key = jax.random.key(0)
    u = flow.sample_training_sigmas(key, (20000,), "uniform")
    ln = flow.sample_training_sigmas(key, (20000,), "logit_normal")
    shifted = flow.sample_training_sigmas(key, (20000,), "logit_normal", shift=3.0)
    for s in (u, ln, shifted):
        assert s.dtype == jnp.float32 and float(s.min()) > 0 and float(s.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(ln.mean()) - 0.5) < 0.01
    assert float(jnp.mean(jnp.abs(ln - 0.5))) < float(jnp.mean(jnp.abs(u - 0.5)))  # logit-normal favours the middle
    np.testing.assert_allclose(shifted, flow.static_shift(ln, 3.0), rtol=1e-6)
    assert float(shifted.mean()) > 0.6
    with pytest.raises(ValueError, match="timestep sampling"):
        flow.sample_training_sigmas(key, (2,), "cosine")
