"""One attention function for the whole model, dispatched by implementation name.

Layout: q (B, Sq, H, Dh); k, v (B, Skv, H, Dh); `kv_mask` (B, Skv) bool, True = key may be
attended (or None). Sq == Skv for the joint sequence; sequence parallelism
(`qwen_jax.models.sequence_parallel`) passes a device's queries against all keys. Every
implementation computes non-causal softmax(q k^T / sqrt(Dh)) v with the softmax in fp32 and
returns (B, Sq, H, Dh) in q's dtype. A sample whose keys are all masked is undefined (the model
always has its image keys).

Implementations (`TransformerConfig.attention`):

  "xla"     Any backend, any dtype and head dim. One head at a time (lax.map), so only (B, Sq, Skv)
            fp32 logits are live; heads whose logits together are small (`ALL_HEADS_MAX_LOGITS_BYTES`)
            run batched instead. Its backward is flash attention's, written in XLA (custom VJP):
            it keeps the output and the row log-sum-exps and recomputes each head's
            probabilities, so a training step never stores all heads' (B, Sq, Skv) probabilities.
            Sharding is left to GSPMD.
  "cudnn"   GPU only; bf16/fp16 activations (fp32 raises); head dim a multiple of 8, at most 128
            (cuDNN's flash kernels). `jax.nn.dot_product_attention(implementation="cudnn")`:
            padding becomes key lengths after moving each sample's valid keys first (key order is
            irrelevant once RoPE is applied); both sequences are padded to a multiple of 64
            (padded keys lie beyond the lengths, padded query rows are dropped). Sharding is left
            to GSPMD (cuDNN's custom call partitions over batch and heads).
  "splash"  TPU only (other backends raise); fp32 or bf16; head dim 128 (Qwen-Image's) is the
            kernel's native tile, others are left to Mosaic's tiling rules. Pallas splash attention
            (`jax.experimental.pallas.ops.tpu.splash_attention`) with a full (non-causal) mask:
            padded text keys get kv segment id 0 and all queries id 1, so they are never
            attended. Both sequences are padded to a multiple of 128, the kernel's blocks being
            the largest of 512/256/128 that divides each (padded keys masked the same way,
            padded query rows dropped). q is scaled by 1/sqrt(Dh) before the kernel, which does
            not scale. A Pallas call cannot be split by GSPMD, so it runs per device under
            `jax.shard_map` over the ambient mesh's free axes: batch over ("data", "fsdp") and
            heads over "tensor" where they divide them, anything else (a "sequence" axis)
            replicated; inside an enclosing shard_map (sequence parallelism) it maps over no axis,
            only to switch off check_vma, which the kernel's untyped outputs fail. Without a
            mesh the kernel is called directly. `_splash(..., interpret=True)` runs the same
            kernel in Pallas interpret mode on any backend (tests).

To add a kernel, write a function with the signature of `_xla` and register it in `ATTENTION_FNS`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec


def _xla(q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array | None) -> jax.Array:
    if kv_mask is None:
        kv_mask = jnp.ones(k.shape[:2], bool)
    return _xla_attention(q, k, v, kv_mask)


def _heads_first(*ts):
    return tuple(jnp.moveaxis(t, 2, 0) for t in ts)


# Heads whose fp32 logits together stay under this many bytes run as one batched product; larger
# ones run one head at a time (see _xla_attention). The toy model's 2 heads x 128 x 80^2 (6.5 MB)
# run ~40 % faster forward + backward batched on CPU; 12 heads x 1088^2 ~1.8x slower.
ALL_HEADS_MAX_LOGITS_BYTES = 16 << 20


def simulated_cpu_mesh() -> bool:
    """True on several CPU devices (`--xla_force_host_platform_device_count`, a simulated mesh).

    There the CPU-only program rewrites (batched heads here, `layers.dense_dot_general`) are
    off: with their layouts, the fake devices' all-reduces in a sharded training step were seen
    to wait on each other until XLA aborted the rendezvous. XLA's default programs complete.
    """
    return jax.default_backend() == "cpu" and jax.device_count() > 1


def _map_heads(fn, q, xs):
    """fn over the leading (head) axis of xs: all heads batched if their logits are small, else a loop."""
    heads, batch, n_q = xs[0].shape[0], xs[0].shape[1], q.shape[1]
    n_kv = xs[1].shape[2]
    if heads * batch * n_q * n_kv * 4 <= ALL_HEADS_MAX_LOGITS_BYTES and not simulated_cpu_mesh():
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs)


def _head_logits(qh, kh, kv_mask):
    """(B, Sq, Skv) fp32 logits of one head, masked keys at the fp32 minimum."""
    logits = jnp.einsum("bqd,bkd->bqk", qh, kh, preferred_element_type=jnp.float32) * qh.shape[-1] ** -0.5
    return jnp.where(kv_mask[:, None, :], logits, jnp.finfo(jnp.float32).min)


def _xla_forward(q, k, v, kv_mask):
    """Attention output and each row's log-sum-exp (H, B, Sq) fp32, head by head (`_map_heads`)."""

    def one_head(qkv):
        qh, kh, vh = qkv  # (B, S, Dh)
        logits = _head_logits(qh, kh, kv_mask)
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        unnormalised = jnp.exp(logits - row_max)  # one exp per logit, as softmax does
        row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
        # Normalise the (Sq, Dh) output rather than the (Sq, Skv) probabilities: one pass over
        # the logits fewer (~10 % of the attention forward on CPU at 1k tokens). In bf16 the
        # unnormalised weights are rounded instead of the probabilities: the same relative error.
        out = jnp.einsum("bqk,bkd->bqd", unnormalised.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
        return (out / row_sum).astype(q.dtype), (row_max + jnp.log(row_sum))[..., 0]

    out, lse = _map_heads(one_head, q, _heads_first(q, k, v))
    return jnp.moveaxis(out, 0, 2), lse


@jax.custom_vjp
def _xla_attention(q, k, v, kv_mask):
    # One head at a time (lax.map): only (B, Sq, Skv) fp32 logits are live instead of
    # (B, H, Sq, Skv). That bounds memory on accelerators and keeps the logits in cache on CPU,
    # where it is ~3.5x faster than the all-heads einsum at 1k tokens. The custom VJP is
    # flash attention's backward in plain XLA: it keeps only the output and the row
    # log-sum-exps and recomputes each head's probabilities, where autodiff of the map would
    # store every head's (B, Sq, Skv) probabilities (9.8 GiB per device at 1328^2 in DMD2).
    return _xla_forward(q, k, v, kv_mask)[0]


def _xla_attention_fwd(q, k, v, kv_mask):
    out, lse = _xla_forward(q, k, v, kv_mask)
    return out, (q, k, v, kv_mask, out, lse)


def _xla_attention_bwd(residuals, d_out):
    q, k, v, kv_mask, out, lse = residuals
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the softmax backward's row term.
    delta = jnp.einsum("bqhd,bqhd->hbq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def one_head(args):
        qh, kh, vh, doh, lse_h, delta_h = args
        # Keys-major (B, Skv, Sq) probabilities: dV = P^T dO and dK = dS^T Q are then plain
        # row-major products, and only dQ = dS K needs its operand transposed. Queries-major,
        # two of the three would: XLA's CPU GEMMs take no transposed left operand, so each
        # costs a (Skv, Sq) transposing copy, often fused into the elementwise producer (~10 %
        # of the attention backward at 1k tokens).
        scale = qh.shape[-1] ** -0.5
        logits_t = jnp.einsum("bkd,bqd->bkq", kh, qh, preferred_element_type=jnp.float32) * scale
        logits_t = jnp.where(kv_mask[:, :, None], logits_t, jnp.finfo(jnp.float32).min)
        probs_t = jnp.exp(logits_t - lse_h[:, None, :])
        dv = jnp.einsum("bkq,bqd->bkd", probs_t.astype(doh.dtype), doh, preferred_element_type=jnp.float32)
        dp_t = jnp.einsum("bkd,bqd->bkq", vh, doh, preferred_element_type=jnp.float32)
        ds_t = (probs_t * (dp_t - delta_h[:, None, :]) * scale).astype(qh.dtype)
        dk = jnp.einsum("bkq,bqd->bkd", ds_t, qh, preferred_element_type=jnp.float32)
        dq = jnp.einsum("bkq,bkd->bqd", ds_t, kh, preferred_element_type=jnp.float32)
        return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype)

    dq, dk, dv = _map_heads(one_head, q, (*_heads_first(q, k, v, d_out), lse, delta))
    d_mask = np.zeros(kv_mask.shape, jax.dtypes.float0)
    return jnp.moveaxis(dq, 0, 2), jnp.moveaxis(dk, 0, 2), jnp.moveaxis(dv, 0, 2), d_mask


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def _keys_valid_first(k, v, kv_mask):
    """Reorders keys/values so each sample's attendable keys come first; returns their count.

    Attention does not depend on key order (RoPE is already applied), and fused kernels express
    padding as "the first n keys are real" far more cheaply than as a dense (S, S) mask.
    """
    order = jnp.argsort(~kv_mask, axis=1, stable=True)[:, :, None, None]
    lengths = jnp.sum(kv_mask, axis=1, dtype=jnp.int32)
    return jnp.take_along_axis(k, order, axis=1), jnp.take_along_axis(v, order, axis=1), lengths


def _pad_sequence(t, multiple):
    """Zero-pads axis 1 of a (B, S, ...) array up to a multiple of `multiple`."""
    pad = -t.shape[1] % multiple
    return jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) if pad else t


