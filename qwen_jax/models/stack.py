"""Stacked layers: N identical modules stored as one module whose parameters carry a leading
layer axis, run with a single `jax.lax.scan` (compile time independent of N) under a named
remat policy. Plain JAX transforms over split/merge, so it does not depend on NNX graph mode.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from qwen_jax.models.remat import apply_remat


def stacked(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` modules from `make(rngs)`, each with its own key, as one module (layer axis first)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), count)
    return nnx.merge(graphdef, jax.vmap(lambda key: nnx.state(make(nnx.Rngs(key))))(keys))


def scan_layers(layers: nnx.Module, body: Callable, carry, remat: str = "none", unroll: int = 1):
    """carry -> body(layer, carry) for each layer of a `stacked` module in order; returns the carry.

    `unroll` blocks run per scan iteration (`jax.lax.scan`'s unroll; the layer count or more
    unrolls fully).
    """
    graphdef, params = nnx.split(layers)

    def step(carry, layer_params):
        return body(nnx.merge(graphdef, layer_params), carry), None

    carry, _ = jax.lax.scan(apply_remat(step, remat), carry, params, unroll=int(unroll))
    return carry
