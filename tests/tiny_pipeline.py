"""A tiny random qwen_jax pipeline folder built in JAX alone (no torch), for training tests.

    from tiny_pipeline import tiny_pipeline_dir  # noqa: F401  (session fixture -> Path)

Components: `TransformerConfig.tiny()` (16 input channels = 2x2 patches of 4 latent channels),
`VAEConfig.tiny()` (4x spatial, 4 channels, so one token covers 8x8 pixels),
`TextEncoderConfig.tiny()` (width 64 = the transformer's joint_attention_dim), the real Qwen
tokenizer, and the shipped Qwen-Image scheduler.
"""

from __future__ import annotations

import pytest

from qwen_jax import flow
from qwen_jax.models import (AutoencoderKLQwenImage, QwenImageTransformer, QwenTextEncoder, TextEncoderConfig,
                             TransformerConfig, VAEConfig)
from qwen_jax.pipeline import save_pipeline
from qwen_jax.models.random_init import random_module
from qwen_tokenizer import build_qwen_tokenizer



def build_tiny_pipeline(folder, tokenizer, seed: int = 0):
    save_pipeline(
        folder,
        transformer=random_module(QwenImageTransformer, TransformerConfig.tiny(), seed),
        vae=random_module(AutoencoderKLQwenImage, VAEConfig.tiny(), seed + 1),
        text_encoder=random_module(QwenTextEncoder, TextEncoderConfig.tiny(), seed + 2),
        tokenizer=tokenizer,
        scheduler=flow.SchedulerConfig.qwen_image(),
    )
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline", build_qwen_tokenizer())
