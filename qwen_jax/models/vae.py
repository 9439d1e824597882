"""Qwen-Image VAE (diffusers `AutoencoderKLQwenImage`) for single images, in Flax NNX.

The diffusers VAE is a causal 3-D conv network over (B, C, T, H, W). For one frame (T=1) it is
a pure 2-D network, which is what this module implements:
  * every causal 3-D conv sees two zero frames in front of the image, so only the last time
    slice of its kernel contributes: a k3 conv is a 3x3 conv with spatial padding 1, a 1x1x1
    conv is a 1x1 conv (the converter keeps `weight[:, :, -1]`);
  * the `time_conv` of 3-D resamplers is skipped on the first frame, so it has no parameters here.

Layout: NHWC everywhere.
  images   (B, H, W, 3)          pixels in [-1, 1]
  latents  (B, H/f, W/f, z_dim)  raw latents (not normalised by latents_mean/std), f = 2**len(temperal_downsample)

Module and parameter names mirror diffusers (`encoder.down_blocks.3.conv1`, `mid_block.attentions.0`,
`norm1.gamma`, ...) so the key table in `qwen_jax.conversion.vae_keys` is one-to-one. Differences:
a conv's `weight` is its `kernel` (HWIO), and `resample.1` (index 1 of a torch Sequential) is
`resample_1`. Module sequences are `nnx.Dict`s keyed "0", "1", ...: their parameter paths equal
those of a list, and string-keyed trees (e.g. read back from orbax) can be `nnx.update`d into them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.models.dtypes import DtypePolicy
from qwen_jax.models.layers import silu
from qwen_jax.pytree import fill_abstract, flatten_params

ARCHITECTURE_FIELDS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
                       "dropout", "input_channels", "latents_mean", "latents_std")
QWEN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
QWEN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
NORM_EPS = 1e-12  # F.normalize's floor on the L2 norm
ATTENTION_QUERY_CHUNK = 4096  # mid attention is over all H*W latents; bound the live logits


@dataclasses.dataclass(frozen=True)
class VAEConfig(DtypePolicy):
    """Architecture of `AutoencoderKLQwenImage` (diffusers field names) and how to run it.

    Defaults are the released Qwen-Image VAE (126,892,531 diffusers parameters). `dropout` is kept
    only so configs round-trip; inference ignores it. Runtime fields (not stored with checkpoints):
        param_dtype: storage dtype of parameters.
        dtype: compute dtype of convs and attention; RMS norms and softmax run in fp32.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple[float, ...] = QWEN_LATENTS_MEAN
    latents_std: tuple[float, ...] = QWEN_LATENTS_STD

    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        for name, kind in (("dim_mult", int), ("attn_scales", float), ("temperal_downsample", bool),
                           ("latents_mean", float), ("latents_std", float)):
            object.__setattr__(self, name, tuple(kind(v) for v in getattr(self, name)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, "
                             f"got {len(self.temperal_downsample)}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim = {self.z_dim} entries each")
        self.check_dtypes()

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along each side (8 for Qwen-Image)."""
        return 2 ** len(self.temperal_downsample)

    @classmethod
    def qwen_image(cls, **runtime) -> "VAEConfig":
        """The released Qwen-Image VAE (Wan-2.1 architecture, 16 latent channels, 8x spatial)."""
        return cls(**runtime)

    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        """A small VAE (4x spatial, 4 latent channels) with the structure of the real one, for tests."""
        z_dim = overrides.get("z_dim", 4)
        base = dict(base_dim=16, z_dim=z_dim, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(False, True),
                    latents_mean=(0.0,) * z_dim, latents_std=(1.0,) * z_dim)
        return cls(**{**base, **overrides})

    def to_diffusers_config(self) -> dict[str, Any]:
        cfg = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}
        cfg.update({k: list(v) for k, v in cfg.items() if isinstance(v, tuple)})
        return {"_class_name": "AutoencoderKLQwenImage", "_diffusers_version": "0.42.1", **cfg}

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any], **runtime) -> "VAEConfig":
        """Reads a diffusers `vae/config.json` dict; bookkeeping and unknown keys are ignored."""
        class_name = cfg.get("_class_name", "AutoencoderKLQwenImage")
        if class_name != "AutoencoderKLQwenImage":
            raise ValueError(f"config.json describes a {class_name}, not an AutoencoderKLQwenImage")
        return cls(**{k: cfg[k] for k in ARCHITECTURE_FIELDS if k in cfg}, **runtime)


# ---- structure (shared with the key table) -------------------------------------------------------
def encoder_layout(cfg: VAEConfig) -> list[tuple[str, int, int]]:
    """`encoder.down_blocks` in order: (kind, in channels, out channels), kind one of
    "residual", "attention", "downsample2d", "downsample3d" (diffusers' construction rule)."""
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    layout, scale = [], 1.0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            layout.append(("residual", cin, cout))
            cin = cout
            if scale in cfg.attn_scales:
                layout.append(("attention", cout, cout))
        if i != len(cfg.dim_mult) - 1:
            layout.append(("downsample3d" if cfg.temperal_downsample[i] else "downsample2d", cout, cout))
            scale /= 2.0
    return layout


def decoder_layout(cfg: VAEConfig) -> list[tuple[int, int, str | None]]:
    """`decoder.up_blocks` in order: (in channels, out channels, upsampler mode or None).

    Each upsampler halves the channels, hence the halved input of every block after the first.
    """
    dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temporal = cfg.temperal_downsample[::-1]
    blocks = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        mode = None if i == len(cfg.dim_mult) - 1 else ("upsample3d" if temporal[i] else "upsample2d")
        blocks.append((cin // 2 if i > 0 else cin, cout, mode))
    return blocks


def _seq(modules) -> nnx.Dict:
    return nnx.Dict({str(i): m for i, m in enumerate(modules)})


def _items(seq: nnx.Dict) -> list:
    # By index, not dict order: graph reconstruction may reorder keys ("10" < "2").
    return [seq[str(i)] for i in range(len(seq))]


def _conv(cfg: VAEConfig, cin: int, cout: int, k: int, *, rngs: nnx.Rngs, stride: int = 1, padding=None) -> nnx.Conv:
    """A biased conv on NHWC input, kernel (k, k, cin, cout); default padding keeps the size."""
    pad = padding if padding is not None else ((k // 2, k // 2),) * 2
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=pad, dtype=cfg.jnp_dtype,
                    param_dtype=cfg.jnp_param_dtype, rngs=rngs)


# ---- blocks --------------------------------------------------------------------------------------
class RMSNorm(nnx.Module):
    """diffusers `QwenImageRMS_norm`: L2-normalise over channels, times sqrt(C) * gamma, in fp32."""

    def __init__(self, dim: int, cfg: VAEConfig):
        self.gamma = nnx.Param(jnp.ones((dim,), cfg.jnp_param_dtype))
        self.out_dtype = cfg.jnp_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, NORM_EPS) * (x.shape[-1] ** 0.5)
        return (y * self.gamma[...].astype(jnp.float32)).astype(self.out_dtype)


class ResidualBlock(nnx.Module):
    """`conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))) + shortcut(x)`; shortcut is a 1x1 conv iff cin != cout."""

    def __init__(self, cfg: VAEConfig, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cin, cfg)
        self.conv1 = _conv(cfg, cin, cout, 3, rngs=rngs)
        self.norm2 = RMSNorm(cout, cfg)
        self.conv2 = _conv(cfg, cout, cout, 3, rngs=rngs)
        self.conv_shortcut = _conv(cfg, cin, cout, 1, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        x = self.conv1(silu(self.norm1(x)))
        return self.conv2(silu(self.norm2(x))) + h


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Single-head softmax attention, q/k/v (B, S, C), scale 1/sqrt(C), softmax in fp32.

    At 1328 px the mid block has S = 27,556: full (S, S) fp32 logits would be 3 GB, so queries run
    in chunks of ATTENTION_QUERY_CHUNK (exact: each chunk sees all keys).
    """
    scale = q.shape[-1] ** -0.5

    def block(qc):
        logits = jnp.einsum("bqc,bkc->bqk", qc, k, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bqk,bkc->bqc", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)

    b, s, c = q.shape
    if s <= ATTENTION_QUERY_CHUNK:
        return block(q)
    n = -(-s // ATTENTION_QUERY_CHUNK)
    qp = jnp.pad(q, ((0, 0), (0, n * ATTENTION_QUERY_CHUNK - s), (0, 0)))
    chunks = jnp.moveaxis(qp.reshape(b, n, ATTENTION_QUERY_CHUNK, c), 1, 0)
    return jnp.moveaxis(jax.lax.map(block, chunks), 0, 1).reshape(b, -1, c)[:, :s]


class AttentionBlock(nnx.Module):
    """diffusers `QwenImageAttentionBlock`: one head over all H*W positions, head dim C; residual."""

    def __init__(self, cfg: VAEConfig, dim: int, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, cfg)
        self.to_qkv = _conv(cfg, dim, 3 * dim, 1, rngs=rngs)  # output channels [q | k | v]
        self.proj = _conv(cfg, dim, dim, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b, h * w, 3 * c), 3, axis=-1)
        return x + self.proj(_attention(q, k, v).reshape(b, h, w, c))


class Resample(nnx.Module):
    """Up: nearest x2 then 3x3 conv dim -> dim/2. Down: zero-pad right/bottom by 1, 3x3 stride-2 conv.

    The 3-D modes equal the 2-D ones for a single frame (their `time_conv` is unused).
    """

    def __init__(self, cfg: VAEConfig, dim: int, mode: str, *, rngs: nnx.Rngs):
        self.up = mode.startswith("upsample")
        if self.up:
            self.resample_1 = _conv(cfg, dim, dim // 2, 3, rngs=rngs)
        else:
            self.resample_1 = _conv(cfg, dim, dim, 3, rngs=rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.up:  # nearest-exact equals nearest for an integer factor
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.resample_1(x)


class MidBlock(nnx.Module):
    """resnets.0, then (attentions.i, resnets.i+1) pairs: one pair in Qwen-Image."""

    def __init__(self, cfg: VAEConfig, dim: int, *, rngs: nnx.Rngs):
        self.resnets = _seq([ResidualBlock(cfg, dim, dim, rngs=rngs) for _ in range(2)])
        self.attentions = _seq([AttentionBlock(cfg, dim, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        resnets = _items(self.resnets)
        x = resnets[0](x)
        for attn, resnet in zip(_items(self.attentions), resnets[1:]):
            x = resnet(attn(x))
        return x


class UpBlock(nnx.Module):
    """num_res_blocks + 1 residual blocks, then an optional upsampler (`upsamplers.0`)."""

    def __init__(self, cfg: VAEConfig, cin: int, cout: int, mode: str | None, *, rngs: nnx.Rngs):
        dims = [cin] + [cout] * (cfg.num_res_blocks + 1)
        self.resnets = _seq([ResidualBlock(cfg, a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.upsamplers = _seq([Resample(cfg, cout, mode, rngs=rngs)]) if mode else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in _items(self.resnets):
            x = resnet(x)
        return self.upsamplers["0"](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
    """Image (B, H, W, input_channels) -> (B, H/f, W/f, out_channels) before `quant_conv`."""

    def __init__(self, cfg: VAEConfig, out_channels: int, *, rngs: nnx.Rngs):
        layout = encoder_layout(cfg)
        self.conv_in = _conv(cfg, cfg.input_channels, cfg.base_dim, 3, rngs=rngs)
        blocks = []
        for kind, cin, cout in layout:
            if kind == "residual":
                blocks.append(ResidualBlock(cfg, cin, cout, rngs=rngs))
            elif kind == "attention":
                blocks.append(AttentionBlock(cfg, cout, rngs=rngs))
            else:
                blocks.append(Resample(cfg, cout, kind, rngs=rngs))
        self.down_blocks = _seq(blocks)
        dim = layout[-1][2]
        self.mid_block = MidBlock(cfg, dim, rngs=rngs)
        self.norm_out = RMSNorm(dim, cfg)
        self.conv_out = _conv(cfg, dim, out_channels, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in _items(self.down_blocks):
            x = block(x)
        return self.conv_out(silu(self.norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    """Latents (B, h, w, z_dim) after `post_quant_conv` -> (B, f*h, f*w, input_channels), unclamped."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        layout = decoder_layout(cfg)
        dim = layout[0][0]
        self.conv_in = _conv(cfg, cfg.z_dim, dim, 3, rngs=rngs)
        self.mid_block = MidBlock(cfg, dim, rngs=rngs)
        self.up_blocks = _seq([UpBlock(cfg, cin, cout, mode, rngs=rngs) for cin, cout, mode in layout])
        self.norm_out = RMSNorm(layout[-1][1], cfg)
        self.conv_out = _conv(cfg, layout[-1][1], cfg.input_channels, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(x))
        for block in _items(self.up_blocks):
            x = block(x)
        return self.conv_out(silu(self.norm_out(x)))


class AutoencoderKLQwenImage(nnx.Module):
    """Single-image Qwen-Image VAE. `encode`/`decode` work on raw latents; normalising them with
    `cfg.latents_mean/std` is the caller's job (`qwen_jax.models.latents`)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(cfg, 2 * cfg.z_dim, rngs=rngs)
        self.quant_conv = _conv(cfg, 2 * cfg.z_dim, 2 * cfg.z_dim, 1, rngs=rngs)
        self.post_quant_conv = _conv(cfg, cfg.z_dim, cfg.z_dim, 1, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)

    def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (B, H, W, C_in) in [-1, 1], H and W multiples of `spatial_factor` ->
        (mean, logvar), each (B, H/f, W/f, z_dim); logvar clamped to [-30, 20] as diffusers does."""
        moments = self.quant_conv(self.encoder(images.astype(self.config.jnp_dtype)))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, C_in) in [-1, 1] -> posterior mean (B, H/f, W/f, z_dim), raw."""
        return self.encode_moments(images)[0]

    def decode(self, z: jax.Array) -> jax.Array:
        """Raw latents (B, h, w, z_dim) -> images (B, f*h, f*w, C_in) clamped to [-1, 1]."""
        x = self.decoder(self.post_quant_conv(z.astype(self.config.jnp_dtype)))
        return jnp.clip(x, -1.0, 1.0)


def abstract_model(cfg: VAEConfig) -> AutoencoderKLQwenImage:
    """The model with abstract (shape-only) parameters; nothing is allocated."""
    return nnx.eval_shape(lambda: AutoencoderKLQwenImage(cfg, rngs=nnx.Rngs(0)))


def abstract_params(cfg: VAEConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Every parameter's path, shape and dtype, computed abstractly."""
    return flatten_params(nnx.state(abstract_model(cfg), nnx.Param))


def count_params(cfg: VAEConfig) -> int:
    return sum(int(np.prod(p.shape)) for p in abstract_params(cfg).values())


def model_from_params(cfg: VAEConfig, params: dict) -> AutoencoderKLQwenImage:
    """The model holding `params` (nested dict, e.g. from `vae_state_dict_to_params`), built
    abstractly: eager random init of the many conv shapes would cost seconds of compilation."""
    return fill_abstract(abstract_model(cfg), params)
