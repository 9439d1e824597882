"""Qwen-Image models in Flax NNX."""

from qwen_jax.models.config import TransformerConfig
from qwen_jax.models.transformer import QwenImageTransformer

__all__ = ["TransformerConfig", "QwenImageTransformer"]
