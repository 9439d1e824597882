"""Jitted denoising loops: the whole loop is one compiled function (lax.fori_loop inside jit).

Two uses, one function:
  teacher  N steps of the shipped Qwen-Image schedule, true CFG with a negative prompt and
           diffusers' per-token norm rescale;
  student  a few explicit sigmas (default 2 steps, sigma in {1.0, 0.75}, shift 3), no CFG.

Recompilation rules: a compiled sampler is keyed on the model (graphdef), the token grid
(`img_shapes`), the batch size, the text length, the number of steps, whether a negative prompt
is given and whether steps re-noise. Sigma values, guidance scale, prompts (at a fixed padded
text length), seeds and parameters are runtime inputs: changing them does not recompile. The
pipeline pads text to multiples of `TEXT_BUCKET` tokens so that most prompts share a shape.

Layouts: latents (B, L_img, 4 * C) packed as the transformer takes them; text (B, L_txt, D_txt).
CFG runs the conditional and negative branches as one batch of 2B (texts padded to a common
length and masked, which leaves each branch's result unchanged).

On several devices: call `sample` under `jax.set_mesh(mesh)`. The batch is split over the mesh's
"data" and "fsdp" axes; with a "sequence" axis (`qwen_jax.sharding.make_mesh(..., sequence=n)`)
each image's tokens are split n ways too (`qwen_jax.models.sequence_parallel`), so one 2048x2048
image (16,384 tokens) runs on n chips. The image token count must divide by n. Place the
inputs with `shard_inputs` (or, for `sample.lower` on abstract inputs, give each
`jax.ShapeDtypeStruct` the sharding from `latents_sharding` / `text_sharding`):

    mesh = make_mesh(data=1, fsdp=1, sequence=8)
    with jax.set_mesh(mesh):
        latents, text, mask, neg, neg_mask = shard_inputs(mesh, latents, text, mask, neg, neg_mask)
        out = sample(graphdef, place_state(state, mesh), latents, ..., img_shapes=((1, 128, 128),))

The ambient mesh is part of jit's cache key: the same call without a mesh compiles separately.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax import flow
from qwen_jax.sharding import TEXT_TOKENS, TOKENS, activation_sharding

TEXT_BUCKET = 64


def student_sigmas(num_steps: int = 2, shift: float = 3.0) -> np.ndarray:
    """The few-step student's grid: linspace(1, 1/N, N) under a fixed shift, then 0 (2 steps: 1, 0.75, 0)."""
    return flow.sampling_sigmas(num_steps, flow.SchedulerConfig.fixed_shift(shift))


def teacher_sigmas(num_steps: int, image_seq_len: int, cfg: flow.SchedulerConfig = flow.SchedulerConfig()) -> np.ndarray:
    """The teacher's grid: Qwen-Image's resolution-shifted schedule with its terminal stretch."""
    return flow.sampling_sigmas(num_steps, cfg, image_seq_len=image_seq_len)


def pad_text(embeds: jax.Array, mask: jax.Array, length: int):
    """Right-pads text states (B, L, D) and mask (B, L) with masked zeros up to `length`."""
    extra = length - embeds.shape[1]
    if extra < 0:
        raise ValueError(f"text of {embeds.shape[1]} tokens does not fit {length}")
    return (jnp.pad(embeds, ((0, 0), (0, extra), (0, 0))),
            jnp.pad(jnp.asarray(mask).astype(jnp.int32), ((0, 0), (0, extra))))


