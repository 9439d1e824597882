"""LoRA adapters on the transformer's linears, kept apart from the frozen base.

A `LoRALinear` is an `nnx.Linear` (same `kernel`/`bias` paths, so checkpoints and key maps are
unchanged) plus `lora_a` (in, r) and `lora_b` (r, out) held as `nnx.LoRAParam`:

    y = x @ kernel + bias + (alpha / r) * (x @ lora_a) @ lora_b,    lora_b starts at zero.

Because `LoRAParam` is a subclass of `Param`, split with the adapters first:

    graphdef, adapters, base, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)

Several models (a student and a fake score, say) then share one `base` pytree and differ only
in their `adapters`: `nnx.merge(graphdef, adapters_student, base, rest)`. Which linears get
adapters is `TransformerConfig.lora_targets`: "attn" (q/k/v/out of both streams), "mlp" and
"mod" (the adaLN modulation linears), in every block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LORA_TARGETS = ("attn", "mlp", "mod")


class LoRALinear(nnx.Linear):
    """A biased Linear with a rank-r adapter; the adapter runs in the layer's compute dtype."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, rngs: nnx.Rngs, **kwargs):
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        dtype = kwargs.get("param_dtype", jnp.float32)
        # A ~ N(0, 1/in) as in the LoRA paper's Kaiming-style init, B = 0: the adapter starts as a no-op.
        self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), (in_features, rank), dtype) / in_features**0.5)
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), dtype))
        self.lora_scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        a, b = self.lora_a[...].astype(y.dtype), self.lora_b[...].astype(y.dtype)
        return y + (self.lora_scale * ((x.astype(y.dtype) @ a) @ b)).astype(y.dtype)


def merged_kernel(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
    """kernel + scale * A @ B (any leading layer axes), computed in fp32, in the kernel's dtype."""
    delta = jnp.einsum("...ir,...ro->...io", lora_a.astype(jnp.float32), lora_b.astype(jnp.float32))
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
