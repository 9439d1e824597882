"""Flow-matching math in one place: noise schedules, the Euler step and prediction conversions.

Convention (Qwen-Image, diffusers' FlowMatchEulerDiscreteScheduler):
    x_sigma = sigma * noise + (1 - sigma) * x0,   sigma in [0, 1], sigma = 1 is pure noise,
    the model predicts the velocity v = noise - x0 and takes sigma itself (not sigma * 1000).
Samplers, trainers and distillation losses all use these functions; nothing else re-derives them.

Schedules are computed on the host in float32 exactly as diffusers computes them, so that a
sampler given the same initial latents takes the same steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The fields of diffusers' FlowMatchEulerDiscreteScheduler that Qwen-Image uses.

    Defaults are Qwen-Image's shipped `scheduler/scheduler_config.json`: resolution-dependent
    exponential shift (mu linear in the packed image-token count) and a terminal stretch to 0.02.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    time_shift_type: str = "exponential"
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02

    @classmethod
    def qwen_image(cls) -> "SchedulerConfig":
        return cls()

    @classmethod
    def fixed_shift(cls, shift: float = 3.0) -> "SchedulerConfig":
        """Static shift `shift*s / (1 + (shift-1)*s)`, no terminal stretch (distilled models use 3)."""
        return cls(shift=shift, use_dynamic_shifting=False, shift_terminal=None)

    _UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                    "stochastic_sampling")

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> "SchedulerConfig":
        for flag in cls._UNSUPPORTED:
            if cfg.get(flag):
                raise ValueError(f"scheduler config sets {flag}=true, which qwen_jax does not implement")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})

    def to_diffusers_config(self) -> dict[str, Any]:
        out = {"_class_name": "FlowMatchEulerDiscreteScheduler", **dataclasses.asdict(self)}
        out.update({flag: False for flag in self._UNSUPPORTED})
        return out


def calculate_mu(image_seq_len: int, cfg: SchedulerConfig) -> float:
    """Exponential-shift parameter, linear in the packed image-token count (H/16)*(W/16)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)


def shift_sigmas(sigmas, cfg: SchedulerConfig, mu: float | None = None) -> np.ndarray:
    """Applies the config's shift (and terminal stretch) to base sigmas; float32 like diffusers."""
    s = np.asarray(sigmas, dtype=np.float32)
    with np.errstate(divide="ignore"):
        if cfg.use_dynamic_shifting:
            if mu is None:
                raise ValueError("this schedule shifts by resolution: pass mu (see calculate_mu)")
            e = math.exp(mu) if cfg.time_shift_type == "exponential" else mu
            s = e / (e + (1 / s - 1))
        else:
            s = static_shift(s, cfg.shift)
    if cfg.shift_terminal:
        if len(s) < 2 or s[-1] == 1:
            # diffusers divides 0 by 0 here and returns NaN sigmas; refuse instead.
            raise ValueError("the shift_terminal stretch needs at least 2 steps below sigma 1; "
                             "use more steps or a fixed-shift schedule")
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    return s.astype(np.float32)


def sampling_sigmas(
    num_steps: int | None = None,
    cfg: SchedulerConfig = SchedulerConfig(),
    image_seq_len: int | None = None,
    sigmas: Sequence[float] | None = None,
) -> np.ndarray:
    """The N + 1 sigmas a sampler visits (last one 0), as diffusers' QwenImagePipeline builds them.

    Base grid `linspace(1, 1/N, N)` unless explicit `sigmas` are given; then the config's shift
    (mu from `image_seq_len` for dynamic shifting) and terminal stretch.
    """
    if sigmas is None:
        if not num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    mu = calculate_mu(image_seq_len, cfg) if cfg.use_dynamic_shifting and image_seq_len is not None else None
    shifted = shift_sigmas(sigmas, cfg, mu)
    return np.concatenate([shifted, np.zeros(1, np.float32)])


def model_time(sigmas) -> np.ndarray:
    """The time the transformer sees for each sigma: diffusers' `(sigma * 1000) / 1000` in float32."""
    t = np.asarray(sigmas, np.float32) * np.float32(1000)
    return (t / np.float32(1000)).astype(np.float32)


# ---- training-time sigmas ---------------------------------------------------------------------

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def static_shift(sigma, shift: float):
    """shift * s / (1 + (shift - 1) * s): moves mass towards high noise for shift > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def static_unshift(sigma, shift: float):
    """The inverse of `static_shift`: the base sigma that the shift maps to `sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


def sample_training_sigmas(key: jax.Array, shape, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                           shift: float | None = None) -> jax.Array:
    """Sigmas for flow-matching training, in (0, 1).

    kind "uniform": U(0, 1); "logit_normal": sigmoid(N(mean, std)) (SD3's choice). An optional
    static `shift` is applied afterwards, as at sampling time.
    """
    if kind == "uniform":
        sigma = jax.random.uniform(key, shape, jnp.float32, minval=1e-5, maxval=1.0)
    elif kind == "logit_normal":
        sigma = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))
    else:
        raise ValueError(f"unknown timestep sampling {kind!r}; choose from {TIMESTEP_SAMPLINGS}")
    return static_shift(sigma, shift) if shift else sigma


# ---- conversions between noise, data and velocity ---------------------------------------------


def add_noise(x0: jax.Array, noise: jax.Array, sigma) -> jax.Array:
    """x_sigma = sigma * noise + (1 - sigma) * x0 (sigma scalar or per sample, broadcast left)."""
    sigma = _bcast(sigma, x0)
    return sigma * noise + (1 - sigma) * x0


def velocity(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The flow-matching target v = noise - x0."""
    return noise - x0


def x0_from_velocity(x_t: jax.Array, v: jax.Array, sigma) -> jax.Array:
    return x_t - _bcast(sigma, x_t) * v


def noise_from_velocity(x_t: jax.Array, v: jax.Array, sigma) -> jax.Array:
    return x_t + (1 - _bcast(sigma, x_t)) * v


def euler_step(x_t: jax.Array, v: jax.Array, sigma, sigma_next) -> jax.Array:
    """x_{sigma_next} = x_sigma + (sigma_next - sigma) * v, in fp32, cast back to v's dtype."""
    dt = _bcast(jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32), x_t)
    return (x_t.astype(jnp.float32) + dt * v.astype(jnp.float32)).astype(v.dtype)


def renoise_step(x_t: jax.Array, v: jax.Array, sigma, sigma_next, noise: jax.Array) -> jax.Array:
    """Stochastic step: predict x0, then re-noise it to sigma_next with fresh `noise` (DMD2/LCM style)."""
    x0 = x0_from_velocity(x_t.astype(jnp.float32), v.astype(jnp.float32), sigma)
    return add_noise(x0, noise.astype(jnp.float32), sigma_next).astype(v.dtype)


def _bcast(sigma, x: jax.Array) -> jax.Array:
    """A scalar or per-sample (B,) sigma shaped to broadcast against x (B, ...)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim)) if sigma.ndim else sigma
