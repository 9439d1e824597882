"""Sequence parallelism: one image's tokens split over the "sequence" mesh axis give the same
transformer outputs and samples as one device (fp32, max abs error <= 1e-5), and really split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwen_jax import flow
from qwen_jax.models import QwenImageTransformer, TransformerConfig
from qwen_jax.sampling import sampler
from qwen_jax.sharding import DEFAULT_RULES, make_mesh, partition_spec, place_state
from tiny_pipeline import tiny_pipeline_dir  # noqa: F401  (session fixture)

CFG = TransformerConfig.tiny()
GRID = (1, 4, 16)  # 64 image tokens: divisible by 8, not square (positions differ per axis)
TOL = 1e-5  # max abs error; outputs and latents are O(1)
MESHES = {"sequence8": dict(data=1, fsdp=1, sequence=8), "data2_sequence4": dict(data=2, fsdp=1, sequence=4)}


def random_model(cfg=CFG, seed=0):
    """(graphdef, state) of a model whose every parameter is random, drawn on the host (no compiles):
    kernels ~ N(0, 1/fan_in), RMSNorm scales around 1, biases non-zero, as in the torch references."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: QwenImageTransformer(cfg, rngs=nnx.Rngs(0))))
    leaves, treedef = jax.tree.flatten_with_path(nnx.to_pure_dict(abstract))
    rng = np.random.default_rng(seed)
    values = []
    for path, x in leaves:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        z = rng.standard_normal(x.shape).astype(x.dtype)
        if "norm" in name and name.endswith("scale"):
            values.append(1.0 + 0.3 * z)
        elif name.endswith("bias"):
            values.append(0.1 * z)
        else:
            values.append(z / np.sqrt(x.shape[-2]))
    nnx.replace_by_pure_dict(abstract, jax.tree.unflatten(treedef, [jnp.asarray(v) for v in values]))
    return graphdef, abstract


@pytest.fixture(scope="module")
def split_model():
    return random_model()


def inputs(batch=2, text_len=7):
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (batch, GRID[1] * GRID[2], CFG.in_channels))
    txt = jax.random.normal(k[1], (batch, text_len, CFG.joint_attention_dim))
    mask = jnp.array([[1] * text_len] + [[1] * 3 + [0] * (text_len - 3)] * (batch - 1), jnp.int32)  # padded text
    return x, txt, mask, jax.random.uniform(k[2], (batch,))


def forward(graphdef, grid=GRID):
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, (grid,)))


@pytest.mark.parametrize("name", sorted(MESHES))
def test_forward_matches_one_device_and_splits_tokens(split_model, name):
    graphdef, state = split_model
    x, txt, mask, t = inputs()
    fwd = forward(graphdef)
    want = fwd(state, x, txt, mask, t)
    mesh = make_mesh(**MESHES[name])
    with jax.set_mesh(mesh):
        placed = place_state(state, mesh)
        xs, txts, masks, _, _ = sampler.shard_inputs(mesh, x, txt, mask)
        got = fwd(placed, xs, txts, masks, t)
        hlo = fwd.lower(placed, xs, txts, masks, t).compile().as_text()
    assert float(jnp.max(jnp.abs(got - want))) <= TOL
    assert got.sharding.spec[1] == "sequence"  # the output stays split along image tokens
    assert "all-gather" in hlo  # the image keys/values gathered for attention
    # the weights are split over the sequence devices too (FSDP-style), not copied on each
    kernel = nnx.to_pure_dict(placed)["transformer_blocks"]["attn"]["to_q"]["kernel"]
    assert kernel.sharding.spec[1] == "sequence" and kernel.addressable_shards[0].data.shape[1] == CFG.inner_dim // 8 * (
        2 if name == "data2_sequence4" else 1)


