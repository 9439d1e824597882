"""The Flax transformer computes what diffusers' QwenImageTransformer2DModel computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from reference import jax_twin, rel_err, to_numpy, torch_transformer

# (diffusers config overrides, batch, text lengths per sample (padded to the max), img_shapes)
CASES = {
    # batch 3, texts of 9/5/1 real tokens padded to 9, with a hole in the middle of one mask
    "tiny_padded_batch3": (dict(), 3, "mixed", [(1, 4, 6)]),
    # non-square token grid (5 x 3), head_dim 48, three heads, three layers, no mask
    "nonsquare_hd48": (dict(attention_head_dim=48, num_attention_heads=3, axes_dims_rope=(8, 20, 20),
                            num_layers=3), 2, None, [(1, 5, 3)]),
    # head_dim 64, two images per sample (edit-style img_shapes), padded text
    "two_images_hd64": (dict(attention_head_dim=64, num_attention_heads=2, axes_dims_rope=(16, 24, 24),
                             in_channels=8, out_channels=2, joint_attention_dim=40), 2, "tail",
                        [[(1, 3, 4), (1, 2, 2)]] * 2),
}


def make_inputs(tm, batch, masking, img_shapes, n_txt=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    shapes = img_shapes[0] if isinstance(img_shapes[0], list) else [img_shapes[0]]
    n_img = sum(f * h * w for f, h, w in shapes)
    x = torch.randn(batch, n_img, tm.config.in_channels, generator=g)
    txt = torch.randn(batch, n_txt, tm.config.joint_attention_dim, generator=g)
    t = torch.rand(batch, generator=g)
    mask = None
    if masking == "mixed":
        mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1, 0, 1, 1, 0, 0, 0, 0, 0]][:batch])
    elif masking == "tail":
        mask = torch.tensor([[1] * n_txt] + [[1] * 4 + [0] * (n_txt - 4)] * (batch - 1))
    return x, txt, mask, t


def run_both(tm, model, x, txt, mask, t, img_shapes):
    with torch.no_grad():
        ref = tm(x, txt, mask, t, img_shapes).sample
    j = lambda a: None if a is None else jnp.asarray(to_numpy(a))  # noqa: E731
    out = model(j(x), j(txt), j(mask), j(t), img_shapes)
    return np.asarray(out.astype(jnp.float32)), to_numpy(ref)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_parity(name):
    config, batch, masking, img_shapes = CASES[name]
    tm = torch_transformer(**config)
    model = jax_twin(tm)
    out, ref = run_both(tm, model, *make_inputs(tm, batch, masking, img_shapes), img_shapes * (1 if isinstance(img_shapes[0], list) else batch))
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5


def test_fp32_parity_width_768():
    config = dict(attention_head_dim=64, num_attention_heads=12, axes_dims_rope=(16, 24, 24), num_layers=2,
                  in_channels=64, out_channels=16, joint_attention_dim=256)
    tm = torch_transformer(**config)
    model = jax_twin(tm)
    x, txt, mask, t = make_inputs(tm, 2, "tail", [(1, 8, 12)], n_txt=20)
    out, ref = run_both(tm, model, x, txt, mask, t, [(1, 8, 12)] * 2)
    assert rel_err(out, ref) <= 1e-4


def test_bf16_parity():
    tm = torch_transformer(dtype=torch.bfloat16, attention_head_dim=64, axes_dims_rope=(16, 24, 24))
    model = jax_twin(tm, param_dtype="bfloat16", dtype="bfloat16")
    x, txt, mask, t = make_inputs(tm, 3, "mixed", [(1, 4, 6)])
    x, txt = x.bfloat16(), txt.bfloat16()
    out, ref = run_both(tm, model, x, txt, mask, t, [(1, 4, 6)] * 3)
    assert model.transformer_blocks.attn.to_q.kernel[...].dtype == jnp.bfloat16
    assert rel_err(out, ref) <= 2e-2


def test_padded_text_is_ignored():
    tm = torch_transformer()
    model = jax_twin(tm)
    x, txt, mask, t = (jnp.asarray(to_numpy(a)) for a in make_inputs(tm, 3, "mixed", [(1, 4, 6)]))
    noisy = jnp.where(mask[..., None].astype(bool), txt, 100.0 * jax.random.normal(jax.random.key(0), txt.shape))
    a = model(x, txt, mask, t, [(1, 4, 6)])
    b = model(x, noisy, mask, t, [(1, 4, 6)])
    assert float(jnp.max(jnp.abs(a - b))) == 0.0
    c = model(x, noisy, None, t, [(1, 4, 6)])  # without the mask the padding matters
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_block_hidden_states_match_diffusers_blocks():
    tm = torch_transformer(num_layers=3)
    model = jax_twin(tm)
    x, txt, mask, t = make_inputs(tm, 3, "mixed", [(1, 4, 6)])
    captured = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, to_numpy(o[1])))
             for n, blk in enumerate(tm.transformer_blocks)]
    with torch.no_grad():
        ref = tm(x, txt, mask, t, [(1, 4, 6)] * 3).sample
    for h in hooks:
        h.remove()
    j = lambda a: jnp.asarray(to_numpy(a))  # noqa: E731
    out, hidden = model(j(x), j(txt), j(mask), j(t), [(1, 4, 6)] * 3, return_hidden_states_at=(2, 0))
    assert rel_err(out, to_numpy(ref)) <= 1e-5
    assert rel_err(hidden[0], captured[2]) <= 1e-5 and rel_err(hidden[1], captured[0]) <= 1e-5


def test_jitted_split_merge_forward_matches_eager():
    tm = torch_transformer()
    model = jax_twin(tm)
    x, txt, mask, t = (jnp.asarray(to_numpy(a)) for a in make_inputs(tm, 3, "mixed", [(1, 4, 6)]))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, ((1, 4, 6),)))
    np.testing.assert_allclose(fwd(state, x, txt, mask, t), model(x, txt, mask, t, [(1, 4, 6)]), rtol=1e-6, atol=1e-6)
