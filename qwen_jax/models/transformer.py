"""Qwen-Image MMDiT (diffusers `QwenImageTransformer2DModel`) in Flax NNX.

Module and parameter names mirror diffusers so the two can be read side by side; the key
table in `qwen_jax.conversion.transformer_keys` lists every correspondence. Differences:
  * the 60 blocks are one `QwenImageTransformerBlock` whose parameters carry a leading layer
    axis, run with a single `jax.lax.scan` (compile time does not grow with depth);
  * `img_mod.1` / `txt_mod.1` are plain Linears `img_mod` / `txt_mod` (the SiLU is in the call);
  * `to_out.0` is `to_out`; the MLPs' `net.0.proj` / `net.2` are `proj_in` / `proj_out`.
Tensor layouts are documented in `qwen_jax.models.config`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwen_jax.models import rope, sequence_parallel
from qwen_jax.models import lora as lora_lib
from qwen_jax.pytree import fill_abstract, flatten_params, unflatten_params
from qwen_jax.sharding import TEXT_TOKENS, TOKENS, constrain
from qwen_jax.models.attention import attention
from qwen_jax.models.config import TransformerConfig
from qwen_jax.models.layers import (
    AdaLayerNormContinuous, FeedForward, RMSNorm, TimestepProjEmbeddings, layer_norm, linear, modulate, silu,
)
from qwen_jax.models.stack import scan_layers, stacked


class JointAttention(nnx.Module):
    """Dual-stream attention: separate projections per stream, one softmax over [text, image]."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads, self.impl = cfg.num_attention_heads, cfg.attention
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out", "to_add_out"):
            setattr(self, name, linear(cfg, d, d, rngs=rngs, lora_target="attn"))
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            setattr(self, name, RMSNorm(hd, cfg))

    def __call__(self, img, txt, cos, sin, kv_mask):
        def heads(x):
            return x.reshape(*x.shape[:-1], self.heads, -1)

        # QK-RMSNorm per head; (text, image) pairs.
        q = self.norm_added_q(heads(self.add_q_proj(txt))), self.norm_q(heads(self.to_q(img)))
        k = self.norm_added_k(heads(self.add_k_proj(txt))), self.norm_k(heads(self.to_k(img)))
        v = heads(self.add_v_proj(txt)), heads(self.to_v(img))
        if sequence_parallel.num_shards() > 1:
            txt_out, img_out = self._split_sequence(q, k, v, cos, sin, kv_mask)
        else:
            txt_out, img_out = self._joint_sequence(q, k, v, cos, sin, kv_mask)
        return self.to_out(img_out), self.to_add_out(txt_out)

    def _joint_sequence(self, q, k, v, cos, sin, kv_mask):
        """One device's view: join the streams text-first, RoPE, one attention over all tokens."""
        n_txt = q[0].shape[1]
        q, k, v = (jnp.concatenate(pair, 1) for pair in (q, k, v))
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        out = attention(q, k, v, kv_mask, self.impl)
        out = checkpoint_name(out.reshape(*out.shape[:2], -1), "attn_out")
        return out[:, :n_txt], out[:, n_txt:]

    def _split_sequence(self, q, k, v, cos, sin, kv_mask):
        """Image tokens split over the "sequence" mesh axis (`sequence_parallel`)."""
        n_txt = q[0].shape[1]
        tables = (cos[:n_txt], sin[:n_txt]), (cos[n_txt:], sin[n_txt:])  # the joint tables, text first
        # RoPE on the global arrays, per stream: each image shard keeps its own positions.
        q, k = (tuple(rope.apply_rope(x, c, s) for x, (c, s) in zip(pair, tables)) for pair in (q, k))
        q, k, v = (tuple(checkpoint_name(t, "qkv") for t in pair) for pair in (q, k, v))
        outs = sequence_parallel.joint_attention(q, k, v, kv_mask, self.impl)
        return tuple(checkpoint_name(o.reshape(*o.shape[:2], -1), "attn_out") for o in outs)


