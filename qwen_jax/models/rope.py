"""Qwen-Image 3-axis RoPE (diffusers `QwenEmbedRope`, scale_rope=True) in real arithmetic.

Each head dim is split into frame / height / width slots (axes_dims_rope, e.g. 16/56/56 real
dims = 8/28/28 rotation pairs). Pairs are *adjacent* elements (2k, 2k+1), GPT-J style.

Positions, computed on the host from the static image shapes:
  image token (frame f, row r, col c) of image number `idx` with a (F, h, w) token grid:
      frame  = idx + f
      height = r - (h - h // 2)        (centred: rows span [-(h - h//2), h//2 - 1])
      width  = c - (w - w // 2)
  text token j:  all three axes = max over images of max(h // 2, w // 2) + j
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ImageShapes = tuple[tuple[int, int, int], ...]
THETA = 10000.0


def normalize_img_shapes(img_shapes) -> ImageShapes:
    """The images of one sample as ((f, h, w), ...), from any of diffusers' forms.

    (f, h, w)                 one image
    [(f, h, w)] * B           one image per sample
    [[(f, h, w), ...]] * B    several images per sample (edit models)
    As in diffusers, only the first sample's entry is used: the batch shares one token grid.
    """

    def depth(x):
        return 1 + depth(x[0]) if isinstance(x, (list, tuple)) and len(x) else 0

    d = depth(img_shapes)
    shapes = [img_shapes] if d == 1 else [img_shapes[0]] if d == 2 else img_shapes[0] if d == 3 else None
    if shapes is None or any(len(s) != 3 or int(min(s)) <= 0 for s in shapes):
        raise ValueError(f"img_shapes must hold (frames, height, width) token grids, got {img_shapes!r}")
    return tuple(tuple(int(v) for v in s) for s in shapes)


def num_image_tokens(img_shapes: ImageShapes) -> int:
    return sum(f * h * w for f, h, w in img_shapes)


def token_positions(img_shapes: ImageShapes, txt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer positions (L_img, 3) and (L_txt, 3) for (frame, height, width)."""
    img = []
    max_vid_index = 0
    for idx, (f, h, w) in enumerate(img_shapes):
        ff, rr, cc = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
        img.append(np.stack([idx + ff, rr - (h - h // 2), cc - (w - w // 2)], axis=-1).reshape(-1, 3))
        max_vid_index = max(max_vid_index, h // 2, w // 2)
    txt = np.repeat((max_vid_index + np.arange(txt_len))[:, None], 3, axis=1)
    return np.concatenate(img, axis=0).astype(np.int32), txt.astype(np.int32)


def _inv_freqs(axes_dims: Sequence[int]) -> list[np.ndarray]:
    # fp32 exactly as diffusers: 1 / theta ** (arange(0, d, 2) / d)
    return [
        (np.float32(1.0) / np.power(np.float32(THETA), np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
        .astype(np.float32)
        for d in axes_dims
    ]


def rope_angles(positions: np.ndarray, axes_dims: Sequence[int]) -> jax.Array:
    """Rotation angles (S, head_dim / 2) in fp32: per axis `position * inv_freq`, concatenated."""
    pos = jnp.asarray(positions, dtype=jnp.float32)
    parts = [pos[:, a, None] * jnp.asarray(inv) for a, inv in enumerate(_inv_freqs(axes_dims))]
    return jnp.concatenate(parts, axis=-1)


def rope_tables(img_shapes: ImageShapes, txt_len: int, axes_dims: Sequence[int]):
    """(cos, sin) for the joint [text, image] sequence, each (L_txt + L_img, head_dim / 2) fp32."""
    img_pos, txt_pos = token_positions(img_shapes, txt_len)
    angles = rope_angles(np.concatenate([txt_pos, img_pos], axis=0), axes_dims)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates adjacent pairs of x (B, S, H, Dh) by the (S, Dh/2) tables; math in fp32."""
    xp = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
