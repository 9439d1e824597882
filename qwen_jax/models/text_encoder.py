"""Qwen2.5-VL-7B's language model (transformers `Qwen2_5_VLTextModel`) in Flax NNX, text only.

Qwen-Image conditions on the last hidden state of this decoder (after its final RMSNorm); the
vision tower and `lm_head` are never used, so they are not built. Module names mirror
transformers (`embed_tokens`, `layers.{self_attn,mlp,input_layernorm,post_attention_layernorm}`,
`norm`); `qwen_jax.conversion.text_encoder_keys` lists every correspondence. The decoder layers
are one `TextDecoderLayer` whose parameters carry a leading layer axis, run with one
`jax.lax.scan`.

Tensor layouts:
  input_ids        (B, L) int        token ids
  attention_mask   (B, L) 0/1        1 = real token, 0 = padding (either side)
  hidden states    (B, L, D)         D = hidden_size (3584)
  q                (B, L, H, Dh)     H query heads (28), Dh = D / H (128)
  k, v             (B, L, KV, Dh)    KV key/value heads (4); each serves H / KV query heads
  cos, sin         (L, Dh)           rotate_half layout: [f_0..f_{Dh/2-1}, f_0..f_{Dh/2-1}]
  output           (B, L, D)         = transformers' `hidden_states[-1]` (after `norm`)

Positions: for text-only input transformers (5.x) uses `arange(L)` for every sample whatever
the padding, on all three mRoPE rows (it never looks at the mask for positions). With right
padding that equals the real-token positions `cumsum(mask) - 1` older versions used; with left
padding the real tokens of a short sample start at its pad count. We do the same, so results
match transformers for either padding side. Identical mRoPE rows make mRoPE plain 1-D RoPE
(tests/test_text_encoder.py checks this against transformers' rotary embedding).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwen_jax.models.dtypes import DtypePolicy
from qwen_jax.models.layers import silu
from qwen_jax.models.remat import REMAT_POLICIES
from qwen_jax.models.stack import scan_layers, stacked
from qwen_jax.pytree import fill_abstract, flatten_params

ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta",
)
_MODEL_TYPES = ("qwen2_5_vl", "qwen2_5_vl_text")
_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel", "Qwen2_5_VLTextModel")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig(DtypePolicy):
    """Architecture of the Qwen2.5-VL text model (transformers field names) and how to run it.

    Defaults are Qwen2.5-VL-7B (7,070,619,136 language-model parameters). Runtime fields:
        param_dtype: storage dtype of parameters.
        dtype: compute dtype of the residual stream and matmuls; norm statistics, softmax and
            the RoPE angles are fp32 (cos/sin are then cast to `dtype`, as transformers does).
        remat: a policy name from `qwen_jax.models.remat.REMAT_POLICIES`.
    """

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} query heads cannot share {self.num_key_value_heads} kv heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        self.check_dtypes()
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")

    @property
    def head_dim(self) -> int:
        # transformers' Qwen2_5_VLAttention uses hidden_size // heads (it ignores a config head_dim).
        return self.hidden_size // self.num_attention_heads

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def qwen2_5_vl_7b(cls, **runtime) -> "TextEncoderConfig":
        """The text model of Qwen2.5-VL-7B, Qwen-Image's text encoder."""
        return cls(**runtime)

    @classmethod
    def tiny(cls, **overrides) -> "TextEncoderConfig":
        """Two layers, width 64, GQA 4:2, full Qwen vocabulary (the real tokenizer works with it)."""
        base = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
        return cls(**{**base, **overrides})

    # ---- transformers config.json --------------------------------------------------------------
    @classmethod
    def from_transformers_config(cls, d: dict[str, Any], **runtime) -> "TextEncoderConfig":
        """Reads a Qwen2.5-VL `config.json` dict (text fields in `text_config` or at top level)."""
        model_type = d.get("model_type")
        if model_type is not None and model_type not in _MODEL_TYPES:
            raise ValueError(f"config.json describes model_type {model_type!r}, not a Qwen2.5-VL model")
        archs = d.get("architectures") or []
        if archs and not any(a in _ARCHITECTURES for a in archs):
            raise ValueError(f"config.json describes {archs}, not Qwen2_5_VLForConditionalGeneration")
        # transformers >= 4.5x nests the text fields in `text_config`; older files (and many hub
        # copies) keep them at top level. Nested wins: that is what transformers 5 reads.
        nested = d.get("text_config") or {}

        def get(name, default=None):
            for source in (nested, d):
                if source.get(name) is not None:
                    return source[name]
            if default is None:
                raise ValueError(f"config.json has no {name!r} (neither in text_config nor at top level)")
            return default

        if get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {get('hidden_act')!r} is not supported (Qwen2.5-VL uses silu)")
        if get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported")
        rope = get("rope_parameters", {}) or get("rope_scaling", {}) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "mrope"):
            raise ValueError(f"rope type {kind!r} is not supported (expected mrope/default)")
        heads = int(get("num_attention_heads"))
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads", heads)),
            rms_norm_eps=float(get("rms_norm_eps", 1e-5)),  # transformers' class default
            rope_theta=float(rope.get("rope_theta") or get("rope_theta", 1_000_000.0)),
            **runtime,
        )

    def to_transformers_config(self, vision_config: dict[str, Any] | None = None) -> dict[str, Any]:
        """A `Qwen2_5_VLConfig(**d)`-compatible dict (text fields nested in `text_config`).

        `vision_config` defaults to the smallest valid tower: only the text model matters here.
        """
        hd = self.head_dim
        # mRoPE sections in Qwen's 7B proportions [16, 24, 24] of Dh/2 = 64; they must sum to Dh/2.
        hw = 3 * hd // 16
        # rope_theta both at text level (transformers 4.x) and in the rope dict (5.x).
        text = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}
        text.update(hidden_act="silu", use_sliding_window=False, model_type="qwen2_5_vl_text",
                    rope_scaling={"type": "mrope", "mrope_section": [hd // 2 - 2 * hw, hw, hw],
                                  "rope_theta": self.rope_theta})
        vision = vision_config or dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                       out_hidden_size=self.hidden_size)
        return {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
                "tie_word_embeddings": False, "text_config": text, "vision_config": vision}