def bucket_length(n: int, bucket: int = TEXT_BUCKET) -> int:
    return max(bucket, -(-n // bucket) * bucket)


def cfg_combine(cond: jax.Array, neg: jax.Array, scale) -> jax.Array:
    """True CFG with diffusers' rescale: the guided velocity keeps the conditional one's per-token norm."""
    comb = neg + scale * (cond - neg)
    cond_norm = jnp.linalg.norm(cond, axis=-1, keepdims=True)
    comb_norm = jnp.linalg.norm(comb, axis=-1, keepdims=True)
    return comb * (cond_norm / comb_norm)


@functools.partial(jax.jit, static_argnames=("graphdef", "img_shapes", "stochastic"))
def sample(
    graphdef,
    state,
    latents: jax.Array,
    sigmas: jax.Array,
    times: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    neg_text: jax.Array | None = None,
    neg_mask: jax.Array | None = None,
    guidance: jax.Array | float = 1.0,
    key: jax.Array | None = None,
    *,
    img_shapes: tuple,
    stochastic: bool = False,
) -> jax.Array:
    """Runs len(sigmas) - 1 denoising steps from `latents` (the noise at sigmas[0]).

    sigmas: (N + 1,) visited sigmas, last 0; times: (N,) what the model sees (flow.model_time).
    With `neg_text`, each step is true CFG with scale `guidance`. With `stochastic`, each step
    predicts x0 and re-noises it with fresh noise from `key` (DMD2-style multi-step sampling):
    one key for the batch, or one per image (`renoise_keys`);
    otherwise steps are Euler (deterministic, diffusers' FlowMatchEulerDiscreteScheduler).
    """
    model = nnx.merge(graphdef, state)
    batch = latents.shape[0]
    use_cfg = neg_text is not None
    if use_cfg:
        text = jnp.concatenate([text, neg_text], axis=0)
        text_mask = jnp.concatenate([text_mask, neg_mask], axis=0)

    def step(i, x):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_in = jnp.concatenate([x, x], axis=0) if use_cfg else x
        t = jnp.full((x_in.shape[0],), times[i], jnp.float32)
        v = model(x_in, text, text_mask, t, img_shapes)
        if use_cfg:
            v = cfg_combine(v[:batch], v[batch:], guidance)
        if stochastic:
            return flow.renoise_step(x, v, sigma, sigma_next, _step_noise(key, i, x.shape)).astype(x.dtype)
        return flow.euler_step(x, v, sigma, sigma_next).astype(x.dtype)

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, latents)


def _step_noise(key: jax.Array, step, shape) -> jax.Array:
    """Step `step`'s re-noising noise: from one key for the batch, or from one key per image
    ((B,) keys), so that an image's noise does not depend on the batch it is in."""
    if key.ndim:
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape[1:], jnp.float32))(key)
    return jax.random.normal(jax.random.fold_in(key, step), shape, jnp.float32)


def latents_sharding(mesh, shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
    """Latents (B, L_img, C): batch over ("data", "fsdp"), image tokens over "sequence" where they divide."""
    return activation_sharding(mesh, TOKENS, shape)


def text_sharding(mesh, shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
    """Text states (B, L_txt, D) or mask (B, L_txt): batch split, text whole along "sequence"."""
    return activation_sharding(mesh, TEXT_TOKENS, shape)


def shard_inputs(mesh, latents, text, text_mask, neg_text=None, neg_mask=None):
    """`sample`'s per-image inputs moved onto `mesh` (None stays None), in the order given."""
    put = lambda x, where: None if x is None else jax.device_put(x, where(mesh, x.shape))  # noqa: E731
    return (put(latents, latents_sharding), put(text, text_sharding), put(text_mask, text_sharding),
            put(neg_text, text_sharding), put(neg_mask, text_sharding))


def seed_keys(seeds) -> jax.Array:
    """(B,) typed keys, one per image from its own seed."""
    return jax.random.wrap_key_data(jnp.stack([jax.random.key_data(jax.random.key(int(s))) for s in seeds]))


def renoise_keys(seeds) -> jax.Array:
    """(B,) keys for `sample(stochastic=True)`, one per image from its seed (apart from its initial noise)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 1))(seed_keys(seeds))


def initial_noise(seeds, latent_shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """One Gaussian per image from its own seed: an image depends on its seed alone, not on the batch."""
    return jax.vmap(lambda k: jax.random.normal(k, latent_shape, dtype))(seed_keys(seeds))
