"""PCM (phased consistency) distillation: the warm start of the 2-step student (`configs/pcm.py`).

Per iteration, on real latents x0 with their captions (`losses.pcm_loss` has the formulas):
(t, r, s) from the shifted grid's phases, the teacher's CFG Euler step t -> r, the stop-gradient
student's jump r -> s as the target, and the student's own jump t -> s pulled to it under a
pseudo-Huber loss. With 2 phases at shift 3 the phase edge is sigma 0.75: exactly the 2-step
student's grid, so each phase becomes one student step.

The teacher is the pretrained transformer (its trainable tree kept aside, never updated); the
student starts from it, or from `distill.student_init`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwen_jax import sharding as sharding_lib
from qwen_jax.distillation import losses, roles
from qwen_jax.models.latents import pack_latents
from qwen_jax.training import optim
from qwen_jax.training import state as state_lib
from qwen_jax.training.objective import SingleOptimizer
from qwen_jax.training.flow_matching import image_grid

sg = jax.lax.stop_gradient


def pcm_step(state, teacher, frozen, batch, *, graphdef, tx, schedule, config, grid):
    key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
    noise_key, sigma_key = jax.random.split(key)
    x0 = pack_latents(batch["latents"].astype(jnp.float32))
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    t, r, s = losses.pcm_sample_sigmas(sigma_key, x0.shape[0], grid)
    text, mask, shapes = batch["prompt_embeds"], batch["prompt_mask"], image_grid(batch["latents"])
    teacher_v = roles.real_score(graphdef, teacher, frozen, text, mask, shapes, batch, config.distill)

    def loss_fn(params):
        student_v = roles.denoiser(graphdef, params, frozen, text, mask, shapes)
        target_v = roles.denoiser(graphdef, sg(params), frozen, text, mask, shapes)
        return losses.pcm_loss(student_v, teacher_v, target_v, x0, noise, t, r, s, config.pcm.huber_c)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new_state, opt_metrics = optim.apply_gradients(state, grads, tx, config.ema.decay)
    return new_state, {"loss": loss, "lr": schedule(state["step"]), **metrics, **opt_metrics}


class Trainer(SingleOptimizer):
    """The PCM objective for `train.py` (the interface is in `training/objective.py`)."""

    needs_negative = True
    check_config = staticmethod(roles.check_config)

    def __init__(self, config, graphdef, params: dict, frozen: dict, mesh):
        self.check_config(config)
        super().__init__(config, roles.initial_student(config, params, mesh), mesh)
        self.graphdef = graphdef
        self.teacher = params  # the state is built by jit: new buffers, so donation never reaches these
        grid = losses.pcm_grid(config.pcm.phases, config.pcm.points, config.pcm.shift)
        self._step = jax.jit(
            functools.partial(pcm_step, graphdef=graphdef, tx=self.tx, schedule=self.schedule, config=config,
                              grid=grid),
            in_shardings=(self.shardings, self.shardings["params"], state_lib.tree_shardings(frozen, mesh), None),
            out_shardings=(self.shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))

    def step(self, state: dict, frozen: dict, batch: dict, step: int):
        del step
        return self._step(state, self.teacher, frozen, batch)