# ---- numerics ------------------------------------------------------------------------------------
def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """1-D RoPE cos/sin for `positions` (..., L): (..., L, Dh) in rotate_half layout, cast to `dtype`.

    The angles `position * theta^(-2k/Dh)` are fp32, like transformers' table, and rounded once
    to the activation dtype (transformers does `cos.to(x.dtype)`).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """NeoX/rotate_half RoPE on x (B, L, heads, Dh) with cos/sin (L, Dh); pairs are (k, k + Dh/2).

    Not the DiT's interleaved (2k, 2k+1) pairing in `qwen_jax.models.rope`.
    """
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def causal_gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped-query attention, scale 1/sqrt(Dh), computed in fp32.

    q (B, L, H, Dh); k, v (B, L, KV, Dh); allowed (B, L, L) bool (query, key). Returns
    (B, L, H * Dh) in q's dtype. Rows with no allowed key (left padding) come out finite and
    meaningless, as they are in transformers; callers drop them.

    fp32 throughout (torch's fused bf16 kernels also keep logits and probabilities in fp32):
    the two attention matmuls are ~3% of a 7B layer's FLOPs at 1k tokens, so this costs little,
    and it avoids XLA:CPU's missing bf16 x bf16 -> f32 dot inside scan/map.
    """
    b, n, h, dh = q.shape
    kv = k.shape[2]
    scale = dh ** -0.5
    f32 = jnp.float32
    # One kv head (and its H/KV query heads) at a time: only (B, H/KV, L, L) logits are live.
    qg = jnp.moveaxis(q.reshape(b, n, kv, h // kv, dh), 2, 0)  # (KV, B, L, G, Dh)
    kg, vg = jnp.moveaxis(k, 2, 0), jnp.moveaxis(v, 2, 0)  # (KV, B, L, Dh)

    def one_group(args):
        qh, kh, vh = (t.astype(f32) for t in args)
        logits = jnp.einsum("bqgd,bkd->bgqk", qh, kh) * scale
        logits = jnp.where(allowed[:, None], logits, jnp.finfo(f32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bgqk,bkd->bqgd", probs, vh).astype(q.dtype)

    out = jax.lax.map(one_group, (qg, kg, vg))  # (KV, B, L, G, Dh)
    return jnp.moveaxis(out, 0, 2).reshape(b, n, h * dh)


# ---- modules -------------------------------------------------------------------------------------
def _linear(cfg: TextEncoderConfig, d_in: int, d_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, rngs=rngs)


class TextRMSNorm(nnx.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, then multiply by `scale`.

    The cast happens before the scale (unlike diffusers' RMSNorm in `layers.py`), so in bf16 the
    product is a bf16 multiply, as in transformers.
    """

    def __init__(self, dim: int, cfg: TextEncoderConfig):
        self.scale = nnx.Param(jnp.ones((dim,), cfg.jnp_param_dtype))
        self.eps = cfg.rms_norm_eps
        self.out_dtype = cfg.jnp_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return (self.scale[...] * y).astype(self.out_dtype)


class TextAttention(nnx.Module):
    """Causal GQA self-attention with biased q/k/v projections and an unbiased output projection."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = _linear(cfg, d, self.heads * hd, True, rngs)
        self.k_proj = _linear(cfg, d, self.kv_heads * hd, True, rngs)
        self.v_proj = _linear(cfg, d, self.kv_heads * hd, True, rngs)
        self.o_proj = _linear(cfg, self.heads * hd, d, False, rngs)

    def __call__(self, x, cos, sin, allowed):
        b, n, _ = x.shape
        q = self.q_proj(x).reshape(b, n, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(b, n, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, n, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        out = checkpoint_name(causal_gqa_attention(q, k, v, allowed), "attn_out")
        return self.o_proj(out)


class TextMLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`, no biases."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs)
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, False, rngs)
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, False, rngs)

    def __call__(self, x):
        h = silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(checkpoint_name(h, "mlp_hidden"))


class TextDecoderLayer(nnx.Module):
    """Pre-norm decoder layer: `h += attn(norm(h))`, then `h += mlp(norm(h))`."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.self_attn = TextAttention(cfg, rngs=rngs)
        self.mlp = TextMLP(cfg, rngs=rngs)
        self.input_layernorm = TextRMSNorm(cfg.hidden_size, cfg)
        self.post_attention_layernorm = TextRMSNorm(cfg.hidden_size, cfg)

    def __call__(self, h, cos, sin, allowed):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, allowed)
        return h + self.mlp(self.post_attention_layernorm(h))


class QwenTextEncoder(nnx.Module):
    """Token ids -> last hidden state after the final norm (transformers' `hidden_states[-1]`).

    Call: `model(input_ids (B, L) int, attention_mask (B, L) 0/1 or None)` -> (B, L, D) in
    `cfg.dtype`. Rows of padding tokens are finite but meaningless.
    """

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype,
                                      param_dtype=cfg.jnp_param_dtype, rngs=rngs)
        self.layers = stacked(lambda r: TextDecoderLayer(cfg, rngs=r), cfg.num_hidden_layers, rngs)
        self.norm = TextRMSNorm(cfg.hidden_size, cfg)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        b, n = input_ids.shape
        keys = jnp.ones((b, n), bool) if attention_mask is None else attention_mask.astype(bool)
        # Causal and key-padding masks, as transformers' create_causal_mask builds for a 2-D mask.
        allowed = jnp.tril(jnp.ones((n, n), bool))[None] & keys[:, None, :]
        cos, sin = rope_tables(jnp.arange(n), cfg.head_dim, cfg.rope_theta, cfg.jnp_dtype)
        h = self.embed_tokens(input_ids).astype(cfg.jnp_dtype)
        h = scan_layers(self.layers, lambda layer, h: layer(h, cos, sin, allowed), h, cfg.remat)
        return self.norm(h)

def abstract_model(cfg: TextEncoderConfig) -> QwenTextEncoder:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and dtypes, no memory."""
    return nnx.eval_shape(lambda: QwenTextEncoder(cfg, rngs=nnx.Rngs(0)))


def from_params(cfg: TextEncoderConfig, params) -> QwenTextEncoder:
    """The model holding `params` (nested dict, e.g. from `text_encoder_state_dict_to_params`),
    built abstractly: no random initialisation of 7B parameters first."""
    return fill_abstract(abstract_model(cfg), params)


def abstract_params(cfg: TextEncoderConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Every parameter's path, shape and dtype (stacked layers included), computed abstractly."""
    return flatten_params(nnx.state(abstract_model(cfg), nnx.Param))


def count_params(cfg: TextEncoderConfig) -> int:
    return sum(int(np.prod(p.shape)) for p in abstract_params(cfg).values())
