"""Named rematerialisation (activation checkpointing) policies for the scanned blocks.

Blocks tag intermediate tensors with `jax.ad_checkpoint.checkpoint_name`:
  "qkv"        q, k, v after QK-norm and RoPE
  "attn_out"   attention output before the output projections
  "mlp_hidden" MLP hidden activation (4 * D wide) after GELU
A policy says which tagged tensors the backward pass may keep; everything else in a block is
recomputed. "none" keeps everything (no remat), "full" recomputes the whole block.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

cp = jax.checkpoint_policies

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": cp.nothing_saveable,
    "save_attn_out": cp.save_only_these_names("attn_out"),
    "save_qkv_attn_out": cp.save_only_these_names("qkv", "attn_out"),
    "save_dots": cp.dots_with_no_batch_dims_saveable,
}


def apply_remat(fn: Callable, policy: str) -> Callable:
    """Wraps a scan body in `jax.checkpoint` with the named policy ("none": unchanged)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose from {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)