def _fused(q, k, v, kv_mask, implementation):
    """jax.nn.dot_product_attention with padding given as key lengths, on even-length sequences."""
    batch, n_q, n_kv = q.shape[0], q.shape[1], k.shape[1]
    if kv_mask is None:
        lengths = jnp.full((batch,), n_kv, jnp.int32)
    else:
        k, v, lengths = _keys_valid_first(k, v, kv_mask)
    # cuDNN's training kernels need even sequence lengths; pad to a multiple of 64 (padded keys
    # lie beyond `lengths`, padded query rows are dropped).
    q, k, v = _pad_sequence(q, 64), _pad_sequence(k, 64), _pad_sequence(v, 64)
    out = jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=jnp.full((batch,), n_q, jnp.int32), key_value_seq_lengths=lengths,
        implementation=implementation)
    return out[:, :n_q]


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array | None) -> jax.Array:
    # cuDNN fused (flash) attention: GPU only, bf16/fp16 inputs, head_dim a multiple of 8.
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention='cudnn' needs bf16/fp16 activations, got {q.dtype}; set dtype='bfloat16'")
    return _fused(q, k, v, kv_mask, "cudnn")


# ---- splash (TPU) -------------------------------------------------------------------------------

_SPLASH_PAD = 128  # the kernel's blocks must be multiples of the TPU lane width
_SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the padded length is used


