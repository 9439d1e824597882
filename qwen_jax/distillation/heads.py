"""Discriminator heads on a transformer's image-token features (the GAN of DMD2 for an MMDiT).

There is no UNet bottleneck in a DiT, so each chosen block's image-token hidden states
(B, L, D) get a small head: parameter-free layer norm, Dense(D -> D), SiLU, Dense(D -> 1) per
token, averaged over tokens: one logit per image per head, summed over heads. Per-token heads
work at any resolution and aspect ratio (PCM's SD3 discriminator and SANA-Sprint do the same).

With a text width (`gan.projection`), each head also judges the image *for its caption*: a
projection discriminator (Miyato & Koyama 2018) adds <mean_tokens(h), P e> to its logit, where h
is the head's hidden layer and e the prompt states averaged over the mask, layer-normalised
(text-encoder states can be large, and the projection's step size should not depend on them).
The backbone's features already see the caption through joint attention, but a head that only
pools them can call an image of the wrong shape real; the projection makes the caption part of
the test.

Parameters are a plain dict {"<i>": {"w1", "b1", "w2", "b2"[, "proj"]}} in float32, replicated
(three heads at width 3072: 113 MB, 340 MB with Adam's moments; projections from the 3584-wide
text add 132 MB, 396 MB; `dmd2.py` says why they are not split). The backbone (fake score or
frozen teacher) is chosen by the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def blocks_at(fractions, num_layers: int) -> tuple[int, ...]:
    """Block indices at fractions of the depth (1.0 = the last block): (0.5, 0.75, 1.0) of 60 -> (29, 44, 59)."""
    out = sorted({min(num_layers - 1, max(0, round(float(f) * num_layers) - 1)) for f in fractions})
    if not out:
        raise ValueError("config.gan.blocks must name at least one depth fraction")
    return tuple(out)


def init_heads(key: jax.Array, width: int, count: int, text_width: int = 0) -> dict:
    """`count` heads on features of `width`; text_width > 0 adds each head's projection P
    (text_width, width), zero at start so a new projection head begins as the plain one."""
    heads = {}
    for i, k in enumerate(jax.random.split(key, count)):
        k1, k2 = jax.random.split(k)
        heads[str(i)] = {"w1": jax.random.normal(k1, (width, width), jnp.float32) / jnp.sqrt(width),
                         "b1": jnp.zeros((width,), jnp.float32),
                         "w2": jax.random.normal(k2, (width, 1), jnp.float32) / jnp.sqrt(width),
                         "b2": jnp.zeros((1,), jnp.float32)}
        if text_width:
            heads[str(i)]["proj"] = jnp.zeros((text_width, width), jnp.float32)
    return heads


def pooled_text(text: jax.Array, mask: jax.Array) -> jax.Array:
    """(B, T, D_txt) prompt states, (B, T) mask -> (B, D_txt) float32: the mean over the valid
    tokens, normalised to zero mean and unit variance over D_txt."""
    m = mask.astype(jnp.float32)[..., None]
    e = (text.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    return (e - e.mean(-1, keepdims=True)) * jax.lax.rsqrt(e.var(-1, keepdims=True) + 1e-6)


def token_logits(head: dict, features: jax.Array, text: jax.Array | None = None) -> jax.Array:
    """(B, L) per-token logits of one head on its (B, L, D) feature map; a projection head adds its
    caption term (the same for every token) from `text` ((B, D_txt), `pooled_text`)."""
    f = features.astype(jnp.float32)
    f = (f - f.mean(-1, keepdims=True)) * jax.lax.rsqrt(f.var(-1, keepdims=True) + 1e-6)
    h = jax.nn.silu(f @ head["w1"] + head["b1"])
    out = (h @ head["w2"] + head["b2"])[..., 0]
    if "proj" in head:
        if text is None:
            raise ValueError("projection heads need the pooled prompt states (text=)")
        # <mean_tokens(h), P e> = mean over tokens of <h, P e>: added per token, it pools the same
        out = out + jnp.einsum("bld,bd->bl", h, text.astype(jnp.float32) @ head["proj"])
    return out


def logits(heads: dict, features: tuple[jax.Array, ...], text: jax.Array | None = None) -> jax.Array:
    """(B,) logits: the sum over heads of each head's mean per-token logit (`token_logits`)."""
    if len(features) != len(heads):
        raise ValueError(f"{len(features)} feature maps for {len(heads)} heads")
    return sum(jnp.mean(token_logits(heads[str(i)], f, text), axis=-1) for i, f in enumerate(features))
