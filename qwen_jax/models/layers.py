"""Small building blocks shared by the transformer: linear, norms, timestep embedding, MLP.

Numerics follow diffusers: normalisation statistics in fp32, results cast back to the compute
dtype; linear layers run in the compute dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.models.attention import simulated_cpu_mesh
from qwen_jax.models.config import TransformerConfig
from qwen_jax.models.lora import LoRALinear

NORM_EPS = 1e-6


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, kernel, precision, preferred_element_type):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)


def _dense_fwd(x, kernel, precision, preferred_element_type):
    return _dense(x, kernel, precision, preferred_element_type), (x, kernel)


def _dense_bwd(precision, preferred_element_type, residuals, dy):
    x, kernel = residuals
    dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
    # The kernel gradient as one (in, tokens) @ (tokens, out) product over the flattened tokens.
    # Autodiff's form contracts the (batch, token) axes of both operands; XLA's CPU GEMMs take no
    # transposed left operand, so it transposes the cotangent inside the fusion that produces it
    # (norm, RoPE and gate backward), a strided loop ~10x slower than a plain copy.
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dkernel = jax.lax.dot_general(x2.T, dy2, (((1,), (0,)), ((), ())), precision=precision,
                                  preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`jax.lax.dot_general` for `nnx.Linear`, with a CPU-friendly backward (`_dense_bwd`) on one CPU device.

    ~10 % of the toy training step on a 2-core CPU. Other backends transpose operands for free
    and keep the plain product (and autodiff's gradient).
    """
    plain = (((lhs.ndim - 1,), (0,)), ((), ()))
    if (jax.default_backend() != "cpu" or simulated_cpu_mesh() or dimension_numbers != plain
            or any(v is not None for v in kwargs.values())):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    return _dense(lhs, rhs, precision, preferred_element_type)


def linear(cfg: TransformerConfig, in_features: int, out_features: int, *, rngs: nnx.Rngs,
           lora_target: str | None = None) -> nnx.Linear:
    """A biased Linear in the config's dtypes (kernel stored (in, out), i.e. torch weight.T).

    With `lora_target` among `cfg.lora_targets` and `cfg.lora_rank > 0`, a `LoRALinear`.
    """
    kwargs = dict(use_bias=True, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs,
                  dot_general=dense_dot_general)
    if cfg.lora_rank and lora_target in cfg.lora_targets:
        return LoRALinear(in_features, out_features, rank=cfg.lora_rank, alpha=cfg.lora_alpha or cfg.lora_rank,
                          **kwargs)
    return nnx.Linear(in_features, out_features, **kwargs)


class RMSNorm(nnx.Module):
    """RMSNorm with a learnable scale (diffusers `RMSNorm`, eps 1e-6), statistics in fp32."""

    def __init__(self, dim: int, cfg: TransformerConfig):
        self.scale = nnx.Param(jnp.ones((dim,), cfg.jnp_param_dtype))
        self.out_dtype = cfg.jnp_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + NORM_EPS)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.out_dtype)


def layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters (eps 1e-6), statistics in fp32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + NORM_EPS)).astype(x.dtype)


def silu(x: jax.Array) -> jax.Array:
    """SiLU evaluated in fp32 and rounded once to x's dtype (as torch's fused bf16 kernel does)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation `x * (1 + scale) + shift`; shift/scale are per sample (B, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def timestep_sinusoid(timestep: jax.Array, dim: int = 256, scale: float = 1000.0) -> jax.Array:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)`.

    `timestep` is sigma in [0, 1]; the sinusoid sees `scale * sigma`. Output (B, dim) fp32,
    ordered [cos, sin]. The frequencies and the product are fp32 whatever the timestep dtype.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = scale * (timestep.astype(jnp.float32)[:, None] * freqs[None, :])
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedding(nnx.Module):
    """`linear_1 -> SiLU -> linear_2` from 256 sinusoid channels to the model width."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, in_channels: int = 256):
        self.linear_1 = linear(cfg, in_channels, cfg.inner_dim, rngs=rngs)
        self.linear_2 = linear(cfg, cfg.inner_dim, cfg.inner_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(silu(self.linear_1(x)))


class TimestepProjEmbeddings(nnx.Module):
    """diffusers `QwenTimestepProjEmbeddings`: sinusoid of sigma, then the MLP."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.timestep_embedder = TimestepEmbedding(cfg, rngs=rngs)
        self.dtype = cfg.jnp_dtype

    def __call__(self, timestep: jax.Array) -> jax.Array:
        # diffusers casts sigma to the model dtype first (bf16 rounding is part of the model).
        timestep = timestep.astype(self.dtype)
        return self.timestep_embedder(timestep_sinusoid(timestep).astype(self.dtype))


class FeedForward(nnx.Module):
    """`proj_in -> GELU(tanh) -> proj_out` with 4x expansion (diffusers `net.0.proj`, `net.2`)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, mult: int = 4):
        self.proj_in = linear(cfg, cfg.inner_dim, mult * cfg.inner_dim, rngs=rngs, lora_target="mlp")
        self.proj_out = linear(cfg, mult * cfg.inner_dim, cfg.inner_dim, rngs=rngs, lora_target="mlp")

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.proj_in(x)
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=True).astype(h.dtype)  # one rounding, as torch
        return self.proj_out(jax.ad_checkpoint.checkpoint_name(h, "mlp_hidden"))


class AdaLayerNormContinuous(nnx.Module):
    """Final adaLN: `LN(x) * (1 + scale) + shift` with (scale, shift) in that order from `linear`."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.linear = linear(cfg, cfg.inner_dim, 2 * cfg.inner_dim, rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.linear(silu(temb)), 2, axis=-1)
        return modulate(layer_norm(x), shift, scale)
