"""LoRA adapters out of qwen_jax: the diffusers / PEFT safetensors layout.

Keys are diffusers module names with `lora_A` / `lora_B` (PEFT), prefixed `transformer.` as
`QwenImagePipeline.load_lora_weights` expects:

    transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight   (r, in)
    transformer.transformer_blocks.{i}.attn.to_q.lora_B.weight   (out, r)

The scale alpha / r is folded into lora_B, so loaders that assume alpha = r apply it exactly.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from qwen_jax.conversion import transformer_keys as keymap
from qwen_jax.conversion.safetensors_io import write_safetensors
from qwen_jax.pytree import flatten_params

PREFIX = "transformer."


def lora_state_dict(model) -> dict[str, np.ndarray]:
    """{diffusers/PEFT key: array} of every adapter in `model` (a QwenImageTransformer with LoRA)."""
    cfg = model.config
    if not cfg.lora_rank:
        raise ValueError("the model has no LoRA adapters (lora_rank=0)")
    flat = flatten_params(nnx.state(model, nnx.LoRAParam))
    out = {}
    for path, a in flat.items():
        if path[-1] != "lora_a":
            continue
        a, b = np.asarray(a), np.asarray(flat[path[:-1] + ("lora_b",)])
        b = (b.astype(np.float32) * cfg.lora_scale).astype(b.dtype)
        layers = range(a.shape[0]) if path[0] == keymap.BLOCKS else [None]
        for layer in layers:
            weight_key = keymap.torch_key(path[:-1] + ("kernel",), layer)  # "<module>.weight"
            module = PREFIX + weight_key[: -len(".weight")]
            a_l, b_l = (a, b) if layer is None else (a[layer], b[layer])
            out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a_l.T)
            out[f"{module}.lora_B.weight"] = np.ascontiguousarray(b_l.T)
    return out


def save_lora(model, path: str | os.PathLike) -> None:
    """Writes the adapters as one diffusers/PEFT-style .safetensors file (atomically)."""
    tensors = lora_state_dict(model)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write_safetensors(tmp, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__,
                          {"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
