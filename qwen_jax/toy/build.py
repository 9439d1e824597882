"""The toy model family, built from the real classes: `python -m qwen_jax.toy.build --out DIR`.

    transformer   QwenImageTransformer, width 128 (2 heads x 64), 4 blocks, 64 tokens of 4x4 pixels
                  (in_channels 48 = 2x2 packing of the codec's 12 channels), text width 64;
                  random (seeded): the flow-matching trainer turns it into the teacher
    vae           PixelShuffleCodec(factor 2): exact, parameter-free (`models/codec.py` says why)
    text_encoder  TextEncoderConfig.tiny(): a 2-layer, width-64 Qwen2.5-VL text model, random with a
                  fixed seed and frozen; it still separates the 168 captions
    tokenizer     the real Qwen2.5-VL tokenizer, rebuilt offline (`qwen_jax.tokenizer`)
    scheduler     fixed shift 3: the grid of the 2-step student (sigmas 1.0, 0.75) and of the teacher
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import numpy as np
from flax import nnx

from qwen_jax import flow
from qwen_jax.conversion.errors import ConversionError
from qwen_jax.models import QwenImageTransformer, QwenTextEncoder, TextEncoderConfig, TransformerConfig
from qwen_jax.models.codec import PixelShuffleCodec, PixelShuffleConfig
from qwen_jax.models.random_init import random_module
from qwen_jax.pytree import flatten_params

TOY_SHIFT = 3.0
# Part of the cache key of a built family (`toy/folders.py`): bump it when what a seed builds changes.
FAMILY_VERSION = "v1"


def toy_transformer_config(**runtime) -> TransformerConfig:
    return TransformerConfig(patch_size=2, in_channels=48, out_channels=12, num_layers=4, attention_head_dim=64,
                             num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(16, 24, 24), **runtime)


def text_encoder_digest(text_encoder) -> str:
    """sha256 of the text encoder's parameters (paths, dtypes and bytes): regenerating it from its
    seed must give exactly the encoder a teacher was trained with."""
    digest = hashlib.sha256()
    for path, value in sorted(flatten_params(nnx.state(text_encoder, nnx.Param)).items()):
        array = np.ascontiguousarray(np.asarray(value))
        digest.update("/".join(path).encode() + str(array.dtype).encode() + array.tobytes())
    return digest.hexdigest()


def build_toy_pipeline(out, seed: int = 0, overwrite: bool = False, transformer: str | None = None,
                       expect_digest: str | None = None) -> str:
    """Writes the toy pipeline folder; `transformer` reuses a trained transformer folder (the
    committed teacher) instead of a random one. Returns the text encoder's digest; with
    `expect_digest`, a different regenerated encoder is an error and nothing is written."""
    from qwen_jax.checkpoints import load_transformer
    from qwen_jax.pipeline import save_pipeline
    from qwen_jax.tokenizer import build_qwen_tokenizer

    text_encoder = random_module(QwenTextEncoder, TextEncoderConfig.tiny(), seed + 1)
    digest = text_encoder_digest(text_encoder)
    if expect_digest and digest != expect_digest:
        raise ValueError(f"the text encoder regenerated from seed {seed} differs from the one the "
                         f"transformer was trained with (sha256 {digest[:12]} != {expect_digest[:12]}); "
                         "a different jax/flax version may initialise differently")
    model = (load_transformer(transformer) if transformer
             else random_module(QwenImageTransformer, toy_transformer_config(), seed))
    save_pipeline(out, transformer=model, vae=PixelShuffleCodec(PixelShuffleConfig(factor=2)),
                  text_encoder=text_encoder, tokenizer=build_qwen_tokenizer(),
                  scheduler=flow.SchedulerConfig.fixed_shift(TOY_SHIFT), overwrite=overwrite)
    return digest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_jax.toy.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random transformer and text encoder")
    p.add_argument("--transformer", help="a trained transformer folder to use (e.g. models/toy/teacher/transformer)")
    p.add_argument("--expect-digest", help="fail unless the regenerated text encoder has this sha256")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        digest = build_toy_pipeline(args.out, args.seed, args.overwrite, args.transformer, args.expect_digest)
    except (FileNotFoundError, FileExistsError, ValueError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} (text encoder sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
