"""qwen_jax: Qwen-Image in JAX/Flax NNX, built for few-step distillation.

Public API:
  TransformerConfig, QwenImageTransformer   the MMDiT (qwen_jax.models; also the VAE and text encoder)
  load_transformer, save_transformer        the converted-weights folder (qwen_jax.checkpoints)
  Pipeline                                  text to image (qwen_jax.pipeline)
"""

from qwen_jax.checkpoints import load_transformer, save_transformer
from qwen_jax.models import QwenImageTransformer, TransformerConfig
from qwen_jax.pipeline import Pipeline

__all__ = ["TransformerConfig", "QwenImageTransformer", "load_transformer", "save_transformer", "Pipeline"]
