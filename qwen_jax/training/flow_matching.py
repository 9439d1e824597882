"""Flow matching: the velocity loss that fine-tunes Qwen-Image and trains the toy teacher.

    x0 = pack(latents)            (B, L_img, 4C), the data
    eps ~ N(0, I), sigma ~ p(sigma) (logit-normal or uniform, optionally shifted: `flow.sample_training_sigmas`)
    x_t = (1 - sigma) x0 + sigma eps         v* = eps - x0          loss = mean (v(x_t, sigma, text) - v*)^2

Caption dropout (for classifier-free guidance) happens before the step, on the host: dropped
rows carry the unconditional prompt's states (`conditioning.drop_captions`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwen_jax import flow
from qwen_jax import sharding as sharding_lib
from qwen_jax.models.latents import pack_latents
from qwen_jax.training import optim
from qwen_jax.training import state as state_lib
from qwen_jax.training.objective import SingleOptimizer
from qwen_jax.training.state import merge_model


def image_grid(latents) -> tuple[tuple[int, int, int], ...]:
    """`img_shapes` for (B, h, w, C) latents: one frame of (h/2) x (w/2) tokens (static shapes)."""
    return ((1, latents.shape[1] // 2, latents.shape[2] // 2),)


def flow_matching_loss(model, batch: dict, key: jax.Array, fm) -> jax.Array:
    """Mean squared velocity error on a batch of normalised latents and prompt states.

    fm: config.flow_matching (timestep_sampling, logit_mean, logit_std, shift).
    """
    x0 = pack_latents(batch["latents"].astype(jnp.float32))
    noise_key, sigma_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    sigma = flow.sample_training_sigmas(sigma_key, (x0.shape[0],), fm.timestep_sampling, fm.logit_mean,
                                        fm.logit_std, fm.shift or None)
    x_t = flow.add_noise(x0, noise, sigma)
    dtype = model.config.jnp_dtype
    v = model(x_t.astype(dtype), batch["prompt_embeds"].astype(dtype), batch["prompt_mask"], sigma,
              image_grid(batch["latents"]))
    return jnp.mean(jnp.square(v.astype(jnp.float32) - flow.velocity(x0, noise)))


def train_step(state: dict, frozen: dict, batch: dict, *, graphdef, tx, schedule, config):
    """One flow-matching step: loss, gradients of the trainable tree, optimizer and EMA update.

    The step's randomness is `fold_in(key(config.seed), step)`: a resumed run draws the same.
    """
    key = jax.random.fold_in(jax.random.key(config.seed), state["step"])

    def loss_fn(params):
        return flow_matching_loss(merge_model(graphdef, params, frozen), batch, key, config.flow_matching)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    new_state, metrics = optim.apply_gradients(state, grads, tx, config.ema.decay)
    return new_state, {"loss": loss, "lr": schedule(state["step"]), **metrics}


class Trainer(SingleOptimizer):
    """The flow-matching objective for `train.py` (the interface is in `training/objective.py`)."""

    def __init__(self, config, graphdef, params: dict, frozen: dict, mesh):
        super().__init__(config, params, mesh)
        self.graphdef = graphdef
        self._step = jax.jit(
            functools.partial(train_step, graphdef=graphdef, tx=self.tx, schedule=self.schedule, config=config),
            in_shardings=(self.shardings, state_lib.tree_shardings(frozen, mesh), None),
            out_shardings=(self.shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))

    def step(self, state: dict, frozen: dict, batch: dict, step: int):
        del step
        return self._step(state, frozen, batch)