def _splash_block(padded_len: int) -> int:
    return next(b for b in _SPLASH_BLOCKS if padded_len % b == 0)


def _splash_local(q, k, v, kv_valid, *, interpret):
    """Splash attention on one device's shard: q (B, Sq, H, Dh), k, v (B, Skv, H, Dh), kv_valid (B, Skv)."""
    # Imported here: Pallas TPU support is loaded only by models that choose splash.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, n_q, heads, head_dim = q.shape
    n_kv = k.shape[1]
    if kv_valid is None and n_kv % _SPLASH_PAD:
        kv_valid = jnp.ones((batch, n_kv), bool)  # the padded keys need masking
    # The kernel computes q k^T unscaled: apply 1/sqrt(Dh) here, in fp32, with one rounding.
    q = (q.astype(jnp.float32) * head_dim ** -0.5).astype(q.dtype)
    q, k, v = (_pad_sequence(t, _SPLASH_PAD).transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, S, Dh)
    len_q, len_kv = q.shape[2], k.shape[2]
    block_q, block_kv = _splash_block(len_q), _splash_block(len_kv)
    sizes = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, use_fused_bwd_kernel=True)
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([splash.FullMask((len_q, len_kv))] * heads), block_sizes=sizes,
        head_shards=1, q_seq_shards=1, interpret=interpret)
    if kv_valid is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        # Only keys with the query's segment id are attended: real keys 1, padded keys 0. Every
        # query (padded rows included, dropped below) is 1, so no softmax row is empty.
        kv_ids = _pad_sequence(kv_valid, _SPLASH_PAD).astype(jnp.int32)
        ids = splash.SegmentIds(q=jnp.ones((batch, len_q), jnp.int32), kv=kv_ids)
        out = jax.vmap(kernel)(q, k, v, segment_ids=ids)
    return out.transpose(0, 2, 1, 3)[:, :n_q]


def _split(mesh, axes, size):
    """The mesh axes among `axes` open to shard_map (present, not already manual) if they divide `size`."""
    free = tuple(a for a in axes if a in mesh.shape and a not in mesh.manual_axes)
    return free if free and size % math.prod(mesh.shape[a] for a in free) == 0 else None


def _splash(q, k, v, kv_mask, *, interpret: bool = False):
    backend = jax.default_backend()
    if not interpret and backend != "tpu":
        raise ValueError(f"attention='splash' is a TPU (Pallas Mosaic) kernel; this backend is {backend!r}: "
                         f"use 'xla' (or 'cudnn' on GPU)")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _splash_local(q, k, v, kv_mask, interpret=interpret)
    # A Pallas call cannot be split by GSPMD: map it over every axis not already manual, splitting
    # batch and heads where the axes divide them (other axes see whole, replicated arrays).
    free = frozenset(mesh.axis_names) - frozenset(mesh.manual_axes)
    batch = _split(mesh, ("data", "fsdp"), q.shape[0])
    heads = _split(mesh, ("tensor",), q.shape[2])
    qkv_spec = PartitionSpec(batch, None, heads, None)
    args, specs = (q, k, v), (qkv_spec,) * 3
    if kv_mask is not None:
        args, specs = args + (kv_mask,), specs + (PartitionSpec(batch, None),)

    def local(q, k, v, kv_mask=None):
        return _splash_local(q, k, v, kv_mask, interpret=interpret)

    # check_vma=False: the kernel's pallas_call does not type how its outputs vary over manual
    # axes, which a check_vma shard_map requires. Inside an enclosing shard_map (sequence
    # parallelism) `free` is empty and this map only switches that check off.
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv_spec, axis_names=free,
                         check_vma=False)(*args)


ATTENTION_FNS = {"xla": _xla, "cudnn": _cudnn, "splash": _splash}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array | None, impl: str = "xla") -> jax.Array:
    """Non-causal multi-head attention with scale 1/sqrt(Dh); returns (B, Sq, H, Dh) in q's dtype."""
    try:
        fn = ATTENTION_FNS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {sorted(ATTENTION_FNS)}") from None
    return fn(q, k, v, kv_mask)
