"""Sequence parallelism: one image's tokens split across the devices of the "sequence" mesh axis.

Active whenever the ambient mesh (`jax.set_mesh`) has a "sequence" axis of size n > 1
(`qwen_jax.sharding.make_mesh(..., sequence=n)`); otherwise the model runs exactly as without it.

Layout, for the image stream of L_img tokens and the text stream of L_txt tokens:
  image stream  (B, L_img, D)  device s of the "sequence" axis holds tokens [s, s + 1) * L_img / n
                               (logical "activation_length" -> "sequence"); L_img must divide by n.
  text stream   (B, L_txt, D)  whole on every device of the axis (a few hundred tokens).
  batch                        over ("data", "fsdp") where they divide it, as everywhere else.
  heads                        over "tensor" inside attention where it divides them.
  RoPE                         applied to the global (logically whole) arrays before attention,
                               so each shard's queries and keys carry their own positions.

Everything but attention is per token, so GSPMD splits it without communication. Attention is
the one place where tokens meet; `joint_attention` runs it under `jax.shard_map`: each device
all-gathers the image keys/values over "sequence" and attends its queries [txt; img_local] to
the joint keys [txt; img_all] with the single-device `attention()`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from qwen_jax.models.attention import attention
from qwen_jax.sharding import SEQUENCE_AXIS, activation_spec, axis_size


def num_shards(mesh=None) -> int:
    """How many pieces each image is split into under `mesh` (default: the ambient mesh)."""
    return axis_size(SEQUENCE_AXIS, mesh)


def check_divisible(num_image_tokens: int, shards: int) -> None:
    if num_image_tokens % shards:
        raise ValueError(
            f"{num_image_tokens} image tokens cannot be split over the '{SEQUENCE_AXIS}' mesh axis of size "
            f"{shards}: choose a sequence size that divides the token count (or an image size that it divides)")


def joint_attention(q, k, v, kv_mask: jax.Array | None, impl: str = "xla"):
    """Attention of the joint [text; image] sequence with the image tokens split over "sequence".

    q, k, v: (text, image) pairs, text (B, L_txt, H, Dh) and image (B, L_img, H, Dh), RoPE
    applied; kv_mask (B, L_txt + L_img) in the joint text-first order, or None.
    Returns (text out (B, L_txt, H, Dh), image out (B, L_img, H, Dh) split like the image queries).
    """
    mesh = jax.sharding.get_abstract_mesh()
    batch, n_img, heads, _ = q[1].shape
    check_divisible(n_img, num_shards(mesh))
    b, _, h = activation_spec(("activation_batch", None, "activation_heads"), (batch, 1, heads), mesh)
    txt_spec, img_spec = PartitionSpec(b, None, h, None), PartitionSpec(b, SEQUENCE_AXIS, h, None)
    pair = (txt_spec, img_spec)
    mask = () if kv_mask is None else (kv_mask,)

    def local(q, k, v, *mask):
        # `to="invarying"`: the gathered keys are the same on every device of the axis; typed so,
        # the text output computed from them may leave the map unsplit along "sequence".
        gather = lambda x: jax.lax.all_gather(x, SEQUENCE_AXIS, axis=1, tiled=True, to="invarying")  # noqa: E731
        keys = jnp.concatenate([k[0], gather(k[1])], axis=1)
        values = jnp.concatenate([v[0], gather(v[1])], axis=1)
        mask = mask[0] if mask else None
        # Two calls, as queries are independent: the text queries run (redundantly) on every
        # device of the axis, which keeps the short text stream whole without a collective.
        return attention(q[0], keys, values, mask, impl), attention(q[1], keys, values, mask, impl)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(pair, pair, pair) + (PartitionSpec(b, None),) * len(mask),
                           out_specs=pair)
    return mapped(q, k, v, *mask)