class QwenImageTransformerBlock(nnx.Module):
    """One dual-stream block: adaLN-modulated joint attention and per-stream MLPs."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.img_mod = linear(cfg, cfg.inner_dim, 6 * cfg.inner_dim, rngs=rngs, lora_target="mod")
        self.txt_mod = linear(cfg, cfg.inner_dim, 6 * cfg.inner_dim, rngs=rngs, lora_target="mod")
        self.attn = JointAttention(cfg, rngs=rngs)
        self.img_mlp = FeedForward(cfg, rngs=rngs)
        self.txt_mlp = FeedForward(cfg, rngs=rngs)

    def __call__(self, img, txt, temb, cos, sin, kv_mask):
        # Modulation rows: [shift1 | scale1 | gate1 | shift2 | scale2 | gate2] (attention half first).
        silu_temb = silu(temb)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = jnp.split(self.img_mod(silu_temb), 6, axis=-1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = jnp.split(self.txt_mod(silu_temb), 6, axis=-1)

        img_attn, txt_attn = self.attn(
            modulate(layer_norm(img), i_shift1, i_scale1),
            modulate(layer_norm(txt), t_shift1, t_scale1),
            cos, sin, kv_mask,
        )
        img = img + i_gate1[:, None] * img_attn
        txt = txt + t_gate1[:, None] * txt_attn

        img = img + i_gate2[:, None] * self.img_mlp(modulate(layer_norm(img), i_shift2, i_scale2))
        txt = txt + t_gate2[:, None] * self.txt_mlp(modulate(layer_norm(txt), t_shift2, t_scale2))
        return img, txt


class QwenImageTransformer(nnx.Module):
    """The Qwen-Image denoiser: packed latents + text states + sigma -> velocity.

    Call: `model(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
    img_shapes)`, shapes as in diffusers (see `qwen_jax.models.config`). `img_shapes` is static
    (token grids per image; under `jax.jit` pass it as a static argument).
    With `return_hidden_states_at=(i, j, ...)` the call also returns the image-token hidden
    states (B, L_img, D) after blocks i, j, ... (0-based) as a tuple, for discriminator heads.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.time_text_embed = TimestepProjEmbeddings(cfg, rngs=rngs)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, cfg)
        self.img_in = linear(cfg, cfg.in_channels, cfg.inner_dim, rngs=rngs)
        self.txt_in = linear(cfg, cfg.joint_attention_dim, cfg.inner_dim, rngs=rngs)
        self.transformer_blocks = stacked(lambda r: QwenImageTransformerBlock(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm_out = AdaLayerNormContinuous(cfg, rngs=rngs)
        self.proj_out = linear(cfg, cfg.inner_dim, cfg.out_features, rngs=rngs)

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        encoder_hidden_states_mask: jax.Array | None,
        timestep: jax.Array,
        img_shapes,
        *,
        return_hidden_states_at: Sequence[int] = (),
    ):
        cfg = self.config
        shapes = rope.normalize_img_shapes(img_shapes)
        batch, n_img, _ = hidden_states.shape
        n_txt = encoder_hidden_states.shape[1]
        if rope.num_image_tokens(shapes) != n_img:
            raise ValueError(f"img_shapes {shapes} give {rope.num_image_tokens(shapes)} tokens, hidden_states has {n_img}")
        layers = tuple(int(i) for i in return_hidden_states_at)
        if any(not 0 <= i < cfg.num_layers for i in layers):
            raise ValueError(f"return_hidden_states_at={layers} must index blocks 0..{cfg.num_layers - 1}")

        img = self.img_in(hidden_states.astype(cfg.jnp_dtype))
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))
        temb = self.time_text_embed(timestep)
        cos, sin = rope.rope_tables(shapes, n_txt, cfg.axes_dims_rope)
        kv_mask = None
        if encoder_hidden_states_mask is not None:
            # Keys only: padded text tokens are never attended; image tokens always are.
            kv_mask = jnp.concatenate(
                [encoder_hidden_states_mask.astype(bool), jnp.ones((batch, n_img), bool)], axis=1)

        img, txt, collected = self._run_blocks(img, txt, temb, cos, sin, kv_mask, layers)
        out = self.proj_out(self.norm_out(img, temb))
        if return_hidden_states_at:
            return out, tuple(collected[k] for k in range(len(layers)))
        return out

    def _run_blocks(self, img, txt, temb, cos, sin, kv_mask, layers):
        """Scans the stacked blocks; also keeps the image states after the blocks in `layers`."""
        wanted = jnp.asarray(layers, jnp.int32)
        # A (K, B, L_img, D) buffer selected into as the scan passes each wanted block: no copy
        # of the stacked parameters, no per-layer output stack.
        collected = jnp.zeros((len(layers),) + img.shape, img.dtype)

        def body(block, carry):
            img, txt, collected, index = carry
            img, txt = block(img, txt, temb, cos, sin, kv_mask)
            img, txt = constrain(img, TOKENS), constrain(txt, TEXT_TOKENS)
            if layers:
                collected = jnp.where((wanted == index)[:, None, None, None], img[None], collected)
            return img, txt, collected, index + 1

        img, txt, collected, _ = scan_layers(self.transformer_blocks, body, (img, txt, collected, jnp.int32(0)),
                                             self.config.remat, self.config.scan_unroll)
        return img, txt, collected

def abstract_model(cfg: TransformerConfig) -> QwenImageTransformer:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and dtypes, no memory."""
    return nnx.eval_shape(lambda: QwenImageTransformer(cfg, rngs=nnx.Rngs(0)))


def abstract_params(cfg: TransformerConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Every parameter's path, shape and dtype (stacked blocks included), computed abstractly."""
    return flatten_params(nnx.state(abstract_model(cfg), nnx.Param))


def count_params(cfg: TransformerConfig) -> int:
    return sum(int(np.prod(p.shape)) for p in abstract_params(cfg).values())


def merge_lora(model: QwenImageTransformer) -> QwenImageTransformer:
    """A plain model (no adapters) whose kernels are `kernel + (alpha/r) * lora_a @ lora_b`."""
    cfg = model.config
    if not cfg.lora_rank:
        return model
    flat = flatten_params(nnx.state(model, nnx.Param))
    merged = {}
    for path, value in flat.items():
        if path[-1] in ("lora_a", "lora_b"):
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in flat:
            value = lora_lib.merged_kernel(value, flat[path[:-1] + ("lora_a",)], flat[path[:-1] + ("lora_b",)],
                                           cfg.lora_scale)
        merged[path] = value
    return fill_abstract(abstract_model(cfg.replace(lora_rank=0)), unflatten_params(merged))
