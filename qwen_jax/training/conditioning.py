"""What the transformer is conditioned on, computed by frozen models: latents and prompt states.

Layouts (one dict per batch, all the objectives take):
  latents        (B, h, w, C) float32, normalised VAE posterior means (`models/latents.py`)
  prompt_embeds  (B, T, D) text-encoder states as the pipeline computes them, T padded to a
                 multiple of `text_bucket` (64 by default; short captions train faster with
                 less), masked positions zero
  prompt_mask    (B, T) int32

The same functions encode on the fly in the trainer and ahead of time in
`tools/cache_dataset.py`, so a cached dataset trains exactly like the images it came from.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.models.latents import normalize_latents
from qwen_jax.sampling import prompts as prompt_lib
from qwen_jax.sampling.sampler import bucket_length, pad_text


@functools.partial(jax.jit, static_argnums=0)
def _encode_images(graphdef, state, images):
    vae = nnx.merge(graphdef, state)
    cfg = vae.config
    return normalize_latents(vae.encode(images).astype(jnp.float32), cfg.latents_mean, cfg.latents_std)


class Conditioner:
    """Frozen VAE + text encoder + tokenizer, loaded from a pipeline folder (or given).

    encode_images(images (B, H, W, 3) in [-1, 1]) -> latents (B, H/f, W/f, C)
    encode_text(captions) -> (prompt_embeds (B, T, D), prompt_mask (B, T))
    """

    def __init__(self, vae, text_encoder, tokenizer, *, max_sequence_length: int = 512, text_bucket: int = 64):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.max_sequence_length, self.text_bucket = max_sequence_length, text_bucket
        self._vae_graphdef, self._vae_state = nnx.split(vae)
        self._text = prompt_lib.jit_encoder(text_encoder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: str | None = None, **kwargs) -> "Conditioner":
        from transformers import AutoTokenizer

        from qwen_jax.pipeline import load_text_encoder, load_vae, resolve_folder

        folder = resolve_folder(folder)
        return cls(load_vae(Path(folder) / "vae", dtype), load_text_encoder(Path(folder) / "text_encoder", dtype),
                   AutoTokenizer.from_pretrained(Path(folder) / "tokenizer"), **kwargs)

    @property
    def pixels_per_latent(self) -> int:
        return self.vae.config.spatial_factor

    def encode_images(self, images) -> jax.Array:
        return _encode_images(self._vae_graphdef, self._vae_state, jnp.asarray(images, jnp.float32))

    def encode_text(self, captions: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        embeds, mask = prompt_lib.encode_prompts(list(captions), self.tokenizer, self._text,
                                                 max_sequence_length=self.max_sequence_length)
        return pad_text(embeds.astype(jnp.float32), mask, bucket_length(embeds.shape[1], self.text_bucket))


def drop_captions(embeds: np.ndarray, mask: np.ndarray, dropped: np.ndarray, uncond_embeds: np.ndarray,
                  uncond_mask: np.ndarray, bucket: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Replaces the rows where `dropped` (B,) is true by the unconditional prompt (CFG dropout).

    embeds (B, T, D), mask (B, T); uncond_embeds (1, T_u, D), uncond_mask (1, T_u). Both sides
    are padded with masked zeros to a common length, a multiple of `bucket`, first.
    """
    embeds, mask, uncond_embeds, uncond_mask = map(np.asarray, (embeds, mask, uncond_embeds, uncond_mask))
    length = bucket_length(max(embeds.shape[1], uncond_embeds.shape[1]), bucket)
    embeds, mask = map(np.asarray, pad_text(embeds, mask, length))
    uncond_embeds, uncond_mask = map(np.asarray, pad_text(uncond_embeds, uncond_mask, length))
    dropped = np.asarray(dropped, bool)
    return (np.where(dropped[:, None, None], uncond_embeds, embeds).astype(np.float32),
            np.where(dropped[:, None], uncond_mask, mask).astype(np.int32))
