"""Transformer weight conversion, both directions, streaming one tensor at a time.

diffusers/ComfyUI safetensors  --diffusers_to_flax-->  transformer folder (config.json + orbax)
transformer folder             --flax_to_diffusers-->  diffusers folder (config.json + shards + index)

Conversion is strict: every source key must map to exactly one Flax parameter slot, every slot
must be filled once, and every shape must agree; otherwise nothing is written and the error
names the missing, unexpected and wrong-shape keys.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np
from tqdm.auto import tqdm

from qwen_jax import checkpoints
from qwen_jax.conversion import transformer_keys as keymap
from qwen_jax.conversion.errors import ConversionError
from qwen_jax.conversion.plan import Plan, assemble_leaf, plan_conversion
from qwen_jax.conversion.component import write_component
from qwen_jax.conversion.safetensors_io import write_safetensors
from qwen_jax.conversion.sources import open_source
from qwen_jax.models.config import TransformerConfig
from qwen_jax.models.transformer import abstract_params
from qwen_jax.pytree import flatten_params, unflatten_params

WEIGHTS_NAME = "diffusion_pytorch_model"


def plan_transformer(cfg: TransformerConfig, shapes: Mapping[str, tuple[int, ...]]) -> Plan:
    """Matches source keys {key: torch shape} to the Flax tree of `cfg`; raises on any mismatch."""
    expected = {path: tuple(s.shape) for path, s in abstract_params(cfg).items()}
    return plan_conversion(expected, shapes, keymap.TABLE)


def state_dict_to_params(cfg: TransformerConfig, state_dict: Mapping[str, np.ndarray], dtype=None) -> dict:
    """In-memory conversion of a {diffusers key: numpy array} dict to the nested Flax params."""
    plan = plan_transformer(cfg, {k: tuple(v.shape) for k, v in state_dict.items()})
    return unflatten_params({leaf.path: assemble_leaf(leaf, state_dict.__getitem__, dtype) for leaf in plan.leaves})


def params_to_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """In-memory inverse of `state_dict_to_params`: nested Flax params -> {diffusers key: array}."""
    out = {}
    for path, value in flatten_params(params).items():
        value = np.asarray(value)
        for layer, key, transpose in keymap.torch_keys_for(path, value.shape):
            v = value[layer] if layer is not None else value
            out[key] = np.ascontiguousarray(v.T if transpose else v)
    return out


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> TransformerConfig:
    """Architecture read off tensor shapes, for single files that come without a config.json."""
    try:
        inner, in_channels = shapes["img_in.weight"]
        head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        joint = shapes["txt_in.weight"][1]
        out_features = shapes["proj_out.weight"][0]
    except KeyError as e:
        raise ConversionError(f"not a Qwen-Image transformer checkpoint: no tensor {e.args[0]!r}") from None
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    if head_dim != 128:
        raise ConversionError(
            f"cannot infer axes_dims_rope for head_dim {head_dim} from the weights; pass --config CONFIG_JSON")
    return TransformerConfig(
        in_channels=in_channels, out_channels=out_features // 4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim, joint_attention_dim=joint, axes_dims_rope=(16, 56, 56))


def _config_from(source_config: dict | None, override: str | os.PathLike | None, shapes) -> TransformerConfig:
    try:
        if override is not None:
            with open(override) as f:
                return TransformerConfig.from_diffusers_config(json.load(f))
        if source_config is not None:
            return TransformerConfig.from_diffusers_config(source_config)
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
        raise ConversionError(f"bad transformer config: {e}") from None
    return infer_config(shapes)


def diffusers_to_flax(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    config: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TransformerConfig:
    """Converts a diffusers or ComfyUI transformer checkpoint into a transformer folder at `dst`.

    dtype: output parameter dtype (default: keep each tensor's stored dtype, e.g. bf16 stays bf16).
    config: a diffusers config.json to use instead of the one found with (or inferred from) `src`.
    """
    source = open_source(src)
    shapes = {k: info.shape for k, info in source.tensors.items()}
    cfg = _config_from(source.config, config, shapes)
    plan = plan_transformer(cfg, shapes)
    with checkpoints.atomic_output_dir(dst, overwrite=overwrite) as tmp:
        write_component(tmp, cfg.to_diffusers_config(), source, plan, dtype, progress, desc="transformer")
    return cfg


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(size).upper())
    if not m:
        raise ConversionError(f"bad shard size {size!r} (use e.g. 5GB, 500MB or a byte count)")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * unit)


def flax_to_diffusers(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Writes a transformer folder back as a diffusers folder (config.json, shards, index json)."""
    cfg = checkpoints.read_config(src)
    stored = checkpoints.param_metadata(src)
    checkpoints.check_stored_params(src, stored, {p: tuple(v.shape) for p, v in abstract_params(cfg).items()})
    limit = _parse_size(max_shard_size)

    # Tensors in leaf order, so that each shard needs at most a couple of stored leaves at a time.
    entries = []  # (diffusers key, torch shape, dtype, leaf path, layer, transpose)
    for path, (shape, stored_dtype) in stored.items():
        out_dtype = np.dtype(dtype) if dtype else stored_dtype
        for layer, key, transpose in keymap.torch_keys_for(path, shape):
            slice_shape = shape[1:] if layer is not None else shape
            entries.append((key, tuple(reversed(slice_shape)) if transpose else slice_shape, out_dtype,
                            path, layer, transpose))
    shards, current, size = [], [], 0
    for e in entries:
        nbytes = int(np.prod(e[1])) * e[2].itemsize
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += nbytes
    shards.append(current)

    cache: dict = {}

    def leaf(path):
        if path not in cache:
            cache.clear()  # keep one stored leaf in memory
            shape, stored_dtype = stored[path]
            cache[path] = checkpoints.read_param(src, path, shape, stored_dtype)
        return cache[path]

    by_key = {e[0]: e for e in entries}

    def produce(key):
        _, _, out_dtype, path, layer, transpose = by_key[key]
        v = leaf(path)
        v = v[layer] if layer is not None else v
        return (v.T if transpose else v).astype(out_dtype, copy=False)

    n = len(shards)
    names = [f"{WEIGHTS_NAME}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    with checkpoints.atomic_output_dir(dst, overwrite=overwrite) as tmp:
        with open(tmp / "config.json", "w") as f:
            json.dump(cfg.to_diffusers_config(), f, indent=2, sort_keys=True)
        for name, shard in tqdm(list(zip(names, shards)), desc="write shards", disable=not progress):
            write_safetensors(tmp / name, [(e[0], e[1], e[2]) for e in shard], produce, {"format": "pt"})
        index = {
            "metadata": {"total_size": sum(int(np.prod(e[1])) * e[2].itemsize for e in entries)},
            "weight_map": {e[0]: name for name, shard in zip(names, shards) for e in shard},
        }
        with open(tmp / f"{WEIGHTS_NAME}.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)

