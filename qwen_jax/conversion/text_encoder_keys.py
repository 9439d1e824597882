"""The map between Qwen2.5-VL checkpoint keys and the Flax text-encoder tree.

Two on-disk namings exist for the same tensors, and both are accepted:
  current (transformers >= 4.52 saves this):  model.language_model.{embed_tokens,layers.{i},norm}.*
                                               model.visual.*, lm_head.weight
  legacy (most hub files, Qwen-Image's too):   model.{embed_tokens,layers.{i},norm}.*
                                               visual.*, lm_head.weight
The vision tower and lm_head are deliberately skipped (Qwen-Image only reads hidden states).
Layer tensors `...layers.{i}.<module>.<tensor>` all go to one stacked leaf under `layers`, at
index i of its leading axis. Linear weights are transposed ((out, in) -> (in, out) kernels).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from qwen_jax.conversion.plan import SKIP, KeyMapping, KeyTable, Plan, assemble_leaf, plan_conversion
from qwen_jax.models.text_encoder import TextEncoderConfig, abstract_params
from qwen_jax.pytree import unflatten_params

LAYERS = "layers"
PREFIX = "model.language_model."  # the naming used in error messages
# transformers module (inside a layer) -> (Flax module path, has bias)
LAYER_LINEARS = {
    "self_attn.q_proj": True,
    "self_attn.k_proj": True,
    "self_attn.v_proj": True,
    "self_attn.o_proj": False,
    "mlp.gate_proj": False,
    "mlp.up_proj": False,
    "mlp.down_proj": False,
}
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")

_SKIPPED = re.compile(r"^(model\.)?visual\.|^lm_head\.|rotary_emb\.inv_freq$")
_BODY = re.compile(r"^model\.(?:language_model\.)?(?!visual\.)(.+)$")
_LAYER = re.compile(rf"^{LAYERS}\.(\d+)\.(.+)\.(weight|bias)$")


def map_key(torch_key: str) -> KeyMapping | str | None:
    """The Flax location of a Qwen2.5-VL key; SKIP for vision/lm_head; None when unknown."""
    if _SKIPPED.search(torch_key):
        return SKIP
    body = _BODY.match(torch_key)
    if not body:
        return None
    name = body.group(1)
    if name == "embed_tokens.weight":
        return KeyMapping(torch_key, ("embed_tokens", "embedding"))
    if name == "norm.weight":
        return KeyMapping(torch_key, ("norm", "scale"))
    m = _LAYER.match(name)
    if not m:
        return None
    layer, module, tensor = int(m.group(1)), m.group(2), m.group(3)
    path = (LAYERS,) + tuple(module.split("."))
    if module in LAYER_LINEARS and (tensor == "weight" or LAYER_LINEARS[module]):
        if tensor == "weight":
            return KeyMapping(torch_key, path + ("kernel",), layer, "linear")
        return KeyMapping(torch_key, path + ("bias",), layer)
    if module in LAYER_NORMS and tensor == "weight":
        return KeyMapping(torch_key, path + ("scale",), layer)
    return None


def slot_name(flax_path: tuple[str, ...], layer: int | None) -> str:
    """The (current-naming) checkpoint key expected for one Flax slot."""
    module, leaf = flax_path[:-1], flax_path[-1]
    tensor = "bias" if leaf == "bias" else "weight"
    if module and module[0] == LAYERS:
        return f"{PREFIX}{LAYERS}.{layer}.{'.'.join(module[1:])}.{tensor}"
    return f"{PREFIX}{'.'.join(module)}.{tensor}"


TABLE = KeyTable(map_key=map_key, slot_name=slot_name, stacked=(LAYERS,))


def plan_text_encoder(cfg: TextEncoderConfig, shapes: Mapping[str, tuple[int, ...]]) -> Plan:
    """Matches source keys {key: torch shape} to the Flax tree of `cfg`; raises on any mismatch."""
    expected = {path: tuple(s.shape) for path, s in abstract_params(cfg).items()}
    return plan_conversion(expected, shapes, TABLE)


def text_encoder_state_dict_to_params(
    cfg: TextEncoderConfig, state_dict: Mapping[str, np.ndarray], dtype=None
) -> dict:
    """In-memory conversion of {checkpoint key: numpy array} to the nested Flax params.

    dtype: output dtype (default: each tensor's own). Vision and lm_head tensors are ignored.
    """
    plan = plan_text_encoder(cfg, {k: tuple(v.shape) for k, v in state_dict.items()})
    return unflatten_params({leaf.path: assemble_leaf(leaf, state_dict.__getitem__, dtype) for leaf in plan.leaves})
