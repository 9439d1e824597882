"""Latent layouts shared by the pipeline and the trainers.

  VAE latents     (B, h, w, C)             channel last, h = H_px / 8, w = W_px / 8 (C = 16)
  packed tokens   (B, (h/2)*(w/2), 4*C)    one token per 2x2 latent patch, tokens row-major over
                                           the (h/2, w/2) grid, features ordered (c, dy, dx)

The packed layout is the transformer's `hidden_states` and equals diffusers'
`QwenImagePipeline._pack_latents` (which starts from (B, C, h, w)) element for element.
Normalisation maps raw VAE latents to the unit-scale space the transformer works in:
`(z - latents_mean) / latents_std`, per channel (the channel axis is last).

pack/unpack use only array methods, so they work on numpy and jax arrays alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp


def pack_latents(z):
    """(B, h, w, C) -> (B, (h/2)*(w/2), 4*C); h and w must be even."""
    b, h, w, c = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    x = z.reshape(b, h // 2, 2, w // 2, 2, c)  # (b, y, dy, x, dx, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(x, h: int, w: int):
    """(B, (h/2)*(w/2), 4*C) -> (B, h, w, C); the inverse of `pack_latents`."""
    b, n, f = x.shape
    if h % 2 or w % 2 or n != (h // 2) * (w // 2) or f % 4:
        raise ValueError(f"cannot unpack {tuple(x.shape)} into a {h}x{w} latent grid")
    z = x.reshape(b, h // 2, w // 2, f // 4, 2, 2)  # (b, y, x, c, dy, dx)
    return z.transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, f // 4)


def _per_channel(values: Sequence[float], z):
    return jnp.asarray(values, dtype=z.dtype).reshape((1,) * (z.ndim - 1) + (-1,))


def normalize_latents(z, mean: Sequence[float], std: Sequence[float]):
    """Raw VAE latents (..., C) -> (z - mean) / std, in z's dtype."""
    return (z - _per_channel(mean, z)) / _per_channel(std, z)


def denormalize_latents(z, mean: Sequence[float], std: Sequence[float]):
    """Normalised latents (..., C) -> z * std + mean, the raw latents `decode` takes."""
    return z * _per_channel(std, z) + _per_channel(mean, z)
