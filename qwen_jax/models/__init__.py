"""Qwen-Image models in Flax NNX: the MMDiT, the VAE and the Qwen2.5-VL text encoder."""

from qwen_jax.models.config import TransformerConfig
from qwen_jax.models.text_encoder import QwenTextEncoder, TextEncoderConfig
from qwen_jax.models.transformer import QwenImageTransformer
from qwen_jax.models.vae import AutoencoderKLQwenImage, VAEConfig

__all__ = ["TransformerConfig", "QwenImageTransformer", "VAEConfig", "AutoencoderKLQwenImage",
           "TextEncoderConfig", "QwenTextEncoder"]
