"""Sample grids during training: the same prompts and seeds at every evaluation, so grids compare.

The sampler is the project's jitted denoising loop (`sampling/sampler.py`) on the weights being
trained; prompts, the negative prompt and the initial noise are encoded once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwen_jax import flow
from qwen_jax.models.latents import pack_latents, unpack_latents
from qwen_jax.pipeline import decode_images
from qwen_jax.sampling import sampler
from qwen_jax.sampling.grid import image_grid
from qwen_jax.training.conditioning import Conditioner
from qwen_jax.training.state import merge_trees


class GridSampler:
    """`sampler(trainable, frozen)` -> one (H, W, 3) grid in [0, 1] of `cfg.prompts`' images."""

    def __init__(self, cfg, conditioner: Conditioner, graphdef, scheduler: flow.SchedulerConfig, mesh=None):
        factor = conditioner.pixels_per_latent
        if cfg.width % (2 * factor) or cfg.height % (2 * factor):
            raise ValueError(f"config.eval.width/height must be multiples of {2 * factor}, "
                             f"got {cfg.width}x{cfg.height}")
        self.cfg, self.graphdef = cfg, graphdef
        self.h, self.w = cfg.height // factor, cfg.width // factor
        self.grid = (1, self.h // 2, self.w // 2)
        prompts = list(cfg.prompts)
        text, mask = conditioner.encode_text(prompts)
        self.neg = None
        if cfg.guidance > 1 and cfg.negative_prompt is not None:
            neg_text, neg_mask = conditioner.encode_text([cfg.negative_prompt] * len(prompts))
            length = max(text.shape[1], neg_text.shape[1])
            text, mask = sampler.pad_text(text, mask, length)
            self.neg = sampler.pad_text(neg_text, neg_mask, length)
        self.text, self.mask = text, mask
        sigmas = flow.sampling_sigmas(cfg.num_steps, scheduler, image_seq_len=self.grid[1] * self.grid[2])
        self.sigmas, self.times = jnp.asarray(sigmas), jnp.asarray(flow.model_time(sigmas[:-1]))
        channels = conditioner.vae.config.z_dim
        seeds = [cfg.seed + i for i in range(len(prompts))]
        self.noise = pack_latents(sampler.initial_noise(seeds, (self.h, self.w, channels)))
        self.vae_graphdef, self.vae_state = nnx.split(conditioner.vae)
        if mesh is not None:  # inputs and the VAE replicated over the mesh the weights live on
            replicated = NamedSharding(mesh, PartitionSpec())
            host = jax.tree.map(np.asarray, (self.text, self.mask, self.noise, self.sigmas, self.times,
                                             self.vae_state, self.neg))  # numpy: valid on every host
            self.text, self.mask, self.noise, self.sigmas, self.times, self.vae_state, self.neg = jax.device_put(
                host, replicated)

    def __call__(self, trainable: dict, frozen: dict) -> np.ndarray:
        state = nnx.State(merge_trees(trainable, frozen))
        neg_text, neg_mask = self.neg if self.neg is not None else (None, None)
        latents = sampler.sample(self.graphdef, state, self.noise, self.sigmas, self.times, self.text, self.mask,
                                 neg_text, neg_mask, jnp.float32(self.cfg.guidance), jax.random.key(self.cfg.seed),
                                 img_shapes=(self.grid,))
        images = decode_images(self.vae_graphdef, self.vae_state, unpack_latents(latents, self.h, self.w))
        return image_grid(np.asarray(jax.device_get(images)))
