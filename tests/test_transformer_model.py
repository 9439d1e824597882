"""Model-level properties: scan depth-independence, remat policies, sharding, bad calls."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from qwen_jax import sharding
from qwen_jax.models import QwenImageTransformer, TransformerConfig
from qwen_jax.models.remat import REMAT_POLICIES
from qwen_jax.pytree import flatten_params

CFG = TransformerConfig.tiny()
SHAPES = ((1, 4, 6),)


def inputs(batch=2, cfg=CFG):
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (batch, 24, cfg.in_channels))
    txt = jax.random.normal(k[1], (batch, 7, cfg.joint_attention_dim))
    mask = jnp.array([[1] * 7] + [[1] * 3 + [0] * 4] * (batch - 1))
    return x, txt, mask, jax.random.uniform(k[2], (batch,))


def test_compiled_program_does_not_grow_with_depth():
    def hlo(layers):
        graphdef, state = nnx.split(QwenImageTransformer(CFG.replace(num_layers=layers), rngs=nnx.Rngs(0)))
        fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, SHAPES))
        return fwd.lower(state, *inputs()).as_text()

    two, sixteen = hlo(2), hlo(16)
    # One scanned block body either way: the same number of matmuls in the program.
    assert two.count("dot_general") == sixteen.count("dot_general") > 0
    assert abs(len(two) - len(sixteen)) < 0.02 * len(two)


def test_remat_policies_give_the_same_gradients():
    x, txt, mask, t = inputs()

    def grads(remat):
        model = QwenImageTransformer(CFG.replace(remat=remat), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p)(x, txt, mask, t, SHAPES) ** 2)

        return jax.jit(jax.grad(loss))(params)

    reference = grads("none")
    for policy in sorted(set(REMAT_POLICIES) - {"none"}):
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(grads(policy))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=policy)


def test_sharded_forward_matches_single_device():
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    model = QwenImageTransformer(CFG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    flat = flatten_params(state)
    shardings = sharding.param_shardings({p: v.shape for p, v in flat.items()}, mesh)
    assert shardings[("transformer_blocks", "img_mlp", "proj_in", "kernel")].spec == PartitionSpec(None, "fsdp", "tensor")
    assert shardings[("txt_norm", "scale")].spec == PartitionSpec("fsdp")
    sharded = sharding.place_state(state, mesh)
    x, txt, mask, t = inputs(batch=4)
    data = NamedSharding(mesh, PartitionSpec("fsdp"))
    fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, SHAPES))
    out = fwd(sharded, *(jax.device_put(a, data) for a in (x, txt, mask, t)))
    np.testing.assert_allclose(out, fwd(state, x, txt, mask, t), rtol=1e-5, atol=1e-5)


def test_abstract_real_model_costs_no_memory():
    from qwen_jax.models.transformer import abstract_params, count_params

    params = abstract_params(TransformerConfig.qwen_image(param_dtype="bfloat16"))
    assert all(isinstance(p, jax.ShapeDtypeStruct) and p.dtype == jnp.bfloat16 for p in params.values())
    assert params[("transformer_blocks", "img_mod", "kernel")].shape == (60, 3072, 18432)
    assert count_params(TransformerConfig.qwen_image()) == 20_430_401_088


def test_unrolled_scan_gives_the_same_outputs_gradients_and_hidden_states():
    x, txt, mask, t = inputs()
    cfg = CFG.replace(num_layers=3)

    def run(unroll, grad):
        model = QwenImageTransformer(cfg.replace(scan_unroll=unroll), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            out, hidden = nnx.merge(graphdef, p)(x, txt, mask, t, SHAPES, return_hidden_states_at=(0, 2))
            return jnp.mean(out ** 2) + jnp.mean(hidden[1] ** 2), (out, hidden)

        return jax.jit(jax.grad(loss, has_aux=True) if grad else loss)(params)

    # Full unroll with gradients; a partial one (3 blocks in iterations of 2) forward only.
    for unroll, grad in ((3, True), (2, False)):
        for a, b in zip(jax.tree.leaves(run(1, grad)), jax.tree.leaves(run(unroll, grad))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"scan_unroll={unroll}")
    with pytest.raises(ValueError, match="scan_unroll"):
        TransformerConfig.tiny(scan_unroll=0)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_cpu_dense_backward_matches_autodiff(dtype, tol, monkeypatch):
    from qwen_jax.models import layers
    from qwen_jax.models.layers import dense_dot_general

    # this session simulates 8 CPU devices, where the custom backward is off: pretend there is one
    monkeypatch.setattr(layers, "simulated_cpu_mesh", lambda: False)
    assert jax.make_jaxpr(lambda x, w: dense_dot_general(x, w, (((1,), (0,)), ((), ()))))(
        jnp.ones((2, 3)), jnp.ones((3, 4))).eqns[0].primitive.name.startswith("custom_vjp")

    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (3, 5, 24), dtype)
    w = jax.random.normal(k[1], (24, 40), dtype)
    r = jax.random.normal(k[2], (3, 5, 40), jnp.float32)
    plain = (((2,), (0,)), ((), ()))

    def loss(dot, x, w):
        return jnp.sum(dot(x, w, plain).astype(jnp.float32) * r)

    want = jax.grad(functools.partial(loss, jax.lax.dot_general), argnums=(0, 1))(x, w)
    got = jax.jit(jax.grad(functools.partial(loss, dense_dot_general), argnums=(0, 1)))(x, w)
    for a, b in zip(want, got):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_bad_calls_and_configs_are_explained():
    model = QwenImageTransformer(CFG, rngs=nnx.Rngs(0))
    x, txt, mask, t = inputs()
    with pytest.raises(ValueError, match="img_shapes"):
        model(x, txt, mask, t, ((1, 5, 6),))
    with pytest.raises(ValueError, match="return_hidden_states_at"):
        model(x, txt, mask, t, SHAPES, return_hidden_states_at=(2,))
    with pytest.raises(ValueError, match="sum\\(axes_dims_rope\\)"):
        TransformerConfig.tiny(axes_dims_rope=(8, 8, 8))
    with pytest.raises(ValueError, match="attention"):
        TransformerConfig.tiny(attention="flash")
    with pytest.raises(ValueError, match="zero_cond_t"):
        TransformerConfig.from_diffusers_config({**CFG.to_diffusers_config(), "zero_cond_t": True})
    with pytest.raises(ValueError, match="cudnn"):
        QwenImageTransformer(CFG.replace(attention="cudnn"), rngs=nnx.Rngs(0))(x, txt, mask, t, SHAPES)


def test_mesh_from_sizes_with_fill():
    mesh = sharding.make_mesh(data=2, fsdp=-1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(sharding.make_mesh(tensor=2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert sharding.batch_sharding(mesh, 3).spec == PartitionSpec(("data", "fsdp"), None, None)
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.make_mesh(data=3)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.make_mesh(data=2, fsdp=2, tensor=1)
