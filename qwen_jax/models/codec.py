"""A fixed, exactly invertible latent codec: pixel (un)shuffle, in place of the VAE.

The toy world uses it so that everything a generator gets wrong is the generator's: a trained
VAE would blur edges and shift colours on its own, and the evaluator could not tell whose fault
that was. It has the VAE's interface (`encode`, `decode`, `config.spatial_factor`, `z_dim`,
`latents_mean/std`), so the pipeline, the trainer and the samplers use it unchanged.

    images   (B, H, W, C)               pixels in [-1, 1]
    latents  (B, H/f, W/f, C*f*f)       the f x f pixels of each cell, features ordered (dy, dx, c)

With f = 2 and the transformer's 2x2 packing, one token is a 4x4 pixel patch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.models.dtypes import DtypePolicy

CLASS_NAME = "PixelShuffleCodec"


@dataclasses.dataclass(frozen=True)
class PixelShuffleConfig(DtypePolicy):
    factor: int = 2
    input_channels: int = 3
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.factor < 1 or self.input_channels < 1:
            raise ValueError(f"factor and input_channels must be >= 1, got {self.factor}, {self.input_channels}")
        self.check_dtypes()

    @property
    def spatial_factor(self) -> int:
        return self.factor

    @property
    def z_dim(self) -> int:
        return self.input_channels * self.factor ** 2

    @property
    def latents_mean(self) -> tuple[float, ...]:
        return (0.0,) * self.z_dim

    @property
    def latents_std(self) -> tuple[float, ...]:
        return (1.0,) * self.z_dim

    def to_diffusers_config(self) -> dict[str, Any]:
        return {"_class_name": CLASS_NAME, "factor": self.factor, "input_channels": self.input_channels}

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any], **runtime) -> "PixelShuffleConfig":
        if cfg.get("_class_name") != CLASS_NAME:
            raise ValueError(f"config.json describes a {cfg.get('_class_name')}, not a {CLASS_NAME}")
        return cls(factor=int(cfg["factor"]), input_channels=int(cfg["input_channels"]), **runtime)


class PixelShuffleCodec(nnx.Module):
    """No parameters: encode = space-to-depth, decode = depth-to-space (then clipped like the VAE)."""

    def __init__(self, cfg: PixelShuffleConfig, *, rngs: nnx.Rngs | None = None):
        del rngs
        self.config = cfg

    def encode(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        f = self.config.factor
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a multiple of the codec factor {f}")
        x = images.astype(self.config.jnp_dtype).reshape(b, h // f, f, w // f, f, c)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // f, w // f, f * f * c)

    def decode(self, z: jax.Array) -> jax.Array:
        b, h, w, d = z.shape
        f, c = self.config.factor, self.config.input_channels
        if d != f * f * c:
            raise ValueError(f"latents have {d} channels, the codec expects {f * f * c}")
        x = z.astype(self.config.jnp_dtype).reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)
        return jnp.clip(x.reshape(b, h * f, w * f, c), -1.0, 1.0)
