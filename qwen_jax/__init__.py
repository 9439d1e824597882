"""qwen_jax: Qwen-Image in JAX/Flax NNX, built for few-step distillation.

Public API:
  TransformerConfig, QwenImageTransformer   the MMDiT (qwen_jax.models)
  load_transformer, save_transformer        the converted-weights folder (qwen_jax.checkpoints)
"""

from qwen_jax.checkpoints import load_transformer, save_transformer
from qwen_jax.models import QwenImageTransformer, TransformerConfig

__all__ = ["TransformerConfig", "QwenImageTransformer", "load_transformer", "save_transformer"]
