"""Attention implementations chosen by name: each against a naive softmax reference, and the choice
reaching the model. Splash runs in Pallas interpret mode (the kernel's own code, on CPU)."""

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from qwen_jax.models import QwenImageTransformer, TransformerConfig
from qwen_jax.models.attention import ATTENTION_FNS, _fused, _splash, _xla, attention
from qwen_jax.models import attention as attention_module

ROOT = Path(__file__).resolve().parents[1]


def naive(q, k, v, kv_mask):
    """softmax(q k^T / sqrt(Dh)) v over all heads at once, in float64 numpy."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if kv_mask is not None:
        logits = np.where(np.asarray(kv_mask)[:, None, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def qkv(shape, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, shape, dtype) for key in keys)


def padded_mask(batch, length):
    """Text-style padding: sample 0 full, 1 tail-padded, 2 with holes and a padded head."""
    mask = np.ones((batch, length), bool)
    mask[1, length // 3:length // 2] = False
    if batch > 2:
        mask[2, :5] = False
        mask[2, 7] = False
    return jnp.asarray(mask)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


splash_interpret = functools.partial(_splash, interpret=True)


@pytest.mark.parametrize("length", [1, 13, 77])
def test_xla_matches_naive_softmax_with_padded_keys(length):
    q, k, v = qkv((3, length, 2, 8))
    mask = padded_mask(3, length) if length > 7 else None
    np.testing.assert_allclose(attention(q, k, v, mask), naive(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_unknown_name_and_wrong_backend_or_dtype_are_explained():
    q, k, v = qkv((1, 8, 2, 8))
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'; choose from \['cudnn'"):
        attention(q, k, v, None, "flash")
    with pytest.raises(ValueError, match="attention='cudnn' needs bf16/fp16 activations, got float32"):
        attention(q, k, v, None, "cudnn")
    with pytest.raises(ValueError, match="attention='splash' is a TPU .* this backend is 'cpu'"):
        attention(q, k, v, None, "splash")


def test_fewer_queries_than_keys_as_sequence_parallelism_calls_it():
    q, k, v = qkv((3, 40, 2, 8))
    q = q[:, :9]
    mask = padded_mask(3, 40)
    want = naive(q, k, v, mask)
    np.testing.assert_allclose(_xla(q, k, v, mask), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_fused(q, k, v, mask, "xla"), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(splash_interpret(q, k, v, mask), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(splash_interpret(q, k, v, None), naive(q, k, v, None), rtol=1e-5, atol=1e-5)


def test_cudnn_key_reordering_and_lengths_match_masked_attention():
    # cuDNN's padding path (valid keys first + key lengths + pad to 64) through XLA's kernel,
    # which takes the same key_value_seq_lengths; odd lengths exercise the padding.
    for length in (13, 77):
        q, k, v = qkv((3, length, 2, 8), seed=length)
        mask = padded_mask(3, length)
        np.testing.assert_allclose(_fused(q, k, v, mask, "xla"), _xla(q, k, v, mask), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_fused(q, k, v, None, "xla"), _xla(q, k, v, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [77, 128, 200])  # padded to one 128 block / exact / one 256 block
def test_splash_matches_xla_with_padded_keys(length):
    q, k, v = qkv((3, length, 2, 32), seed=length)
    mask = padded_mask(3, length)
    fn = jax.jit(splash_interpret)
    np.testing.assert_allclose(fn(q, k, v, mask), _xla(q, k, v, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fn(q, k, v, None), _xla(q, k, v, None), rtol=1e-5, atol=1e-5)


def test_splash_bf16_is_as_close_to_fp32_as_xla():
    q, k, v = qkv((2, 200, 2, 64), jnp.bfloat16)
    mask = padded_mask(2, 200)
    exact = naive(q, k, v, mask)
    out = splash_interpret(q, k, v, mask)
    assert out.dtype == jnp.bfloat16
    assert rel(out.astype(jnp.float32), exact) < max(1e-2, 2 * rel(_xla(q, k, v, mask).astype(jnp.float32), exact))


def test_splash_under_a_mesh_shards_batch_and_heads_and_has_gradients():
    # 2 x 2 x 2 mesh: batch over (data, fsdp), heads over tensor, each device runs the kernel.
    q, k, v = qkv((4, 77, 4, 32), seed=3)
    mask = padded_mask(4, 77)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, mask)))

    with jax.set_mesh(mesh):
        out = jax.jit(splash_interpret)(q, k, v, mask)
        hlo = jax.jit(splash_interpret).lower(q, k, v, mask).as_text()
        grads = jax.jit(jax.grad(functools.partial(loss, splash_interpret), argnums=(0, 1, 2)))(q, k, v)
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo
    np.testing.assert_allclose(out, _xla(q, k, v, mask), rtol=1e-5, atol=1e-5)
    want = jax.grad(functools.partial(loss, _xla), argnums=(0, 1, 2))(q, k, v)
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_splash_inside_a_sequence_parallel_shard_map():
    # Sequence parallelism's pattern: a check_vma shard_map over every axis, each device's
    # queries against all keys (gathered over "sequence", typed invariant along it).
    q, k, v = qkv((4, 256, 2, 32), seed=5)
    mask = padded_mask(4, 256)
    mesh = jax.make_mesh((4, 2), ("fsdp", "sequence"), axis_types=(AxisType.Auto,) * 2)
    split, whole = PartitionSpec("fsdp", "sequence"), PartitionSpec("fsdp")

    def local(q, k, v, mask):
        gather = functools.partial(jax.lax.all_gather, axis_name="sequence", axis=1, tiled=True, to="invarying")
        return splash_interpret(q, gather(k), gather(v), mask)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(split, split, split, whole), out_specs=split)
    with jax.set_mesh(mesh):
        out = jax.jit(mapped)(q, k, v, mask)
    np.testing.assert_allclose(out, _xla(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_the_configured_kernel_reaches_the_model(monkeypatch):
    cfg = TransformerConfig.tiny()
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (2, 24, cfg.in_channels))
    txt = jax.random.normal(keys[1], (2, 7, cfg.joint_attention_dim))
    mask = jnp.array([[1] * 7, [1] * 3 + [0] * 4])
    t = jax.random.uniform(keys[2], (2,))
    calls = []

    def spy(q, k, v, kv_mask):
        calls.append(q.shape)
        return splash_interpret(q, k, v, kv_mask)

    monkeypatch.setitem(ATTENTION_FNS, "splash", spy)
    _, state = nnx.split(QwenImageTransformer(cfg, rngs=nnx.Rngs(0)))

    def forward(impl):
        graphdef = nnx.graphdef(QwenImageTransformer(cfg.replace(attention=impl), rngs=nnx.Rngs(0)))
        return jax.jit(lambda s: nnx.merge(graphdef, s)(x, txt, mask, t, ((1, 4, 6),)))(state)

    want = forward("xla")
    assert not calls
    np.testing.assert_allclose(forward("splash"), want, rtol=1e-5, atol=1e-5)
    assert calls == [(2, 31, 2, 32)]  # traced once: the blocks are scanned



def test_gpu_check_smoke_runs_on_cpu(capsys):
    # bench/gpu_check.py's every section on tiny sizes (XLA attention only on a CPU).
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    gpu_check.main(["--smoke"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["errors"] == {} and result["skipped"] == []
    assert result["device_kind"] and result["peak_bf16_tflop_per_s"] is None
    assert result["model"]["extrapolated_to"] == 60 and len(result["model"]["depths"]) == 2
    assert 0.9 < result["flops_1_block"]["xla_lowered_over_analytic_as_counted"] < 1.2
    # the forward and each sampling kernel: both depths measured, the fit to 60 blocks positive
    forward, sampling = result["forward_1328"], result["sampling_2048"]
    assert sampling["batch"] == 4 and "cudnn" not in sampling and "rel_err_cudnn_vs_xla" not in sampling
    for row in (forward, sampling["xla"]):
        assert sorted(row["depths"]) == sorted(map(str, result["model"]["depths"]))
        assert all(d["s"] > 0 and d["compile_s"] > 0 and d["tflop_per_s"] > 0 and d["mfu"] is None
                   for d in row["depths"].values())
        assert "fixed_s" in row and row["per_block_s"] > 0 and row["predicted_60_blocks_s"] > 0
        assert row["tflop_per_s_60_blocks"] > 0 and row["mfu_60_blocks"] is None
        assert row["flop_60_blocks"] > max(d["flop"] for d in row["depths"].values())
    dmd = result["dmd2_lora_step"]
    assert dmd["finite"] and dmd["lora_rank"] == 64 and dmd["step_s"] > 0
    assert dmd["compile_s"]["generator"] > 0 and dmd["compile_s"]["critic"] > 0
    assert {"generator/generator_loss", "critic/loss"} <= set(dmd["first_losses"])
    toy = result["toy_family"]
    assert toy["finite"] and 0.0 <= toy["image_min"] < toy["image_max"] <= 1.0
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu_check.peak_flops("NVIDIA L40S") == 362e12
    assert gpu_check.peak_flops("NVIDIA L4") == 121e12 and gpu_check.peak_flops("Radeon") is None
    assert gpu_check.depth_fit({4: 1.0, 8: 1.5}, 1e12, 1e12)["predicted_60_blocks_s"] == 0.5 + 0.125 * 60


def all_heads_softmax(q, k, v, kv_mask):
    """The same attention as one differentiable jnp expression (autodiff's gradients)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if kv_mask is not None:
        logits = jnp.where(kv_mask[:, None, None, :], logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


@pytest.mark.parametrize("queries", [29, 7])  # joint sequence / a sequence-parallel shard of queries
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("heads_batched", [True, False])  # small logits: all heads at once; large: a loop
def test_xla_backward_recomputes_to_autodiff_gradients(queries, masked, heads_batched, monkeypatch):
    # (this session simulates 8 CPU devices, where heads are never batched: pretend there is one)
    monkeypatch.setattr(attention_module, "simulated_cpu_mesh", lambda: False)
    if not heads_batched:
        monkeypatch.setattr(attention_module, "ALL_HEADS_MAX_LOGITS_BYTES", 0)
    q, k, v = qkv((3, 29, 4, 16), seed=queries)
    q = q[:, :queries]
    weights = jax.random.normal(jax.random.key(9), q.shape)
    mask = padded_mask(3, 29) if masked else None

    def grads(fn):
        return jax.grad(lambda *qkv: jnp.sum(fn(*qkv, mask) * weights), argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(grads(_xla), grads(all_heads_softmax)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    # Masked keys get exactly zero key and value gradients.
    if masked:
        _, dk, dv = grads(_xla)
        assert not np.any(np.asarray(dk)[~np.asarray(mask)]) and not np.any(np.asarray(dv)[~np.asarray(mask)])


def test_xla_backward_stores_one_head_of_probabilities_not_all():
    # Autodiff of the per-head map would keep every head's (B, S, S) fp32 probabilities for the
    # backward: 8 heads x 8 MiB here. The custom VJP keeps the output and row log-sum-exps.
    batch, length, heads = 2, 1024, 8
    one_head_probs = batch * length * length * 4
    spec = jax.ShapeDtypeStruct((batch, length, heads, 64), jnp.float32)
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(_xla(q, k, v, None)), argnums=(0, 1, 2)))
    temps = step.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
    assert temps < 5 * one_head_probs, (temps, one_head_probs)
