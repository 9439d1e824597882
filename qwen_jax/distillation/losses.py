"""Distillation objectives as pure functions: DMD2, the fake-score loss, GAN losses and PCM.

Layouts: sample tensors are (B, ...) (packed latents (B, L, D), latents (B, H, W, C), toy points
(B, 2)); sigmas are scalars or per-sample (B,). A *denoiser* is any callable (x_t, sigma) -> v
predicting the flow velocity v = noise - x0 (`qwen_jax.flow` conventions, sigma in [0, 1]);
parameters, text conditioning and CFG are closed over by the caller, so the same functions drive
the MMDiT and a toy MLP. `sg` = stop_gradient; `mean` is over every element unless stated.

DMD2, generator turn (x = generator sample, t ~ U[0.02, 0.98], eps ~ N(0, I)):
    x_t     = (1 - t) sg(x) + t eps
    x0_real = x_t - t v_teacher(x_t, t),   x0_fake = x_t - t v_fake(x_t, t)           (both sg)
    g       = (x0_fake - x0_real) / (mean_{non-batch} |x - x0_real| + eps)   per sample, fp32, nan_to_num
    L_DM    = 0.5 mean (x - sg(x - g))^2,   hence  dL_DM/dx = g / N,  N = x.size
  Reduction: mean over all elements, as DMD2's mse_loss. The GAN weights the references tuned
  against it (lambda_G 5e-3 .. 3e-2) then carry over, and the value 0.5 mean(g^2) is O(1) at any size.
Fake score, critic turn (every iteration; sg(x) so the generator gets no gradient):
    L_fake  = mean (v_fake((1 - t) sg(x) + t eps, t) - (eps - sg(x)))^2
GAN on logits f (fake) and r (real) of any shape (one per image or per token), averaged:
    softplus (non-saturating, DMD2):  L_G = mean softplus(-f),  L_D = mean softplus(f) + mean softplus(-r)
    hinge (SAGAN / SANA-Sprint):      L_G = -mean f,            L_D = mean relu(1 + f) + mean relu(1 - r)
PCM (phased consistency). Grid of N solver sigmas sigma_j = shift((j + 1) / N), previous points
sigma-_j = sigma_{j-1} with sigma-_0 = shift(0.001); M phases start at floor(linspace(0, N, M, endpoint=False))
and the edge of index j is sigma-_{start(phase(j))} (shift 3, M = 2: edges ~0.003 and 0.75):
    t = sigma_j, r = sigma-_j, s = edge(j),   x_t = (1 - t) x0 + t eps
    pred   = x_t + (s - t) v_student(x_t, t)                         (the only term with a gradient)
    x_r    = x_t + (r - t) v_teacher(x_t, t)                         (sg: one teacher Euler step)
    target = x_r + (s - r) v_target(x_r, r),  = x_r where r == s     (sg: theta- = stop-grad student or EMA)
    L_PCM  = mean sqrt((pred - target)^2 + c^2) - c,   c = 1e-3      (pseudo-Huber)
Schedule (TTUR): the critic steps every iteration, the generator when step % ratio == 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import flow

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, sigma) -> velocity
sg = jax.lax.stop_gradient

GAN_KINDS = ("softplus", "hinge")


# ---- DMD2 --------------------------------------------------------------------------------------


def dmd_timesteps(key: jax.Array, shape, t_min: float = 0.02, t_max: float = 0.98,
                  shift: float | None = None) -> jax.Array:
    """DM-loss sigmas: U(t_min, t_max) (DMD2's 0.02..0.98), or with `shift`, shift(U(0, 1)) clipped to it.

    The ends are cut: near 0 both scores return ~x (no signal), near 1 x_t keeps almost nothing of x.
    """
    if shift:
        u = jax.random.uniform(key, shape, jnp.float32)
        return jnp.clip(flow.static_shift(u, shift), t_min, t_max)
    return jax.random.uniform(key, shape, jnp.float32, minval=t_min, maxval=t_max)


def dmd_loss(x: jax.Array, x0_real: jax.Array, x0_fake: jax.Array, eps: float = 1e-6):
    """Distribution-matching surrogate on the generator sample x (B, ...); see the module docstring.

    x0_real / x0_fake: teacher / fake-score x0 predictions of the re-noised sg(x); they are
    stop-gradiented here so neither network receives a gradient from the generator's loss.
    Returns (loss, metrics); d loss / d x = g / x.size.
    """
    xf = x.astype(jnp.float32)
    x0_real = sg(x0_real.astype(jnp.float32))
    x0_fake = sg(x0_fake.astype(jnp.float32))
    axes = tuple(range(1, x.ndim))
    # Per-sample normaliser, computed from sg(x): it rescales the step, it is not part of the objective.
    norm = jnp.mean(jnp.abs(sg(xf) - x0_real), axis=axes, keepdims=True) + eps
    g = jnp.nan_to_num((x0_fake - x0_real) / norm)
    loss = 0.5 * jnp.mean((xf - sg(xf - g)) ** 2)
    metrics = {"dmd_loss": sg(loss), "dmd_normaliser": sg(jnp.mean(norm)), "dmd_grad_abs": sg(jnp.mean(jnp.abs(g)))}
    return loss, metrics


def distribution_matching_loss(x: jax.Array, teacher_v: Denoiser, fake_v: Denoiser, noise: jax.Array,
                               sigma: jax.Array, eps: float = 1e-6):
    """The generator turn's DM loss: re-noise sg(x) to `sigma`, denoise with both scores, `dmd_loss`.

    teacher_v: the real score (CFG applied by the caller); fake_v: the fake score (no CFG).
    Returns (loss, metrics).
    """
    x_t = flow.add_noise(sg(x).astype(jnp.float32), noise.astype(jnp.float32), sigma)
    x0_real = flow.x0_from_velocity(x_t, teacher_v(x_t, sigma).astype(jnp.float32), sigma)
    x0_fake = flow.x0_from_velocity(x_t, fake_v(x_t, sigma).astype(jnp.float32), sigma)
    return dmd_loss(x, x0_real, x0_fake, eps)


def regression_loss(sample: jax.Array, target: jax.Array) -> jax.Array:
    """DMD1's regression term: mean squared error between the student's sample and the teacher's
    ODE sample from the same noise and caption (latents; the target is a constant)."""
    return jnp.mean((sample.astype(jnp.float32) - sg(target).astype(jnp.float32)) ** 2)


def fake_score_loss(fake_v: Denoiser, x0: jax.Array, noise: jax.Array, sigma: jax.Array):
    """Flow-matching (velocity MSE) loss of the fake score on generator samples x0, taken as constants.

    The sg(x0) makes the loss safe to differentiate inside a function that also produced x0 with
    the generator: only the fake score's parameters (closed over by fake_v) get a gradient.
    Returns (loss, metrics).
    """
    x0 = sg(x0).astype(jnp.float32)
    noise = noise.astype(jnp.float32)
    v = fake_v(flow.add_noise(x0, noise, sigma), sigma).astype(jnp.float32)
    loss = jnp.mean((v - flow.velocity(x0, noise)) ** 2)
    return loss, {"fake_score_loss": sg(loss)}


def should_update_generator(step, ratio: int):
    """Whether iteration `step` (0-based) also updates the generator: 1 in `ratio`, starting at 0.

    The critic updates on every iteration, so over n iterations there are ceil(n / ratio)
    generator updates and n critic updates. Works on Python ints and traced arrays.
    """
    if ratio < 1:
        raise ValueError(f"dfake_gen_update_ratio must be >= 1, got {ratio}")
    return step % ratio == 0


# ---- GAN ---------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in GAN_KINDS:
        raise ValueError(f"unknown GAN loss {kind!r}; choose from {GAN_KINDS}")


def gan_generator_loss(fake_logits: jax.Array, kind: str = "softplus") -> jax.Array:
    """Generator's adversarial loss on the discriminator's logits for its samples."""
    _check_kind(kind)
    f = fake_logits.astype(jnp.float32)
    return jnp.mean(jax.nn.softplus(-f)) if kind == "softplus" else -jnp.mean(f)


def gan_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str = "softplus") -> jax.Array:
    """Discriminator's loss; the caller passes logits of sg(fake samples) so the generator is untouched.

    The two halves are summed, not averaged (DMD2); real and fake batches may differ in size.
    """
    _check_kind(kind)
    r, f = real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32)
    if kind == "softplus":
        return jnp.mean(jax.nn.softplus(f)) + jnp.mean(jax.nn.softplus(-r))
    return jnp.mean(jax.nn.relu(1 + f)) + jnp.mean(jax.nn.relu(1 - r))


def _per_sample(a: jax.Array, x: jax.Array) -> jax.Array:
    """A scalar or (B,) array shaped to broadcast against x (B, ...)."""
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


# ---- PCM ---------------------------------------------------------------------------------------


def pseudo_huber(a: jax.Array, b: jax.Array, c: float = 1e-3) -> jax.Array:
    """mean sqrt((a - b)^2 + c^2) - c: ~(a - b)^2 / 2c for |a - b| << c, ~|a - b| beyond (robust to outliers)."""
    d2 = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))
    # d^2 / (sqrt(d^2 + c^2) + c) equals sqrt(d^2 + c^2) - c without its fp32 cancellation for |d| << c.
    return jnp.mean(d2 / (jnp.sqrt(d2 + c * c) + c))


@dataclasses.dataclass(frozen=True)
class PCMGrid:
    """PCM's solver grid (float32, host-side, ascending in j).

    sigmas[j]     t for index j:        shift((j + 1) / N)
    prev[j]       r, one solver step lower: sigmas[j - 1], prev[0] = shift(sigma_min)
    edges[j]      s, the lower edge of j's phase: prev[start of the phase]
    boundaries    the M phase edges, ascending ([~0.003, 0.75] for shift 3, M = 2)
    """

    sigmas: np.ndarray
    prev: np.ndarray
    edges: np.ndarray
    boundaries: np.ndarray

    @property
    def num_points(self) -> int:
        return len(self.sigmas)


def pcm_grid(num_phases: int = 2, num_points: int = 100, shift: float = 3.0, sigma_min: float = 0.001) -> PCMGrid:
    """The shifted N-point grid and its M phases (2 phases at shift 3: a 2-step student at [1.0, 0.75])."""
    if not 1 <= num_phases <= num_points:
        raise ValueError(f"need 1 <= num_phases <= num_points, got {num_phases}, {num_points}")
    base = np.arange(1, num_points + 1, dtype=np.float32) / np.float32(num_points)
    sigmas = np.asarray(flow.static_shift(base, shift), np.float32)
    first = np.asarray(flow.static_shift(np.float32(sigma_min), shift), np.float32)
    prev = np.concatenate([first[None], sigmas[:-1]]).astype(np.float32)
    starts = np.floor(np.linspace(0, num_points, num_phases, endpoint=False)).astype(np.int64)
    phase = np.searchsorted(starts, np.arange(num_points), side="right") - 1
    boundaries = prev[starts]
    return PCMGrid(sigmas=sigmas, prev=prev, edges=boundaries[phase], boundaries=boundaries)


def pcm_phase_edges(sigma, boundaries):
    """(phase, lower edge) of each sigma: phase m covers (b_m, b_{m+1}], the top one (b_{M-1}, 1].

    A sigma equal to a boundary belongs to the phase below it (it is that phase's last grid
    point: 0.75 maps to the edge ~0.003 on the 2-phase grid); sigmas <= b_0 clip to phase 0.
    """
    boundaries = jnp.asarray(boundaries, jnp.float32)
    phase = jnp.clip(jnp.searchsorted(boundaries, jnp.asarray(sigma, jnp.float32), side="left") - 1,
                     0, boundaries.shape[0] - 1)
    return phase, boundaries[phase]


def pcm_sample_sigmas(key: jax.Array, batch: int, grid: PCMGrid):
    """(t, r, s), each (batch,): a grid index j ~ U{0..N-1} per sample and its point, previous point and edge."""
    j = jax.random.randint(key, (batch,), 0, grid.num_points)
    return jnp.asarray(grid.sigmas)[j], jnp.asarray(grid.prev)[j], jnp.asarray(grid.edges)[j]


def pcm_loss(student_v: Denoiser, teacher_v: Denoiser, target_v: Denoiser, x0: jax.Array, noise: jax.Array,
             t: jax.Array, r: jax.Array, s: jax.Array, c: float = 1e-3):
    """Phased-consistency loss on clean data x0 (B, ...) with noise (B, ...) at per-sample (t, r, s).

    student_v: the trained denoiser (gradient flows through its one call, at (x_t, t)).
    teacher_v: the frozen teacher with CFG, for the Euler step t -> r.
    target_v:  theta-, the student's stop-gradient copy or EMA, evaluated at (x_r, r).
    t, r, s:   from `pcm_sample_sigmas` (s <= r < t; r == s at a phase's first grid point).
    Returns (loss, metrics); only student_v's closed-over parameters receive a gradient.
    """
    x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
    x_t = flow.add_noise(x0, noise, t)
    pred = flow.euler_step(x_t, student_v(x_t, t).astype(jnp.float32), t, s)
    x_r = sg(flow.euler_step(x_t, teacher_v(x_t, t).astype(jnp.float32), t, r))
    target = flow.euler_step(x_r, target_v(x_r, r).astype(jnp.float32), r, s)
    # At a phase start the target is the teacher step itself (boundary condition); `where`, not the
    # zero-length step, so a non-finite theta- prediction there cannot leak into the target.
    at_edge = _per_sample(jnp.asarray(r) == jnp.asarray(s), x_r)
    target = sg(jnp.where(at_edge, x_r, target))
    loss = pseudo_huber(pred, target, c)
    return loss, {"pcm_loss": sg(loss), "pcm_abs_err": sg(jnp.mean(jnp.abs(pred - target)))}
