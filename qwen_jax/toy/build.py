"""The toy model family, built from the real classes: `python -m qwen_jax.toy.build --out DIR`.

    transformer   QwenImageTransformer, width 128 (2 heads x 64), 4 blocks, text width 64; 64 tokens
                  of 4x4 pixels (in_channels 48 = 2x2 packing of the codec's 12 channels) or, with
                  --token-pixels 2, 256 tokens of 2x2 pixels (in_channels 12); random (seeded,
                  adaLN-zero): the flow-matching trainer turns it into the teacher
    vae           PixelShuffleCodec(factor token_pixels / 2): exact, parameter-free (`models/codec.py`
                  says why)
    text_encoder  TextEncoderConfig.tiny(): a 2-layer, width-64 Qwen2.5-VL text model, random with a
                  fixed seed and frozen; it still separates the 168 captions
    tokenizer     the real Qwen2.5-VL tokenizer, rebuilt offline (`qwen_jax.tokenizer`)
    scheduler     fixed shift 3: the grid of the 2-step student (sigmas 1.0, 0.75) and of the teacher
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax import flow
from qwen_jax.conversion.errors import ConversionError
from qwen_jax.models import QwenImageTransformer, QwenTextEncoder, TextEncoderConfig, TransformerConfig
from qwen_jax.models.codec import PixelShuffleCodec, PixelShuffleConfig
from qwen_jax.models.random_init import random_module
from qwen_jax.pytree import flatten_params

TOY_SHIFT = 3.0
# Part of the cache key of a built family (`toy/folders.py`): bump it when what a seed builds
# changes. v2: the random transformer starts adaLN-zero (`adaln_zero`).
FAMILY_VERSION = "v2"
TOKEN_PIXELS = (4, 2)  # pixels per side of one transformer token; the codec's factor is half of it
INITS = ("adaln_zero", "random")


def toy_transformer_config(token_pixels: int = 4, **runtime) -> TransformerConfig:
    """The family's transformer for tokens of `token_pixels` x `token_pixels` pixels (the codec
    folds token_pixels / 2 pixels per side into channels; the transformer packs 2x2 latents)."""
    if token_pixels not in TOKEN_PIXELS:
        raise ValueError(f"token_pixels must be one of {TOKEN_PIXELS}, got {token_pixels}")
    channels = 3 * (token_pixels // 2) ** 2
    return TransformerConfig(patch_size=2, in_channels=4 * channels, out_channels=channels, num_layers=4,
                             attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
                             axes_dims_rope=(16, 24, 24), **runtime)


def token_pixels_of(cfg: TransformerConfig) -> int:
    """Inverse of `toy_transformer_config`: the token size a toy transformer was built for."""
    factor = math.isqrt(cfg.out_channels // 3)
    if cfg.patch_size != 2 or 3 * factor * factor != cfg.out_channels:
        raise ValueError(f"not a toy transformer: patch {cfg.patch_size}, {cfg.out_channels} output channels")
    return 2 * factor


def adaln_zero(model: QwenImageTransformer) -> QwenImageTransformer:
    """Zeroes every modulation and the output projection (DiT's adaLN-Zero): each block starts as
    the identity and the model outputs 0, so early training spends no steps undoing random gates."""
    for lin in (model.transformer_blocks.img_mod, model.transformer_blocks.txt_mod, model.norm_out.linear,
                model.proj_out):
        lin.kernel[...] = jnp.zeros_like(lin.kernel[...])
        lin.bias[...] = jnp.zeros_like(lin.bias[...])
    return model


def text_encoder_digest(text_encoder) -> str:
    """sha256 of the text encoder's parameters (paths, dtypes and bytes): the exact draw."""
    digest = hashlib.sha256()
    for path, value in sorted(flatten_params(nnx.state(text_encoder, nnx.Param)).items()):
        array = np.ascontiguousarray(np.asarray(value))
        digest.update("/".join(path).encode() + str(array.dtype).encode() + array.tobytes())
    return digest.hexdigest()


# The same seed does not give the same bits everywhere: a normal draw's last bits depend on how
# XLA evaluates erf_inv (another backend, another jax/LLVM version, XLA CPU at another
# optimisation level). So a regenerated encoder is checked against its sha256 first and, failing
# that, against a fingerprint that rounding cannot move but a different draw cannot match:
# random +-1 projections of all its parameters (float64). One ulp everywhere moves a projection
# by ~1e-7 of the parameters' rms; another seed or init scale moves it by ~1 rms.
FINGERPRINT_PROJECTIONS = 8
FINGERPRINT_RTOL = 1e-5


def text_encoder_fingerprint(text_encoder) -> dict:
    """{"rms": the parameters' rms, "projections": 8 random +-1 projections / sqrt(count)}: the
    draw up to rounding (see above). The signs are seeded by each parameter's path."""
    total, squares = 0, 0.0
    projections = np.zeros(FINGERPRINT_PROJECTIONS)
    for path, value in sorted(flatten_params(nnx.state(text_encoder, nnx.Param)).items()):
        x = np.asarray(value, np.float64).ravel()
        # the raw PCG64 stream (fixed across numpy versions, unlike Generator methods), one bit a sign
        bits = np.random.PCG64(zlib.crc32("/".join(path).encode()))
        for start in range(0, x.size, 1 << 20):  # bounded memory for the 9.7 M-entry embedding
            chunk = x[start:start + (1 << 20)]
            words = bits.random_raw(-(-FINGERPRINT_PROJECTIONS * chunk.size // 64)).astype("<u8")
            signs = np.unpackbits(words.view(np.uint8))[:FINGERPRINT_PROJECTIONS * chunk.size]
            projections += (signs.reshape(FINGERPRINT_PROJECTIONS, chunk.size) * 2.0 - 1.0) @ chunk
        total += x.size
        squares += float(np.dot(x, x))
    return {"rms": math.sqrt(squares / total), "projections": [float(p) for p in projections / math.sqrt(total)]}


def fingerprints_match(a: dict, b: dict) -> bool:
    """The same draw up to rounding: every number within FINGERPRINT_RTOL of the rms."""
    try:
        scale = FINGERPRINT_RTOL * float(a["rms"])
        pa, pb = [float(a["rms"]), *map(float, a["projections"])], [float(b["rms"]), *map(float, b["projections"])]
    except (KeyError, TypeError, ValueError):
        return False
    return len(pa) == len(pb) and all(abs(x - y) <= scale for x, y in zip(pa, pb))


def build_toy_pipeline(out, seed: int = 0, overwrite: bool = False, transformer: str | None = None,
                       expect_digest: str | None = None, token_pixels: int = 4, init: str = "adaln_zero",
                       expect_fingerprint: dict | None = None) -> str:
    """Writes the toy pipeline folder; `transformer` reuses a trained transformer folder (the
    committed teacher) instead of a random one (`token_pixels` per token; `init` "adaln_zero", a
    training start, or "random", every weight drawn: a stand-in teacher, whose outputs must not
    be all zero); the codec follows the transformer. Returns the text encoder's digest; with
    `expect_digest`, a different regenerated encoder is an error and nothing is written (unless it
    matches `expect_fingerprint`: the same draw, rounded differently by this host's XLA)."""
    from qwen_jax.checkpoints import load_transformer
    from qwen_jax.pipeline import save_pipeline
    from qwen_jax.tokenizer import build_qwen_tokenizer

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    # The seeded parameters are drawn on the CPU whatever the default backend: the committed
    # models were trained with the CPU's draw, which a GPU's erf_inv would round differently
    # (the fingerprint would accept it; drawn on the CPU, the exact digest usually holds).
    with jax.default_device(jax.devices("cpu")[0]):
        text_encoder = random_module(QwenTextEncoder, TextEncoderConfig.tiny(), seed + 1)
        digest = text_encoder_digest(text_encoder)
        if (expect_digest and digest != expect_digest
                and not (expect_fingerprint and fingerprints_match(text_encoder_fingerprint(text_encoder),
                                                                   expect_fingerprint))):
            raise ValueError(f"the text encoder regenerated from seed {seed} differs from the one the "
                             f"transformer was trained with (sha256 {digest[:12]} != {expect_digest[:12]}"
                             f"{', fingerprints differ' if expect_fingerprint else ', and no fingerprint to compare'}"
                             "); a different jax/flax version initialises differently")
        model = (load_transformer(transformer) if transformer
                 else random_module(QwenImageTransformer, toy_transformer_config(token_pixels), seed))
    if not transformer and init == "adaln_zero":
        model = adaln_zero(model)
    codec = PixelShuffleCodec(PixelShuffleConfig(factor=token_pixels_of(model.config) // 2))
    save_pipeline(out, transformer=model, vae=codec, text_encoder=text_encoder, tokenizer=build_qwen_tokenizer(),
                  scheduler=flow.SchedulerConfig.fixed_shift(TOY_SHIFT), overwrite=overwrite)
    return digest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_jax.toy.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random transformer and text encoder")
    p.add_argument("--transformer", help="a trained transformer folder to use (e.g. models/toy/teacher/transformer)")
    p.add_argument("--token-pixels", type=int, default=4, choices=TOKEN_PIXELS,
                   help="pixels per token side of the random transformer (ignored with --transformer)")
    p.add_argument("--init", default="adaln_zero", choices=INITS,
                   help="adaln_zero (a training start) or random (every weight drawn: a stand-in teacher)")
    p.add_argument("--expect-digest", help="fail unless the regenerated text encoder has this sha256")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        digest = build_toy_pipeline(args.out, args.seed, args.overwrite, args.transformer, args.expect_digest,
                                    args.token_pixels, args.init)
    except (FileNotFoundError, FileExistsError, ValueError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} (text encoder sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
