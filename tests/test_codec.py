"""The pixel-shuffle codec: exact inverse, the VAE's interface, and a pipeline folder that uses it."""

import numpy as np

from qwen_jax import flow
from qwen_jax.models import QwenImageTransformer, QwenTextEncoder, TextEncoderConfig, TransformerConfig
from qwen_jax.models.codec import PixelShuffleCodec, PixelShuffleConfig
from qwen_jax.models.latents import pack_latents
from qwen_jax.pipeline import Pipeline, save_pipeline
from qwen_tokenizer import qwen_tokenizer  # noqa: F401  (session fixture)
from qwen_jax.models.random_init import random_module


def test_encode_decode_is_exact_and_tokens_are_4x4_patches():
    codec = PixelShuffleCodec(PixelShuffleConfig(factor=2))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 12, 3)).astype(np.float32)
    z = codec.encode(images)
    assert z.shape == (2, 4, 6, 12) and codec.config.z_dim == 12 and codec.config.spatial_factor == 2
    np.testing.assert_array_equal(np.asarray(codec.decode(z)), images)
    np.testing.assert_array_equal(np.asarray(z[0, 1, 2]), images[0, 2:4, 4:6].reshape(-1))  # (dy, dx, c)
    tokens = pack_latents(np.asarray(z))  # (B, 2*3, 48): one token per 4x4 pixel patch
    assert tokens.shape == (2, 6, 48)
    assert set(np.asarray(tokens[0, 0]).tolist()) == set(images[0, :4, :4].reshape(-1).tolist())


def test_pipeline_folder_with_the_codec(qwen_tokenizer, tmp_path):  # noqa: F811
    cfg = TransformerConfig.tiny(in_channels=48, out_channels=12)
    save_pipeline(tmp_path / "p", transformer=random_module(QwenImageTransformer, cfg, 0),
                  vae=PixelShuffleCodec(PixelShuffleConfig()),
                  text_encoder=random_module(QwenTextEncoder, TextEncoderConfig.tiny(), 1),
                  tokenizer=qwen_tokenizer, scheduler=flow.SchedulerConfig.fixed_shift(3.0))
    assert not (tmp_path / "p" / "vae" / "params").exists()
    pipe = Pipeline.from_pretrained(tmp_path / "p")
    assert isinstance(pipe.vae, PixelShuffleCodec) and pipe.pixels_per_token == 4
    out = pipe(["a red circle on a blue background"], height=32, width=32, num_steps=2, guidance=1.0)
    assert out.array.shape == (1, 32, 32, 3) and np.isfinite(out.array).all()
