"""The declarative map between diffusers transformer keys and the Flax parameter tree.

Every diffusers tensor `<module>.<weight|bias>` corresponds to one Flax leaf path (a tuple of
names). Block tensors `transformer_blocks.{i}.<module>...` all go to one stacked leaf, at index
i of its leading layer axis. Linear weights are stored transposed ((out, in) in torch, a
(in, out) kernel in Flax); everything else keeps its shape.
"""

from __future__ import annotations

import re

from qwen_jax.conversion.plan import KeyMapping, KeyTable
from qwen_jax.models.config import TransformerConfig

# diffusers module -> Flax module path, for Linears (weight+bias) and RMSNorms (weight).
TOP_LINEARS = {
    "img_in": "img_in",
    "txt_in": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2": "time_text_embed.timestep_embedder.linear_2",
    "norm_out.linear": "norm_out.linear",
    "proj_out": "proj_out",
}
TOP_NORMS = {"txt_norm": "txt_norm"}
BLOCK_LINEARS = {
    "img_mod.1": "img_mod",
    "txt_mod.1": "txt_mod",
    "attn.to_q": "attn.to_q",
    "attn.to_k": "attn.to_k",
    "attn.to_v": "attn.to_v",
    "attn.add_q_proj": "attn.add_q_proj",
    "attn.add_k_proj": "attn.add_k_proj",
    "attn.add_v_proj": "attn.add_v_proj",
    "attn.to_out.0": "attn.to_out",
    "attn.to_add_out": "attn.to_add_out",
    "img_mlp.net.0.proj": "img_mlp.proj_in",
    "img_mlp.net.2": "img_mlp.proj_out",
    "txt_mlp.net.0.proj": "txt_mlp.proj_in",
    "txt_mlp.net.2": "txt_mlp.proj_out",
}
BLOCK_NORMS = {
    "attn.norm_q": "attn.norm_q",
    "attn.norm_k": "attn.norm_k",
    "attn.norm_added_q": "attn.norm_added_q",
    "attn.norm_added_k": "attn.norm_added_k",
}
BLOCKS = "transformer_blocks"
_BLOCK_KEY = re.compile(rf"^{BLOCKS}\.(\d+)\.(.+)$")


def _leaf(module_key: str, tensor: str, linears: dict, norms: dict):
    """(flax path, transform) for `<module_key>.<tensor>`, or None when not a known tensor."""
    if module_key in linears and tensor in ("weight", "bias"):
        leaf, transform = ("kernel", "linear") if tensor == "weight" else ("bias", "identity")
        return tuple(linears[module_key].split(".")) + (leaf,), transform
    if module_key in norms and tensor == "weight":
        return tuple(norms[module_key].split(".")) + ("scale",), "identity"
    return None


def map_key(torch_key: str) -> KeyMapping | None:
    """The Flax location of a diffusers key; None when the key is not part of the model."""
    module_key, _, tensor = torch_key.rpartition(".")
    m = _BLOCK_KEY.match(torch_key)
    if m:
        block_module, _, tensor = m.group(2).rpartition(".")
        found = _leaf(block_module, tensor, BLOCK_LINEARS, BLOCK_NORMS)
        return KeyMapping(torch_key, (BLOCKS,) + found[0], int(m.group(1)), found[1]) if found else None
    found = _leaf(module_key, tensor, TOP_LINEARS, TOP_NORMS)
    return KeyMapping(torch_key, found[0], None, found[1]) if found else None


def diffusers_keys(cfg: TransformerConfig) -> list[str]:
    """Every key of a diffusers state dict for this architecture, in diffusers' order."""
    keys = []

    def add(prefix, linears, norms):
        for module in linears:
            keys.extend([f"{prefix}{module}.weight", f"{prefix}{module}.bias"])
        keys.extend(f"{prefix}{module}.weight" for module in norms)

    add("", {k: v for k, v in TOP_LINEARS.items() if k.startswith("time_text_embed")}, TOP_NORMS)
    add("", {k: v for k, v in TOP_LINEARS.items() if k in ("img_in", "txt_in")}, {})
    for i in range(cfg.num_layers):
        add(f"{BLOCKS}.{i}.", BLOCK_LINEARS, BLOCK_NORMS)
    add("", {k: v for k, v in TOP_LINEARS.items() if k in ("norm_out.linear", "proj_out")}, {})
    return keys


def _reverse(table: dict) -> dict[tuple[str, ...], str]:
    return {tuple(flax.split(".")): torch for torch, flax in table.items()}


_FLAX_TO_TORCH_TOP = _reverse({**TOP_LINEARS, **TOP_NORMS})
_FLAX_TO_TORCH_BLOCK = _reverse({**BLOCK_LINEARS, **BLOCK_NORMS})


def torch_key(flax_path: tuple[str, ...], layer: int | None) -> str:
    """The diffusers key of one Flax leaf (at `layer` of the stack for block parameters)."""
    module, leaf = flax_path[:-1], flax_path[-1]
    tensor = {"kernel": "weight", "bias": "bias", "scale": "weight"}[leaf]
    if module and module[0] == BLOCKS:
        return f"{BLOCKS}.{layer}.{_FLAX_TO_TORCH_BLOCK[module[1:]]}.{tensor}"
    return f"{_FLAX_TO_TORCH_TOP[module]}.{tensor}"


TABLE = KeyTable(
    map_key=lambda key: map_key(key),
    slot_name=lambda path, layer: torch_key(path, layer),
    stacked=(BLOCKS,),
    unsupported={"__index_timestep_zero__": "a zero_cond_t (Qwen-Image-Edit-2511) checkpoint"},
)


def torch_keys_for(flax_path: tuple[str, ...], shape) -> list[tuple[int | None, str, bool]]:
    """(layer, diffusers key, transpose) for every tensor stored in one Flax leaf of `shape`."""
    transpose = flax_path[-1] == "kernel"
    if flax_path[0] == BLOCKS:
        return [(i, torch_key(flax_path, i), transpose) for i in range(shape[0])]
    return [(None, torch_key(flax_path, None), transpose)]
