"""Randomly initialised models without eager per-layer compilation: for tests and the toy world."""

from __future__ import annotations

import jax
from flax import nnx


def random_module(cls, cfg, seed: int):
    """`cls(cfg, rngs=nnx.Rngs(seed))` with every parameter created under one jit: eager init of
    many small convs or stacked layers compiles op by op and takes seconds; this takes one compile."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed))))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(cls(cfg, rngs=nnx.Rngs(seed)))[1])())
