"""The real 20B configuration, checked without allocating it."""

import torch
from diffusers import QwenImageTransformer2DModel

from qwen_jax.conversion import transformer_keys as keymap
from qwen_jax.models import TransformerConfig
from qwen_jax.models.transformer import abstract_params, count_params


def test_meta_diffusers_keys_map_exactly_onto_the_abstract_flax_tree():
    with torch.device("meta"):
        reference = QwenImageTransformer2DModel()  # diffusers' defaults are the released model
    torch_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert len(torch_shapes) == 1933

    cfg = TransformerConfig.from_diffusers_config(dict(reference.config))
    assert cfg == TransformerConfig.qwen_image()
    assert sorted(torch_shapes) == sorted(keymap.diffusers_keys(cfg))

    # Apply the converter's key map and assemble the implied Flax tree: path -> stacked shape.
    implied: dict[tuple[str, ...], dict] = {}
    for key, shape in torch_shapes.items():
        m = keymap.map_key(key)
        assert m is not None, key
        assert keymap.torch_key(m.flax_path, m.layer) == key
        implied.setdefault(m.flax_path, {})[m.layer] = m.flax_shape(shape)
    implied_shapes = {}
    for path, slices in implied.items():
        if None in slices:
            assert len(slices) == 1
            implied_shapes[path] = slices[None]
        else:
            assert sorted(slices) == list(range(cfg.num_layers)) and len(set(slices.values())) == 1
            implied_shapes[path] = (cfg.num_layers,) + slices[0]

    flax_shapes = {path: tuple(s.shape) for path, s in abstract_params(cfg).items()}
    assert implied_shapes == flax_shapes
    assert count_params(cfg) == 20_430_401_088
    assert sum(v.numel() for v in reference.state_dict().values()) == 20_430_401_088
