"""The three roles of distillation (teacher, student, fake score) as denoisers over one graphdef.

Every role is the same transformer definition with its own trainable tree and the shared frozen
tree (the base weights under LoRA, empty for full weights). A denoiser is (x_t, sigma) -> v in
packed layout (B, L, 4C) with sigma scalar or (B,), as `distillation/losses.py` expects.

The student is a K-step generator on `student_sigmas` (2 steps at shift 3: 1.0 -> 0.75 -> 0).
Its transitions are those of the sampler (`sampling/sampler.py`): "ode" = Euler (inference with
`sample(..., stochastic=False)`), "sde" = predict x0 and re-noise with fresh noise
(`stochastic=True`). Backward simulation runs the student's own earlier steps without gradient,
so training sees the inputs inference will.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import flow
from qwen_jax.sampling.sampler import cfg_combine, student_sigmas as shifted_student_sigmas
from qwen_jax.training.state import merge_model

RENOISE = ("ode", "sde")
sg = jax.lax.stop_gradient


def student_sigmas(distill) -> np.ndarray:
    """(K + 1,) float32: the student's visited sigmas, last 0 (config.distill.student_steps / shift)."""
    return np.asarray(shifted_student_sigmas(int(distill.student_steps), float(distill.student_shift)), np.float32)


def guidance_scale(sigma: jax.Array, guidance: float, interval=(0.0, 1.0)) -> jax.Array:
    """Per-sample CFG scale (B,): `guidance` where lo <= sigma <= hi, 1 (the conditional velocity)
    elsewhere. A guidance interval: CFG at the noise levels that fix the layout is what narrows it."""
    lo, hi = interval
    return jnp.where((sigma >= lo) & (sigma <= hi), jnp.float32(guidance), jnp.float32(1.0))


def denoiser(graphdef, trainable: dict, frozen: dict, text: jax.Array, mask: jax.Array, img_shapes,
             negative: tuple | None = None, guidance: float = 1.0, guidance_interval=(0.0, 1.0)):
    """(x_t, sigma) -> v of the model `trainable` + `frozen` conditioned on (text, mask).

    With `negative` = (states, mask) and guidance > 1: true CFG with Qwen's per-token norm
    rescale (`sampler.cfg_combine`), the conditional and unconditional halves in one call, at the
    samples whose sigma lies in `guidance_interval` (`guidance_scale`; the others get scale 1).
    """
    model = merge_model(graphdef, trainable, frozen)
    dtype = model.config.jnp_dtype
    use_cfg = negative is not None and guidance > 1

    def v(x_t, sigma):
        batch = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
        if not use_cfg:
            return model(x_t.astype(dtype), text.astype(dtype), mask, t, img_shapes).astype(jnp.float32)
        both = model(jnp.concatenate([x_t, x_t]).astype(dtype), jnp.concatenate([text, negative[0]]).astype(dtype),
                     jnp.concatenate([mask, negative[1]]), jnp.concatenate([t, t]), img_shapes).astype(jnp.float32)
        scale = guidance_scale(t, guidance, guidance_interval)[:, None, None]
        return cfg_combine(both[:batch], both[batch:], scale)

    return v


def real_score(graphdef, teacher: dict, frozen: dict, text, mask, img_shapes, batch: dict, distill):
    """The frozen teacher as PCM and DMD2 query it: CFG `distill.guidance` against the batch's
    negative prompt, at the sigmas inside `distill.guidance_interval`."""
    return denoiser(graphdef, teacher, frozen, text, mask, img_shapes, (batch["negative_embeds"], batch["negative_mask"]),
                    distill.guidance, tuple(distill.guidance_interval))


def features(graphdef, trainable: dict, frozen: dict, x_t, sigma, text, mask, img_shapes, blocks: tuple[int, ...]):
    """Image-token hidden states (B, L, D) after `blocks` of the model at (x_t, sigma): the GAN's input."""
    model = merge_model(graphdef, trainable, frozen)
    dtype = model.config.jnp_dtype
    t = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x_t.shape[0],))
    _, hidden = model(x_t.astype(dtype), text.astype(dtype), mask, t, img_shapes, return_hidden_states_at=blocks)
    return tuple(h.astype(jnp.float32) for h in hidden)


def transition(x, v, sigma, sigma_next, noise, renoise: str):
    """One student step from sigma to sigma_next: Euler ("ode") or x0 + fresh noise ("sde")."""
    if renoise == "sde":
        return flow.renoise_step(x, v, sigma, sigma_next, noise)
    return flow.euler_step(x, v, sigma, sigma_next)


def backward_simulate(student_v, z: jax.Array, sigmas: jax.Array, k: jax.Array, key: jax.Array, renoise: str):
    """The student's input at exit step k: its own steps 0..k-1 from noise z, without gradient."""
    def body(j, x):
        noise = jax.random.normal(jax.random.fold_in(key, j), x.shape, jnp.float32)
        return transition(x, student_v(x, sigmas[j]), sigmas[j], sigmas[j + 1], noise, renoise)

    return sg(jax.lax.fori_loop(0, k, body, z))


def generate(student_v, z: jax.Array, sigmas: jax.Array, k: jax.Array, key: jax.Array, renoise: str):
    """The student's x0 prediction at exit step k (gradient through the last call only)."""
    x_k = backward_simulate(student_v, z, sigmas, k, key, renoise)
    sigma = sigmas[k]
    return flow.x0_from_velocity(x_k, student_v(x_k, sigma), sigma)


def exit_step(key: jax.Array, num_steps: int) -> jax.Array:
    """k ~ U{0..K-1}, one per iteration (a scalar: every device draws the same from the same key)."""
    return jax.random.randint(key, (), 0, num_steps)


def check_config(config) -> None:
    """The distill.* errors that need nothing loaded."""
    if config.distill.renoise not in RENOISE:
        raise ValueError(f"config.distill.renoise={config.distill.renoise!r}: choose one of {RENOISE}")
    interval = tuple(config.distill.guidance_interval)
    if len(interval) != 2 or not 0.0 <= interval[0] < interval[1] <= 1.0:
        raise ValueError(f"config.distill.guidance_interval={interval}: "
                         "need 0 <= lo < hi <= 1")
    if config.distill.student_init and config.model.lora_rank > 0:
        raise ValueError("config.distill.student_init needs full-weight training (config.model.lora_rank=0): a "
                         "merged export cannot seed LoRA adapters")


def initial_student(config, teacher: dict, mesh) -> dict:
    """The student's trainable tree at step 0: the teacher's, or `distill.student_init`'s weights.

    `student_init` is a transformer folder (e.g. a PCM run's export) of the same architecture;
    under LoRA the adapters start at zero on the shared base instead (merged exports cannot be
    split back into a base and adapters).
    """
    path = config.distill.student_init
    if not path:
        return teacher
    check_config(config)
    from qwen_jax import checkpoints
    from qwen_jax.conversion.errors import ConversionError
    from qwen_jax.training.state import split_trainable

    try:
        with jax.set_mesh(mesh):
            model = checkpoints.load_transformer(path, param_dtype=config.model.param_dtype, dtype=config.model.dtype,
                                                 attention=config.model.attention, remat=config.model.remat,
                                                 scan_unroll=config.model.get("scan_unroll", 1), mesh=mesh)
    except (ConversionError, FileNotFoundError) as e:
        raise ConversionError(f"config.distill.student_init: {e}") from None
    _, params, _ = split_trainable(model, lora=False)
    if jax.tree.structure(params) != jax.tree.structure(teacher) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(teacher))):
        raise ValueError(f"config.distill.student_init={path}: not the teacher's architecture")
    return params
