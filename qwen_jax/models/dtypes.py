"""The dtype policy every model config shares: `param_dtype` (storage) and `dtype` (compute)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16")


class DtypePolicy:
    """Mixin for frozen config dataclasses that have `param_dtype` and `dtype` string fields."""

    def check_dtypes(self) -> None:
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
