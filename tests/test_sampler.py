"""The jitted samplers take diffusers' steps (Euler, true CFG + rescale) and compile once per shape."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from flax import nnx

from qwen_jax import flow
from qwen_jax.sampling import sampler
from reference import jax_twin, rel_err, torch_transformer
from test_flow import QWEN_SCHEDULER

GRID = (1, 4, 6)


def reference_loop(tm, latents, text, mask, neg, neg_mask, steps, scale):
    """diffusers' QwenImagePipeline denoising loop, written out on the bare transformer."""
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=0.6)
    x = torch.from_numpy(latents)
    for t in scheduler.timesteps:
        timestep = t.expand(x.shape[0]).to(x.dtype) / 1000
        with torch.no_grad():
            cond = tm(x, text, mask, timestep, [[GRID]] * x.shape[0]).sample
            if neg is not None:
                uncond = tm(x, neg, neg_mask, timestep, [[GRID]] * x.shape[0]).sample
                comb = uncond + scale * (cond - uncond)
                cond = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        x = scheduler.step(cond, t, x, return_dict=False)[0]
    return x.numpy(), scheduler.sigmas.numpy()


def inputs(tm, batch=2):
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(batch, 24, tm.config.in_channels, generator=g).numpy()
    text = torch.randn(batch, 9, tm.config.joint_attention_dim, generator=g)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3][:batch])
    neg = torch.randn(batch, 4, tm.config.joint_attention_dim, generator=g)  # a shorter negative prompt
    return latents, text, mask, neg, torch.ones(batch, 4, dtype=torch.long)


def test_teacher_sampler_with_true_cfg_matches_diffusers_loop():
    tm = torch_transformer()
    latents, text, mask, neg, neg_mask = inputs(tm)
    want, sigmas = reference_loop(tm, latents, text, mask, neg, neg_mask, steps=4, scale=4.0)

    model = jax_twin(tm)
    graphdef, state = nnx.split(model)
    j = lambda t: jnp.asarray(t.numpy())  # noqa: E731
    length = sampler.bucket_length(max(text.shape[1], neg.shape[1]))
    txt, txt_mask = sampler.pad_text(j(text), j(mask), length)
    ntxt, nmask = sampler.pad_text(j(neg), j(neg_mask), length)
    np.testing.assert_allclose(flow.shift_sigmas(np.linspace(1.0, 0.25, 4), flow.SchedulerConfig(), mu=0.6),
                               sigmas[:-1], atol=1e-6)
    got = sampler.sample(graphdef, state, jnp.asarray(latents), jnp.asarray(sigmas), jnp.asarray(flow.model_time(sigmas[:-1])),
                         txt, txt_mask, ntxt, nmask, jnp.float32(4.0), img_shapes=(GRID,))
    assert rel_err(got, want) <= 1e-5


def test_student_sampler_two_steps_without_cfg():
    tm = torch_transformer()
    latents, text, mask, _, _ = inputs(tm)
    sigmas = sampler.student_sigmas()
    np.testing.assert_allclose(sigmas, [1.0, 0.75, 0.0])
    x = torch.from_numpy(latents)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        with torch.no_grad():
            v = tm(x, text, mask, torch.full((2,), float(s)), [GRID] * 2).sample
        x = x + (float(s_next) - float(s)) * v
    graphdef, state = nnx.split(jax_twin(tm))
    got = sampler.sample(graphdef, state, jnp.asarray(latents), jnp.asarray(sigmas),
                         jnp.asarray(flow.model_time(sigmas[:-1])), jnp.asarray(text.numpy()),
                         jnp.asarray(mask.numpy()), img_shapes=(GRID,))
    assert rel_err(got, x.numpy()) <= 1e-5


