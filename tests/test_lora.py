"""LoRA: adapters start as a no-op, only they train, the base is shared and untouched, and the
merged and PEFT exports are exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qwen_jax import load_transformer, save_transformer
from qwen_jax.conversion.lora import lora_state_dict, save_lora
from qwen_jax.conversion.safetensors_io import SafetensorsFile, read_tensor
from qwen_jax.models import QwenImageTransformer, TransformerConfig
from qwen_jax.models.transformer import merge_lora
from qwen_jax.pytree import flatten_params
from qwen_jax.sharding import make_mesh, param_shardings
from test_transformer_model import SHAPES, inputs

CFG = TransformerConfig.tiny(lora_rank=4, lora_alpha=8.0)


def trained_adapters(model, steps=3):
    """A few Adam steps on the adapters only; returns (model, base params before, after)."""
    x, txt, mask, t = inputs()
    graphdef, adapters, base, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    opt = optax.adam(1e-2)
    opt_state = opt.init(adapters)

    @jax.jit
    def step(adapters, opt_state, base):
        def loss(a):
            return jnp.mean(nnx.merge(graphdef, a, base, rest)(x, txt, mask, t, SHAPES) ** 2)

        value, grads = jax.value_and_grad(loss)(adapters)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(adapters, updates), opt_state, value

    before = jax.tree.map(np.array, base)
    for _ in range(steps):
        adapters, opt_state, _ = step(adapters, opt_state, base)
    return nnx.merge(graphdef, adapters, base, rest), before, base


def test_adapters_start_as_no_op_and_cover_attn_mlp_mod():
    lora = QwenImageTransformer(CFG, rngs=nnx.Rngs(0))
    plain = merge_lora(lora)  # B = 0: the merged kernels are the base kernels
    assert plain.config.lora_rank == 0
    x, txt, mask, t = inputs()
    np.testing.assert_allclose(lora(x, txt, mask, t, SHAPES), plain(x, txt, mask, t, SHAPES), rtol=1e-6, atol=1e-6)
    adapted = {p[:-1] for p in flatten_params(nnx.state(lora, nnx.LoRAParam))}
    assert len(adapted) == 14 and all(p[0] == "transformer_blocks" for p in adapted)
    assert ("transformer_blocks", "img_mod") in adapted and ("transformer_blocks", "txt_mlp", "proj_out") in adapted
    with pytest.raises(ValueError, match="lora_targets"):
        TransformerConfig.tiny(lora_rank=2, lora_targets=("embed",))


def test_only_adapters_train_and_the_base_is_bit_identical():
    model, before, base = trained_adapters(QwenImageTransformer(CFG, rngs=nnx.Rngs(0)))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    b_factors = [v for p, v in flatten_params(nnx.state(model, nnx.LoRAParam)).items() if p[-1] == "lora_b"]
    assert all(float(jnp.abs(v).max()) > 0 for v in b_factors)


def test_two_adapter_sets_share_one_base():
    model = QwenImageTransformer(CFG, rngs=nnx.Rngs(0))
    trained, _, _ = trained_adapters(model)
    graphdef, adapters_1, base, rest = nnx.split(trained, nnx.LoRAParam, nnx.Param, ...)
    _, adapters_0, _, _ = nnx.split(QwenImageTransformer(CFG, rngs=nnx.Rngs(0)), nnx.LoRAParam, nnx.Param, ...)
    x, txt, mask, t = inputs()
    one = nnx.merge(graphdef, adapters_1, base, rest)(x, txt, mask, t, SHAPES)
    zero = nnx.merge(graphdef, adapters_0, base, rest)(x, txt, mask, t, SHAPES)
    assert float(jnp.abs(one - zero).max()) > 1e-4  # same base arrays, different adapters


def test_merged_export_equals_base_plus_scaled_ba(tmp_path):
    model, _, _ = trained_adapters(QwenImageTransformer(CFG, rngs=nnx.Rngs(0)))
    flat = flatten_params(nnx.state(model, nnx.Param))
    merged = merge_lora(model)
    assert merged.config.lora_rank == 0
    merged_flat = flatten_params(nnx.state(merged, nnx.Param))
    k = ("transformer_blocks", "attn", "to_q")
    want = flat[k + ("kernel",)] + (8.0 / 4) * jnp.einsum("lir,lro->lio", flat[k + ("lora_a",)], flat[k + ("lora_b",)])
    np.testing.assert_allclose(merged_flat[k + ("kernel",)], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(merged_flat[("img_in", "kernel")], flat[("img_in", "kernel")])
    x, txt, mask, t = inputs()
    np.testing.assert_allclose(merged(x, txt, mask, t, SHAPES), model(x, txt, mask, t, SHAPES), rtol=1e-5, atol=1e-5)

    save_transformer(model, tmp_path / "merged")  # written merged, loads as a plain model
    reloaded = load_transformer(tmp_path / "merged")
    np.testing.assert_allclose(reloaded(x, txt, mask, t, SHAPES), merged(x, txt, mask, t, SHAPES), rtol=1e-6, atol=1e-6)

    # adapters on top of a stored base, sharded like their kernels
    fresh = load_transformer(tmp_path / "merged", lora_rank=4, mesh=make_mesh(fsdp=2, tensor=4))
    np.testing.assert_allclose(fresh(x, txt, mask, t, SHAPES), merged(x, txt, mask, t, SHAPES), rtol=1e-5, atol=1e-5)
    a = fresh.transformer_blocks.attn.to_q.lora_a[...]
    assert a.sharding.spec == param_shardings({("transformer_blocks", "attn", "to_q", "lora_a"): a.shape},
                                              a.sharding.mesh)[("transformer_blocks", "attn", "to_q", "lora_a")].spec
    assert tuple(a.sharding.spec) == (None, "fsdp", None)


def test_peft_export_names_shapes_and_scale(tmp_path):
    model, _, _ = trained_adapters(QwenImageTransformer(CFG, rngs=nnx.Rngs(0)))
    sd = lora_state_dict(model)
    assert len(sd) == 2 * 14 * CFG.num_layers
    a = sd["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"]
    b = sd["transformer.transformer_blocks.1.img_mlp.net.0.proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (256, 4)
    assert "transformer.transformer_blocks.0.img_mod.1.lora_A.weight" in sd
    # W_torch + B @ A (scale folded into B) equals the merged kernel, transposed
    flat = flatten_params(nnx.state(model, nnx.Param))
    merged = flatten_params(nnx.state(merge_lora(model), nnx.Param))
    k = ("transformer_blocks", "attn", "to_k")
    w = np.asarray(flat[k + ("kernel",)][0]).T
    delta = sd["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] @ sd[
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight"]
    np.testing.assert_allclose(w + delta, np.asarray(merged[k + ("kernel",)][0]).T, rtol=1e-5, atol=1e-6)
    save_lora(model, tmp_path / "lora.safetensors")
    stored = SafetensorsFile(tmp_path / "lora.safetensors").tensors
    assert set(stored) == set(sd)
    np.testing.assert_array_equal(read_tensor(stored["transformer.transformer_blocks.1.attn.to_q.lora_A.weight"]), a)


def test_adapters_follow_tensor_parallelism_and_fall_back_to_fsdp():
    """Every LoRA factor is split: over "tensor" like its kernel where the mesh has it, else
    over "fsdp" (replicated adapters would cost each device a full copy per adapter set)."""
    shapes = {p: v.shape for p, v in flatten_params(nnx.state(QwenImageTransformer(CFG, rngs=nnx.Rngs(0)),
                                                                    nnx.LoRAParam)).items()}
    a, b = ("transformer_blocks", "img_mlp", "proj_out", "lora_a"), ("transformer_blocks", "img_mod", "lora_b")
    fsdp_only = param_shardings(shapes, make_mesh(fsdp=8))
    assert all("fsdp" in tuple(s.spec) for s in fsdp_only.values())
    assert tuple(fsdp_only[a].spec) == (None, "fsdp", None) and tuple(fsdp_only[b].spec) == (None, None, "fsdp")
    with_tensor = param_shardings(shapes, make_mesh(fsdp=2, tensor=4))
    assert tuple(with_tensor[a].spec) == (None, "tensor", None) and tuple(with_tensor[b].spec) == (None, None, "tensor")
    assert tuple(with_tensor[("transformer_blocks", "attn", "to_q", "lora_a")].spec) == (None, "fsdp", None)