def test_samplers_match_one_device(split_model):
    graphdef, state = split_model
    x, txt, mask, _ = inputs()
    neg, neg_mask = jax.random.normal(jax.random.key(2), txt.shape), jnp.ones(mask.shape, jnp.int32)
    student = sampler.student_sigmas()  # 2 steps, no CFG
    teacher = sampler.teacher_sigmas(2, GRID[1] * GRID[2])  # 2 steps of true CFG (a batch of 4)

    def run(sigmas, *args, **kw):
        return sampler.sample(graphdef, kw.pop("state", state), args[0], jnp.asarray(sigmas),
                              jnp.asarray(flow.model_time(sigmas[:-1])), *args[1:], img_shapes=(GRID,), **kw)

    want = run(student, x, txt, mask), run(teacher, x, txt, mask, neg, neg_mask, jnp.float32(4.0))
    mesh = make_mesh(**MESHES["data2_sequence4"])
    with jax.set_mesh(mesh):
        xs, txts, masks, negs, neg_masks = sampler.shard_inputs(mesh, x, txt, mask, neg, neg_mask)
        placed = place_state(state, mesh)
        got = (run(student, xs, txts, masks, state=placed),
               run(teacher, xs, txts, masks, negs, neg_masks, jnp.float32(4.0), state=placed))
    for g, w in zip(got, want):
        assert float(jnp.max(jnp.abs(g - w))) <= TOL
        assert tuple(g.sharding.spec) == ("data", "sequence")


def test_abstract_inputs_lower_with_sequence_sharding(split_model):
    # How a planner compiles the sampler for a mesh without real data: ShapeDtypeStructs with shardings.
    graphdef, state = split_model
    mesh = make_mesh(**MESHES["sequence8"])
    latents, text, mask = (1, GRID[1] * GRID[2], CFG.in_channels), (1, 64, CFG.joint_attention_dim), (1, 64)

    def abstract(shape, sharding=None, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    params = jax.tree.map(lambda p: abstract(p.shape, p.sharding, p.dtype), place_state(state, mesh))
    with jax.set_mesh(mesh):
        lowered = sampler.sample.lower(
            graphdef, params, abstract(latents, sampler.latents_sharding(mesh, latents)), abstract((3,)),
            abstract((2,)), abstract(text, sampler.text_sharding(mesh, text)),
            abstract(mask, sampler.text_sharding(mesh, mask), jnp.int32), img_shapes=(GRID,))
    assert "all_gather" in lowered.as_text()
    assert lowered.compile().output_shardings.spec[1] == "sequence"


def test_token_count_that_does_not_divide_is_explained(split_model):
    graphdef, state = split_model
    x, txt, mask, t = inputs()
    x = x[:, :15]  # a 3x5 grid
    message = "15 image tokens cannot be split over the 'sequence' mesh axis of size 8"
    with jax.set_mesh(make_mesh(**MESHES["sequence8"])), pytest.raises(ValueError, match=message):
        forward(graphdef, (1, 3, 5))(state, x, txt, mask, t)
    from qwen_jax.sample import sequence_mesh

    with pytest.raises(ValueError, match="size 8"):
        sequence_mesh(8, 15)


def test_mesh_with_sequence_axis():
    assert "sequence" not in make_mesh().shape  # the default mesh keeps its three axes
    assert dict(make_mesh(data=2, fsdp=1, sequence=-1).shape) == {"data": 2, "fsdp": 1, "sequence": 4, "tensor": 1}
    with pytest.raises(ValueError, match="'sequence': 3"):
        make_mesh(fsdp=1, sequence=3)
    # weights: "embed" over fsdp and sequence jointly; without a sequence axis, fsdp alone
    axes, shape = ("layers", "embed", "heads"), (2, 64, 64)
    assert partition_spec(axes, shape, make_mesh(fsdp=4, sequence=2), DEFAULT_RULES) == P(None, ("fsdp", "sequence"), "tensor")
    assert partition_spec(axes, shape, make_mesh(fsdp=8), DEFAULT_RULES) == P(None, "fsdp", "tensor")
    assert partition_spec(axes, (2, 12, 64), make_mesh(fsdp=4, sequence=2), DEFAULT_RULES)[1] == "fsdp"  # 8 does not divide 12


def test_pipeline_on_a_sequence_mesh_gives_the_same_images(tiny_pipeline_dir):  # noqa: F811
    from qwen_jax.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(tiny_pipeline_dir)
    mesh = make_mesh(**MESHES["data2_sequence4"])
    sharded = Pipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, mesh=mesh)
    sharded.encode_text = pipe.encode_text  # the same compiled text encoder: only sampling differs
    px = pipe.pixels_per_token
    call = dict(height=GRID[1] * px, width=GRID[2] * px, num_steps=2, guidance=1.0, seed=3)
    want = pipe(["a fox", "a red cat in the snow"], **call).array
    np.testing.assert_allclose(sharded(["a fox", "a red cat in the snow"], **call).array, want, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="cannot be split"):
        sharded(["a fox"], height=3 * px, width=5 * px, num_steps=2, guidance=1.0)