def test_second_call_with_same_shapes_does_not_recompile():
    model = jax_twin(torch_transformer())
    graphdef, state = nnx.split(model)
    latents, text, mask, neg, neg_mask = (jnp.asarray(np.asarray(a)) for a in inputs(torch_transformer()))
    text, mask = sampler.pad_text(text, mask, 64)
    neg, neg_mask = sampler.pad_text(neg, neg_mask, 64)

    def run(sigmas, guidance, lat, txt):
        return sampler.sample(graphdef, state, lat, jnp.asarray(sigmas), jnp.asarray(flow.model_time(sigmas[:-1])),
                              txt, mask, neg, neg_mask, jnp.float32(guidance), img_shapes=(GRID,))

    run(sampler.student_sigmas(4), 4.0, latents, text)
    before = sampler.sample._cache_size()
    # other sigma values, guidance, latents and prompts of the same padded length: no new program
    run(sampler.teacher_sigmas(4, 24), 2.5, latents + 1, text * 0.5)
    assert sampler.sample._cache_size() == before
    run(sampler.student_sigmas(2), 4.0, latents, text)  # a different step count is a new shape
    assert sampler.sample._cache_size() == before + 1


def test_stochastic_sampler_renoises_with_its_key():
    model = jax_twin(torch_transformer())
    graphdef, state = nnx.split(model)
    latents, text, mask, _, _ = (jnp.asarray(np.asarray(a)) for a in inputs(torch_transformer()))
    sigmas = sampler.student_sigmas()
    args = (graphdef, state, latents, jnp.asarray(sigmas), jnp.asarray(flow.model_time(sigmas[:-1])), text, mask)
    a = sampler.sample(*args, key=jax.random.key(1), img_shapes=(GRID,), stochastic=True)
    b = sampler.sample(*args, key=jax.random.key(1), img_shapes=(GRID,), stochastic=True)
    c = sampler.sample(*args, key=jax.random.key(2), img_shapes=(GRID,), stochastic=True)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3
    # the last step lands on sigma 0, where re-noising adds nothing: x0 is the prediction itself
    assert np.isfinite(np.asarray(a)).all()

    # one key per image (the pipeline's): an image's re-noising depends on its seed, not on the batch
    seeds = [5 + i for i in range(latents.shape[0])]
    batch = sampler.sample(*args, key=sampler.renoise_keys(seeds), img_shapes=(GRID,), stochastic=True)
    last = args[:2] + (latents[-1:],) + args[3:5] + (text[-1:], mask[-1:])
    alone = sampler.sample(*last, key=sampler.renoise_keys(seeds[-1:]), img_shapes=(GRID,), stochastic=True)
    np.testing.assert_allclose(alone, batch[-1:], rtol=1e-5, atol=1e-5)
    other = sampler.sample(*last, key=sampler.renoise_keys([99]), img_shapes=(GRID,), stochastic=True)
    assert float(jnp.abs(other - alone).max()) > 1e-3


def test_initial_noise_depends_on_the_seed_only():
    batch = sampler.initial_noise([7, 8, 9], (4, 6, 16))
    alone = sampler.initial_noise([8], (4, 6, 16))
    np.testing.assert_array_equal(batch[1], alone[0])
    assert float(jnp.abs(batch[0] - batch[1]).max()) > 0.1


def test_official_aspect_ratios_at_1k_and_2k_trace_on_the_real_model():
    import functools

    from qwen_jax.models import TransformerConfig
    from qwen_jax.models.transformer import abstract_model
    from qwen_jax.pipeline import ASPECT_RATIOS, ASPECT_RATIOS_2K

    assert len(ASPECT_RATIOS) == len(ASPECT_RATIOS_2K) == 7
    graphdef, state = nnx.split(abstract_model(TransformerConfig.qwen_image(param_dtype="bfloat16", dtype="bfloat16")))
    for name, (w, h) in [*ASPECT_RATIOS.items(), *ASPECT_RATIOS_2K.items()]:
        assert w % 16 == 0 and h % 16 == 0, name
    w, h = ASPECT_RATIOS_2K["16:9"]  # the largest: 160 x 89 = 14,240 image tokens
    grid = (1, h // 16, w // 16)
    sds = jax.ShapeDtypeStruct
    out = jax.eval_shape(
        functools.partial(sampler.sample, graphdef, img_shapes=(grid,)), state,
        sds((4, grid[1] * grid[2], 64), jnp.bfloat16), sds((3,), jnp.float32), sds((2,), jnp.float32),
        sds((4, 128, 3584), jnp.bfloat16), sds((4, 128), jnp.int32))
    assert out.shape == (4, 14240, 64) and out.dtype == jnp.bfloat16
